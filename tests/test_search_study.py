"""Real studies on a tiny ResNet and a Fashion-MNIST subset: workers sharing one storage, a killed worker,
resume, MLflow parent/child records, report statistics, diverged and pruned trials, a multi-objective search."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from cli import main
from conftest import ROOT, tiny_study

pytestmark = pytest.mark.slow

TINY = tiny_study(data=(1000, 200, 400), widths=(8, 16, 32), epochs=1, batch_size=100)


def study_file(tmp_path: Path, body: str, name: str = "tiny") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(TINY + textwrap.dedent(body))
    return path


def children(client: MlflowClient, experiment: str) -> tuple[list, list]:
    """(parent runs, child runs) of a study's experiment."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("reslab.role") == "study"]
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, kids


def expected_stats(kids: list, metric: str) -> dict:
    """Per arm: n, mean, std, and vs arm A the paired difference, its 95% CI and p, from the child runs."""
    values: dict[str, dict[int, float]] = {}
    for r in kids:
        if r.data.tags.get("state") == "COMPLETE":
            values.setdefault(r.data.tags["arm"], {})[int(r.data.tags["seed"])] = r.data.metrics[metric]
    out = {}
    for arm, by_seed in values.items():
        v = np.array(list(by_seed.values()))
        row = {"n": len(v), "mean": v.mean(), "std": v.std(ddof=1)}
        if arm != "A":
            seeds = sorted(by_seed)
            d = np.array([by_seed[s] - values["A"][s] for s in seeds])
            half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
            row.update(diff=d.mean(), ci=(d.mean() - half, d.mean() + half),
                       p=stats.ttest_rel([by_seed[s] for s in seeds], [values["A"][s] for s in seeds]).pvalue)
        out[arm] = row
    return out


def test_two_workers_kill_one_resume_and_report(tmp_path, fashion_mnist, capsys):
    path = study_file(tmp_path, """
        ablation:
          axes: {block.shortcut: [A, B]}
          baseline: A
          seeds: 2
          metric: [test/error, train/error]
        """)
    out = tmp_path / "outputs"
    args = [sys.executable, str(ROOT / "cli.py"), "ablate", str(path), "--workers", "2", "--heartbeat", "2",
            "--output-dir", str(out)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    pids, killed_trial, log = {}, None, []
    for line in proc.stdout:
        log.append(line)
        if line.startswith("worker ") and ": pid " in line:
            pids[int(line.split()[1].rstrip(":"))] = int(line.split("pid ")[1].split()[0])
        if killed_trial is None and line.startswith("[worker 1] trial ") and line.rstrip().endswith("started"):
            killed_trial = int(line.split()[3])
            time.sleep(1.0)                                   # well inside training: kill it mid-trial
            os.kill(pids[1], signal.SIGKILL)
    assert proc.wait(timeout=600) == 0, "".join(log)
    text = "".join(log)
    assert killed_trial is not None and f"worker 1 (pid {pids[1]}) died by signal 9" in text

    storage = f"sqlite:///{out / 'optuna.db'}"
    trials = optuna.load_study(study_name="tiny", storage=storage).get_trials()
    killed = trials[killed_trial]
    why = text + "".join(f"trial {t.number} {t.state.name} {t.params} {t.user_attrs}\n" for t in trials)
    assert killed.state == optuna.trial.TrialState.FAIL and "reslab.outcome" not in killed.user_attrs, why
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    cells = sorted((t.params["arm"], t.params["seed"]) for t in complete)
    assert cells == [("A", 0), ("A", 1), ("B", 0), ("B", 1)], why     # each cell once: nothing repeated
    chain = [killed]                                                  # the killed trial was retried (a retry
    while chain[-1].state != optuna.trial.TrialState.COMPLETE:        # that itself raised is retried in turn)
        retries = [t for t in trials if t.user_attrs.get("reslab.retry_of") == chain[-1].number]
        assert len(retries) == 1 and retries[0].params == killed.params, why
        chain.append(retries[0])
    assert all(t.user_attrs.get("reslab.outcome") == "error" for t in chain[1:-1]), why
    assert len(trials) == 4 + len(chain) - 1, why                     # nothing else ran

    # a rerun finds every cell done: it trains nothing and loses nothing
    capsys.readouterr()
    assert main(["ablate", str(path), "--workers", "1", "--heartbeat", "1", "--output-dir", str(out)]) == 0
    again = capsys.readouterr().out
    assert "started" not in again and "(resumed)" in again
    after = optuna.load_study(study_name="tiny", storage=storage).get_trials()
    assert [(t.number, t.state, t.values) for t in after] == [(t.number, t.state, t.values) for t in trials]

    # MLflow: one parent for the study, a child per trial that reached MLflow, states as in Optuna
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    parents, kids = children(client, "ablation/tiny")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert all(k.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for k in kids)
    done = [k for k in kids if k.data.tags.get("state") == "COMPLETE"]
    assert sorted((k.data.tags["arm"], k.data.tags["seed"]) for k in done) == [("A", "0"), ("A", "1"), ("B", "0"),
                                                                               ("B", "1")]
    for k in done:
        assert k.info.status == "FINISHED" and k.data.tags["reslab.study"] == "tiny"
        assert {"test/error", "train/error", "val/error"} <= set(k.data.metrics)
        assert k.data.params["trial.block.shortcut"] == k.data.tags["arm"]
        assert k.data.params["train.seed"] == k.data.tags["seed"]
        assert len(client.get_metric_history(k.info.run_id, "train/error")) == 1      # one epoch
    others = [k for k in kids if k not in done]
    assert all(k.info.status == "FAILED" and k.data.tags.get("state") == "FAILED" for k in others)
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "results")}
    assert {"results/results.csv", "results/results.md", "results/curves.png"} <= artifacts
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id, "study")} == {"study/tiny.yaml",
                                                                                         "study/resnet20.yaml"}

    # the report's statistics equal those computed here from the child runs
    assert main(["report", str(path), "--output-dir", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    for metric in ("test/error", "train/error"):
        expected = expected_stats(kids, metric)
        for row in summary["results"][metric]:
            e = expected[row["arm"]]
            assert row["n"] == e["n"] == 2
            assert row["mean"] == pytest.approx(e["mean"]) and row["std"] == pytest.approx(e["std"])
            if row["arm"] == "A":
                assert row["comparison"] is None
                continue
            c = row["comparison"]
            assert c["test"] == "paired t" and c["diff"] == pytest.approx(e["diff"])
            assert (c["ci_low"], c["ci_high"]) == pytest.approx(e["ci"])
            if not math.isnan(e["p"]):
                assert c["p"] == pytest.approx(e["p"])
    assert main(["report", "tiny", "--output-dir", str(out)]) == 0
    table = capsys.readouterr().out
    assert "test/error (%)" in table and "Δ vs A" in table


def test_diverged_arm_fails_with_reason_and_study_goes_on(tmp_path, fashion_mnist):
    from search import StudyOptions, run_study

    path = study_file(tmp_path, """
        ablation:
          arms: {steady: {train.lr: 0.05}, exploding: {train.lr: 1.0e+6}}
          baseline: steady
          seeds: 1
        """, name="diverge")
    summary = run_study(StudyOptions(str(path), output_dir=str(tmp_path / "outputs"), heartbeat=1, progress=False))
    arms = {a["name"]: a for a in summary["arms"]}
    assert arms["steady"]["complete"] == [0] and arms["exploding"]["complete"] == []
    assert "nan" in arms["exploding"]["failed"][0]["reason"] or "non-finite" in arms["exploding"]["failed"][0]["reason"]
    study = optuna.load_study(study_name="diverge", storage=f"sqlite:///{tmp_path / 'outputs' / 'optuna.db'}")
    bad = [t for t in study.trials if t.params["arm"] == "exploding"]
    assert len(bad) == 1 and bad[0].state == optuna.trial.TrialState.FAIL     # final: not retried
    assert bad[0].user_attrs["reslab.outcome"] == "diverged" and bad[0].user_attrs["reslab.reason"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    _, kids = children(client, "ablation/diverge")
    states = {k.data.tags["arm"]: (k.info.status, k.data.tags["state"]) for k in kids}
    assert states == {"steady": ("FINISHED", "COMPLETE"), "exploding": ("FAILED", "FAILED")}
    assert "failure_reason" in [k for k in kids if k.data.tags["arm"] == "exploding"][0].data.tags


def test_pruned_trial_is_pruned_in_optuna_and_mlflow(tmp_path, fashion_mnist):
    from runs.mlflow_client import client_for
    from runs.mlflow_write import ensure_experiment
    from search.objective import TrialContext, record_outcome, run_trial
    from search.space import load_study_file

    path = study_file(tmp_path, """
        search:
          space: {train.lr: [0.05]}
          objectives: [val/error]
          pruner: median
        """, name="prune")
    plan = load_study_file(path, ["train.epochs=2"])
    out = tmp_path / "outputs"
    client = client_for(None, out)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    exp = ensure_experiment(client, "search/prune", out)
    parent = client.create_run(exp).info.run_id
    # a pruner that prunes any positive error: the callback must stop the run after its first epoch
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    trial = study.ask()
    outcome = run_trial(TrialContext(plan, uri, "search/prune", exp, parent, out, progress=False, client=client),
                        trial)
    record_outcome(trial, outcome)
    study.tell(trial, state=outcome.state)
    assert study.trials[0].state == optuna.trial.TrialState.PRUNED
    assert list(study.trials[0].intermediate_values) == [1]            # reported after epoch 1, then pruned
    run = client.get_run(outcome.run_id)
    assert run.info.status == "KILLED" and run.data.tags["state"] == "PRUNED"
    assert run.data.tags["mlflow.parentRunId"] == parent


def test_multi_objective_search_records_pareto_front(tmp_path, fashion_mnist):
    from search import StudyOptions, run_study

    path = study_file(tmp_path, """
        search:
          space:
            block.type: [plain, basic]
            width_multiplier: {low: 0.5, high: 1.5, log: true}
          objectives: [val/error, macs]
          sampler: nsga2
          sampler_seed: 3
          trials: 3
        """, name="front")
    out = tmp_path / "outputs"
    summary = run_study(StudyOptions(str(path), output_dir=str(out), heartbeat=1, progress=False, kind="search"))
    rows = summary["trials_table"]
    assert len(rows) == 3 and all(r["state"] == "COMPLETE" for r in rows)
    assert summary["best"] and set(summary["best"]) <= {r["number"] for r in rows}
    for r in rows:                                   # the MACs objective is the network's own count
        assert r["values"][1] == r["metrics"]["macs"]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    parents, kids = children(client, "search/front")
    assert len(parents) == 1 and len(kids) == 3
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id, "results")} >= {
        "results/pareto.png", "results/results.csv", "results/results.md", "results/summary.json"}
    assert all("trial.width_multiplier" in k.data.params for k in kids)


def test_a_cells_result_does_not_depend_on_how_many_workers_ran_it(tmp_path):
    """Every trial of a study runs with the study's CPU thread count (train.threads, default 1), whatever --workers
    says: the same cells with one worker and with two give the same numbers to the last bit, and the report says
    where they ran."""
    path = study_file(tmp_path, "ablation: {axes: {block.shortcut: [A, B]}, baseline: A, seeds: 1}\n")
    results = {}
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}    # a user's shell: all cores on offer
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "ablate", str(path), "--workers", str(workers),
                               "--output-dir", str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'optuna.db'}")
        study = optuna.load_study(study_name="tiny", storage=storage)
        assert study.user_attrs["reslab.trial_threads"] == 1
        results[workers] = {(t.params["arm"], t.params["seed"]): (t.user_attrs["reslab.metrics"]["test/loss"],
                                                                 t.user_attrs["reslab.threads"])
                            for t in study.trials}
    assert results[1] == results[2] and all(threads == 1 for _, threads in results[1].values())
