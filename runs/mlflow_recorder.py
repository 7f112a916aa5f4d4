"""What records a run while it trains: the Lightning callback that writes each epoch's row to the MLflow run, and
MLflow's system-metrics monitor."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional

import pytorch_lightning as pl
from mlflow.tracking import MlflowClient

from .mlflow_write import log_datasets, log_metrics

if TYPE_CHECKING:
    from .record import RunRecord


def start_system_metrics(run_id: str, tracking_uri: str, resume: bool = False) -> Any:
    """MLflow's system-metrics monitor on this run (needs psutil); None when off or unavailable.

    On unless MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING is false."""
    if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").strip().lower() in ("false", "0", "no"):
        return None
    try:
        import psutil  # noqa: F401
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, resume_logging=resume, tracking_uri=tracking_uri)
        monitor.start()
        return monitor
    except Exception:  # noqa: BLE001  (system metrics are a nicety; never fail a run for them)
        return None


def stop_system_metrics(monitor: Any) -> None:
    """Stop the monitor started by start_system_metrics (no-op for None)."""
    if monitor is not None:
        try:
            monitor.finish()
        except Exception:  # noqa: BLE001
            pass


class MlflowRecorder(pl.Callback):
    """Lightning callback: logs the data module's data sets (`dataset_inputs()`) when training starts and each
    epoch's row (ReslabModule.history, closed by EpochSummary) to the run of the record it is given
    (runs.record.RunRecord), on global rank 0. The run is read from the record in setup(): the record makes the
    MLflow run after the Trainer is built.

    Rows of epochs already recorded (an interrupted attempt of a resumed run) are skipped: no duplicates.
    Opens its own client when first used, so it pickles (ddp_spawn)."""

    def __init__(self, record: RunRecord):
        self.record = record
        self.run_id: Optional[str] = None      # the record's, from setup() on
        self.recorded_through = 0              # the last epoch in MLflow
        self._client: Optional[MlflowClient] = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.run_id is None:                # (once: the test after fit goes on from fit's last epoch)
            self.run_id, self.recorded_through = self.record.run_id, self.record.recorded_through

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.record.uri)
        return self._client

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        dataset_inputs = getattr(trainer.datamodule, "dataset_inputs", None)
        if trainer.is_global_zero and dataset_inputs is not None:
            log_datasets(self.client, self.run_id, dataset_inputs())

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        history = getattr(pl_module, "history", None)
        if not trainer.is_global_zero or not history:
            return
        row = history[-1]
        if row["epoch"] > self.recorded_through:
            log_metrics(self.client, self.run_id, row, step=row["epoch"])
            self.recorded_through = row["epoch"]

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        """Test metrics at the step of the last recorded epoch."""
        results = getattr(pl_module, "results", {}).get("test")
        if trainer.is_global_zero and results:
            log_metrics(self.client, self.run_id, results, step=self.recorded_through)
