"""reslab's one gateway to MLflow: stores, experiments, runs, params, tags, metrics, artifacts, and the names
and limits they follow. Runs, studies (search.recording) and diagnostics (diagnose.record) all write here.

Default store: `sqlite:///<abs output_dir>/mlflow.db`, artifacts in `<output_dir>/mlartifacts`. With a tracking
server (`http://host:port`, `mlflow server --serve-artifacts`) the server's artifact store holds every artifact,
checkpoints included, so that any machine (and the UI) reads them: nothing goes into a local folder. Only global
rank 0 talks to MLflow. Per-epoch metrics are logged with step = epoch number (1 = after the first epoch).
"""
from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union
from urllib.parse import urlparse

import pytorch_lightning as pl
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS   # on a logged model: its versions [{name, version}]

from arches import Complexity, Spec, diff_from_base, spec_hash
from arches.errors import ReslabError, first_line
from arches.spec import flatten

from .quiet import quiet
from .stores import check_driver, open_sqlite, schema_lock, sqlite_path, writable_folder

MAX_KEY = 250                  # MLflow limits: param/metric key length,
MAX_PARAM_VALUE = 6000         # param value length,
MAX_TAG_VALUE = 8000           # tag value length,
BATCH = 100                    # params or tags per log_batch call,
METRIC_BATCH = 1000            # metrics per log_batch call
METRIC_KEYS = ("train/loss", "train/acc", "train/error", "val/loss", "val/acc", "val/error", "lr",
               "images_per_s")
STATE_TAG = "state"            # how a run ended, in reslab's words: FINISHED | FAILED | INTERRUPTED | PRUNED |
FAILURE_TAG = "failure_reason"  # COMPLETE (a study's trial); and why, when it failed
NOTE_TAG = "mlflow.note.content"   # the description MLflow's UI shows for an experiment or a run
MODEL_NAME = "model"           # a finished run's MLflow model: runs:/<run id>/model
ROOT = Path(__file__).resolve().parents[1]
MetricKey = Union[str, Sequence[str]]


# ---- stores and experiments -----------------------------------------------------------------------------
def default_tracking_uri(output_dir: str | Path = "outputs", create: bool = True) -> str:
    """sqlite:///<abs output_dir>/mlflow.db (the folder is created unless `create` is false: then the store's first
    opening makes it; one-line error when it cannot be)."""
    out = Path(output_dir).expanduser().resolve()
    if create:
        writable_folder(out, "--output-dir")
    return f"sqlite:///{out / 'mlflow.db'}"


def artifact_root(output_dir: str | Path = "outputs") -> str:
    """file:// URI of <abs output_dir>/mlartifacts, where experiments created here keep their artifacts."""
    return (Path(output_dir).expanduser().resolve() / "mlartifacts").as_uri()


def remote_artifacts(uri: str) -> bool:
    """Whether the tracking URI is a tracking server (http/https), whose own artifact store keeps the runs' artifacts
    (experiments are made without a local artifact location, checkpoints are uploaded every epoch)."""
    return uri.split("://", 1)[0].lower() in ("http", "https")


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
    given = bool(tracking_uri) and tracking_uri != default_tracking_uri(output_dir, create=False)
    flag = "--tracking-uri" if given else "--output-dir"        # (a study passes the default on, resolved)
    uri = with_driver(tracking_uri or default_tracking_uri(output_dir))
    if "://" not in uri:
        raise ReslabError(f"tracking URI '{uri}' has no scheme; use sqlite:///path/mlflow.db, "
                          f"postgresql://..., or http://host:port", file="--tracking-uri")
    check_driver(uri, "MLflow store", "--tracking-uri")
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


def ensure_experiment(client: MlflowClient, name: str, output_dir: str | Path = "outputs",
                      description: Optional[str] = None) -> str:
    """Id of the experiment `name`, created if missing (artifacts under output_dir/mlartifacts; on a tracking
    server, where the server keeps them); `description` becomes its description in MLflow's UI (the tag
    mlflow.note.content) unless it has one."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        experiment_id = found.experiment_id
        has_note = bool(found.tags.get(NOTE_TAG))
        location = found.artifact_location or ""
        if remote_artifacts(client.tracking_uri) and urlparse(location).scheme in ("", "file"):
            print(f"note: experiment '{name}' keeps its artifacts in {location}, a folder of the machine that made "
                  f"it, not in the tracking server's artifact store: other machines cannot read them (use a new "
                  f"experiment or study name)", file=sys.stderr)
    else:
        has_note = False
        try:
            location = None if remote_artifacts(client.tracking_uri) else artifact_root(output_dir)
            experiment_id = client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by another process
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
            experiment_id = found.experiment_id
    if description and not has_note:
        client.set_experiment_tag(experiment_id, NOTE_TAG, description[:MAX_TAG_VALUE])
    return experiment_id


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


def log_checkpoint(client: MlflowClient, run_id: str, path: Path) -> None:
    """A checkpoint file as the run's artifact checkpoints/<its name>, replacing the one before whole (MLflow's
    artifact server writes an upload under a temporary name and renames it into place)."""
    client.log_artifact(run_id, str(path), artifact_path="checkpoints")


def end_run(client: MlflowClient, run_id: str, status: str, tags: Optional[dict[str, Any]] = None) -> None:
    """Set the closing tags, then end the run with an MLflow status (FINISHED | FAILED | KILLED)."""
    set_tags(client, run_id, tags or {})
    client.set_terminated(run_id, status=status)


def _git(*args: str, cwd: Path = ROOT) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def source_tags() -> dict[str, str]:
    """MLflow's source fields (its UI's Source and User columns): the program that ran (the script given to Python,
    else reslab's cli.py), LOCAL, the user, and the git commit, branch and remote of the reslab checkout."""
    entry = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    name = entry.resolve() if entry is not None and entry.is_file() else ROOT / "cli.py"
    tags = {"mlflow.source.name": str(name), "mlflow.source.type": "LOCAL"}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):
        pass
    for tag, args in (("mlflow.source.git.commit", ("rev-parse", "HEAD")),
                      ("mlflow.source.git.branch", ("rev-parse", "--abbrev-ref", "HEAD")),
                      ("mlflow.source.git.repoURL", ("config", "--get", "remote.origin.url"))):
        value = _git(*args)
        if value:
            tags[tag] = value
    return tags


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
    tags.update(source_tags())
    if "mlflow.source.git.commit" in tags:
        tags["git_commit"] = tags["mlflow.source.git.commit"]
    return tags


def log_table(client: MlflowClient, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
    """Rows as an MLflow table artifact (JSON; the UI shows it as a table, mlflow.load_table reads it)."""
    import pandas as pd

    if rows:
        client.log_table(run_id, pd.DataFrame(rows), artifact_file)


# ---- data sets and models --------------------------------------------------------------------------------
def log_datasets(client: MlflowClient, run_id: str, datasets: Iterable[dict[str, Any]]) -> None:
    """The run's data as MLflow dataset inputs (the runs table's Dataset column): one per split, each a dict with
    name, digest, source (a URI), context (train | val | test) and profile (sizes, shapes: JSON-ready)."""
    inputs = []
    for d in datasets:
        entity = Dataset(name=d["name"], digest=d["digest"], source_type="local" if d["source"].startswith("file:")
                         else "code", source=json.dumps({"uri": d["source"]}),
                         profile=json.dumps(d.get("profile") or {}))
        inputs.append(DatasetInput(entity, tags=[InputTag("mlflow.data.context", d["context"])]))
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def log_model(client: MlflowClient, run_id: str, network: Any, example: Any, *, step: int = 0,
              files: Sequence[Path] = (), metadata: Optional[dict[str, Any]] = None,
              register: Optional[str] = None) -> dict[str, Any]:
    """The trained network as the run's MLflow model `model` (the mlflow.pytorch flavour, serialised with
    torch.export: no pickle; input example and signature from `example`, a batch of >= 2 inputs so that the
    batch size stays free), `files` beside its MLmodel file, the run's metrics at `step` linked to it, and,
    with `register`, a new version of that registered model.

    `mlflow.pytorch.load_model("runs:/<run id>/model")` gives the network back. Returns model_id, model_uri and
    (registered) version. MLflow's fluent log_model writes to the global tracking URI and experiment; this uses
    the client's own store (the same steps, through MlflowClient)."""
    import torch
    import mlflow.pytorch
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model, infer_signature

    run = client.get_run(run_id)
    with torch.no_grad():
        logits = network(example)
    signature = infer_signature(example.numpy(), logits.numpy())
    model = client.create_logged_model(run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                       params=dict(run.data.params), model_type="pytorch",
                                       tags={k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")})
    try:
        with tempfile.TemporaryDirectory(prefix="reslab-model-") as tmp, quiet():
            path = Path(tmp) / MODEL_NAME
            info = Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id,
                         model_id=model.model_id)
            mlflow.pytorch.save_model(network, str(path), mlflow_model=info, signature=signature,
                                      input_example=example.numpy(), serialization_format="pt2",
                                      pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                                      metadata=metadata)
            for f in files:                  # beside MLmodel (MLflow's extra_files would copy with a progress bar)
                shutil.copyfile(f, path / Path(f).name)
            client.log_model_artifacts(model.model_id, str(path))
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
        linked = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model.model_id)
                  for key in run.data.metrics for m in client.get_metric_history(run_id, key)
                  if m.step == step and m.model_id is None]
        for chunk in _chunks(linked, METRIC_BATCH):
            client.log_batch(run_id, metrics=chunk)
        client.finalize_logged_model(model.model_id, "READY")
    except BaseException:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    out = {"model_id": model.model_id, "model_uri": f"runs:/{run_id}/{MODEL_NAME}", "version": None}
    if register:
        out["version"] = register_model(client, register, model.artifact_location, run_id, model.model_id)
    return out


def check_model_name(name: str) -> str:
    """A registered-model name MLflow accepts and stores whole: printable, at most as long as the registry's name
    column (one-line error for --register otherwise)."""
    from mlflow.store.model_registry.dbmodels.models import SqlRegisteredModel
    from mlflow.utils.validation import _validate_model_name

    limit = SqlRegisteredModel.__table__.c.name.type.length      # MLflow's own limit (256 characters)
    if not name.isprintable():
        bad = next(c for c in name if not c.isprintable())
        raise ReslabError(f"a model name cannot hold control or other unprintable characters (found {bad!r} at "
                          f"position {name.index(bad)})", file="--register")
    if len(name) > limit:
        raise ReslabError(f"a model name has at most {limit} characters, as MLflow's registry stores them (got "
                          f"{len(name)})", file="--register")
    try:
        _validate_model_name(name)
    except MlflowException as e:
        raise ReslabError(first_line(e) or "not a valid model name", file="--register") from None
    return name


def register_model(client: MlflowClient, name: str, source: str, run_id: str, model_id: str) -> str:
    """A new version of registered model `name` (created when missing) from the logged model, linked to it as
    mlflow.register_model links them: the logged model's tag mlflow.modelVersions lists the version (the UI's model
    page reads it; MLflow's SQL registry keeps no model_id on the version itself). Returns the version."""
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source=source, run_id=run_id, model_id=model_id,
                                          await_creation_for=0).version
    listed = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(
        listed + [{"name": name, "version": int(version)}])})
    return str(version)


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
    """Lightning callback: logs the data module's data sets (`dataset_inputs()`) when training starts and each
    epoch's row (ReslabModule.history, closed by EpochSummary) to the MLflow run, on global rank 0.

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

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        describe = getattr(trainer.datamodule, "dataset_inputs", None)
        if trainer.is_global_zero and describe is not None:
            log_datasets(self.client, self.run_id, describe())

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
