"""Spec -> nn.Module: the plan's blocks in order between a stem and a head. Names follow torchvision."""
from __future__ import annotations

import hashlib
import math
from typing import Optional

import torch
from torch import nn

from .init import InitReport, Resolve, checked, load_init, read_init
from .plan import NetworkPlan, plan_network
from .schema import Spec
from .stems import stem_modules


class Network(nn.Module):
    """stem -> layer1..layerN -> [final BN-ReLU for pre-activation nets] -> pool -> dropout -> fc."""

    def __init__(self, spec: Spec, plan: NetworkPlan):
        super().__init__()
        for name, module in stem_modules(spec, plan.stem_channels).items():
            self.add_module(name, module)
        stages: dict[int, list[nn.Module]] = {}
        for b in plan.blocks:
            stages.setdefault(b.stage, []).append(b.cls(b.in_channels, b.width, b.stride, b.cfg, b.drop_path))
        self.stage_names = []
        for s, blocks in stages.items():
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
            self.stage_names.append(f"layer{s + 1}")
        self.final_bn = nn.BatchNorm2d(plan.out_channels) if plan.final_bn else None
        self.final_relu = nn.ReLU(inplace=True) if plan.final_relu else None
        self.avgpool = nn.AdaptiveAvgPool2d(1) if spec.head.pool == "avg" else nn.AdaptiveMaxPool2d(1)
        self.dropout = nn.Dropout(spec.head.dropout) if spec.head.dropout > 0 else None
        self.fc = nn.Linear(plan.out_channels, spec.classes)
        init_weights(self, spec.train.seed)
        self.init_report = None            # what `init_from` loaded (build_model(spec, init=True))

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


def _stable_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest(), "little") >> 1


def init_weights(model: nn.Module, seed: int) -> None:
    """Initialise every layer from a generator seeded by (seed, layer name): two specs built with the same
    seed get the same initial weights in every layer they share by name and shape (paired ablation arms).
    Convs: Kaiming normal, fan_out (He et al. 2015, torchvision); linear: PyTorch's uniform(+-1/sqrt(fan_in));
    BN: gamma 1, beta 0; then each block's own touches (gate biases, zero-init residual)."""
    for name, m in model.named_modules():
        g = torch.Generator(device="cpu").manual_seed(_stable_seed(seed, name))
        if isinstance(m, nn.Conv2d):
            if m.weight.device.type == "meta":
                continue
            m.weight.data.copy_(nn.init.kaiming_normal_(torch.empty(m.weight.shape), mode="fan_out",
                                                        nonlinearity="relu", generator=g))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if m.weight.device.type == "meta":
                continue
            bound = 1.0 / math.sqrt(m.in_features)
            m.weight.data.copy_(torch.empty(m.weight.shape).uniform_(-bound, bound, generator=g))
            if m.bias is not None:
                m.bias.data.copy_(torch.empty(m.bias.shape).uniform_(-bound, bound, generator=g))
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in model.modules():
        if hasattr(m, "init_residual"):
            m.init_residual()


def build_model(spec: Spec, plan: NetworkPlan | None = None, *, init: bool = False,
                resolve: Optional[Resolve] = None) -> Network:
    """Compile a validated spec into a network, initialised from `spec.train.seed` (see init_weights); `plan`: the
    spec's plan_network when the caller has it already. With `init`, then load `spec.init_from` (arches.init; an
    MLflow run id is turned into its checkpoint by `resolve`, runs.checkpoint.init_checkpoint); what loaded is in
    `network.init_report`."""
    model = Network(spec, plan or plan_network(spec))
    if init:
        model.init_report = load_init(model, spec, resolve)
    return model


def init_report(spec: Spec, resolve: Optional[Resolve] = None, plan: NetworkPlan | None = None) -> Optional[InitReport]:
    """Check `init_from` against the network (built on the meta device), shapes only: no tensor is read; SpecError
    if it does not fit. None when the spec has no init_from, or names a run id and no `resolve` is given. `plan`:
    the spec's plan_network when the caller has it already."""
    found = read_init(spec, resolve, meta=True)
    if found is None:
        return None
    with torch.device("meta"):
        ours = build_model(spec, plan).state_dict()
    return checked(spec, found[0], found[1], ours)
