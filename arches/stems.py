"""Stems (`stem.type`): the layers before the first stage, named as torchvision's (`conv1`, `bn1`, `relu`,
`maxpool`), and the pool after them (`stem.pool`)."""
from __future__ import annotations

from typing import ClassVar

from torch import nn

from .layers import conv3x3
from .registry import STEMS
from .schema import Spec


class Stem:
    """Base of the stems: `conv()` is the stem's conv(s), followed by BN-ReLU (`stem.act`) and the pool."""
    name: ClassVar[str] = ""
    stride: ClassVar[int] = 1          # its (first) conv's stride unless `stem.stride` says otherwise
    pool: ClassVar[str] = "max"        # the pool after it unless `stem.pool` says otherwise

    @classmethod
    def conv(cls, in_channels: int, width: int, stride: int) -> nn.Module:
        raise NotImplementedError


@STEMS.register("imagenet")
class ImageNet(Stem):
    """7x7/2 conv, 3x3/2 max-pool (He et al. 2015)."""
    stride = 2

    @classmethod
    def conv(cls, in_channels, width, stride):
        return nn.Conv2d(in_channels, width, 7, stride=stride, padding=3, bias=False)


@STEMS.register("cifar")
class Cifar(Stem):
    """3x3/1 conv, no pool (He et al. 2015's CIFAR nets)."""
    pool = "none"

    @classmethod
    def conv(cls, in_channels, width, stride):
        return conv3x3(in_channels, width, stride)


@STEMS.register("deep")
class Deep(Stem):
    """3x3/2 conv-BN-ReLU, 3x3 conv-BN-ReLU at half width, 3x3 conv, 3x3/2 max-pool (Bag of Tricks ResNet-C)."""
    stride = 2

    @classmethod
    def conv(cls, in_channels, width, stride):
        inner = max(1, width // 2)
        return nn.Sequential(conv3x3(in_channels, inner, stride), nn.BatchNorm2d(inner), nn.ReLU(inplace=True),
                             conv3x3(inner, inner), nn.BatchNorm2d(inner), nn.ReLU(inplace=True),
                             conv3x3(inner, width))


# stem.pool -> (layers after the stem for `channels`, their stride)
POOLS = {
    "max": (lambda c: nn.MaxPool2d(3, stride=2, padding=1), 2),
    "conv": (lambda c: nn.Sequential(conv3x3(c, c, 2), nn.BatchNorm2d(c), nn.ReLU(inplace=True)), 2),  # ResNet-RS
    "none": (lambda c: nn.Identity(), 1),
}


def stem_pool(spec: Spec) -> str:
    return spec.stem.pool or STEMS.lookup(spec.stem.type).pool


def stem_strides(spec: Spec) -> tuple[int, int]:
    """(the stem conv's stride, the pool's stride)."""
    return spec.stem.stride or STEMS.lookup(spec.stem.type).stride, POOLS[stem_pool(spec)][1]


def stem_modules(spec: Spec, channels: int) -> dict[str, nn.Module]:
    """conv1, bn1, relu, maxpool of a stem with `channels` outputs."""
    act = spec.stem.act
    conv = STEMS.lookup(spec.stem.type).conv(spec.input.channels, channels, stem_strides(spec)[0])
    return {"conv1": conv,
            "bn1": nn.BatchNorm2d(channels) if act else nn.Identity(),
            "relu": nn.ReLU(inplace=True) if act else nn.Identity(),
            "maxpool": POOLS[stem_pool(spec)][0](channels)}
