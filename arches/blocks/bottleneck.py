"""Bottleneck blocks: 1x1 reduce, 3x3, 1x1 expand (bottleneck, grouped, preact_bottleneck)."""
from __future__ import annotations

from ..layers import conv1x1, conv3x3
from ..schema import BlockSpec
from .block import Block, register


@register("bottleneck")
class Bottleneck(Block):
    """x + f(x), f = 1x1 reduce, 3x3 (grouped), 1x1 expand; the stride on the 3x3 (v1.5) or the first 1x1 (v1)."""
    defaults = {"placement": "original", "stride_on": "3x3"}
    stride_positions = ("1x1", "3x3")

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

    @classmethod
    def convs(cls, in_channels: int, width: int, stride: int, cfg: BlockSpec):
        inner = cls.inner_width(width, cfg)
        s1, s3 = (stride, 1) if cfg.stride_on == "1x1" else (1, stride)
        return [conv1x1(in_channels, inner, s1),
                conv3x3(inner, inner, s3, cfg.cardinality),
                conv1x1(inner, cls.out_channels(width, cfg))]


@register("grouped")
class Grouped(Bottleneck):
    """x + f(x), f = bottleneck whose 3x3 conv has `cardinality` groups of `base_width` (ResNeXt, Xie 2017)."""


@register("preact_bottleneck")
class PreActBottleneck(Bottleneck):
    """x + f(x), f = bottleneck with full pre-activation (He et al. 2016, ResNet-164)."""
    defaults = {"placement": "full_preact", "stride_on": "3x3"}
    placements = ("relu_preact", "full_preact")
