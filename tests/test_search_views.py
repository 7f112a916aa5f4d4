"""What a study looks like in the tools people open: a 3-arm ablation and a 4-trial search, each run through the
CLI, then read back from the Optuna storage (with optuna-dashboard's own loading code where it is installed) and the
MLflow store: objective names, importances only for searches and labelled with their evaluator, the report's test,
per-seed values and Holm-adjusted p, per-arm statistics as a table (not metrics), arm and seed as params, the study
file's header comment as the experiment's description, and a console free of library warnings."""
from __future__ import annotations

import io
import json
import math
import textwrap
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import pytest
from mlflow.tracking import MlflowClient

from conftest import run_cli
from test_search_study import TINY

pytestmark = pytest.mark.slow

HEADER = "# Three shortcut options on a tiny ResNet.\n# Two seeds each.\n"
# the tiny study of test_search_study, smaller still: 2 epochs of 2 batches per trial
BASE = TINY.replace("train_subset: 1000, val_size: 200, test_subset: 400",
                    "train_subset: 256, val_size: 128, test_subset: 128").replace(
    "epochs: 1, max_steps: null, batch_size: 100", "epochs: 2, max_steps: null, batch_size: 64, limit_batches: 2")


def dashboard_get(storage: str, path: str) -> dict:
    """GET `path` from optuna-dashboard's WSGI app on the storage (skips when optuna-dashboard is absent)."""
    dashboard = pytest.importorskip("optuna_dashboard")
    environ: dict = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO()}
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(dashboard.wsgi(storage)(environ, lambda s, headers, exc=None: status.append(s)))
    assert status[0].startswith("200"), (status, body[:300])
    return json.loads(body)


def no_library_warnings(text: str) -> None:
    assert "Warning" not in text and "warn(" not in text, text


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("views")
    path = tmp / "options.yaml"
    path.write_text(HEADER + BASE + textwrap.dedent("""\
        ablation:
          axes: {block.shortcut: [A, B, C]}
          baseline: A
          seeds: 2
          metric: [test/error, train/error]
        """))
    out = tmp / "outputs"
    done = run_cli("ablate", str(path), "--output-dir", str(out), "--heartbeat", "2", env={"PYTHONWARNINGS": ""})
    assert done.returncode == 0, done.stdout + done.stderr
    return path, out, done


def test_ablation_report_names_its_test_and_gives_seeds_and_holm(ablation):
    from search.stats import holm

    path, out, done = ablation
    no_library_warnings(done.stdout + done.stderr)
    assert "Holm" in done.stdout and "paired t-test" in done.stdout and "importances" not in done.stdout
    summary = json.loads(run_cli("report", str(path), "--output-dir", str(out), "--json").stdout)
    assert summary["importances"] is None
    for metric, rows in summary["results"].items():
        raw = [r["comparison"]["p"] for r in rows if r["comparison"]]
        adjusted = [r["comparison"]["p_holm"] for r in rows if r["comparison"]]
        assert len(raw) == 2 and adjusted == pytest.approx(holm(raw), nan_ok=True)
        assert all(a >= p for a, p in zip(adjusted, raw) if not math.isnan(p))

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ablation/options")
    assert "Three shortcut options on a tiny ResNet.\nTwo seeds" in experiment.tags["mlflow.note.content"]
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("reslab.role") == "study"]
    kids = [r for r in runs if r.data.tags.get("reslab.role") == "trial"]
    assert not parent.data.metrics, "per-arm summaries crowd the trials' charts"
    assert parent.data.tags["reslab.trials"] == "6 complete"
    assert sorted((k.data.params["arm"], k.data.params["seed"]) for k in kids) == [
        (a, s) for a in "ABC" for s in "01"]
    assert all(k.data.tags["arm"] == k.data.params["arm"] for k in kids)

    folder = Path(client.download_artifacts(parent.info.run_id, "results", str(out / "dl")))
    table = json.loads((folder / "arms.json").read_text())
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert len(rows) == 6 and {r["arm"] for r in rows} == {"A", "B", "C"}
    by_arm = {(r["metric"], r["arm"]): r for r in rows}
    for metric, arms in summary["results"].items():
        for s in arms:
            assert by_arm[metric, s["arm"]]["mean"] == pytest.approx(s["mean"])
            assert by_arm[metric, s["arm"]]["seed 1"] == pytest.approx(s["values"]["1"])
    markdown = (folder / "results.md").read_text()
    assert "paired t-test" in markdown and "| p (Holm) |" in markdown and "| arm | seed 0 | seed 1 |" in markdown
    c = {seed: summary["results"]["test/error"][2]["values"][seed] for seed in ("0", "1")}
    test_section = markdown.split("## train/error")[0]
    assert f"| C | {100 * c['0']:.2f} | {100 * c['1']:.2f} |" in test_section      # test/error, seeds 0 and 1
    kid = next(k for k in kids if k.data.params["arm"] == "C" and k.data.params["seed"] == "1")
    assert kid.data.metrics["test/error"] == c["1"]


def test_where_an_ablation_is_looked_at(ablation):
    """Each trial's diff is its arm's and seed's settings; the parent run's description (what MLflow shows where the
    run page opens) is the report with mean ± std, Δ, CI and p per arm; the experiment has a saved runs view of the
    trials (arm, seed, the metrics) linked from its description; each Optuna trial links to its MLflow run, as a
    user attribute and as its note in optuna-dashboard."""
    path, out, _ = ablation
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ablation/options")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("reslab.role") == "study"]
    kids = {(k.data.params["arm"], k.data.params["seed"]): k for k in runs if k.data.tags.get("reslab.role") == "trial"}
    assert kids["B", "1"].data.tags["diff"] == 'block.shortcut: "A" -> "B"; train.seed: null -> 1'
    assert kids["A", "0"].data.tags["diff"] == "train.seed: null -> 0"
    folder = Path(client.download_artifacts(kids["C", "1"].info.run_id, "", str(out / "kid")))
    assert json.loads((folder / "diff_from_base.json").read_text()) == {
        "block.shortcut": {"base": "A", "value": "C"}, "train.seed": {"base": None, "value": 1}}

    summary = json.loads(run_cli("report", str(path), "--output-dir", str(out), "--json").stdout)
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("**test/error (%)**, minimize; mean ± std over seeds\n\n"
                           "| arm | n | mean ± std | Δ vs A | 95% CI | p | p (Holm) |")
    assert note.endswith("Three shortcut options on a tiny ResNet.\nTwo seeds each.")
    c = next(r for r in summary["results"]["test/error"] if r["arm"] == "C")
    lo, hi = c["comparison"]["ci_low"], c["comparison"]["ci_high"]
    assert (f"| C | 2 | {100 * c['mean']:.2f} ± {100 * c['std']:.2f} | {100 * c['comparison']['diff']:+.2f} | "
            f"{100 * lo:+.2f}…{100 * hi:+.2f} |") in note

    e = experiment.experiment_id
    view = json.loads(experiment.tags["mlflow.sharedViewState.reslab-trials"])
    assert view["selectedColumns"] == ["params.`arm`", "params.`seed`", "metrics.`test/error`", "metrics.`train/error`"]
    assert view["searchFilter"] == "tags.`reslab.role` = 'trial'"
    matched = client.search_runs([e], filter_string=view["searchFilter"])     # the filter is one MLflow accepts
    assert sorted(r.info.run_id for r in matched) == sorted(k.info.run_id for k in kids.values())
    assert experiment.tags["mlflow.note.content"].startswith(
        f"[Open the trials table: arm, seed and metrics of every trial](#/experiments/{e}/runs?viewStateShareKey="
        f"reslab-trials)\n\nThree shortcut options on a tiny ResNet.")

    import optuna

    storage = f"sqlite:///{out / 'optuna.db'}"
    study = optuna.load_study(study_name="options", storage=storage)
    urls = {t.number: t.user_attrs["reslab.mlflow_url"] for t in study.trials}
    for t in study.trials:
        run_id = t.user_attrs["reslab.run_id"]
        assert urls[t.number] == f"http://127.0.0.1:5000/#/experiments/{e}/runs/{run_id}"
    detail = dashboard_get(storage, f"/api/studies/{study._study_id}")
    notes = {t["number"]: t["note"]["body"] for t in detail["trials"]}
    assert all(f"]({urls[n]})" in body for n, body in notes.items()) and len(notes) == 6
