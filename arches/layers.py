"""Small layers the blocks share: convs, squeeze-excitation, drop-path (stochastic depth)."""
from __future__ import annotations

import torch
from torch import nn


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def se_channels(channels: int, ratio: float, divisor: int) -> int:
    """SE hidden width: channels * ratio to the nearest multiple of divisor, at least divisor (timm's rule)."""
    return max(divisor, int(channels * ratio + divisor / 2) // divisor * divisor)


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(relu(fc1(mean over H, W of x)))): per-channel gates from global context (Hu et al. 2018)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden, 1)     # 1x1 convs with bias: timm's names and shapes
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))
        return x * torch.sigmoid(self.fc2(s))


class DropPath(nn.Module):
    """In training, each sample's x is 0 with probability p, else x / (1 - p) (stochastic depth); eval: x."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep.div_(1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p:.4f}"
