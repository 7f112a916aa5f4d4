"""The block library: one small class per YAML `type:`. Names of convs and BNs follow torchvision."""
from __future__ import annotations

from ..schema import BlockSpec
from .base import PREACT, Block, conv1x1, conv3x3
from .registry import register


@register("plain")
class Plain(Block):
    """f(x), f = two 3x3 conv-BN(-ReLU) layers; no shortcut (He et al. 2015's plain nets)."""
    residual = False
    placements = ("original",) + PREACT

    def __init__(self, in_channels: int, width: int, stride: int, cfg: BlockSpec):
        super().__init__(in_channels, width, stride, cfg)
        out = self.out_channels(width, self.cfg)
        self.add_layers([conv3x3(in_channels, out, stride), conv3x3(out, out)])

    @classmethod
    def out_channels(cls, width: int, cfg: BlockSpec) -> int:
        return max(1, round(width * cfg.widen))


@register("basic")
class Basic(Plain):
    """x + f(x), f = two 3x3 convs (He et al. 2015, 18/34 layers and the CIFAR nets)."""
    residual = True
    placements = Block.placements


@register("preact")
class PreAct(Basic):
    """x + f(x), f = BN-ReLU-3x3 conv twice: full pre-activation (He et al. 2016)."""
    default_placement = "full_preact"
    placements = PREACT


@register("wide")
class Wide(PreAct):
    """x + f(x), f = BN-ReLU-3x3 conv, dropout, BN-ReLU-3x3 conv at width * k (Zagoruyko & Komodakis 2016)."""


@register("highway")
class Highway(Basic):
    """H(x) * T(x) + x * (1 - T(x)), H = two 3x3 conv-BN-ReLU, T = sigmoid(1x1 conv + b), b < 0 (Srivastava 2015)."""
    default_placement = "relu_before_add"
    placements = ("relu_before_add", "original")
    forced = {"variant": "exclusive_gate"}


@register("bottleneck")
class Bottleneck(Block):
    """x + f(x), f = 1x1 reduce, 3x3 (strided, grouped), 1x1 expand (He et al. 2015, 50+ layers; v1.5 stride)."""

    def __init__(self, in_channels: int, width: int, stride: int, cfg: BlockSpec):
        super().__init__(in_channels, width, stride, cfg)
        inner, groups = self.inner_width(width, self.cfg), self.cfg.cardinality
        self.add_layers([conv1x1(in_channels, inner), conv3x3(inner, inner, stride, groups),
                         conv1x1(inner, self.out_channels(width, self.cfg))])

    @staticmethod
    def inner_width(width: int, cfg: BlockSpec) -> int:
        """torchvision's rule: int(width * base_width / 64) * cardinality, times WRN's k."""
        return int(round(width * cfg.widen) * (cfg.base_width / 64.0)) * cfg.cardinality

    @classmethod
    def out_channels(cls, width: int, cfg: BlockSpec) -> int:
        return max(1, round(width * cfg.widen)) * cfg.expansion

    @classmethod
    def problem(cls, in_channels, width, stride, cfg):
        if cls.inner_width(width, cfg) < 1:
            return "base_width", f"inner width int({width} * {cfg.base_width} / 64) is 0; raise width or base_width"
        return super().problem(in_channels, width, stride, cfg)


@register("grouped")
class Grouped(Bottleneck):
    """x + f(x), f = bottleneck whose 3x3 conv has `cardinality` groups of `base_width` (ResNeXt, Xie 2017)."""


@register("preact_bottleneck")
class PreActBottleneck(Bottleneck):
    """x + f(x), f = bottleneck with full pre-activation (He et al. 2016, ResNet-164)."""
    default_placement = "full_preact"
    placements = PREACT
