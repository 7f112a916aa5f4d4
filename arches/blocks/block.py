"""What every block is: its branch (the type's convs) run in a placement, joined to its shortcut by a merge.

    y = placement.after(merge(drop_path(se(f(x))), shortcut(x)))

A block type (a subclass, one registry line) only says which convs its branch has and how wide its output
is; the placement (blocks/placements.py), the merge (blocks/merges.py, `variant`), the shortcut option
(arches/shortcuts.py), squeeze-excitation and drop-path are pieces chosen by name in the spec.
"""
from __future__ import annotations

from typing import ClassVar, Iterator, Optional

import torch
from torch import nn

from ..layers import DropPath, SqueezeExcite, se_channels
from ..registry import BLOCKS, PLACEMENTS, VARIANTS
from ..schema import BlockSpec
from ..shortcuts import ZeroPadShortcut
from . import placements  # noqa: F401  (registers the placements)
from .merges import Merge, NoShortcut


class Block(nn.Module):
    """Base of every registered block type: subclasses give `convs()` and, if not `width * widen`, `out_channels()`."""

    name: ClassVar[str] = ""                      # the YAML `type:` (set by the registry)
    residual: ClassVar[bool] = True               # has a shortcut merged with its branch
    placements: ClassVar[Optional[tuple[str, ...]]] = None  # the placements it can run; None = every registered one
    defaults: ClassVar[dict] = {"placement": "original"}  # settings filled in where the spec leaves them null
    forced: ClassVar[dict] = {}                   # settings this type always has (highway's gate)
    stride_positions: ClassVar[tuple[str, ...]] = ()  # values of `stride_on` it has (types with a 1x1 conv)

    # --- the plan side: settings, sizes and checks, no tensors ------------------------------------------------
    @classmethod
    def settings(cls, cfg: BlockSpec) -> BlockSpec:
        """cfg with this type's forced settings and its (and its placement's) defaults filled in."""
        updates = dict(cls.forced)
        updates.update({k: v for k, v in cls.defaults.items() if getattr(cfg, k) is None})
        placement = PLACEMENTS.get(updates.get("placement", cfg.placement))
        if cfg.projection_bn is None and placement is not None:
            updates["projection_bn"] = placement.projection_bn
        return cfg.model_copy(update=updates) if updates else cfg

    @classmethod
    def supported_placements(cls) -> tuple[str, ...]:
        return cls.placements if cls.placements is not None else tuple(PLACEMENTS)

    @classmethod
    def out_channels(cls, width: int, cfg: BlockSpec) -> int:
        return max(1, round(width * cfg.widen))

    @classmethod
    def merge_for(cls, cfg: BlockSpec) -> Merge:
        return VARIANTS.lookup(cfg.variant)() if cls.residual else NoShortcut()

    @classmethod
    def problem(cls, in_channels: int, width: int, stride: int, cfg: BlockSpec) -> Optional[tuple[str, str]]:
        """(key, message) when this block cannot be built with these sizes and settings, else None."""
        supported = cls.supported_placements()
        if cfg.placement not in supported:
            return "placement", (f"block type '{cls.name}' supports placements {', '.join(supported)}, "
                                 f"not '{cfg.placement}'")
        if cfg.stride_on is not None and cfg.stride_on not in cls.stride_positions:
            having = ", ".join(n for n, c in BLOCKS.items() if c.stride_positions)
            return "stride_on", (f"block type '{cls.name}' has no 1x1 conv to carry the stride (it strides its "
                                 f"first 3x3); stride_on applies to: {having}")
        message = cls.merge_for(cfg).problem(cfg, in_channels, cls.out_channels(width, cfg))
        return ("shortcut", message) if message else None

    @classmethod
    def convs(cls, in_channels: int, width: int, stride: int, cfg: BlockSpec) -> list[nn.Conv2d]:
        """The branch's convs in order; each gets a BN, named conv1/bn1, conv2/bn2, ... (torchvision)."""
        raise NotImplementedError

    # --- the module side ------------------------------------------------------------------------------------
    def __init__(self, in_channels: int, width: int, stride: int, cfg: BlockSpec, drop_path: float = 0.0):
        super().__init__()
        self.cfg = cfg = self.settings(cfg)
        self.in_channels, self.stride, self.out_ch = in_channels, stride, self.out_channels(width, cfg)
        self.placement = PLACEMENTS.lookup(cfg.placement)()
        self.merge = self.merge_for(cfg)
        convs = self.convs(in_channels, width, stride, cfg)
        self.depth = len(convs)
        for i, conv in enumerate(convs, 1):
            setattr(self, f"conv{i}", conv)
            setattr(self, f"bn{i}", nn.BatchNorm2d(self.placement.norm_channels(conv)))
        self.relu = nn.ReLU(inplace=False)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        self.downsample = self.merge.shortcut(self, cfg)
        self.merge.attach(self, cfg)
        self.se = SqueezeExcite(self.out_ch, se_channels(self.out_ch, cfg.se_ratio, cfg.se_divisor)) \
            if cfg.se_ratio > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 and self.residual else None

    def layers(self) -> Iterator[tuple[int, nn.Conv2d, nn.BatchNorm2d]]:
        """(i, conv_i, bn_i) for i = 1 .. depth."""
        for i in range(1, self.depth + 1):
            yield i, getattr(self, f"conv{i}"), getattr(self, f"bn{i}")

    def drop_before(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Block dropout on the input of conv i > 1."""
        return self.drop(h) if i > 1 and self.drop is not None else h

    def init_residual(self) -> None:
        """After the network-wide init: the merge's own layers, and the optional zero-init of the branch."""
        self.merge.init(self, self.cfg)
        if self.residual and self.cfg.zero_init_residual:
            nn.init.zeros_(getattr(self, f"{self.placement.zero_last}{self.depth}").weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f, s = self.placement.branch(self, x)
        if self.se is not None:
            f = self.se(f)
        if self.drop_path is not None:
            f = self.drop_path(f)
        if self.downsample is not None:
            s = self.downsample(s)
        return self.placement.after(self, self.merge.join(self, f, s, x))

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """The shortcut path alone: what a lesion leaves of this block."""
        if self.residual:
            s = self.placement.shortcut_input(self, x)
            return s if self.downsample is None else self.downsample(s)
        if self.out_ch >= self.in_channels:      # plain blocks: match the shape, no weights
            return ZeroPadShortcut(self.in_channels, self.out_ch, self.stride)(x)
        return x[:, : self.out_ch, :: self.stride, :: self.stride]


register = BLOCKS.register
