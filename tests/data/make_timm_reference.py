"""Write the timm reference tables that tests/test_arches_references.py checks reslab's specs against.

Produced with timm 1.0.31 (`pip install --no-deps timm`) in a separate virtual environment holding torch 2.14.1 and
torchvision 0.29.1 (timm needs torchvision, which must not be installed beside reslab's CPU torch), run on CPU
from the repository root:

    /tmp/tvenv/bin/pip install --no-deps timm
    /tmp/tvenv/bin/python tests/data/make_timm_reference.py

It writes
- timm_state_dict_shapes.json: for resnet50d, seresnet50 and resnetrs50 (timm.create_model, no weights), the
  parameter count and every state_dict key with its shape;
- timm_tiny_reference.pt: two small timm ResNets (random weights and BN statistics), each with its state_dict,
  a fixed input and timm's eval-mode output: `tiny_rs` (bottleneck, deep stem, stem pool replaced by a strided
  conv, average-pool downsampling, SE at ratio 1/4: the ResNet-RS / ResNet-D features) and `tiny_se_basic`
  (basic blocks, 7x7 stem, SE at ratio 1/16: SE-ResNet-18's layout). Tests load these into the equivalent
  reslab specs with `init_from` and compare outputs. Nothing here is imported by reslab or its tests' code.
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import timm
import torch
from timm.layers import get_attn
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

HERE = Path(__file__).resolve().parent
MODELS = ("resnet50d", "seresnet50", "resnetrs50")


def shapes() -> dict:
    out = {}
    for name in MODELS:
        model = timm.create_model(name, pretrained=False)
        out[name] = {"params": sum(p.numel() for p in model.parameters()),
                     "state_dict": {k: list(v.shape) for k, v in model.state_dict().items()}}
    return out


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, BN statistics included, so that every layer shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.3)


def tiny() -> dict:
    se_quarter = partial(get_attn("se"), rd_ratio=0.25)
    nets = {
        "tiny_rs": ResNet(Bottleneck, (1, 1, 1, 1), num_classes=5, channels=(4, 8, 8, 8), stem_width=4,
                          stem_type="deep", replace_stem_pool=True, avg_down=True,
                          block_args=dict(attn_layer=se_quarter)),
        "tiny_se_basic": ResNet(BasicBlock, (2, 1, 1, 1), num_classes=5, channels=(8, 8, 16, 16),
                                block_args=dict(attn_layer="se")),
    }
    out = {}
    for seed, (name, net) in enumerate(nets.items()):
        randomise(net, seed)
        net.eval()
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(100 + seed))
        with torch.no_grad():
            y = net(x)
        out[name] = {"state_dict": {k: v.clone() for k, v in net.state_dict().items()}, "input": x, "output": y}
    return out


if __name__ == "__main__":
    print(f"timm {timm.__version__}, torch {torch.__version__}")
    (HERE / "timm_state_dict_shapes.json").write_text(json.dumps(shapes(), separators=(",", ":")) + "\n")
    torch.save(tiny(), HERE / "timm_tiny_reference.pt")
    print("wrote", HERE / "timm_state_dict_shapes.json", HERE / "timm_tiny_reference.pt")
