"""The loss landscape around a trained network (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets").

A direction d has one random Gaussian tensor per parameter, filter-normalised: every filter d_i (slice along the
first dimension of a weight; a row of a linear layer) is rescaled to the norm of the same filter of the trained
weights, d_i <- d_i / ||d_i|| * ||theta_i||, so a step of 1 moves every filter by its own size and networks of
different scales are comparable. Biases and BN weights (1-D parameters) get a zero direction, as the paper's
`--xignore biasbn`; with ignore='none' they move along themselves (d = theta), as its code does.

The loss is L(theta + a d1 + b d2), the mean of `loss` over a fixed set of training images, with every BN in eval
mode on the checkpoint's running statistics (Li et al. perturb the weights only, net.eval()): the centre of the
grid is then exactly the network that was trained and stored, and no grid point depends on the batch it is
evaluated in. Curvature along d is d^T H d = d^2/dt^2 L(theta + t d) at t = 0, computed exactly by autograd
(two backward passes through t), and on the 1-D line by second differences.

    d1 = random_direction(model, seed=0)
    loss = LossOnData(model, batches)                       # loss(params) -> (mean loss, accuracy)
    line = [loss(shifted(loss.theta, a, d1))[0] for a in alphas]
    c = curvature(loss, d1)
"""
from __future__ import annotations

from typing import Callable, Literal, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

Direction = dict[str, torch.Tensor]
Ignore = Literal["biasbn", "none"]
IGNORE = ("biasbn", "none")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def filter_normalised(direction: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`direction` with every filter (slice along dim 0) rescaled to the norm of the same filter of `weight`."""
    dims = tuple(range(1, direction.dim()))
    d_norm = torch.linalg.vector_norm(direction, dim=dims, keepdim=True)
    w_norm = torch.linalg.vector_norm(weight.detach(), dim=dims, keepdim=True)
    return direction * (w_norm / d_norm.clamp_min(1e-10))


def random_direction(model: nn.Module, seed: int, ignore: Ignore = "biasbn") -> Direction:
    """A filter-normalised random direction in the space of `model`'s parameters (name -> tensor).

    The Gaussian draws come from one CPU generator seeded `seed`, parameter after parameter in named order, so
    networks with the same parameter shapes get the same raw draws (the same direction per filter, scaled to
    each network's own filter norms)."""
    if ignore not in IGNORE:
        raise ValueError(f"ignore must be one of {IGNORE}, not {ignore!r}")
    g = torch.Generator().manual_seed(seed)
    out: Direction = {}
    for name, p in model.named_parameters():
        raw = torch.randn(p.shape, generator=g, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
        if p.dim() <= 1:
            out[name] = torch.zeros_like(p) if ignore == "biasbn" else p.detach().clone()
        else:
            out[name] = filter_normalised(raw, p)
    return out


def shifted(theta: Mapping[str, torch.Tensor], *steps: tuple[float | torch.Tensor, Direction]) -> Direction:
    """theta + sum of a_k d_k for the (a_k, d_k) in `steps`."""
    out = dict(theta)
    for a, d in steps:
        out = {k: v + a * d[k] for k, v in out.items()}
    return out


class LossOnData:
    """Mean loss (and accuracy) of a network at any parameters, over fixed batches, buffers as stored (eval mode)."""

    def __init__(self, model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 loss: LossFn = F.cross_entropy, accuracy: bool = True):
        if not batches or sum(len(y) for _, y in batches) == 0:
            raise ValueError("no images to measure the loss on")
        self.model = model.eval()
        self.batches = list(batches)
        self.loss = loss
        self.accuracy = accuracy
        self.images = sum(len(y) for _, y in self.batches)
        self.theta: Direction = {k: v.detach() for k, v in model.named_parameters()}
        self.buffers: Direction = {k: v.detach() for k, v in model.named_buffers()}

    def _forward(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, {**params, **self.buffers}, (x,))

    @torch.no_grad()
    def __call__(self, params: Mapping[str, torch.Tensor]) -> tuple[float, float]:
        """(mean loss over all images, top-1 accuracy or nan) of the network with `params`."""
        total = correct = 0.0
        for x, y in self.batches:
            out = self._forward(params, x)
            total += float(self.loss(out, y)) * len(y)
            if self.accuracy:
                correct += float((out.argmax(dim=1) == y).sum())
        return total / self.images, (correct / self.images if self.accuracy else float("nan"))

    def curvature(self, direction: Direction) -> float:
        """d^T H d: the second derivative of the mean loss along `direction` at theta (exact, by autograd)."""
        total = 0.0
        for x, y in self.batches:
            t = torch.zeros((), dtype=torch.float64, requires_grad=True)
            with torch.enable_grad():
                params = {k: v + t.to(v.dtype) * direction[k] for k, v in self.theta.items()}
                value = self.loss(self._forward(params, x), y) * (len(y) / self.images)
                (slope,) = torch.autograd.grad(value, t, create_graph=True)
                if not slope.requires_grad:             # the loss is linear along d here
                    continue
                (second,) = torch.autograd.grad(slope, t)
            total += float(second)
        return total


def second_differences(alphas: Sequence[float], losses: Sequence[float]) -> list[Optional[float]]:
    """Curvature along a sampled line: the second divided difference at every inner point (None at the ends)."""
    out: list[Optional[float]] = [None]
    for i in range(1, len(alphas) - 1):
        h0, h1 = alphas[i] - alphas[i - 1], alphas[i + 1] - alphas[i]
        out.append(2 * ((losses[i + 1] - losses[i]) / h1 - (losses[i] - losses[i - 1]) / h0) / (h0 + h1))
    return out + [None]


def local_minima(grid: Sequence[Sequence[float]]) -> int:
    """Grid points whose loss is below all of their (up to 8) neighbours: 1 for a convex bowl, more when chaotic."""
    g = torch.tensor(grid, dtype=torch.float64)
    padded = F.pad(g[None, None], (1, 1, 1, 1), value=float("inf"))[0, 0]
    rows, cols = g.shape
    lower = torch.ones_like(g, dtype=torch.bool)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            if di or dj:
                lower &= g < padded[1 + di:1 + di + rows, 1 + dj:1 + dj + cols]
    return int(lower.sum())
