"""reslab's one gateway to MLflow: stores, experiments, runs, params, tags, metrics, artifacts, and the names
and limits they follow. Runs, studies (search.recording) and diagnostics (diagnose.record) all write here.

Default store: `sqlite:///<abs output_dir>/mlflow.db`, artifacts in `<output_dir>/mlartifacts`. Only global
rank 0 talks to MLflow. Per-epoch metrics are logged with step = epoch number (1 = after the first epoch).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import pytorch_lightning as pl
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.tracking import MlflowClient

from arches import Complexity, Spec, diff_from_base, spec_hash
from arches.errors import ReslabError, first_line
from arches.spec import flatten

from .quiet import quiet
from .stores import open_sqlite, schema_lock, sqlite_path, writable_folder

MAX_KEY = 250                  # MLflow limits: param/metric key length,
MAX_PARAM_VALUE = 6000         # param value length,
MAX_TAG_VALUE = 8000           # tag value length,
BATCH = 100                    # params or tags per log_batch call,
METRIC_BATCH = 1000            # metrics per log_batch call
METRIC_KEYS = ("train/loss", "train/acc", "train/error", "val/loss", "val/acc", "val/error", "lr",
               "images_per_s")
TEST_KEYS = ("test/loss", "test/acc", "test/error")
STATE_TAG = "state"            # how a run ended, in reslab's words: FINISHED | FAILED | INTERRUPTED | PRUNED |
FAILURE_TAG = "failure_reason"  # COMPLETE (a study's trial); and why, when it failed
ROOT = Path(__file__).resolve().parents[1]
MetricKey = Union[str, Sequence[str]]


# ---- stores and experiments -----------------------------------------------------------------------------
def default_tracking_uri(output_dir: str | Path = "outputs") -> str:
    """sqlite:///<abs output_dir>/mlflow.db (the folder is created; one-line error when it cannot be)."""
    out = Path(output_dir).expanduser().resolve()
    writable_folder(out, "--output-dir")
    return f"sqlite:///{out / 'mlflow.db'}"


def artifact_root(output_dir: str | Path = "outputs") -> str:
    """file:// URI of <abs output_dir>/mlartifacts, where experiments created here keep their artifacts."""
    return (Path(output_dir).expanduser().resolve() / "mlartifacts").as_uri()


def with_driver(url: str) -> str:
    """postgresql://... -> postgresql+psycopg2://... when only psycopg2 is installed (SQLAlchemy 2.1 defaults
    to psycopg 3 for a bare postgresql:// URL)."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgresql", "postgres") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    return url


def reachable(uri: str, timeout_s: float = 5.0) -> Optional[str]:
    """None when a server-backed store answers within timeout_s, else why not (MLflow itself retries for
    minutes before giving up). SQL databases are tried with SQLAlchemy, tracking servers over HTTP."""
    scheme = uri.split("://", 1)[0].lower()
    try:
        if scheme.startswith(("postgresql", "postgres", "mysql", "mssql")):
            import sqlalchemy

            args = {"connect_timeout": int(timeout_s)} if scheme.startswith(("postgres", "mysql")) else {}
            engine = sqlalchemy.create_engine(uri, connect_args=args, poolclass=sqlalchemy.pool.NullPool)
            with engine.connect():
                pass
        elif scheme in ("http", "https"):
            import urllib.request

            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except Exception as e:  # noqa: BLE001  (any failure to connect is the answer)
        return first_line(e) or type(e).__name__
    return None


def _open_client(uri: str) -> MlflowClient:
    """A client on the store, its tables created or upgraded (quietly: MLflow logs that at INFO). When that fails,
    MLflow's cached engine for the URI is dropped, so that a store made anew in its place is opened afresh."""
    try:
        with quiet():
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)
    except Exception:
        engine = getattr(SqlAlchemyStore, "_engine_map", {}).pop(uri, None)
        if engine is not None:
            engine.dispose()
        raise
    return client


def client_for(tracking_uri: Optional[str], output_dir: str | Path = "outputs") -> MlflowClient:
    """An MlflowClient on the given store (default: the sqlite file in output_dir), opened safely against other
    commands opening it too (runs.stores); one-line error if unusable."""
    flag = "--tracking-uri" if tracking_uri else "--output-dir"
    uri = with_driver(tracking_uri or default_tracking_uri(output_dir))
    if "://" not in uri:
        raise ReslabError(f"tracking URI '{uri}' has no scheme; use sqlite:///path/mlflow.db, "
                          f"postgresql://..., or http://host:port", file="--tracking-uri")
    path = sqlite_path(uri)
    if path is not None:
        return open_sqlite(path, _open_client, "MLflow store", flag,
                           {"runs": "1", "experiments": "experiment_id != 0"})   # (0: MLflow's Default)
    problem = reachable(uri)
    if problem:
        raise ReslabError(f"cannot reach MLflow store {uri}: {problem}", file="--tracking-uri")
    try:
        with schema_lock(uri, "mlflow-schema"):
            return _open_client(uri)
    except Exception as e:  # noqa: BLE001  (any store failure is a bad --tracking-uri)
        first = first_line(e) or type(e).__name__
        raise ReslabError(f"cannot open MLflow store {uri}: {first}", file="--tracking-uri") from None


def experiment_name(spec: Spec) -> str:
    """spec.family, else the name without its depth: resnet20 -> resnet, wrn_28_10 -> wrn."""
    if spec.family:
        return spec.family
    match = re.match(r"^(.*?[A-Za-z])[_-]?\d", spec.name)
    return match.group(1) if match else spec.name


def ensure_experiment(client: MlflowClient, name: str, output_dir: str | Path = "outputs") -> str:
    """Id of the experiment `name`, created (artifacts under output_dir/mlartifacts) if missing."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(output_dir))
    except MlflowException:  # created meanwhile by another process
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


# ---- names and values ------------------------------------------------------------------------------------
def legal_key(*parts: str) -> str:
    """An MLflow-legal param or metric name: parts joined by '/', characters MLflow refuses replaced by '_', cut to
    MAX_KEY. MLflow allows letters, digits, '_', '-', '.', ' ', ':' and '/'."""
    return "/".join(re.sub(r"[^\w\-. :/]", "_", str(p)) for p in parts)[:MAX_KEY]


def _params(values: dict[str, Any]) -> list[Param]:
    return [Param(k[:MAX_KEY], ("" if v is None else str(v))[:MAX_PARAM_VALUE]) for k, v in values.items()]


def _tags(values: dict[str, Any]) -> list[RunTag]:
    return [RunTag(k, str(v)[:MAX_TAG_VALUE]) for k, v in values.items()]


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


# ---- writing ---------------------------------------------------------------------------------------------
def create_run(client: MlflowClient, experiment_id: str, name: str, tags: Optional[dict[str, Any]] = None,
               parent_run_id: Optional[str] = None) -> str:
    """A new RUNNING run (nested under parent_run_id when given); returns its id."""
    tags = dict(tags or {})
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return client.create_run(experiment_id, run_name=name, tags={k: str(v) for k, v in tags.items()}).info.run_id


def log_params(client: MlflowClient, run_id: str, values: Union[dict[str, Any], list[Param]],
               skip_existing: bool = False) -> None:
    """Params ({key: value}, cut to MLflow's limits, or Params); skip_existing: leave the run's own alone."""
    params = _params(values) if isinstance(values, dict) else list(values)
    if skip_existing:
        existing = client.get_run(run_id).data.params
        params = [p for p in params if p.key not in existing]
    for chunk in _chunks(params, BATCH):
        client.log_batch(run_id, params=chunk)


def set_tags(client: MlflowClient, run_id: str, values: dict[str, Any]) -> None:
    """Tags, values cut to MLflow's limit."""
    for chunk in _chunks(_tags(values), BATCH):
        client.log_batch(run_id, tags=chunk)


def log_metrics(client: MlflowClient, run_id: str, values: dict[str, float], step: int) -> None:
    """One set of metrics at one step (the key 'epoch', non-numeric and NaN values skipped)."""
    log_metric_rows(client, run_id, [(k, v, step) for k, v in values.items()
                                     if k != "epoch" and isinstance(v, (int, float)) and float(v) == float(v)])


def log_metric_rows(client: MlflowClient, run_id: str, rows: Iterable[tuple[MetricKey, float, int]]) -> None:
    """(key, value, step) rows; a key given as parts is joined by legal_key."""
    now = int(time.time() * 1000)
    metrics = [Metric(legal_key(*k) if isinstance(k, (tuple, list)) else k[:MAX_KEY], float(v), now, int(step))
               for k, v, step in rows]
    for chunk in _chunks(metrics, METRIC_BATCH):
        client.log_batch(run_id, metrics=chunk)


def log_files(client: MlflowClient, run_id: str, files: Iterable[Path], folder: Optional[str] = None) -> None:
    """Existing files as artifacts (under `folder`)."""
    for f in files:
        if Path(f).is_file():
            client.log_artifact(run_id, str(f), artifact_path=folder)


def end_run(client: MlflowClient, run_id: str, status: str, tags: Optional[dict[str, Any]] = None) -> None:
    """Set the closing tags, then end the run with an MLflow status (FINISHED | FAILED | KILLED)."""
    set_tags(client, run_id, tags or {})
    client.set_terminated(run_id, status=status)


def git_commit(cwd: Path = ROOT) -> Optional[str]:
    """HEAD's commit hash of the repository holding reslab, or None."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def compact_diff(diff: dict[str, tuple[Any, Any]]) -> str:
    """{'block.shortcut': ('A', 'B')} -> 'block.shortcut: A -> B' (one '; '-separated line)."""
    return "; ".join(f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in diff.items())


def spec_params(spec: Spec) -> list[Param]:
    """The resolved spec flattened to dotted params, keys and values cut to MLflow's limits."""
    return _params(flatten(spec.model_dump(mode="json")))


def spec_tags(spec: Spec, cost: Complexity) -> dict[str, str]:
    """Tags that identify a run: spec, block types, shortcut, hash, diff from base, size, git commit."""
    tags = {"spec": spec.name, "block": ",".join(sorted({row.kind for row in cost.blocks})),
            "shortcut": spec.block.shortcut, "data": spec.data.name, "spec_hash": spec_hash(spec),
            "params": str(cost.params), "macs": str(cost.macs)}
    diff = diff_from_base(spec)
    if diff:
        tags["diff"] = compact_diff(diff)
    source = getattr(spec, "_source", None)
    if source is not None and getattr(source, "file", None):
        tags["spec_file"] = str(source.file)
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    return tags


# ---- reading ---------------------------------------------------------------------------------------------
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


# ---- system metrics and the per-epoch recorder -----------------------------------------------------------
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
    """Lightning callback: logs each epoch's row (from EpochSummary) to the MLflow run, on global rank 0.

    Rows of epochs already recorded (an interrupted attempt of a resumed run) are skipped: no duplicates.
    Holds only strings until first used, so it pickles (ddp_spawn)."""

    def __init__(self, tracking_uri: str, run_id: str, recorded_through: int = 0):
        self.tracking_uri, self.run_id, self.recorded_through = tracking_uri, run_id, recorded_through
        self._client: Optional[MlflowClient] = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}

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
