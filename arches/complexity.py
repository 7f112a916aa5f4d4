"""Params, MACs and activations of a spec, in total and per stage and block.

MACs are multiply-adds of convolutions and linear layers (the papers' and torchvision's convention), taken
from torch's FlopCounterMode (FLOPs / 2). Activations are the output elements of those layers (fvcore's
convention). The network is built on the meta device, so even ResNet-152 costs no memory or compute.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .compile import Network, build_model
from .plan import NetworkPlan
from .schema import Spec


@dataclass
class Row:
    name: str                 # 'stem', 'layer1', 'layer1.0', 'head'
    kind: str                 # block type, or 'stem' / 'stage' / 'head'
    out_shape: tuple          # (C, H, W) of its output, or (classes,)
    params: int
    macs: int
    acts: int
    blocks: int = 1           # number of blocks (stages)


@dataclass
class Complexity:
    name: str
    input_shape: tuple        # (C, H, W)
    params: int
    macs: int
    acts: int
    stages: list[Row] = field(default_factory=list)   # stem, layer1..N, head
    blocks: list[Row] = field(default_factory=list)   # every block

    def to_dict(self) -> dict:
        return asdict(self)


def _count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def complexity(spec: Spec, model: Network | None = None, plan: NetworkPlan | None = None) -> Complexity:
    """Measure one forward pass of a single image at the spec's input size (of `model`, else of the network
    built on the meta device from `plan`, else from the spec)."""
    if model is None:
        with torch.device("meta"):
            model = build_model(spec, plan)
    device = next(model.parameters()).device
    shape = (spec.input.channels, spec.input.size, spec.input.size)
    acts: dict[str, int] = {}
    outputs: dict[str, tuple] = {}
    hooks = []
    named = dict(model.named_modules())
    tracked = {"stem": model.maxpool, "head": model.fc, **{n: named[n] for n in model.stage_names},
               **dict(model.blocks())}

    def count_acts(name):
        def hook(_m, _i, out):
            acts[name] = acts.get(name, 0) + out[0].numel()
        return hook

    def keep_shape(name):
        def hook(_m, _i, out):
            outputs[name] = tuple(out.shape[1:])
        return hook

    for name, module in named.items():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_hook(count_acts(name)))
    for name, module in tracked.items():
        hooks.append(module.register_forward_hook(keep_shape(name)))
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    try:
        with counter, torch.no_grad():
            model(torch.zeros((1, *shape), device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)

    prefix = type(model).__name__
    flops = {k[len(prefix) + 1:] if k.startswith(prefix + ".") else k: sum(v.values())
             for k, v in counter.get_flop_counts().items()}

    acts_under: dict[str, int] = {}        # activations summed into every enclosing module's name, in one pass
    for key, count in acts.items():
        parts = key.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            acts_under[name] = acts_under.get(name, 0) + count

    def under(names: list[str]) -> tuple[int, int]:
        macs = sum(flops.get(n, 0) for n in names) // 2      # the counter already sums each module's children
        return macs, sum(acts_under.get(n, 0) for n in names)

    stem_names = ["conv1", "bn1", "maxpool"]      # maxpool: a conv in ResNet-RS
    head_names = [n for n in ("final_bn", "fc") if getattr(model, n, None) is not None]
    rows = []
    macs, act = under(stem_names)
    rows.append(Row("stem", spec.stem.type, outputs["stem"],
                    sum(_count_params(named[n]) for n in stem_names), macs, act))
    for s in model.stage_names:
        macs, act = under([s])
        rows.append(Row(s, "stage", outputs[s], _count_params(named[s]), macs, act, len(named[s])))
    macs, act = under(head_names)
    rows.append(Row("head", spec.head.pool, outputs["head"], sum(_count_params(named[n]) for n in head_names),
                    macs, act))
    blocks = []
    for name, block in model.blocks():
        macs, act = under([name])
        blocks.append(Row(name, block.name, outputs[name], _count_params(block), macs, act))
    return Complexity(spec.name, shape, _count_params(model), counter.get_total_flops() // 2,
                      sum(acts.values()), rows, blocks)
