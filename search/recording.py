"""MLflow records of a study: one experiment, one parent run for the study, one nested child run per trial.

Children are created by runs.fit.train (parent_run_id=...); this module creates and finds the parent, tags
children with their trial's state and marks children of dead workers (runs.tracking.read_history reads
their metric histories).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Optional

from mlflow.entities import Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

STUDY_TAG = "reslab.study"        # on the parent and every child
ROLE_TAG = "reslab.role"          # study | trial
TRIAL_TAG = "reslab.trial"        # the Optuna trial number (children)
STATE_TAG = "state"               # COMPLETE | FAILED | PRUNED (children)
FAILURE_TAG = "failure_reason"


def experiment_name(kind: str, study: str) -> str:
    """One MLflow experiment per study: 'ablation/shortcuts', 'search/resnet_macs'."""
    return f"{kind}/{study}"


def create_parent_run(client: MlflowClient, experiment_id: str, study: str, kind: str, description: str = "") -> str:
    """A new parent run for the study; returns its id."""
    tags = {STUDY_TAG: study, ROLE_TAG: "study", "reslab.kind": kind, "mlflow.runName": study}
    if description:
        tags["mlflow.note.content"] = description
    run = client.create_run(experiment_id, run_name=study, tags=tags)
    return run.info.run_id


def run_exists(client: MlflowClient, run_id: Optional[str]) -> bool:
    if not run_id:
        return False
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return False
    return run.info.lifecycle_stage == "active"


def reopen(client: MlflowClient, run_id: str) -> None:
    """Mark a resumed study's parent run RUNNING again."""
    if client.get_run(run_id).info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list:
    """Every child run of the parent (all pages)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                  max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def trial_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> dict[int, list]:
    """Child runs by Optuna trial number."""
    out: dict[int, list] = {}
    for run in child_runs(client, experiment_id, parent_run_id):
        number = run.data.tags.get(TRIAL_TAG)
        if number is not None and number.isdigit():
            out.setdefault(int(number), []).append(run)
    return out


def mark_child(client: MlflowClient, run_id: str, state: str, params: dict[str, Any] | None = None,
               reason: Optional[str] = None, status: Optional[str] = None) -> None:
    """Tag a child run with its trial's state (and the sampled values as params), ending it if asked."""
    tags = [RunTag(STATE_TAG, state)]
    if reason:
        tags.append(RunTag(FAILURE_TAG, reason[:5000]))
    existing = client.get_run(run_id).data.params
    new = [Param(_key(f"trial.{k}"), str(v)[:6000]) for k, v in (params or {}).items()
           if _key(f"trial.{k}") not in existing]
    client.log_batch(run_id, params=new, tags=tags)
    if status:
        client.set_terminated(run_id, status=status)


def _key(text: str) -> str:
    """An MLflow-legal key: letters, digits, _ - . / and spaces."""
    return re.sub(r"[^\w\-./ ]", "_", text)[:250]


def metric_key(*parts: str) -> str:
    return _key("/".join(parts))


def log_files(client: MlflowClient, run_id: str, files: Iterable[Path], folder: Optional[str] = None) -> None:
    for f in files:
        if Path(f).is_file():
            client.log_artifact(run_id, str(f), artifact_path=folder)
