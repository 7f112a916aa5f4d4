"""The multi-machine deployment, for real on 127.0.0.1: MLflow's tracking server on PostgreSQL with proxied artifacts
(`mlflow server --serve-artifacts --artifacts-destination`), Optuna on PostgreSQL, and two `ablate` commands in two
working directories that share no files (two machines). The first is killed (SIGKILL) mid-trial; the second picks
that trial up from the checkpoint the first uploaded, in the same MLflow run. Every artifact is read back through
the server; neither machine's folder holds anything afterwards."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from cli import main
from conftest import ROOT, free_port, tiny_study
from test_search_postgres import PG_BIN, postgres  # noqa: F401  (postgres: the fixture)

pytestmark = pytest.mark.slow

STUDY = tiny_study(data=(1200, 100, 200), widths=(8, 16, 16), epochs=3, batch_size=40) + """\
ablation:
  axes: {block.shortcut: [A, B]}
  baseline: A
  seeds: 1
"""


@pytest.fixture
def tracking_server(postgres, tmp_path):  # noqa: F811  (the imported fixture)
    """`mlflow server` on PostgreSQL with proxied artifacts, as the README starts it; yields its URL."""
    from search.ui import stop_group
    from search.storage import with_driver

    port = free_port()
    artifacts = tmp_path / "server" / "artifacts"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", with_driver(f"{postgres}/mlflow"),
           "--serve-artifacts", "--artifacts-destination", str(artifacts), "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(0.5)
        yield url, artifacts
    finally:
        stop_group(proc)
        log.close()


def test_two_machines_a_tracking_server_and_a_machine_killed_mid_trial(tmp_path, tracking_server, postgres,  # noqa
                                                                       fashion_mnist, capsys, monkeypatch):
    url, artifacts = tracking_server
    subprocess.run([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", postgres.rsplit(":", 1)[1], "-U", "postgres",
                    "optuna"], check=True, capture_output=True)
    storage = f"{postgres}/optuna"
    machines = {}
    for name in ("a", "b"):                    # two working folders, nothing shared between them
        folder = tmp_path / name
        folder.mkdir()
        (folder / "cells.yaml").write_text(STUDY)
        machines[name] = folder
    command = [sys.executable, str(ROOT / "cli.py"), "ablate", "cells.yaml", "--workers", "1", "--heartbeat", "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RESLAB_STORAGE")}
    first = subprocess.Popen(command + ["--tracking-uri", url, "--storage", storage], cwd=machines["a"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    log_a = [first.stdout.readline()]
    while " started" not in log_a[-1]:                      # machine a has claimed its cell ...
        log_a.append(first.stdout.readline())
        assert log_a[-1] or first.poll() is None, "".join(log_a)
    second = subprocess.Popen(command, cwd=machines["b"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**env, "MLFLOW_TRACKING_URI": url, "RESLAB_STORAGE": storage})

    client = MlflowClient(url)                           # ... and killed once its first epoch is on the server
    deadline, run = time.time() + 300, None
    while time.time() < deadline:
        exp = client.get_experiment_by_name("ablation/cells")
        running = client.search_runs([exp.experiment_id], "tags.`reslab.role` = 'trial' and "
                                     "attributes.status = 'RUNNING'") if exp else []
        run = running[0] if running else None
        if run is not None and "checkpoints/last.ckpt" in [f.path for f in client.list_artifacts(
                run.info.run_id, "checkpoints")]:
            break
        time.sleep(0.1)
    first.kill()
    killed_at = time.time() * 1000
    log_a.append(first.communicate(timeout=60)[0])
    assert run is not None, "".join(log_a)
    killed_run = run.info.run_id
    epochs_before = [m.step for m in client.get_metric_history(killed_run, "train/loss")]
    assert client.get_run(killed_run).info.status == "RUNNING" and 1 <= len(epochs_before) < 3, epochs_before

    out_b, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out_b
    assert f"note: run {killed_run} was left RUNNING by process {first.pid}" in out_b and "resuming" in out_b, out_b
    # machine b trained its own cell from epoch 1, and the killed one from where machine a left it
    assert out_b.count("epoch 1/3") == 1 and out_b.count("epoch 3/3") == 2, out_b

    from search.storage import with_driver
    trials = optuna.load_study(study_name="cells", storage=with_driver(storage)).get_trials()
    why = "".join(log_a) + out_b + "".join(f"{t.number} {t.state.name} {t.params} {t.user_attrs}\n" for t in trials)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.params["arm"] for t in complete) == ["A", "B"] and len(trials) == 3, why
    dead = [t for t in trials if t.state == optuna.trial.TrialState.FAIL][0]
    assert "reslab.outcome" not in dead.user_attrs, why            # no outcome: its machine died
    retry = [t for t in complete if t.user_attrs.get("reslab.retry_of") == dead.number][0]

    # one MLflow run per cell: the killed attempt and its retry are one run, its epochs each recorded once
    exp = client.get_experiment_by_name("ablation/cells")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("reslab.role") == "study"]
    kids = [r for r in runs if r.data.tags.get("reslab.role") == "trial"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED" and len(kids) == 2, why
    resumed = client.get_run(killed_run)
    assert resumed.info.status == "FINISHED" and resumed.data.tags["state"] == "COMPLETE"
    assert resumed.data.tags["reslab.trial"] == str(retry.number) and resumed.data.tags["resumed"] == "1"
    assert resumed.data.tags["reslab.attempts"] == f"{dead.number}, {retry.number}"
    for key in ("train/loss", "val/loss"):
        history = client.get_metric_history(killed_run, key)
        assert sorted(m.step for m in history) == [1, 2, 3], key
        assert all(m.timestamp < killed_at for m in history if m.step in epochs_before), key   # machine a's
    assert retry.values[0] == pytest.approx(resumed.data.metrics["test/error"])

    # every artifact is on the server, read through it; the checkpoints load
    for kid in kids:
        names = {f.path for f in client.list_artifacts(kid.info.run_id)}
        assert {"curves.png", "spec.yaml", "checkpoints"} <= names, names
        ckpt = client.download_artifacts(kid.info.run_id, "checkpoints/last.ckpt", str(tmp_path / kid.info.run_id))
        assert torch.load(ckpt, weights_only=True, map_location="cpu")["epoch"] == 2        # 3 epochs, from 0
        assert kid.info.artifact_uri.startswith("mlflow-artifacts:/")
    results = {f.path for f in client.list_artifacts(parent[0].info.run_id, "results")}
    assert {"results/results.md", "results/results.csv", "results/curves.png"} <= results
    assert "| A |" in Path(client.download_artifacts(parent[0].info.run_id, "results/results.md",
                                                     str(tmp_path / "parent"))).read_text()
    assert {f.path for f in client.list_artifacts(parent[0].info.run_id, "study")} == {"study/cells.yaml",
                                                                                        "study/resnet20.yaml"}
    assert list(artifacts.rglob("last.ckpt")) and list(artifacts.rglob("MLmodel"))   # (where the server keeps them)
    for folder in machines.values():                       # nothing written on either machine: no outputs/ at all
        assert sorted(p.name for p in folder.iterdir()) == ["cells.yaml"], list(folder.rglob("*"))

    # the report, from anywhere, with the stores named by the environment
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("RESLAB_STORAGE", storage)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["report", "cells"]) == 0
    table = capsys.readouterr().out
    assert "test/error (%)" in table and parent[0].info.run_id in table


def test_a_run_stopped_on_one_machine_resumes_on_another_through_the_server(tmp_path, tracking_server,  # noqa: F811
                                                                             fashion_mnist):
    """`cli.py run --tracking-uri http://...` stopped by SIGTERM after its first epoch on machine a, then
    `run --resume RUN_ID` on machine b with the server named by $MLFLOW_TRACKING_URI: one run, every epoch recorded
    once, the checkpoint fetched from the server, and no file written in either machine's folder."""
    url, _ = tracking_server
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        folder.mkdir()
    spec = [str(ROOT / "specs" / "fmnist_resnet20.yaml"), "--set", f"data.root={fashion_mnist}",
            "stages.0.depth=1", "stages.1.depth=1", "stages.2.depth=1", "data.val_size=256", "data.test_subset=512",
            "data.train_subset=512", "train.epochs=3", "train.batch_size=64"]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RESLAB_STORAGE")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "run", *spec, "--progress", "lines",
                             "--tracking-uri", url], cwd=folders[0], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    assert first.startswith("epoch 1/3"), first + proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert f"--tracking-uri {url}" in err, err                      # the resume command names the server
    run_id = err.split("run ", 1)[1].split()[0]
    client = MlflowClient(url)
    assert client.get_run(run_id).info.status == "KILLED"
    assert "checkpoints/last.ckpt" in [f.path for f in client.list_artifacts(run_id, "checkpoints")]
    done_epochs = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert 1 <= len(done_epochs) < 3

    resumed = subprocess.run([sys.executable, str(ROOT / "cli.py"), "run", "--resume", run_id, "--progress", "lines"],
                             cwd=folders[1], env={**env, "MLFLOW_TRACKING_URI": url}, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"epoch {len(done_epochs) + 1}/3" in resumed.stdout and "epoch 1/3" not in resumed.stdout, resumed.stdout
    assert f"see it: {url}/#/experiments" in resumed.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "1"
    for key in ("train/loss", "val/loss"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2, 3], key
    ckpt = client.download_artifacts(run_id, "checkpoints/last.ckpt", str(tmp_path / "fetched"))
    assert torch.load(ckpt, weights_only=True, map_location="cpu")["epoch"] == 2
    for folder in folders:                                          # nothing on either machine
        assert not list(folder.rglob("*")), list(folder.rglob("*"))
