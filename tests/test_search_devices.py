"""Trials of several devices (`--devices-per-trial K`): each trial trains with Lightning DDP over K processes (gloo on
CPU), the worker being rank 0. A rank killed mid-trial, then a rerun: every cell COMPLETE once. The pruner's
decision reaches every rank. Bad device counts and stores: one line, exit 2, nothing recorded."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from cli import main
from conftest import ROOT, tiny_study

TINY = tiny_study(data=(400, 100, 200), widths=(8, 8, 8), epochs=1, batch_size=50)


def study_file(tmp_path: Path, body: str, name: str = "ddp") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(TINY + textwrap.dedent(body))
    return path


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.slow
def test_a_rank_killed_mid_trial_then_a_rerun_completes_every_cell_once(tmp_path, fashion_mnist, capsys):
    path = study_file(tmp_path, "ablation: {axes: {block.shortcut: [A, B]}, baseline: A, seeds: 1}\n")
    out = tmp_path / "outputs"
    args = [sys.executable, str(ROOT / "cli.py"), "ablate", str(path), "--workers", "2", "--devices-per-trial", "2",
            "--heartbeat", "2", "--output-dir", str(out)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    log, killed = [], None
    for line in proc.stdout:
        log.append(line)
        # '[worker 1] trial 3: rank 1 pid 1234': the second process of worker 1's trial, started by Lightning
        if killed is None and line.startswith("[worker 1] trial ") and ": rank 1 pid " in line:
            killed = int(line.split()[3].rstrip(":")), int(line.rsplit(" ", 1)[1])
            time.sleep(1.0)                                   # inside the trial: joining DDP or training
            os.kill(killed[1], signal.SIGKILL)
    assert proc.wait(timeout=600) == 0, "".join(log)
    text = "".join(log)
    assert killed is not None, text
    assert text.count(": rank 1 pid ") >= 2, text                  # every trial ran on two processes
    assert "started on 2 devices" in text

    storage = f"sqlite:///{out / 'optuna.db'}"
    capsys.readouterr()
    assert main(["ablate", str(path), "--workers", "2", "--heartbeat", "2", "--output-dir", str(out)]) == 0
    rerun = capsys.readouterr().out
    trials = optuna.load_study(study_name="ddp", storage=storage).get_trials()
    why = text + rerun + "".join(f"trial {t.number} {t.state.name} {t.params} {t.user_attrs}\n" for t in trials)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.params["arm"] for t in complete) == ["A", "B"], why         # each cell COMPLETE, once
    hit = trials[killed[0]]
    assert hit.state == optuna.trial.TrialState.FAIL and hit.user_attrs.get("reslab.outcome") in (None, "error"), why
    retry = [t for t in complete if t.params == hit.params]
    assert retry and retry[0].user_attrs["reslab.retry_of"] == hit.number, why
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL) for t in trials), why
    assert all(t.user_attrs["reslab.device"] == "2 x cpu" for t in complete), why
    study = optuna.load_study(study_name="ddp", storage=storage)
    assert study.user_attrs["reslab.trial_devices"] == 2

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ablation/ddp")
    runs = client.search_runs([exp.experiment_id], "tags.`reslab.role` = 'trial'")
    done = [r for r in runs if r.data.tags.get("state") == "COMPLETE"]
    assert sorted(r.data.tags["arm"] for r in done) == ["A", "B"], why
    for r in done:                                # one run per trial, by rank 0 alone, trained on 2 processes
        assert r.info.status == "FINISHED" and r.data.params["train.devices"] == "2"
        assert [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")] == [1]
        assert r.data.metrics["test/error"] == pytest.approx(
            [t for t in complete if t.params["arm"] == r.data.tags["arm"]][0].values[0])
    assert all(r.info.status == "FAILED" for r in runs if r not in done), why
    assert not list((out / "checkpoints").glob("*.ckpt"))            # no second copy by Lightning's own callback

    # a study fixes its devices per trial: another count is refused in one line, and nothing changes
    assert main(["ablate", str(path), "--devices-per-trial", "1", "--output-dir", str(out)]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("--devices-per-trial: study 'ddp'") and "2 devices" in line, line
    after = optuna.load_study(study_name="ddp", storage=storage).get_trials()
    assert [(t.number, t.state) for t in after] == [(t.number, t.state) for t in trials]


PRUNE_SCRIPT = """\
import json, sys
sys.path.insert(0, {root!r})
from search.objective import follow_trial, following
trial = following()
if trial is not None:                       # rank 1, started by Lightning from this very command line
    sys.exit(follow_trial(trial))
import optuna
from runs.mlflow_client import client_for
from runs.mlflow_write import ensure_experiment
from search.objective import TrialContext, run_trial
from search.space import load_study_file
plan = load_study_file({path!r}, ["train.epochs=3"])
client = client_for(None, {out!r})
exp = ensure_experiment(client, "search/prune", {out!r})
parent = client.create_run(exp).info.run_id
study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))   # prunes any positive error
t = study.ask()
outcome = run_trial(TrialContext(plan, "sqlite:///{out}/mlflow.db", "search/prune", exp, parent, {out!r},
                                 progress=False, client=client, devices=2), t)
study.tell(t, state=outcome.state)
print(json.dumps({{"state": outcome.state.name, "run_id": outcome.run_id,
                  "reported": list(study.trials[0].intermediate_values)}}))
"""


@pytest.mark.slow
def test_the_pruners_decision_reaches_every_rank(tmp_path, fashion_mnist):
    """Rank 0 asks Optuna and broadcasts: both processes stop after epoch 1 of 3. Were the decision rank 0's alone,
    rank 1 would train on into epoch 2 waiting for a rank 0 that left, fail, and Lightning would kill the job."""
    path = study_file(tmp_path, """
        search:
          space: {train.lr: [0.05]}
          objectives: [val/error]
          pruner: {type: median, warmup_epochs: 0}
        """, name="prune")
    out = tmp_path / "outputs"
    script = tmp_path / "prune_one.py"
    script.write_text(PRUNE_SCRIPT.format(root=str(ROOT), path=str(path), out=str(out)))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rank 1 pid" in done.stdout and "rank 1 failed" not in done.stderr, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["state"] == "PRUNED" and result["reported"] == [1], result
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(result["run_id"])
    assert run.info.status == "KILLED" and run.data.tags["state"] == "PRUNED"
    assert run.data.params["train.devices"] == "2" and run.data.params["train.epochs"] == "3"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/error")] == [1]


def test_devices_per_trial_that_this_machine_cannot_give_is_one_line(tmp_path, capsys, monkeypatch):
    path = study_file(tmp_path, "ablation: {axes: {block.shortcut: [A, B]}, baseline: A, seeds: 1}\n")
    out = tmp_path / "outputs"
    cores = os.cpu_count()
    assert main(["ablate", str(path), "--devices-per-trial", str(cores + 1), "--output-dir", str(out)]) == 2
    assert one_line(capsys.readouterr().err) == (f"--devices-per-trial: {cores + 1} processes per trial, but this "
                                                 f"machine has {cores} CPU cores")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")                # no GPU visible, whatever the machine
    assert main(["ablate", str(path), "--devices-per-trial", "2", "--set", "train.accelerator=gpu",
                 "--output-dir", str(out)]) == 2
    assert one_line(capsys.readouterr().err) == "--devices-per-trial: 2 GPUs per trial, but 0 GPUs are visible"
    file = study_file(tmp_path, f"devices_per_trial: {cores + 1}\nablation: {{axes: {{block.shortcut: [A]}}, "
                                f"baseline: A, seeds: 1}}\n", name="infile")
    assert main(["ablate", str(file), "--output-dir", str(out)]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"{file}:8: devices_per_trial: {cores + 1} processes per trial"), line
    assert main(["ablate", str(file), "--devices-per-trial", "1", "--output-dir", str(out)]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"{file}:8: devices_per_trial: {cores + 1} devices per trial, but --devices-per-trial "
                           f"says 1"), line
    assert main(["ablate", str(path), "--devices-per-trial", "0", "--output-dir", str(out)]) == 2
    assert one_line(capsys.readouterr().err) == "--devices-per-trial: must be at least 1 (got 0)"
    assert not out.exists()                                           # nothing recorded, no store made


def test_gpus_are_split_into_groups_of_k_and_k_must_divide_them(tmp_path, monkeypatch):
    from arches.errors import ReslabError
    from search import study
    from search.space import load_study_file

    plan = load_study_file(study_file(tmp_path, "ablation: {axes: {block.shortcut: [A]}, baseline: A, seeds: 1}\n"),
                           ["train.accelerator=gpu"])
    where = ReslabError("", file="--devices-per-trial")
    monkeypatch.setattr(study, "_gpus", lambda: ["0", "1", "2", "3"])
    assert study.check_devices(2, plan, where) == ["0", "1", "2", "3"]
    envs = [study.worker_env(i, ["0", "1", "2", "3"], 1, 2)["CUDA_VISIBLE_DEVICES"] for i in range(3)]
    assert envs == ["0,1", "2,3", "0,1"]                              # more workers than groups: they share
    assert study.worker_env(3, ["0", "1", "2", "3"], 1)["CUDA_VISIBLE_DEVICES"] == "3"
    with pytest.raises(ReslabError, match=r"^--devices-per-trial: 3 does not divide the 4 visible GPUs"):
        study.check_devices(3, plan, where)
    with pytest.raises(ReslabError, match=r"^--devices-per-trial: 8 GPUs per trial, but 4 GPUs are visible"):
        study.check_devices(8, plan, where)


def test_unreachable_stores_and_missing_drivers_are_one_line_and_record_nothing(tmp_path, capsys, monkeypatch):
    path = study_file(tmp_path, "ablation: {axes: {block.shortcut: [A]}, baseline: A, seeds: 1}\n")
    out = tmp_path / "outputs"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RESLAB_STORAGE", raising=False)
    assert main(["ablate", str(path), "--tracking-uri", "http://127.0.0.1:9", "--output-dir", str(out)]) == 2
    assert one_line(capsys.readouterr().err).startswith("--tracking-uri: cannot reach MLflow store http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")      # the same, from the environment
    assert main(["ablate", str(path), "--output-dir", str(out)]) == 2
    assert one_line(capsys.readouterr().err).startswith(
        "--tracking-uri ($MLFLOW_TRACKING_URI): cannot reach MLflow store http://127.0.0.1:9")
    assert not out.exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql+pg8000://reslab@127.0.0.1:9/mlflow")
    assert main(["ablate", str(path), "--output-dir", str(out)]) == 2
    assert one_line(capsys.readouterr().err) == (
        "--tracking-uri ($MLFLOW_TRACKING_URI): MLflow store postgresql+pg8000://...: its database driver 'pg8000' "
        "is not installed (pip install pg8000)")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    for storage in ("postgresql+pg8000://reslab@127.0.0.1:9/optuna", "postgresql://reslab@127.0.0.1:9/optuna"):
        monkeypatch.setenv("RESLAB_STORAGE", storage)
        assert main(["ablate", str(path), "--output-dir", str(out)]) == 2
        line = one_line(capsys.readouterr().err)
        assert line.startswith("--storage ($RESLAB_STORAGE): "), line
        assert ("'pg8000' is not installed (pip install pg8000)" in line if "pg8000" in storage else
                "cannot reach Optuna storage postgresql+psycopg2://reslab@127.0.0.1:9/optuna" in line), line
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")          # the default store, made, holds nothing
    assert [e.name for e in client.search_experiments()] == ["Default"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["mlflow.db", "mlflow.db.lock"]
