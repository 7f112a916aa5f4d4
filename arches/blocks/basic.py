"""Two-conv blocks: plain, basic, preact, wide, highway. Names of convs and BNs follow torchvision."""
from __future__ import annotations

from ..layers import conv3x3
from ..schema import BlockSpec
from .block import Block, register


@register("basic")
class Basic(Block):
    """x + f(x), f = two 3x3 convs, the first strided (He et al. 2015: 18/34 layers and the CIFAR nets)."""

    @classmethod
    def convs(cls, in_channels: int, width: int, stride: int, cfg: BlockSpec):
        out = cls.out_channels(width, cfg)
        return [conv3x3(in_channels, out, stride), conv3x3(out, out)]


@register("plain")
class Plain(Basic):
    """f(x), f = two 3x3 conv-BN(-ReLU) layers; no shortcut (He et al. 2015's plain nets)."""
    residual = False
    placements = ("original", "relu_preact", "full_preact")


@register("preact")
class PreAct(Basic):
    """x + f(x), f = BN-ReLU-3x3 conv twice: full pre-activation (He et al. 2016)."""
    defaults = {"placement": "full_preact"}
    placements = ("relu_preact", "full_preact")


@register("wide")
class Wide(Basic):
    """x + f(x), f = BN-ReLU-3x3 conv, BN-ReLU, dropout, 3x3 conv at width * `widen` (Zagoruyko & Komodakis 2016)."""
    defaults = {"placement": "full_preact"}
    placements = ("relu_preact", "full_preact")


@register("highway")
class Highway(Basic):
    """H(x) T(x) + x (1 - T(x)), H = two 3x3 conv-BN-ReLU, T = sigmoid(1x1 conv + b), b < 0 (Srivastava 2015)."""
    defaults = {"placement": "relu_before_add"}
    placements = ("relu_before_add", "original")
    forced = {"variant": "exclusive_gate"}
