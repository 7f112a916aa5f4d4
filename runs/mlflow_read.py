"""Reading MLflow records back: a run's per-epoch rows, whether a run exists, a parent's child runs."""
from __future__ import annotations

from typing import Iterable, Optional

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

METRIC_KEYS = ("train/loss", "train/acc", "train/error", "val/loss", "val/acc", "val/error", "lr",
               "images_per_s")


def read_history(client: MlflowClient, run_id: str, keys: Iterable[str] = METRIC_KEYS) -> list[dict]:
    """The run's per-epoch rows, rebuilt from MLflow's metric histories (last value per step wins)."""
    rows: dict[int, dict] = {}
    for key in keys:
        for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)):
            rows.setdefault(m.step, {"epoch": m.step})[key] = m.value
    return [rows[s] for s in sorted(rows)]


def run_exists(client: MlflowClient, run_id: Optional[str]) -> bool:
    """Whether the store has this run, not deleted."""
    if not run_id:
        return False
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return False
    return run.info.lifecycle_stage == "active"


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list:
    """Every run nested under the parent (all pages)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                  max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs
