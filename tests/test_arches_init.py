"""Weights in: `init_from` reads state_dict files (torchvision/timm layouts, Lightning and DataParallel
checkpoints, MLflow run ids), checks them against the network before loading, and `show` says what loaded."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import cli
from arches import build_model, load_spec, spec_from_dict


ROOT = Path(__file__).resolve().parents[1]
RESNET20 = ROOT / "specs" / "resnet20.yaml"


def weights(spec_path: Path, *overrides: str) -> dict:
    """A state_dict of the network a spec describes, at another seed than the spec's."""
    return build_model(load_spec(spec_path, ["train.seed=7", *overrides])).state_dict()


def test_a_torchvision_layout_file_loads_strict(tmp_path):
    state = weights(ROOT / "specs" / "resnet18.yaml")
    torch.save(state, tmp_path / "resnet18.pth")
    spec = load_spec(ROOT / "specs" / "resnet18.yaml", [f"init_from={tmp_path / 'resnet18.pth'}"])
    model = build_model(spec, init=True)
    assert model.init_report.loaded == list(state) and not model.init_report.rules
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not torch.equal(build_model(spec).conv1.weight, state["conv1.weight"])   # init=False: the seed's own


def test_init_map_renames_another_codes_keys(tmp_path):
    state = {re.sub(r"^layer", "backbone.stage", k).replace("fc.", "head."): v for k, v in weights(RESNET20).items()}
    torch.save({"model": state, "epoch": 90}, tmp_path / "other.pt")
    spec = load_spec(RESNET20, [f"init_from={tmp_path / 'other.pt'}", "init_map={'^backbone\\.stage': layer, "
                                                                        "'^head\\.': fc.}"])
    model = build_model(spec, init=True)
    assert model.init_report.rules == {r"^backbone\.stage -> layer": 108, r"^head\. -> fc.": 2}
    assert torch.equal(model.layer3[2].conv2.weight, state["backbone.stage3.2.conv2.weight"])


def show(capsys, *args: str) -> tuple[int, str, str]:
    """`python cli.py show ARGS` in this process: exit code, stdout, stderr."""
    code = cli.main(["show", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_strict_or_not_and_show_lists_what_loaded(tmp_path, capsys):
    path = tmp_path / "cifar100.pt"
    torch.save(weights(RESNET20, "classes=100", "data.name=synthetic"), path)
    code, _, err = show(capsys, str(RESNET20), "--set", f"init_from={path}")
    assert code == 2 and err.strip() == (f"--set: init_from: {path} does not fit this network: fc.weight: expected "
                                         f"shape [10, 64], found [100, 64] (2 shapes differ, 0 keys missing, 0 "
                                         f"unexpected; init_strict: false loads only what fits)")
    code, out, _ = show(capsys, str(RESNET20), "--set", f"init_from={path}", "init_strict=false")
    assert code == 0
    assert "114 of 116 tensors loaded: conv1.* (1), bn1.* (5), layer1.* (36), layer2.* (36), layer3.* (36)" in out
    assert "not loaded, shape differs: fc.weight (network [10, 64], file [100, 64]), fc.bias" in out
    data = json.loads(show(capsys, str(RESNET20), "--json", "--set", f"init_from={path}", "init_strict=false")[1])
    assert data["params"] == 269_722 and [m[0] for m in data["init"]["mismatched"]] == ["fc.weight", "fc.bias"]
    model = build_model(load_spec(RESNET20, [f"init_from={path}", "init_strict=false"]), init=True)
    assert torch.equal(model.fc.bias, build_model(load_spec(RESNET20)).fc.bias)   # the head keeps its seeded init


def module_file(path: Path) -> None:
    torch.save(torch.nn.Linear(2, 2), path)


BAD_FILES = {
    "text": (lambda p: p.write_text("not weights"), r"is not a state_dict: not a file torch\.save writes"),
    "list": (lambda p: torch.save([1, 2, 3], p), r"is not a state_dict: it holds a list, no tensors"),
    "module": (module_file, r"is not a state_dict: it pickles a torch\.nn\.modules\.linear\.Linear, which "
                            r"weights_only=True does not load"),
    "other_net": (lambda p: torch.save(weights(ROOT / "specs" / "resnet18.yaml"), p),
                  r"does not fit this network: conv1\.weight: expected shape \[16, 3, 3, 3\], found \[64, 3, 7, 7\] "
                  r"\(\d+ shapes differ, \d+ keys missing, \d+ unexpected; another network's checkpoint\?"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_init_from_is_one_line_exit_2(case, tmp_path, capsys, monkeypatch):
    write, pattern = BAD_FILES[case]
    write(tmp_path / "w.pt")
    (tmp_path / "bad.yaml").write_text(f"base: {RESNET20}\nname: x\ninit_from: w.pt\n")
    monkeypatch.chdir(tmp_path)
    code = cli.main(["validate", "bad.yaml"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert re.search(r"^bad\.yaml:3: init_from: w\.pt " + pattern, lines[0]), lines[0]


def test_a_run_id_starts_from_that_runs_checkpoint(tmp_path, monkeypatch, capsys):
    """`init_from: RUN_ID` as `run` resolves it: the run's checkpoint in the MLflow store (runs.checkpoint)."""
    from mlflow.tracking import MlflowClient

    from runs.checkpoint import checkpoint_dir
    from runs.module import ReslabModule
    from runs.mlflow_client import default_tracking_uri

    outputs = tmp_path / "outputs"
    uri = default_tracking_uri(outputs)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x", artifact_location=str(tmp_path / "art"))).info.run_id
    trained = weights(RESNET20)
    ckpt = checkpoint_dir(outputs, run_id) / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {**{f"model.{k}": v for k, v in trained.items()},
                               "metric_acc.val_.tp": torch.zeros(3)},
                "hyper_parameters": {"spec": {"name": "trained"}}}, ckpt)      # a Lightning checkpoint's layout
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    spec = load_spec(RESNET20, [f"init_from={run_id}"])                     # a run id is checked when resolved
    module = ReslabModule(spec.model_dump(mode="json"))
    assert module.model.init_report.source == str(ckpt)
    assert all(torch.equal(v, trained[k]) for k, v in module.model.state_dict().items())
    code, out, _ = show(capsys, str(RESNET20), "--set", f"init_from={run_id}")
    assert code == 0 and "116 of 116 tensors loaded" in out and "prefix model. dropped (116)" in out


def test_a_spec_rebuilt_from_stored_data_does_not_read_its_init_file(tmp_path):
    """A trained run's spec names the file it started from; reloading the run must not need that file."""
    spec = spec_from_dict({**load_spec(RESNET20).model_dump(mode="json"), "init_from": str(tmp_path / "gone.pt")})
    assert spec.init_from.endswith("gone.pt") and build_model(spec).init_report is None
    with pytest.raises(Exception, match="no such file"):
        build_model(spec, init=True)
