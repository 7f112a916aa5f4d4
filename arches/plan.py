"""Spec -> plan: every block's class, settings, channels, stride and spatial size, checked before any tensor.

The compiler builds exactly this plan; complexity, lesions and reports read it too.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from pydantic import ValidationError

from .blocks import block_class
from .errors import Locator, SpecError, located
from .registry import PLACEMENTS
from .schema import MAX_BLOCK_CHANNELS, MAX_BLOCKS, BlockSpec, Spec
from .stems import stem_strides

# drop_path.schedule -> drop probability of block l of L (1-based) for drop_path.rate
DROP_PATH_SCHEDULES = {
    "linear": lambda rate, l, n: rate * l / n,                            # Huang et al. 2016
    "linear_from_zero": lambda rate, l, n: rate * (l - 1) / max(n - 1, 1),  # timm's ResNets
    "constant": lambda rate, l, n: rate,
}


@dataclass(frozen=True)
class BlockPlan:
    name: str            # module name, torchvision style: 'layer2.0'
    stage: int           # 0-based stage index
    index: int           # 0-based index in its stage
    cls: type            # the registered block class
    cfg: BlockSpec       # resolved settings (spec defaults < stage overrides < block overrides)
    in_channels: int
    width: int           # after the spec's width_multiplier
    out_channels: int
    stride: int
    in_size: int         # spatial side entering the block
    out_size: int
    drop_path: float = 0.0  # drop-path probability of its branch in training (stochastic depth)


@dataclass(frozen=True)
class NetworkPlan:
    stem_channels: int
    stem_size: int       # spatial side after the stem
    blocks: tuple[BlockPlan, ...]
    out_channels: int    # channels reaching the head
    final_bn: bool       # the last block's placement leaves its sum unnormalised: BN before the head ...
    final_relu: bool     # ... and ReLU (pre-activation)


def _fail(spec: Spec, path: tuple, message: str) -> SpecError:
    return (getattr(spec, "_source", None) or Locator("<spec>")).error(message, *path)


def scaled(width: int, multiplier: float) -> int:
    return max(1, round(width * multiplier))


def conv_out(size: int, stride: int) -> int:
    """Side after a 3x3 (pad 1) or 1x1 conv with this stride."""
    return (size - 1) // stride + 1


def stem_size(spec: Spec) -> int:
    """Side after the stem: its conv, then its pool (both pad so that the side is ceil(size / stride))."""
    conv_stride, pool_stride = stem_strides(spec)
    return conv_out(conv_out(spec.input.size, conv_stride), pool_stride)


def resolve_block(spec: Spec, stage_index: int, block_index: int) -> BlockSpec:
    """Spec-wide block defaults < stage `block:` < stage `blocks: {i: ...}`, validated."""
    stage = spec.stages[stage_index]
    merged = {**spec.block.model_dump(exclude_unset=False), **stage.block, **stage.blocks.get(block_index, {})}
    try:
        cfg = BlockSpec.model_validate(merged)
    except ValidationError as e:
        key = next((str(err["loc"][0]) for err in e.errors() if err["loc"]), "")
        where = ("blocks", block_index) if key in stage.blocks.get(block_index, {}) else ("block",)
        raise located(e, BlockSpec, getattr(spec, "_source", None) or Locator("<spec>"), merged,
                      prefix=("stages", stage_index, *where)) from None
    try:
        cls = block_class(cfg.type)
    except KeyError as e:
        where = ("blocks", block_index) if "type" in stage.blocks.get(block_index, {}) else \
            ("block",) if "type" in stage.block else None
        path = ("stages", stage_index, *where, "type") if where else ("block", "type")
        raise _fail(spec, path, e.args[0]) from None
    return cls.settings(cfg)


def plan_network(spec: Spec) -> NetworkPlan:
    """Resolve and check every block. Raises SpecError naming the key at fault."""
    m = spec.width_multiplier
    total = sum(stage.depth for stage in spec.stages)
    if total > MAX_BLOCKS:
        raise _fail(spec, ("stages",), f"{total:,} blocks in all; at most {MAX_BLOCKS:,} (ResNet-1202 has 600)")
    channels, size = scaled(spec.stem.width, m), stem_size(spec)
    if channels > MAX_BLOCK_CHANNELS:
        raise _fail(spec, ("stem", "width"), f"{channels:,} channels after width_multiplier; at most "
                                             f"{MAX_BLOCK_CHANNELS:,}")
    stem_channels, stem_side = channels, size
    factor = stem_strides(spec)[0] * stem_strides(spec)[1]   # total downsampling so far
    blocks: list[BlockPlan] = []
    for s, stage in enumerate(spec.stages):
        for i in stage.blocks:
            if not 0 <= i < stage.depth:
                raise _fail(spec, ("stages", s, "blocks", i), f"block index {i} out of range: the stage has "
                                                               f"{stage.depth} blocks")
        for i in range(stage.depth):
            cfg = resolve_block(spec, s, i)
            cls = block_class(cfg.type)
            stride = stage.stride if i == 0 else 1
            factor *= stride
            if stride > size:
                raise _fail(spec, ("stages", s, "stride"),
                            f"input {spec.input.size}x{spec.input.size} is too small for the strides: stage {s} "
                            f"receives {size}x{size} and strides by {stride} (need input.size >= {factor})")
            width = scaled(stage.width, m)
            problem = cls.problem(channels, width, stride, cfg)
            if problem:
                key, message = problem
                where = ("blocks", i, key) if key in stage.blocks.get(i, {}) else ("block", key) \
                    if key in stage.block else None
                raise _fail(spec, ("stages", s, *where) if where else ("block", key),
                            f"stage {s} block {i}: {message}")
            out = cls.out_channels(width, cfg)
            widest = max(out, round(width * cfg.widen * cfg.base_width / 64) * cfg.cardinality)
            if widest > MAX_BLOCK_CHANNELS:
                raise _fail(spec, ("stages", s, "width"),
                            f"stage {s} block {i} would have {widest:,} channels (the width after width_multiplier, "
                            f"widen, expansion, base_width and cardinality); at most {MAX_BLOCK_CHANNELS:,}")
            new_size = conv_out(size, stride)
            blocks.append(BlockPlan(f"layer{s + 1}.{i}", s, i, cls, cfg, channels, width, out, stride, size,
                                    new_size))
            channels, size = out, new_size
    if not blocks:
        raise _fail(spec, ("stages",), "every stage has depth 0: the network has no blocks")
    schedule, rate = DROP_PATH_SCHEDULES[spec.drop_path.schedule], spec.drop_path.rate
    if rate > 0:
        blocks = [replace(b, drop_path=schedule(rate, n, len(blocks))) for n, b in enumerate(blocks, 1)]
    last = PLACEMENTS.lookup(blocks[-1].cfg.placement)
    return NetworkPlan(stem_channels, stem_side, tuple(blocks), channels, last.final_bn, last.final_relu)
