"""Shared test setup: small thread counts (CI has 2 cores), the real Fashion-MNIST files, temp outputs."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

import torch  # noqa: E402

torch.set_num_threads(1)

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
STORE_VARIABLES = ("MLFLOW_TRACKING_URI", "RESLAB_STORAGE")   # the CLI's defaults for --tracking-uri / --storage


@pytest.fixture(autouse=True)
def no_store_from_the_environment(monkeypatch):
    """Each test starts without $MLFLOW_TRACKING_URI / $RESLAB_STORAGE and leaves none behind: the user's shell
    must not redirect a test's records, nor a test that sets one (Lightning's MLFlowLogger calls
    mlflow.set_tracking_uri, which exports it) redirect the next test's commands."""
    for name in STORE_VARIABLES:
        monkeypatch.setenv(name, "")          # (recorded, so that teardown removes what the test set)
        monkeypatch.delenv(name)


@pytest.fixture
def fashion_mnist() -> Path:
    """Folder of the real Fashion-MNIST IDX files (Debian package dataset-fashion-mnist)."""
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.fail("Fashion-MNIST missing: apt-get install dataset-fashion-mnist (.ci/run installs it)")
    return FASHION_MNIST


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    """A fresh outputs/ folder (MLflow store, checkpoints, Optuna storage) for one test."""
    out = tmp_path / "outputs"
    out.mkdir()
    return out


def tiny_study(*, data: tuple[int, int, int], widths: tuple[int, ...], epochs: int, batch_size: int,
               lr: float = 0.05) -> str:
    """The head of a study file (base and `set:`) over a tiny ResNet on Fashion-MNIST, for the study tests: `data`
    (train_subset, val_size, test_subset), one block per stage of these widths (the first stride 1, then 2), a
    constant lr without warmup. The test appends its `ablation:` or `search:` section."""
    stages = ", ".join(f"{{depth: 1, width: {w}" + (", stride: 2}" if i else "}") for i, w in enumerate(widths))
    return (f"base: {ROOT / 'specs' / 'resnet20.yaml'}\n"
            "set:\n"
            f"  data: {{name: fashion-mnist, train_subset: {data[0]}, val_size: {data[1]}, test_subset: {data[2]}, "
            "augment: none}\n"
            "  input: {channels: 1, size: 28}\n"
            f"  stem.width: {widths[0]}\n"
            f"  stages: [{stages}]\n"
            f"  train: {{epochs: {epochs}, max_steps: null, batch_size: {batch_size}, lr: {lr}, "
            "schedule: {type: constant}, warmup: {steps: 0}}\n")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for servers and DDP rendezvous the tests start)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 600, env: dict | None = None):
    """Run `python cli.py ARGS` in a subprocess; returns CompletedProcess with text output."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def measure_test_accuracy(model, spec) -> tuple[int, int]:
    """(correct, total) of `model` on the spec's whole test set, evaluated independently of reslab's metrics."""
    from runs.data import ReslabData

    data = ReslabData(spec)
    data.setup("test")
    correct = total = 0
    model.eval()
    with torch.no_grad():
        for images, labels in data.test_dataloader():
            correct += int((model(images).argmax(1) == labels).sum())
            total += len(labels)
    return correct, total
