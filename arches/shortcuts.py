"""Shortcut paths: what a block adds its branch to.

Options when the shape changes (He et al. 2015, Sec. 3.3), spatial and channel mismatch handled apart:
  A: stride subsample + zero-pad the new channels (no parameters)
  B: 1x1 conv (strided) + BN, only where the shape changes; identity elsewhere
  C: 1x1 conv + BN on every block
  D: 2x2 avg-pool (where strided) then 1x1 conv + BN (Bag of Tricks "ResNet-D")
The He et al. 2016 variant `conv` puts a bare 1x1 conv on every block's shortcut.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ZeroPadShortcut(nn.Module):
    """Option A: x[:, :, ::s, ::s] with zero channels appended up to out_channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"option A cannot reduce channels ({in_channels} -> {out_channels})")
        self.extra, self.stride = out_channels - in_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x


def make_shortcut(option: str, variant: str, in_channels: int, out_channels: int,
                  stride: int) -> nn.Module | None:
    """The shortcut module for one block (None = identity), named `downsample` as in torchvision."""
    changes = stride != 1 or in_channels != out_channels
    if variant == "conv":
        return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False))
    if option == "A":
        return ZeroPadShortcut(in_channels, out_channels, stride) if changes else None
    if option == "B" and not changes:
        return None
    if option == "D":
        pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
        return nn.Sequential(pool, nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_channels))


def shortcut_problem(option: str, variant: str, in_channels: int, out_channels: int) -> str | None:
    """Why this shortcut cannot join these shapes, or None."""
    if variant != "conv" and option == "A" and out_channels < in_channels:
        return (f"shortcut A (zero-pad) cannot reduce channels {in_channels} -> {out_channels}; "
                f"use B, C or D for this block")
    return None
