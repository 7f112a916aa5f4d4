"""Placements: where BN and ReLU sit around a block's convs and its addition (He et al. 2016, Fig. 4).

A placement runs the block's (conv, BN) pairs as its branch f, says what the shortcut reads and what follows
the merge. With y = merge(f, shortcut):
  (a) original          conv-BN-ReLU ... conv-BN        -> y -> ReLU
  (b) bn_after_add      conv-BN-ReLU ... conv           -> y -> BN -> ReLU
  (c) relu_before_add   conv-BN-ReLU ... conv-BN-ReLU   -> y
  (d) relu_preact       ReLU-conv-BN ... ReLU-conv-BN   -> y
  (e) full_preact       BN-ReLU-conv ... BN-ReLU-conv   -> y  (a projection reads the pre-activated x)
Block dropout (`block.dropout`) sits right before every conv but the first: after the BN-ReLU in (e), as the
Wide-ResNet code has it.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..registry import PLACEMENTS

Tensor = torch.Tensor


class Placement:
    """Base of the placements; `b` is the block (its `layers()`, `relu`, `downsample`, `drop_before`)."""
    name: ClassVar[str] = ""
    letter: ClassVar[str] = ""           # the paper's letter: `placement: e` works too
    final_bn: ClassVar[bool] = False     # a network ending in this placement normalises before its head ...
    final_relu: ClassVar[bool] = False   # ... and applies a ReLU
    projection_bn: ClassVar[bool] = True  # default of `projection_bn`: BN after a projection shortcut's conv
    zero_last: ClassVar[str] = "bn"      # zero_init_residual zeroes the branch's last "bn" or "conv"

    def norm_channels(self, conv: nn.Conv2d) -> int:
        """Width of the BN paired with this conv (after it, or before it in full pre-activation)."""
        return conv.out_channels

    def branch(self, b, x: Tensor) -> tuple[Tensor, Tensor]:
        """(f(x), the tensor the shortcut reads): `layer` over the block's (conv, BN) pairs, and x."""
        h = x
        for i, conv, bn in b.layers():
            h = self.layer(b, i, conv, bn, h)
        return h, x

    def layer(self, b, i: int, conv: nn.Conv2d, bn: nn.BatchNorm2d, h: Tensor) -> Tensor:
        """The i-th (conv, BN) pair of the branch applied to h."""
        raise NotImplementedError

    def after(self, b, y: Tensor) -> Tensor:
        """What follows the merge."""
        return y

    def shortcut_input(self, b, x: Tensor) -> Tensor:
        return x


@PLACEMENTS.register("original")
class Original(Placement):
    """(a) conv-BN-ReLU ... conv-BN, merge, ReLU (He et al. 2015)."""
    letter = "a"

    def layer(self, b, i, conv, bn, h):
        h = bn(conv(b.drop_before(i, h)))
        return b.relu(h) if i < b.depth else h

    def after(self, b, y):
        return b.relu(y)


@PLACEMENTS.register("bn_after_add")
class BNAfterAdd(Placement):
    """(b) conv-BN-ReLU ... conv, merge, BN (the last conv's), ReLU."""
    letter, zero_last = "b", "conv"

    def layer(self, b, i, conv, bn, h):
        h = conv(b.drop_before(i, h))
        return b.relu(bn(h)) if i < b.depth else h

    def after(self, b, y):
        return b.relu(getattr(b, f"bn{b.depth}")(y))


@PLACEMENTS.register("relu_before_add")
class ReLUBeforeAdd(Placement):
    """(c) conv-BN-ReLU after every conv, the last too, then merge."""
    letter = "c"

    def layer(self, b, i, conv, bn, h):
        return b.relu(bn(conv(b.drop_before(i, h))))


@PLACEMENTS.register("relu_preact")
class ReLUPreact(Placement):
    """(d) ReLU-conv-BN for every conv, then merge: ReLU-only pre-activation."""
    letter, final_relu = "d", True

    def layer(self, b, i, conv, bn, h):
        return bn(conv(b.relu(b.drop_before(i, h))))


@PLACEMENTS.register("full_preact")
class FullPreact(Placement):
    """(e) BN-ReLU-conv for every conv, then merge: full pre-activation (He et al. 2016)."""
    letter, final_bn, final_relu, projection_bn, zero_last = "e", True, True, False, "conv"

    def norm_channels(self, conv):
        return conv.in_channels

    def branch(self, b, x):
        h, s = x, x
        for i, conv, bn in b.layers():
            h = b.relu(bn(h))
            if i == 1 and b.downsample is not None:
                s = h                          # a projection sees the normalised input (the authors' code)
            h = conv(b.drop_before(i, h))
        return h, s

    def shortcut_input(self, b, x):
        return b.relu(b.bn1(x)) if b.downsample is not None else x
