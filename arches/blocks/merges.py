"""Merges (`block.variant`): how a block joins its branch f and its shortcut s (He et al. 2016, Fig. 2 / Table 1).

A merge may own layers (a gate), registered on the block under torchvision-style names, and may replace the
block's shortcut option (the 1x1 conv shortcut).
"""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import SHORTCUTS, VARIANTS
from ..schema import BlockSpec
from ..shortcuts import projection

Tensor = torch.Tensor


class Merge:
    """Base of the merges: y = f + s, the shortcut built from the block's `shortcut` option."""
    name: ClassVar[str] = ""

    def problem(self, cfg: BlockSpec, in_channels: int, out_channels: int) -> Optional[str]:
        return SHORTCUTS.lookup(cfg.shortcut).problem(in_channels, out_channels)

    def shortcut(self, b, cfg: BlockSpec) -> Optional[nn.Module]:
        return SHORTCUTS.lookup(cfg.shortcut).build(b.in_channels, b.out_ch, b.stride, cfg)

    def attach(self, b, cfg: BlockSpec) -> None:
        """Add this merge's own layers to the block."""

    def init(self, b, cfg: BlockSpec) -> None:
        """Initialise them (after the network-wide init)."""

    def join(self, b, f: Tensor, s: Tensor, x: Tensor) -> Tensor:
        return f + s


class NoShortcut(Merge):
    """y = f: a plain block (not registered: `plain` blocks use it whatever `variant` says)."""

    def problem(self, cfg, in_channels, out_channels):
        return None

    def shortcut(self, b, cfg):
        return None

    def join(self, b, f, s, x):
        return f


@VARIANTS.register("identity")
class Identity(Merge):
    """f + s."""


@VARIANTS.register("scaling")
class Scaling(Merge):
    """scale * s + f, or scale * s + (1 - scale) * f with `scale_residual`."""

    def join(self, b, f, s, x):
        return b.cfg.scale * s + ((1 - b.cfg.scale) if b.cfg.scale_residual else 1.0) * f


@VARIANTS.register("exclusive_gate")
class ExclusiveGate(Merge):
    """g f + (1 - g) s, g = sigmoid(1x1 conv of x + `gate_bias`) (highway-style gating)."""

    def attach(self, b, cfg):
        b.gate = nn.Conv2d(b.in_channels, b.out_ch, 1, stride=b.stride, bias=True)

    def init(self, b, cfg):
        nn.init.constant_(b.gate.bias, cfg.gate_bias)

    def join(self, b, f, s, x):
        g = torch.sigmoid(b.gate(x))
        return g * f + (1 - g) * s


@VARIANTS.register("shortcut_gate")
class ShortcutGate(ExclusiveGate):
    """f + (1 - g) s: only the shortcut is gated."""

    def join(self, b, f, s, x):
        return f + (1 - torch.sigmoid(b.gate(x))) * s


@VARIANTS.register("conv")
class ConvShortcut(Merge):
    """f + conv1x1(x) on every block, whatever `shortcut` says."""

    def problem(self, cfg, in_channels, out_channels):
        return None

    def shortcut(self, b, cfg):
        return projection(b.in_channels, b.out_ch, b.stride, norm=False)


@VARIANTS.register("dropout")
class ShortcutDropout(Merge):
    """f + dropout(s) with probability `shortcut_dropout`."""

    def join(self, b, f, s, x):
        return f + F.dropout(s, b.cfg.shortcut_dropout, b.training)
