"""MLflow records of a study: one experiment, one parent run for the study, one nested child run per trial.

Children are created by runs.fit.train (parent_run_id=...); this module creates and finds the parent, tags
children with their trial's state and the values they stand for, and closes children of dead workers. Every
write goes through runs.mlflow_write.
"""
from __future__ import annotations

from typing import Any, Optional

from mlflow.tracking import MlflowClient

from runs.mlflow_read import child_runs
from runs.mlflow_write import FAILURE_TAG, STATE_TAG, create_run, end_run, legal_key, log_params, set_tags, source_tags

from . import keys


def experiment_name(kind: str, study: str) -> str:
    """One MLflow experiment per study: 'ablation/shortcuts', 'search/resnet_macs'."""
    return f"{kind}/{study}"


def create_parent_run(client: MlflowClient, experiment_id: str, study: str, kind: str, description: str = "") -> str:
    """A new parent run for the study; returns its id."""
    tags = {keys.STUDY_TAG: study, keys.ROLE_TAG: "study", keys.KIND_TAG: kind, **source_tags()}
    if description:
        tags["mlflow.note.content"] = description
    return create_run(client, experiment_id, study, tags)


def reopen(client: MlflowClient, run_id: str) -> None:
    """Mark a resumed study's parent run RUNNING again."""
    if client.get_run(run_id).info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")


def trial_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> dict[int, list]:
    """Child runs by Optuna trial number."""
    out: dict[int, list] = {}
    for run in child_runs(client, experiment_id, parent_run_id):
        number = run.data.tags.get(keys.TRIAL_TAG)
        if number is not None and number.isdecimal() and number.isascii():
            out.setdefault(int(number), []).append(run)
    return out


def mark_child(client: MlflowClient, run_id: str, state: str, params: dict[str, Any] | None = None,
               reason: Optional[str] = None, status: Optional[str] = None) -> None:
    """Tag a child run with its trial's state (and the values it stands for as trial.* params), ending it with
    an MLflow status if asked."""
    log_params(client, run_id, {legal_key(f"trial.{k}"): v for k, v in (params or {}).items()},
               skip_existing=True)
    tags = {STATE_TAG: state, **({FAILURE_TAG: reason} if reason else {})}
    if status:
        end_run(client, run_id, status, tags)
    else:
        set_tags(client, run_id, tags)
