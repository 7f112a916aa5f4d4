"""Hostile weights-in, export and registry inputs (issue 23): each is one line on stderr and exit code 2, with
nothing trained or recorded: init_map replacements with a bad group or escape, truncated or forged .safetensors
files, pickles of code (refused without PyTorch's advice to turn the check off), unreadable files, `init_from:
RUN_ID` looked up in the command's --output-dir / --tracking-uri, and --register names MLflow would store
mangled (control characters, names longer than its registry's column)."""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import cli
from arches import build_model, load_spec, spec_from_dict
from conftest import ROOT

RESNET20 = ROOT / "specs" / "resnet20.yaml"
SMALL = ["stages.0.depth=1", "stages.1.depth=1", "stages.2.depth=1"]          # resnet8: quick to build and train
QUICK_RUN = [*SMALL, "data.name=synthetic", "data.synthetic_size=64", "data.val_size=16", "train.epochs=1",
             "train.batch_size=32"]


def cli_line(capsys, *args: str) -> tuple[int, str]:
    """`python cli.py ARGS` in this process: (exit code, its only stderr line; fails on more)."""
    code = cli.main(list(args))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return code, err[0]


def small_weights(*overrides: str) -> dict[str, torch.Tensor]:
    return build_model(load_spec(RESNET20, [*SMALL, "train.seed=7", *overrides])).state_dict()


def write_safetensors(state: dict[str, torch.Tensor], path: Path) -> bytes:
    """The safetensors layout (8-byte header size, JSON header of dtype/shape/offsets, data); returns the bytes."""
    header, blobs, offset = {}, [], 0
    for key, tensor in state.items():
        blob = tensor.contiguous().numpy().tobytes()
        header[key] = {"dtype": {torch.float32: "F32", torch.int64: "I64"}[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    data = struct.pack("<Q", len(text)) + text + b"".join(blobs)
    path.write_bytes(data)
    return data


# ---- init_map replacements ------------------------------------------------------------------------------
@pytest.mark.parametrize("replacement, why", [(r"\9", "invalid group reference 9"),
                                              (r"\g<nope>", "unknown group name 'nope'"),
                                              (r"\q", r"bad escape \q")])
def test_an_init_map_replacement_with_a_bad_group_or_escape_is_one_line(replacement, why, tmp_path, capsys):
    spec = tmp_path / "x.yaml"
    spec.write_text(f"base: {RESNET20}\nname: x\ninit_map:\n  '^(?P<stage>layer)': '{replacement}'\n")
    code, line = cli_line(capsys, "validate", str(spec))
    assert code == 2 and line.startswith(f"{spec}:3: init_map: replacement '{replacement}' of '^(?P<stage>layer)'")
    assert why in line and "the pattern has 1 group: stage" in line
    code, line = cli_line(capsys, "show", str(RESNET20), "--set", f"init_map={{'^(a)': '{replacement}'}}")
    assert code == 2 and line.startswith(f"--set: init_map: replacement '{replacement}'") and why in line
    assert cli.main(["validate", str(RESNET20), "--set", r"init_map={'^(a)\.': '\1.b'}"]) == 0   # a good one


# ---- .safetensors files ---------------------------------------------------------------------------------
def test_a_truncated_safetensors_file_is_one_line_before_anything_runs(tmp_path, capsys):
    data = write_safetensors(small_weights(), tmp_path / "full.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) * 2 // 3])
    out = tmp_path / "outputs"
    code, line = cli_line(capsys, "run", str(RESNET20), "--set", *QUICK_RUN,
                          f"init_from={tmp_path / 'cut.safetensors'}", "--output-dir", str(out))
    assert code == 2 and re.fullmatch(
        rf"--set: init_from: {re.escape(str(tmp_path))}/cut\.safetensors is not a state_dict: truncated: tensor "
        r"'[\w.]+' ends at byte \d+ of the data, the file holds \d+", line), line
    assert not (out / "mlflow.db").exists()                      # refused before any run was recorded
    # a spec rebuilt from stored data is not checked at load: building its network is, in one line too
    spec = spec_from_dict({**load_spec(RESNET20, SMALL).model_dump(mode="json"),
                           "init_from": str(tmp_path / "cut.safetensors")})
    with pytest.raises(cli_error(), match="truncated: tensor"):
        build_model(spec, init=True)
    assert cli.main(["show", str(RESNET20), "--set", *SMALL, f"init_from={tmp_path / 'full.safetensors'}"]) == 0
    assert "44 of 44 tensors loaded" in capsys.readouterr().out


def cli_error() -> type:
    from arches.errors import ReslabError
    return ReslabError


FORGED = {   # header entry -> what the one line says
    "dtype": ({"dtype": "F8_E9", "shape": [2], "data_offsets": [0, 8]}, "has dtype 'F8_E9'; reslab reads F64"),
    "unhashable dtype": ({"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, r"has dtype \['F32'\]"),
    "shape": ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, r"has no valid shape \(got \[-2\]\)"),
    "offsets": ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "has no valid data_offsets"),
    "size": ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, r"has shape \[3\] \(F32\), which needs 12 "
                                                                     r"bytes; its offsets give 8"),
    "huge": ({"dtype": "F32", "shape": [2 ** 40, 2 ** 40], "data_offsets": [0, 8]}, "needs 4835703278458516698824704 "
                                                                                   "bytes"),
}


@pytest.mark.parametrize("case", sorted(FORGED))
def test_a_forged_safetensors_header_is_one_line(case, tmp_path, capsys):
    entry, pattern = FORGED[case]
    text = json.dumps({"conv1.weight": entry}).encode()
    (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + bytes(8))
    code, line = cli_line(capsys, "validate", str(RESNET20), "--set", f"init_from={tmp_path / 'w.safetensors'}")
    assert code == 2 and "w.safetensors is not a state_dict: " in line and re.search(pattern, line), line
    (tmp_path / "h.safetensors").write_bytes(struct.pack("<Q", 10 ** 12) + b"{}")      # a header past the end
    code, line = cli_line(capsys, "validate", str(RESNET20), "--set", f"init_from={tmp_path / 'h.safetensors'}")
    assert code == 2 and "its header says 1000000000000 bytes, the file has 10" in line


# ---- pickles of code, unreadable files ---------------------------------------------------------------------
class Executes:
    """An object whose unpickling runs a shell command."""

    def __reduce__(self):
        return os.system, ("echo unpickled",)


PYTORCH_ADVICE = re.compile(r"weights_only.{0,10}False|will likely succeed|Re-running", re.IGNORECASE)


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_a_pickle_of_code_is_refused_without_pytorchs_advice_to_turn_the_check_off(layout, tmp_path, capsys):
    state = {"state_dict": {f"model.{k}": v for k, v in small_weights().items()}, "callback": Executes()}
    weights, ckpt = tmp_path / "w.pt", tmp_path / "w.ckpt"
    for path in (weights, ckpt):
        torch.save(state, path, _use_new_zipfile_serialization=layout == "zip")
    code, line = cli_line(capsys, "validate", str(RESNET20), "--set", *SMALL, f"init_from={weights}")
    assert code == 2 and not PYTORCH_ADVICE.search(line), line
    assert line.endswith(f"{weights} is not a state_dict: it pickles a posix.system, which weights_only=True does "
                         f"not load (reslab runs no pickled code; save the model's state_dict() instead)"), line
    for command in (["export", str(ckpt), "--format", "torchscript", "--output-dir", str(tmp_path)],
                    ["diagnose", str(RESNET20), "--set", *SMALL, "--lesion", "--checkpoint", str(ckpt),
                     "--output-dir", str(tmp_path)]):
        code, line = cli_line(capsys, *command)
        assert code == 2 and not PYTORCH_ADVICE.search(line), line
        assert line == f"{ckpt}: cannot load checkpoint: it pickles a posix.system, which weights_only=True does " \
                       f"not load (reslab runs no pickled code; save the model's state_dict() instead)"
    assert not (tmp_path / "exports").exists()


def test_an_unreadable_init_file_is_one_line(capsys):
    """A file that exists and cannot be read, even by root: /proc/self/mem (reading its first bytes is an I/O error)."""
    code, line = cli_line(capsys, "validate", str(RESNET20), "--set", "init_from=/proc/self/mem")
    assert code == 2 and line == "--set: init_from: cannot read /proc/self/mem: Input/output error"


def test_a_device_file_as_init_from_is_one_line(capsys):
    code, line = cli_line(capsys, "validate", str(RESNET20), "--set", "init_from=/dev/null")
    assert code == 2 and line == ("--set: init_from: /dev/null is not a regular file (a device, a pipe?), not a "
                                  "weights file")


# ---- init_from: RUN_ID in the command's store -------------------------------------------------------------------
def trained_run(store: Path, uri: str) -> tuple[str, dict]:
    """A run in the MLflow store `uri` with a Lightning-layout checkpoint: in <store>/checkpoints/<id>/ for a local
    store's run, as artifact checkpoints/last.ckpt otherwise. Returns (run id, its weights)."""
    from runs.checkpoint import checkpoint_dir

    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x", artifact_location=str(store / "art"))).info.run_id
    trained = small_weights()
    ckpt = checkpoint_dir(store, run_id) / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in trained.items()},
                "hyper_parameters": {"spec": {"name": "trained"}}}, ckpt)
    return run_id, trained


def test_init_from_a_run_id_is_looked_up_in_output_dir_and_tracking_uri(tmp_path, capsys):
    from runs.mlflow_client import default_tracking_uri

    out = tmp_path / "O"
    run_id, trained = trained_run(out, default_tracking_uri(out))
    args = ["show", str(RESNET20), "--set", *SMALL, f"init_from={run_id}"]
    assert cli.main([*args, "--output-dir", str(out)]) == 0
    assert "44 of 44 tensors loaded" in capsys.readouterr().out
    code, line = cli_line(capsys, *args)                               # not in the default store: one line
    assert code == 2 and line == (f"run id: no MLflow store at outputs/mlflow.db to find run '{run_id}' in; give a "
                                  f".ckpt path or --tracking-uri")

    missing = tmp_path / "typo" / "runs.db"                            # a look-up never makes a store
    code, line = cli_line(capsys, *args, "--tracking-uri", f"sqlite:///{missing}")
    assert code == 2 and line == (f"run id: no MLflow store at {missing} to find run '{run_id}' in; give a .ckpt "
                                  f"path or --tracking-uri") and not missing.parent.exists()

    elsewhere = tmp_path / "elsewhere"
    uri = f"sqlite:///{elsewhere / 'runs.db'}"
    elsewhere.mkdir()
    other_id, _ = trained_run(elsewhere, uri)
    assert cli.main(["show", str(RESNET20), "--set", *SMALL, f"init_from={other_id}", "--tracking-uri", uri]) == 0
    assert "44 of 44 tensors loaded" in capsys.readouterr().out

    # `run` trains from it, recording into --tracking-uri (the init run's store), its weights in the network
    assert cli.main(["run", str(RESNET20), "--set", *QUICK_RUN, "train.lr=1e-12",
                     f"init_from={other_id}", "--tracking-uri", uri, "--output-dir", str(tmp_path / "o2"),
                     "--progress", "lines"]) == 0
    client = MlflowClient(uri)
    new = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
           if r.info.run_id != other_id]
    assert len(new) == 1 and new[0].info.status == "FINISHED" and new[0].data.params["init_from"] == other_id
    ckpt = torch.load(tmp_path / "o2" / "checkpoints" / new[0].info.run_id / "last.ckpt", weights_only=True)
    conv = ckpt["state_dict"]["model.conv1.weight"]
    assert torch.allclose(conv, small_weights()["conv1.weight"], atol=1e-6)     # lr ~0: the init run's weights
    assert not torch.allclose(conv, build_model(load_spec(RESNET20, SMALL)).conv1.weight, atol=1e-2)  # not the seed's


# ---- --register names -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, why", [
    ("resnet\nv2", r"a model name cannot hold control or other unprintable characters \(found '\\n' at position 6\)"),
    ("a\x00b", r"unprintable characters \(found '\\x00' at position 1\)"),
    ("m" * 300, r"a model name has at most 256 characters, as MLflow's registry stores them \(got 300\)")])
def test_a_register_name_with_control_characters_or_absurd_length_is_one_line(name, why, tmp_path, capsys):
    out = tmp_path / "outputs"
    code, line = cli_line(capsys, "run", str(RESNET20), "--set", *QUICK_RUN, "--register", name,
                          "--output-dir", str(out))
    assert code == 2 and line.startswith("--register: a model name ") and re.search(why, line), line
    assert not out.exists()                                          # nothing trained, nothing recorded


# ---- export --output ----------------------------------------------------------------------------------------
def test_an_export_output_that_is_a_folder_under_a_file_or_the_checkpoint_itself_is_one_line(tmp_path, capsys):
    ckpt = tmp_path / "net.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in small_weights().items()},
                "hyper_parameters": {"spec": load_spec(RESNET20, SMALL).model_dump(mode="json")}}, ckpt)
    before = ckpt.read_bytes()
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("notes\n")
    export = ["export", str(ckpt), "--format", "torchscript", "--output-dir", str(tmp_path), "--output"]
    for output, expected in [
            (tmp_path / "folder", f"--output: {tmp_path / 'folder'} is a folder; give the file to write (e.g. "
                                  f"{tmp_path / 'folder' / 'model.ts.pt'})"),
            (tmp_path / "file" / "net.ts.pt", f"--output: {tmp_path / 'file'} is a file, not a folder"),
            (ckpt, f"--output: {ckpt} is the checkpoint being exported; writing there would destroy it")]:
        code, line = cli_line(capsys, *export, str(output))
        assert code == 2 and line == expected
    assert ckpt.read_bytes() == before and (tmp_path / "file").read_text() == "notes\n"
    assert cli.main([*export, str(tmp_path / "folder" / "net.ts.pt")]) == 0             # a file in the folder
    assert torch.jit.load(str(tmp_path / "folder" / "net.ts.pt"))(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["net.ts.pt"]     # no temporary file left
