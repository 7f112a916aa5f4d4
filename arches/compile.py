"""Spec -> nn.Module: the plan's blocks in order between a stem and a head. Names follow torchvision."""
from __future__ import annotations

import torch
from torch import nn

from .plan import NetworkPlan, plan_network
from .schema import Spec


class Network(nn.Module):
    """stem -> layer1..layerN -> [final BN-ReLU for pre-activation nets] -> pool -> dropout -> fc."""

    def __init__(self, spec: Spec, plan: NetworkPlan):
        super().__init__()
        c, stem = plan.stem_channels, spec.stem
        if stem.type == "imagenet":
            self.conv1 = nn.Conv2d(spec.input.channels, c, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(spec.input.channels, c, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c) if stem.act else nn.Identity()
        self.relu = nn.ReLU(inplace=True) if stem.act else nn.Identity()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem.type == "imagenet" else nn.Identity()
        stages: dict[int, list[nn.Module]] = {}
        for b in plan.blocks:
            stages.setdefault(b.stage, []).append(b.cls(b.in_channels, b.width, b.stride, b.cfg))
        self.stage_names = []
        for s, blocks in stages.items():
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
            self.stage_names.append(f"layer{s + 1}")
        last = plan.blocks[-1].cfg.placement
        self.final_bn = nn.BatchNorm2d(plan.out_channels) if last == "full_preact" else None
        self.final_relu = nn.ReLU(inplace=True) if plan.preact_head else None
        self.avgpool = nn.AdaptiveAvgPool2d(1) if spec.head.pool == "avg" else nn.AdaptiveMaxPool2d(1)
        self.dropout = nn.Dropout(spec.head.dropout) if spec.head.dropout > 0 else None
        self.fc = nn.Linear(plan.out_channels, spec.classes)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        if self.final_bn is not None:
            x = self.final_bn(x)
        if self.final_relu is not None:
            x = self.final_relu(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.fc(x)

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """(name, block) for every block, in order: 'layer1.0', ..."""
        return [(f"{s}.{i}", b) for s in self.stage_names for i, b in enumerate(getattr(self, s))]


def build_model(spec: Spec) -> Network:
    """Compile a validated spec into a network (weights initialised as the papers do)."""
    return Network(spec, plan_network(spec))
