"""What a study looks like where people open it: MLflow's run page of the parent, its experiment's runs table, and
each trial's page in optuna-dashboard.

- The parent run's description (the tag mlflow.note.content, which MLflow renders as Markdown where the run's page
  opens) is the report: per arm n, mean ± std, Δ with its 95% CI and p (a search: its trials table).
- The experiment gets a saved runs view, MLflow's "shared view state" (the experiment tag
  mlflow.sharedViewState.<key>, opened by the URL ?viewStateShareKey=<key>): the trials alone (so no parent needs
  expanding, in the table and in the charts), sorted by arm, with the columns arm, seed (a search: its sampled
  values) and the study's metrics. The experiment's description links to it. MLflow keeps a user's plain
  runs-table state in the browser (localStorage): a client cannot change what the bare experiment URL opens.
- Each trial links to its MLflow run: the user attribute reslab.mlflow_url and the trial's note in
  optuna-dashboard (a Markdown link).
"""
from __future__ import annotations

import json
from typing import Any, Optional

from runs.hints import program
from runs.mlflow_client import remote_artifacts
from runs.mlflow_write import MAX_TAG_VALUE, NOTE_TAG, legal_key, set_tags

from . import keys

SHARE_KEY = "reslab-trials"                              # the saved view's key (any string MLflow's UI accepts)
SHARED_VIEW_TAG = "mlflow.sharedViewState."              # MLflow's UI reads the view from experiment tag + key
UI_ADDRESS = "http://127.0.0.1:5000"                     # where `reslab ui` serves a local store by default
RUN_URL = "reslab.mlflow_url"                            # trial user attribute: its MLflow run's page


def column(kind: str, key: str) -> str:
    """MLflow's runs-table column key: params.`arm`, metrics.`test/error`."""
    return f"{kind}.`{key}`"


def trials_view(report: Any) -> dict:
    """The saved runs view of a study's experiment (`report`: its search.report.StudyReport): trials only, every
    one shown in charts, arm/seed (or the sampled values) and the study's metrics as columns."""
    metrics = [m["name"] for m in report.metrics]
    if report.kind == "ablation":
        params = ["arm", "seed"]
        order = column("params", "arm")
    else:
        params = [legal_key(f"trial.{k}") for k in sorted({k for r in report.trials_table
                                                                     for k in r.params})]
        order = column("metrics", metrics[0])
    return {
        "searchFilter": f"tags.`{keys.ROLE_TAG}` = 'trial'",
        "orderByKey": order, "orderByAsc": True, "lifecycleFilter": "Active",
        "selectedColumns": [column("params", p) for p in params] + [column("metrics", m) for m in metrics],
        "runsHiddenMode": "SHOW_ALL",                     # (MLflow's charts show the first 10 runs by default)
        "groupBy": None,                                  # (MLflow's groups show means without their spread)
    }


def view_url(experiment_id: str, base: str = "") -> str:
    """The URL (relative to the UI's address unless `base` is given) of the experiment's saved trials view."""
    return f"{base}#/experiments/{experiment_id}/runs?viewStateShareKey={SHARE_KEY}"


def result_tables(report: Any) -> str:
    """The report as Markdown, its tables first: an ablation's per-arm table of each metric (n, mean ± std, Δ,
    95% CI, p), then how to read them; a search's trials table."""
    from .report import HOLM_NOTE, TEST_NOTE

    if report.kind != "ablation":
        return "\n".join(report.markdown_body()).strip()
    lines = []
    for m in report.metrics:
        columns, rows = report.table(m["name"])
        unit = " (%)" if m["name"].endswith(("/error", "/acc")) else ""
        lines += [f"**{m['name']}{unit}**, {m['goal']}; mean ± std over seeds", "",
                  "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    holm = report.has_holm()
    return "\n".join(lines + [f"n = seeds per arm. {TEST_NOTE}." + (f" {HOLM_NOTE}." if holm else "")])


def parent_note(report: Any, description: str, experiment_id: str) -> str:
    """The parent run's description: the results tables first (MLflow shows a description's first lines until
    'Show more'), where the rest is, then the study's own words."""
    more = (f"[The trials: one row per {'arm x seed' if report.kind == 'ablation' else 'trial'}]"
            f"({view_url(experiment_id)}) · per-seed values, CSV, figures: Artifacts → results/")
    tail = "\n\n" + more + ("\n\n" + description.strip() if description.strip() else "")
    tables = result_tables(report)
    if len(tables) + len(tail) > MAX_TAG_VALUE:
        tables = tables[: MAX_TAG_VALUE - len(tail) - 100].rsplit("\n**", 1)[0] + \
            "\n\n(the remaining tables: results/results.md)"
    return (tables + tail)[: MAX_TAG_VALUE]


def experiment_note(note: str, experiment_id: str) -> str:
    """The experiment's description with a link to the saved trials view first (MLflow shows the description's
    first line above the runs table), added once."""
    link = f"[Open the trials table: arm, seed and metrics of every trial]({view_url(experiment_id)})"
    return note if view_url(experiment_id) in note else (link + "\n\n" + note.strip()).strip()


def publish(client: Any, parent_run_id: str, report: Any, description: str = "") -> None:
    """The parent's description (the report), the experiment's saved trials view and its link."""
    run = client.get_run(parent_run_id)
    experiment_id = run.info.experiment_id
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + SHARE_KEY, json.dumps(trials_view(report)))
    experiment = client.get_experiment(experiment_id)
    client.set_experiment_tag(experiment_id, NOTE_TAG,
                              experiment_note(experiment.tags.get(NOTE_TAG, ""), experiment_id))
    set_tags(client, parent_run_id, {NOTE_TAG: parent_note(report, description, experiment_id)})


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """A trial's MLflow run page: on the tracking server, else where `reslab ui` serves the local store."""
    base = tracking_uri.rstrip("/") + "/" if remote_artifacts(tracking_uri) else UI_ADDRESS + "/"
    return f"{base}#/experiments/{experiment_id}/runs/{run_id}"


def link_trial(trial: Any, tracking_uri: str, experiment_id: str, run_id: Optional[str],
               output_dir: Optional[str] = None) -> None:
    """The trial's MLflow run as its user attribute reslab.mlflow_url and its note in optuna-dashboard."""
    if not run_id:
        return
    url = run_url(tracking_uri, experiment_id, run_id)
    trial.set_user_attr(RUN_URL, url)
    try:
        from optuna_dashboard import save_note
    except ImportError:
        return
    served = "" if remote_artifacts(tracking_uri) else \
        f" (start the UI with `{program()} ui" + (f" --output-dir {output_dir}`)" if output_dir else "`)")
    save_note(trial, f"MLflow run: [{run_id}]({url}){served}")
