"""`python cli.py run` in subprocesses: bad flags and missing data (one line, exit 2), a NaN loss (exit 1),
SIGTERM then --resume (same MLflow run, no duplicate epochs), DDP with 2 CPU processes (one run, metrics of
the whole test set), and two nodes launched as the README shows (by hand and with torchrun): one run, on node 0."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT, free_port, measure_test_accuracy, run_cli
from runs.record import run_owner
from runs.mlflow_client import default_tracking_uri

TINY = ["stages.0.depth=1", "stages.1.depth=1", "stages.2.depth=1", "data.val_size=256", "data.test_subset=512"]


def tiny(data_root: Path, *extra: str) -> list[str]:
    """`run` arguments for resnet8 on a Fashion-MNIST subset."""
    return ["run", "specs/fmnist_resnet20.yaml", "--set", f"data.root={data_root}", *TINY, *extra,
            "--progress", "lines"]


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def only_run(outputs: Path):
    client = MlflowClient(default_tracking_uri(outputs))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def test_bad_flag_is_one_line_exit_2():
    done = run_cli("run", "specs/fmnist_resnet20.yaml", "--epochs", "3")
    assert done.returncode == 2
    assert "unrecognized arguments: --epochs" in one_line(done.stderr)
    done = run_cli("run", "specs/fmnist_resnet20.yaml", "--devices", "two")
    assert done.returncode == 2 and "--devices" in one_line(done.stderr)
    done = run_cli("run", "--set", "train.epochs=2")
    assert done.returncode == 2 and "spec" in one_line(done.stderr)


def test_missing_data_is_one_line_exit_2(outputs, tmp_path):
    done = run_cli("run", "specs/fmnist_resnet20.yaml", "--set", f"data.root={tmp_path / 'nowhere'}",
                   "--output-dir", str(outputs))
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert "data.root" in line and "does not exist" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    done = run_cli("run", "specs/resnet20.yaml", "--set", "data.download=false", f"data.root={empty}",
                   "--output-dir", str(outputs), env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert done.returncode == 2
    assert "cifar10 not found" in one_line(done.stderr)
    assert not (outputs / "checkpoints").exists()   # no run was started


def test_corrupt_data_fails_before_any_run_is_recorded(fashion_mnist, outputs, tmp_path):
    for f in fashion_mnist.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes((fashion_mnist / "t10k-labels-idx1-ubyte.gz").read_bytes()[:300])
    done = run_cli(*tiny(tmp_path, "data.train_subset=256"), "--output-dir", str(outputs))
    assert done.returncode == 2 and "corrupt gzip" in one_line(done.stderr), done.stderr
    client = MlflowClient(default_tracking_uri(outputs))
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_bad_store_and_unknown_resume_are_one_line_exit_2(outputs):
    done = run_cli("run", "specs/fmnist_resnet20.yaml", "--tracking-uri", "nowhere", "--output-dir", str(outputs))
    assert done.returncode == 2 and "--tracking-uri" in one_line(done.stderr)
    done = run_cli("run", "--resume", "0123abcd", "--output-dir", str(outputs))
    assert done.returncode == 2 and "no checkpoint to resume run 0123abcd" in one_line(done.stderr)
    # servers that do not answer: one line within seconds, not MLflow's minutes of retries
    for uri in ("postgresql://nobody@127.0.0.1:9/db", "http://127.0.0.1:9"):
        done = run_cli("run", "specs/fmnist_resnet20.yaml", "--tracking-uri", uri, "--output-dir", str(outputs),
                       timeout=60)
        assert done.returncode == 2 and "--tracking-uri: cannot reach MLflow store" in one_line(done.stderr)


def test_nan_loss_fails_with_exit_1(fashion_mnist, outputs):
    done = run_cli(*tiny(fashion_mnist, "data.train_subset=512", "train.epochs=2", "train.lr=1.0e+6",
                         "train.schedule.type=constant"), "--output-dir", str(outputs))
    assert done.returncode == 1, done.stderr
    line = one_line(done.stderr)
    assert "failed" in line and "loss became" in line
    _, run = only_run(outputs)
    assert run.info.status == "FAILED" and "loss became" in run.data.tags["failure_reason"]


def test_sigterm_then_resume(fashion_mnist, outputs):
    args = tiny(fashion_mnist, "data.train_subset=512", "train.epochs=5", "train.batch_size=64")
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args, "--output-dir", str(outputs)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()                 # 'epoch 1/5 ...' once the first epoch is recorded
    assert first.startswith("epoch 1/5"), first + proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    line = one_line(err)
    assert "interrupted (SIGTERM)" in line and "--resume" in line
    client, run = only_run(outputs)
    run_id = run.info.run_id
    assert run.info.status == "KILLED" and run_id in line
    logged = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert logged and logged == sorted(set(logged)) and len(logged) < 5

    done = run_cli("run", "--resume", run_id, "--output-dir", str(outputs), "--progress", "lines")
    assert done.returncode == 0, done.stderr
    assert run_id in done.stdout and "mlflow ui --backend-store-uri sqlite:///" in done.stdout
    client, run = only_run(outputs)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    for key in ("train/loss", "val/loss", "lr", "images_per_s"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2, 3, 4, 5], key
    assert [m.step for m in client.get_metric_history(run_id, "test/acc")] == [5]


def test_sigkill_after_an_epoch_then_resume(fashion_mnist, outputs):
    """kill -9 once epoch 1's checkpoint is on disk: the run is left RUNNING (detectably stale: its process is
    gone), and `run --resume` says so and finishes it from epoch 2, every epoch recorded once."""
    args = tiny(fashion_mnist, "data.train_subset=512", "train.epochs=3", "train.batch_size=64")
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args, "--output-dir", str(outputs)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    assert first.startswith("epoch 1/3"), first + proc.stderr.read()
    deadline = time.time() + 120
    while not list(outputs.glob("checkpoints/*/last.ckpt")) and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.communicate(timeout=60)
    client, run = only_run(outputs)
    run_id = run.info.run_id
    assert run.info.status == "RUNNING" and run_owner(run) == "gone"

    done = run_cli("run", "--resume", run_id, "--output-dir", str(outputs), "--progress", "lines")
    assert done.returncode == 0, done.stderr
    assert f"run {run_id} was left RUNNING by process {proc.pid}" in done.stderr and "gone" in done.stderr
    client, run = only_run(outputs)
    assert run.info.status == "FINISHED" and run.data.tags["state"] == "FINISHED"
    for key in ("train/loss", "val/loss"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2, 3], key


def test_ddp_two_cpu_processes_make_one_run(fashion_mnist, outputs):
    done = run_cli(*tiny(fashion_mnist, "data.train_subset=1024", "train.epochs=1", "train.batch_size=64",
                         "data.test_subset=500"),
                   "--devices", "2", "--output-dir", str(outputs), timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("test accuracy") == 1         # only rank 0 prints
    client, run = only_run(outputs)
    assert run.info.status == "FINISHED" and run.data.params["train.devices"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [1]

    # the logged test accuracy covers all 500 test images (both shards), not one process's half
    from runs.checkpoint import load_model

    spec, model = load_model(run.info.run_id, tracking_uri=default_tracking_uri(outputs))
    correct, total = measure_test_accuracy(model, spec)
    assert total == 500
    assert run.data.metrics["test/acc"] == pytest.approx(correct / total, abs=1e-6)



def _two_nodes(folder: Path, args: list[str], launch) -> list[subprocess.CompletedProcess]:
    """Start the same command as node 0 and node 1, each in its own working folder (two machines that share no
    files), `launch(node_rank, port)` giving each its command prefix and environment; wait for both."""
    port, procs = free_port(), []
    for rank in (0, 1):
        (folder / f"node{rank}").mkdir(parents=True)
        prefix, env = launch(rank, port)
        procs.append(subprocess.Popen([*prefix, str(ROOT / "cli.py"), *args], cwd=folder / f"node{rank}",
                                      env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def test_two_nodes_make_one_run_by_hand_and_with_torchrun(fashion_mnist, tmp_path):
    """`--devices 1 --num-nodes 2` on two "machines" (two folders on 127.0.0.1): started with MASTER_ADDR,
    MASTER_PORT, NODE_RANK as Lightning reads them, then with torchrun. Each makes one MLflow run, written by node 0
    alone, whose test accuracy covers the whole test set; both launches train the same (bit for bit the same loss)."""
    args = tiny(fashion_mnist, "data.train_subset=1024", "train.epochs=1", "train.batch_size=64",
                "data.test_subset=500") + ["--devices", "1", "--num-nodes", "2"]
    args[1] = str(ROOT / args[1])                     # (each node runs in its own folder)
    by_hand = _two_nodes(tmp_path / "by_hand", args, lambda rank, port: (
        [sys.executable], {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(rank)}))
    torchrun = _two_nodes(tmp_path / "torchrun", args, lambda rank, port: (
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
         str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port)], {}))
    losses = []
    for launch, (node0, node1) in (("by_hand", by_hand), ("torchrun", torchrun)):
        assert node0.returncode == 0 and node1.returncode == 0, node0.stderr + node1.stderr
        assert node0.stdout.count("test accuracy") == 1 and "test accuracy" not in node1.stdout
        client, run = only_run(tmp_path / launch / "node0" / "outputs")
        assert run.info.status == "FINISHED" and run.data.params["train.num_nodes"] == "2"
        assert run.data.params["train.devices"] == "1"
        # node 1 recorded nothing: no store, no checkpoint, no artifact in its folder
        assert not [p for p in (tmp_path / launch / "node1").rglob("*") if p.is_file()], launch
        from runs.checkpoint import load_model

        uri = default_tracking_uri(tmp_path / launch / "node0" / "outputs")
        spec, model = load_model(run.info.run_id, tracking_uri=uri)
        correct, total = measure_test_accuracy(model, spec)
        assert total == 500 and run.data.metrics["test/acc"] == pytest.approx(correct / total, abs=1e-6)
        losses.append([m.value for m in client.get_metric_history(run.info.run_id, "train/loss")])
    assert losses[0] == losses[1]


def test_several_nodes_without_a_launcher_is_one_line(fashion_mnist, outputs):
    """Node 0 alone would wait half an hour for node 1: refused before anything is recorded."""
    env = {k: "" for k in ("MASTER_ADDR", "NODE_RANK")}
    clean = {k: v for k, v in os.environ.items() if k not in env}
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), *tiny(fashion_mnist), "--num-nodes", "2",
                           "--output-dir", str(outputs)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=clean)
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert line.startswith("train.num_nodes: 2 nodes, but no launcher started this process"), line
    assert "torchrun" in line and "NODE_RANK" in line
    client = MlflowClient(default_tracking_uri(outputs))
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
