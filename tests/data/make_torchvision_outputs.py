#!/usr/bin/env python3
"""Writes tests/data/torchvision_outputs.json: logits of torchvision's own models carrying reslab's initial weights.

Run where torchvision imports (it cannot on the CPU build of torch that reslab's setup installs), e.g. a venv with
`pip install torch==2.14.1 torchvision==0.29.1 pydantic pyyaml rich`:

    python tests/data/make_torchvision_outputs.py

For each model: reslab's network from specs/<name>.yaml (weights initialised from train.seed), its state_dict loaded
into torchvision.models.<name>() with strict=True, and torchvision's eval-mode logits on a seeded 2x3x64x64 input.
tests/test_torchvision_parity.py compares reslab's own logits with these.
"""
import json
import sys
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from arches import build_model, load_spec  # noqa: E402

MODELS = ("resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2")


def probe() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def main() -> None:
    out = {"torch": torch.__version__, "torchvision": torchvision.__version__, "input": "randn(2,3,64,64), seed 0",
           "models": {}}
    torch.set_num_threads(1)
    for name in MODELS:
        ours = build_model(load_spec(ROOT / "specs" / f"{name}.yaml"))
        theirs = getattr(torchvision.models, name)()
        theirs.load_state_dict(ours.state_dict(), strict=True)
        with torch.no_grad():
            logits = theirs.eval()(probe())
        out["models"][name] = [[float(f"{v:.8g}") for v in row] for row in logits.tolist()]
    path = ROOT / "tests" / "data" / "torchvision_outputs.json"
    path.write_text(json.dumps(out, separators=(",", ":")))
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
