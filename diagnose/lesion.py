"""Lesion study (Veit et al. 2016): delete one block at a time from a trained network and measure accuracy.

Deleting block k replaces its forward by `Block.skip`, the shortcut path alone. For a residual block that is
the identity (or the projection / zero-pad shortcut where the shape changes); for a plain block it is the same
operation, which cuts the only path through that block. `lesioned` swaps the forward in place and restores
it on exit: no copy of the model is made.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from arches.errors import ReslabError, did_you_mean

from .gradients import named_blocks


def resolve_blocks(model: nn.Module, names: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The blocks called `names` ('layer2.0', ...; None = all), in network order. Unknown names: ReslabError."""
    blocks = named_blocks(model)
    if names is None:
        return blocks
    known = dict(blocks)
    for name in names:
        if name not in known:
            raise ReslabError(f"no block '{name}' in this network{did_you_mean(name, known)}; blocks are "
                              f"{', '.join(known) if len(known) <= 12 else ', '.join(list(known)[:12]) + ', ...'}",
                              path="--blocks")
    wanted = set(names)
    return [(n, b) for n, b in blocks if n in wanted]


@contextmanager
def lesioned(model: nn.Module, names: Iterable[str]) -> Iterator[nn.Module]:
    """Within the block, the named blocks compute only their shortcut (`block.skip`); restored on exit."""
    blocks = resolve_blocks(model, list(names))
    saved = []
    for _, block in blocks:
        if not hasattr(block, "skip"):
            raise ReslabError(f"block {type(block).__name__} has no skip path to leave when lesioned")
        saved.append((block, block.__dict__.get("forward")))
        block.forward = block.skip          # nn.Module.__call__ looks up self.forward: the instance wins
    try:
        yield model
    finally:
        for block, previous in saved:
            if previous is None:
                del block.forward
            else:
                block.forward = previous


def is_downsampling(block: nn.Module) -> bool:
    """The block changes the resolution or the channel count (its skip is not the identity)."""
    return getattr(block, "stride", 1) != 1 or getattr(block, "in_channels", None) != getattr(block, "out_ch", None)


@torch.no_grad()
def accuracy(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy of `model` (eval mode) over the (images, labels) batches."""
    correct = total = 0
    for images, labels in batches:
        correct += int((model(images).argmax(dim=1) == labels).sum())
        total += len(labels)
    if total == 0:
        raise ReslabError("no test images to measure accuracy on")
    return correct / total


@dataclass
class LesionRow:
    block: str          # 'layer2.0'; '' for the intact network
    downsampling: bool  # the block changes shape: its skip is a zero-pad / projection, not the identity
    residual: bool      # the block has a shortcut
    accuracy: float     # test accuracy with this block lesioned
    drop: float         # intact accuracy minus this one

    def to_dict(self) -> dict:
        return asdict(self)


def lesion_study(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 names: Sequence[str] | None = None) -> tuple[float, list[LesionRow]]:
    """(intact accuracy, one row per lesioned block): each block deleted alone, the rest intact (eval mode)."""
    blocks = resolve_blocks(model, names)
    was_training = model.training
    model.eval()
    try:
        intact = accuracy(model, batches)
        rows = []
        for name, block in blocks:
            with lesioned(model, [name]):
                acc = accuracy(model, batches)
            rows.append(LesionRow(name, is_downsampling(block), bool(getattr(block, "residual", False)), acc,
                                  intact - acc))
    finally:
        model.train(was_training)
    return intact, rows
