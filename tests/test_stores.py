"""Stores and output folders under stress: commands starting together on a fresh folder, a kill while a store is
being made, a half-made store left by a killed process, a folder that cannot be written, a full disk mid-run."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import ROOT, run_cli
from runs.fit import RunOptions, train
from runs.mlflow_client import client_for, default_tracking_uri
from search.storage import open_storage

TINY = ["stages.0.depth=1", "stages.1.depth=1", "stages.2.depth=1", "data.val_size=256", "data.test_subset=256",
        "data.train_subset=256", "train.epochs=1"]


def run_args(outputs: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), "run", "specs/fmnist_resnet20.yaml", "--set", *TINY, *extra,
            "--output-dir", str(outputs), "--progress", "lines"]


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@contextlib.contextmanager
def tmpfs(folder: Path, size: str, *options: str):
    """A small tmpfs mounted at folder (root only; the test skips where mounting is not allowed)."""
    folder.mkdir(parents=True, exist_ok=True)
    opts = ",".join((f"size={size}", *options))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_two_runs_started_together_on_a_fresh_folder(fashion_mnist, tmp_path):
    outputs = tmp_path / "outputs"
    procs = [subprocess.Popen(run_args(outputs, f"train.seed={i}"), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    client = MlflowClient(default_tracking_uri(outputs))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.data.params["train.seed"] for r in runs) == ["0", "1"]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_a_kill_while_the_store_is_made_leaves_nothing_half_made(fashion_mnist, tmp_path):
    outputs = tmp_path / "outputs"
    proc = subprocess.Popen(run_args(outputs), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(outputs.glob(".mlflow.db.*.creating")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert list(outputs.glob(".mlflow.db.*.creating")), "the store was not being made"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (outputs / "mlflow.db").exists()
    done = run_cli(*run_args(outputs)[2:])
    assert done.returncode == 0, done.stderr
    assert not list(outputs.glob(".mlflow.db.*"))
    client = client_for(None, outputs)
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == 1


def test_a_half_made_store_without_records_is_made_anew(tmp_path):
    """What an older reslab (or MLflow itself) leaves when killed while creating its tables: moved aside, one note."""
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    db = outputs / "mlflow.db"
    code = f"from mlflow.tracking import MlflowClient; MlflowClient('sqlite:///{db}').search_experiments()"
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    while not (db.exists() and db.stat().st_size > 0) and proc.poll() is None:
        time.sleep(0.002)
    time.sleep(0.2)                                  # some tables made, the rest not
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    client_for(None, outputs).search_experiments()  # opens (made anew when it was half-made)
    assert client_for(None, outputs).get_experiment_by_name("Default") is not None


def test_a_store_holding_records_is_never_replaced(tmp_path):
    outputs = tmp_path / "outputs"
    client = client_for(None, outputs)
    client.create_experiment("kept")
    import sqlite3

    with sqlite3.connect(outputs / "mlflow.db") as db:          # break it: the schema version is unknown
        db.execute("UPDATE alembic_version SET version_num = 'nonexistent'")
    done = run_cli("run", "specs/fmnist_resnet20.yaml", "--set", *TINY, "--output-dir", str(outputs))
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert "holds records" in line and "mlflow db upgrade" in line
    assert (outputs / "mlflow.db").exists() and not list(outputs.glob("mlflow.db.broken-*"))


def test_an_output_folder_that_cannot_be_written_is_one_line(tmp_path):
    as_file = tmp_path / "file"
    as_file.write_text("x")
    for args, words in [(["--output-dir", str(as_file)], "is a file"),
                        (["--tracking-uri", "sqlite:////proc/reslab/mlflow.db"], "cannot write in /proc/reslab")]:
        started = time.time()
        done = run_cli("run", "specs/fmnist_resnet20.yaml", "--set", *TINY, *args)
        assert done.returncode == 2 and words in one_line(done.stderr), done.stderr
        assert time.time() - started < 60
    with tmpfs(tmp_path / "ro", "1m", "ro") as read_only:
        for command in (["run", "specs/fmnist_resnet20.yaml", "--set", *TINY], ["report", "x"],
                        ["ablate", "specs/ablations/shortcuts.yaml"]):
            done = run_cli(*command, "--output-dir", str(read_only / "out"))
            assert done.returncode == 2, done.stderr
            line = one_line(done.stderr)
            assert "--output-dir" in line or "no study storage" in line, line


def test_a_full_disk_mid_run_fails_the_run_in_one_line_and_keeps_the_last_checkpoint(fashion_mnist, tmp_path):
    """The disk fills after epoch 1's checkpoint: epoch 2's cannot be written. The run ends FAILED with the
    reason, the error is one line, and epoch 1's checkpoint is still whole."""
    import pytorch_lightning as pl

    from arches import load_spec
    from arches.errors import ReslabError
    from runs.mlflow_client import client_for as client

    spec = load_spec("specs/fmnist_resnet20.yaml", [*TINY, "train.epochs=3", f"data.root={fashion_mnist}"])

    class Fill(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:               # after epoch 2's row is recorded, before its checkpoint
                free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
                with open(disk / "filler", "wb") as f:
                    f.write(b"\0" * max(0, free - 64 * 1024))

    with tmpfs(tmp_path / "disk", "8m") as disk:
        with pytest.raises(ReslabError) as info:
            train(spec, RunOptions(output_dir=disk, progress=False, callbacks=[Fill()]))
        message = str(info.value)
        assert "\n" not in message and "No space left on device" in message
        checkpoint = next(disk.glob("checkpoints/*/last.ckpt"))
        assert torch.load(checkpoint, weights_only=True)["epoch"] == 0        # epoch 1's, whole
        (disk / "filler").unlink()
        run = client(None, disk).search_runs([e.experiment_id for e in client(None, disk).search_experiments()])[0]
        assert run.info.status == "FAILED" and "No space left" in run.data.tags["failure_reason"]


def test_optuna_storage_made_atomically_too(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert storage.get_all_studies() == [] and not list(tmp_path.glob(".optuna.db.*"))
