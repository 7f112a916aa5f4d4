"""Shortcut options: what a block adds its branch to where the shape changes (`block.shortcut`).

He et al. 2015, Sec. 3.3 (spatial and channel mismatch handled apart):
  A: stride subsample + zero-pad the new channels (no parameters)
  B: 1x1 conv (strided) + BN, only where the shape changes; identity elsewhere
  C: 1x1 conv + BN on every block
  D: 2x2 avg-pool (where strided) then 1x1 conv + BN, only where the shape changes (Bag of Tricks "ResNet-D")
Projections drop their BN with `projection_bn: false` (full pre-activation's own choice). Module names follow
torchvision: the shortcut is the block's `downsample`, a Sequential (conv `.0`, BN `.1`; D: pool `.0`).
"""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import conv1x1
from .registry import SHORTCUTS
from .schema import BlockSpec


class ZeroPadShortcut(nn.Module):
    """Option A: x[:, :, ::s, ::s] with zero channels up to out_channels, appended or split around x's."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, split: bool = False):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"option A cannot reduce channels ({in_channels} -> {out_channels})")
        extra = out_channels - in_channels
        before = extra // 2 if split else 0
        self.extra, self.stride, self.pad = extra, stride, (0, 0, 0, 0, before, extra - before)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, self.pad) if self.extra else x


def projection(in_channels: int, out_channels: int, stride: int, norm: bool,
               pool: Optional[nn.Module] = None) -> nn.Sequential:
    """[pool], 1x1 conv (strided unless pooled), [BN]."""
    conv = conv1x1(in_channels, out_channels, 1 if pool is not None else stride)
    bn = [nn.BatchNorm2d(out_channels)] if norm else []
    return nn.Sequential(*([pool] if pool is not None else []), conv, *bn)


class Shortcut:
    """Base of the shortcut options: None (the identity) unless the shape changes or `always`."""
    name: ClassVar[str] = ""
    always: ClassVar[bool] = False               # a module on every block, not only where the shape changes

    @classmethod
    def build(cls, in_channels: int, out_channels: int, stride: int, cfg: BlockSpec) -> Optional[nn.Module]:
        if not (cls.always or stride != 1 or in_channels != out_channels):
            return None
        return cls.make(in_channels, out_channels, stride, cfg)

    @classmethod
    def make(cls, in_channels: int, out_channels: int, stride: int, cfg: BlockSpec) -> nn.Module:
        return projection(in_channels, out_channels, stride, bool(cfg.projection_bn))

    @classmethod
    def problem(cls, in_channels: int, out_channels: int) -> Optional[str]:
        """Why this option cannot join these channel counts, or None."""
        return None


@SHORTCUTS.register("A")
class ZeroPad(Shortcut):
    """Subsample + zero channels: no parameters (He et al. 2015 option A)."""

    @classmethod
    def make(cls, in_channels, out_channels, stride, cfg):
        return ZeroPadShortcut(in_channels, out_channels, stride, split=cfg.zero_pad == "split")

    @classmethod
    def problem(cls, in_channels, out_channels):
        if out_channels < in_channels:
            return (f"shortcut A (zero-pad) cannot reduce channels {in_channels} -> {out_channels}; "
                    f"use B, C or D for this block")
        return None


@SHORTCUTS.register("B")
class Project(Shortcut):
    """1x1 projection where the shape changes (option B)."""


@SHORTCUTS.register("C")
class ProjectAlways(Shortcut):
    """1x1 projection on every block (option C)."""
    always = True


@SHORTCUTS.register("D")
class PoolProject(Shortcut):
    """2x2 average pool, then a 1x1 projection, where the shape changes (ResNet-D, timm's avg_down)."""

    @classmethod
    def make(cls, in_channels, out_channels, stride, cfg):
        pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
        return projection(in_channels, out_channels, stride, bool(cfg.projection_bn), pool)
