"""reslab's ImageNet networks compute torchvision's functions: logits against a table of torchvision's own outputs
(tests/data/torchvision_outputs.json, written by tests/data/make_torchvision_outputs.py where torchvision
imports: torchvision's models carrying reslab's initial weights, loaded strict), and against torchvision itself
where it imports here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from arches import build_model, load_spec

ROOT = Path(__file__).resolve().parents[1]
TABLE = json.loads((ROOT / "tests" / "data" / "torchvision_outputs.json").read_text())


def probe() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(TABLE["models"]))
def test_logits_equal_torchvisions_on_the_same_weights(name):
    ours = build_model(load_spec(ROOT / "specs" / f"{name}.yaml")).eval()
    with torch.no_grad():
        logits = ours(probe()).double()
    theirs = torch.tensor(TABLE["models"][name], dtype=torch.float64)
    scale = theirs.abs().max()
    # float32 sums in another order (other torch version, CPU kernels) move the last digits only
    assert torch.allclose(logits, theirs, rtol=1e-4, atol=1e-5 * float(scale)), (logits - theirs).abs().max()


def test_torchvision_weights_load_strict_and_agree():
    tv = pytest.importorskip("torchvision.models")
    for name in ("resnet18", "resnext50_32x4d"):
        theirs = getattr(tv, name)().eval()
        ours = build_model(load_spec(ROOT / "specs" / f"{name}.yaml")).eval()
        ours.load_state_dict(theirs.state_dict(), strict=True)
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            assert torch.allclose(ours(x), theirs(x), atol=1e-5)
