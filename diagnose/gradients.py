"""Gradient diagnostics at one state of a network: per-block gradient norms and shattered-gradient correlation.

Two measurements, both on real images:
  * block gradient norms: ||dL/dh_k|| for the output h_k of every block k, L = mean cross-entropy on a batch.
    A steady slope across depth shows vanishing (norms shrink toward the input) or exploding gradients.
  * gradient correlation (Balduzzi et al. 2017, "The Shattered Gradients Problem"): walk a straight line of
    `points` inputs between two images, take the gradient of one fixed scalar output (a fixed random projection
    of the logits, or one logit) with respect to the input at each point, and average the cosine similarity of
    the gradients at neighbouring points. Smooth (brown-noise) gradients give ~1; shattered (white-noise)
    gradients of deep plain nets give ~0.

BatchNorm (`bn`): "batch" runs every BN on batch statistics, all points of the path in one batch, as in the
paper (the points then share statistics; running statistics are left untouched); "eval" uses running
statistics, so every point is independent (at initialisation call `calibrate_bn` first, or the statistics are
the untrained 0/1). Dropout is always off.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Literal, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from arches.errors import ReslabError

BNMode = Literal["batch", "eval"]
BN_MODES = ("batch", "eval")
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@contextmanager
def bn_mode(model: nn.Module, mode: BNMode) -> Iterator[nn.Module]:
    """Eval mode, except BN on batch statistics when mode == 'batch'; training flags and BN buffers restored."""
    if mode not in BN_MODES:
        raise ValueError(f"bn mode must be one of {BN_MODES}, not {mode!r}")
    flags = {m: m.training for m in model.modules()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    model.eval()
    if mode == "batch":
        for m in model.modules():
            if isinstance(m, _BN):
                m.train()
    try:
        yield model
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
        for m, flag in flags.items():
            m.train(flag)


@torch.no_grad()
def calibrate_bn(model: nn.Module, images: torch.Tensor) -> None:
    """Set every BN's running statistics to those of `images` (one cumulative pass), as training would."""
    flags = {m: m.training for m in model.modules()}
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None          # cumulative average: one pass gives exactly this batch's statistics
        m.train()
    try:
        model(images)
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        for m, flag in flags.items():
            m.train(flag)


def named_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The network's blocks in order: `Network.blocks()` for reslab networks, else every direct child."""
    if hasattr(model, "blocks"):
        return list(model.blocks())
    return list(model.named_children())


def block_gradient_norms(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                         bn: BNMode = "batch") -> list[tuple[str, float]]:
    """(block name, ||dL/d(block output)||) for every block, L = mean cross-entropy of `model` on the batch."""
    norms: dict[str, float] = {}
    handles = []

    def watch(name: str):
        def forward_hook(module, inputs, output):
            # a tensor hook sees the gradient of this very version of the output, even if a later layer
            # modifies it in place (the inplace ReLU of a pre-activation head)
            output.register_hook(lambda grad: norms.__setitem__(name, float(grad.detach().norm())))
        return forward_hook

    blocks = named_blocks(model)
    for name, block in blocks:
        handles.append(block.register_forward_hook(watch(name)))
    try:
        with bn_mode(model, bn), torch.enable_grad():
            x = images.detach().clone().requires_grad_(True)   # gradients flow to the input, not the weights
            loss = F.cross_entropy(model(x), labels)
            torch.autograd.grad(loss, x)
    finally:
        for h in handles:
            h.remove()
    return [(name, norms.get(name, float("nan"))) for name, _ in blocks]


def line_between(a: torch.Tensor, b: torch.Tensor, points: int) -> torch.Tensor:
    """`points` inputs evenly spaced on the segment from a to b (both ends included): shape (points, *a.shape)."""
    if points < 2:
        raise ValueError("a path needs at least 2 points")
    t = torch.linspace(0.0, 1.0, points, dtype=a.dtype, device=a.device).view(-1, *([1] * a.dim()))
    return (1 - t) * a.unsqueeze(0) + t * b.unsqueeze(0)


def path_gradients(fn: Callable[[torch.Tensor], torch.Tensor], path: torch.Tensor) -> torch.Tensor:
    """Gradient of the scalar fn(x_i) with respect to x_i at every point of `path`: shape (points, features).

    fn maps a batch (points, ...) to one scalar per point (points,). The gradient of their sum is taken, which
    is the per-point gradient whenever points do not interact (eval-mode BN); with batch-statistics BN it is
    the gradient through the shared statistics too, as in Balduzzi et al."""
    with torch.enable_grad():
        x = path.detach().clone().requires_grad_(True)
        out = fn(x)
        if out.shape != (x.shape[0],):
            raise ValueError(f"fn must return one scalar per point, shape ({x.shape[0]},), got {tuple(out.shape)}")
        (grad,) = torch.autograd.grad(out.sum(), x)
    return grad.reshape(grad.shape[0], -1)


def neighbour_correlation(grads: torch.Tensor, lag: int = 1, kind: str = "cosine") -> float:
    """Mean correlation between the gradient vectors of points `lag` apart on the path.

    kind 'cosine': cosine similarity of the raw vectors; 'pearson': of the vectors centred over their features."""
    if not 1 <= lag < grads.shape[0]:
        raise ValueError(f"lag must be in 1..{grads.shape[0] - 1}, not {lag}")
    g = grads.double()
    if kind == "pearson":
        g = g - g.mean(dim=1, keepdim=True)
    elif kind != "cosine":
        raise ValueError(f"kind must be 'cosine' or 'pearson', not {kind!r}")
    return float(F.cosine_similarity(g[:-lag], g[lag:], dim=1, eps=1e-30).mean())


def correlation_by_lag(grads: torch.Tensor, max_lag: int = 32, kind: str = "cosine") -> list[float]:
    """The paper's autocorrelation view: mean neighbour correlation at lags 1..max_lag."""
    return [neighbour_correlation(grads, lag, kind) for lag in range(1, min(max_lag, grads.shape[0] - 1) + 1)]


Readout = Union[Literal["projection"], int]


def parse_readout(text: str) -> Readout:
    """'projection' or a logit index given as text (the --readout flag); anything else: ReslabError."""
    if text == "projection":
        return "projection"
    if text.isascii() and text.isdecimal():
        return int(text)
    raise ReslabError(f"--readout must be 'projection' or a logit index, not '{text}'", path="--readout")


def readout_vector(classes: int, readout: Readout, seed: int) -> torch.Tensor:
    """The fixed direction a scalar output is read along: a seeded random unit vector, or one logit's axis."""
    if readout == "projection":
        g = torch.Generator().manual_seed(seed)
        r = torch.randn(classes, generator=g)
        return r / r.norm()
    index = int(readout)
    if not 0 <= index < classes:
        raise ReslabError(f"logit {index} out of range: the network has {classes} outputs", path="--readout")
    return F.one_hot(torch.tensor(index), classes).float()


def gradient_correlation(model: nn.Module, a: torch.Tensor, b: torch.Tensor, points: int = 256,
                         readout: Readout = "projection", seed: int = 0, bn: BNMode = "batch",
                         max_lag: int = 32) -> tuple[float, list[float]]:
    """(mean cosine correlation of neighbouring input gradients, correlation at lags 1..max_lag) along a->b."""
    path = line_between(a, b, points)

    def scalar(x: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        return logits @ readout_vector(logits.shape[1], readout, seed).to(logits)

    with bn_mode(model, bn):
        grads = path_gradients(scalar, path)
    return neighbour_correlation(grads), correlation_by_lag(grads, max_lag)


def network_depth(model: nn.Module) -> int:
    """Weighted layers on the main path, counted as the papers do: stem conv + every branch conv + classifier."""
    blocks = named_blocks(model)
    if not blocks or not all(hasattr(b, "depth") for _, b in blocks):
        return sum(1 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    return 2 + sum(int(b.depth) for _, b in blocks)


def is_residual(model: nn.Module) -> bool:
    """True when any block adds a shortcut to its branch."""
    return any(getattr(b, "residual", False) for _, b in named_blocks(model))


def pick_pair(labels: Sequence[int] | torch.Tensor, seed: int) -> tuple[int, int]:
    """Two indices of images with different labels (when there are two labels), chosen by seed."""
    labels = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g).tolist()
    first = order[0]
    for j in order[1:]:
        if labels[j] != labels[first]:
            return first, j
    return first, order[1]
