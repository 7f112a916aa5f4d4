"""What every block shares: a chain of conv-BN pairs, BN/ReLU placement, the shortcut and how it merges.

A block subclass only says which convs it has (`layers`) and how wide its output is; this class runs them
in the placement asked for (He et al. 2016, Fig. 4):
  original          x -> conv-BN-ReLU-...-conv-BN -> (+ shortcut) -> ReLU
  bn_after_add      x -> conv-BN-ReLU-...-conv    -> (+ shortcut) -> BN -> ReLU
  relu_before_add   x -> conv-BN-ReLU-...-conv-BN-ReLU -> (+ shortcut)
  relu_preact       x -> ReLU-conv-BN-...-ReLU-conv-BN -> (+ shortcut)
  full_preact       x -> BN-ReLU-conv-...-BN-ReLU-conv -> (+ shortcut)
and merges branch f and shortcut s by the shortcut variant (identity f + s, scaling, gating, dropout).
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..schema import BlockSpec
from ..shortcuts import ZeroPadShortcut, make_shortcut, shortcut_problem

PREACT = ("relu_preact", "full_preact")


class Block(nn.Module):
    """Base of every registered block. Subclasses set `layers`, `out_channels()` and their own defaults."""

    name: ClassVar[str] = ""                      # the YAML `type:` (set by @register)
    residual: ClassVar[bool] = True               # has a shortcut added to its branch
    default_placement: ClassVar[str] = "original"
    placements: ClassVar[tuple[str, ...]] = ("original", "bn_after_add", "relu_before_add", "relu_preact",
                                                "full_preact")
    forced: ClassVar[dict] = {}                   # settings this type always has (e.g. highway's gate)

    # --- the plan side: sizes and checks, no tensors -------------------------------------------------------
    @classmethod
    def settings(cls, cfg: BlockSpec) -> BlockSpec:
        """cfg with this type's forced settings and default placement filled in."""
        updates = dict(cls.forced)
        if cfg.placement is None:
            updates["placement"] = cls.default_placement
        return cfg.model_copy(update=updates) if updates else cfg

    @classmethod
    def out_channels(cls, width: int, cfg: BlockSpec) -> int:
        return width

    @classmethod
    def problem(cls, in_channels: int, width: int, stride: int, cfg: BlockSpec) -> tuple[str, str] | None:
        """(key, message) when this block cannot be built with these sizes, else None."""
        if cfg.placement not in cls.placements:
            return "placement", (f"block type '{cls.name}' supports placements {', '.join(cls.placements)}, "
                                 f"not '{cfg.placement}'")
        if cls.residual:
            msg = shortcut_problem(cfg.shortcut, cfg.variant, in_channels, cls.out_channels(width, cfg))
            if msg:
                return "shortcut", msg
        return None

    # --- the module side --------------------------------------------------------------------------------
    def __init__(self, in_channels: int, width: int, stride: int, cfg: BlockSpec):
        super().__init__()
        self.cfg = cfg = self.settings(cfg)
        self.placement = cfg.placement
        self.in_channels, self.stride = in_channels, stride
        self.out_ch = self.out_channels(width, cfg)
        self.relu = nn.ReLU(inplace=False)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    def add_layers(self, convs: list[nn.Conv2d]) -> None:
        """Register conv1/bn1, conv2/bn2, ... (torchvision names); BN width follows the placement."""
        self.depth = len(convs)
        for i, conv in enumerate(convs, 1):
            channels = conv.in_channels if self.placement == "full_preact" else conv.out_channels
            setattr(self, f"conv{i}", conv)
            setattr(self, f"bn{i}", nn.BatchNorm2d(channels))
        if self.residual:
            self.downsample = make_shortcut(self.cfg.shortcut, self.cfg.variant, self.in_channels, self.out_ch,
                                            self.stride)
            if self.cfg.variant in ("exclusive_gate", "shortcut_gate"):
                self.gate = nn.Conv2d(self.in_channels, self.out_ch, 1, stride=self.stride, bias=True)
        else:
            self.downsample = None

    def init_residual(self) -> None:
        """After the generic init: gate biases, and the optional zero-init of the branch's last layer."""
        if getattr(self, "gate", None) is not None:
            nn.init.constant_(self.gate.bias, self.cfg.gate_bias)
        if self.residual and self.cfg.zero_init_residual:
            last = getattr(self, f"bn{self.depth}")
            if self.placement in ("original", "relu_preact", "relu_before_add"):
                nn.init.zeros_(last.weight)            # the branch ends in this BN: f(x) = 0
            else:
                nn.init.zeros_(getattr(self, f"conv{self.depth}").weight)  # it ends in the conv

    def branch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f(x) in this placement, and the tensor the shortcut reads (pre-activated x for full_preact)."""
        p, h, shortcut_in = self.placement, x, x
        for i in range(1, self.depth + 1):
            conv, bn = getattr(self, f"conv{i}"), getattr(self, f"bn{i}")
            last = i == self.depth
            if i > 1 and self.drop is not None:
                h = self.drop(h)
            if p == "full_preact":
                h = self.relu(bn(h))
                if i == 1 and self.downsample is not None:
                    shortcut_in = h                    # projections see the normalised input (He 2016 code)
                h = conv(h)
            elif p == "relu_preact":
                h = bn(conv(self.relu(h)))
            elif p == "relu_before_add":
                h = self.relu(bn(conv(h)))
            elif p == "bn_after_add" and last:
                h = conv(h)                            # its BN comes after the addition
            else:                                      # original, and bn_after_add's inner layers
                h = bn(conv(h))
                if not last:
                    h = self.relu(h)
        return h, shortcut_in

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """The shortcut path alone: what a lesion leaves of this block."""
        if self.residual and self.placement == "full_preact" and self.downsample is not None:
            x = self.relu(self.bn1(x))
        if self.residual and self.downsample is not None:
            return self.downsample(x)
        if self.stride != 1 or self.in_channels != self.out_ch:   # plain blocks: match the shape, no weights
            return ZeroPadShortcut(self.in_channels, self.out_ch, self.stride)(x) if self.out_ch >= self.in_channels \
                else x[:, : self.out_ch, :: self.stride, :: self.stride]
        return x

    def merge(self, f: torch.Tensor, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Join branch f and shortcut s as the variant says (x = block input, for gates)."""
        v = self.cfg.variant
        if v == "scaling":
            return self.cfg.scale * s + ((1 - self.cfg.scale) if self.cfg.scale_residual else 1.0) * f
        if v == "exclusive_gate":
            g = torch.sigmoid(self.gate(x))
            return g * f + (1 - g) * s
        if v == "shortcut_gate":
            return f + (1 - torch.sigmoid(self.gate(x))) * s
        if v == "dropout":
            return f + F.dropout(s, self.cfg.shortcut_dropout, self.training)
        return f + s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f, shortcut_in = self.branch(x)
        if not self.residual:
            return f if self.placement in PREACT else self.relu(f)
        s = shortcut_in if self.downsample is None else self.downsample(shortcut_in)
        y = self.merge(f, s, x)
        if self.placement == "original":
            return self.relu(y)
        if self.placement == "bn_after_add":
            return self.relu(getattr(self, f"bn{self.depth}")(y))
        return y


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
