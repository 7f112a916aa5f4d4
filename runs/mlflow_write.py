"""Writing MLflow records: experiments, runs, params, tags, metrics, artifacts and data sets, under the names and
within the limits MLflow accepts. Runs (runs.record), studies (search.recording) and diagnostics (diagnose.record)
all write through here. Per-epoch metrics are logged with step = epoch number (1 = after the first epoch).
"""
from __future__ import annotations

import getpass
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union
from urllib.parse import urlparse

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from arches import Complexity, Spec, diff_from_base, spec_hash
from arches.spec import flatten

from .mlflow_client import artifact_root, remote_artifacts

MAX_KEY = 250                  # MLflow limits: param/metric key length,
MAX_PARAM_VALUE = 6000         # param value length,
MAX_TAG_VALUE = 8000           # tag value length,
BATCH = 100                    # params or tags per log_batch call,
METRIC_BATCH = 1000            # metrics per log_batch call
STATE_TAG = "state"            # how a run ended, in reslab's words: FINISHED | FAILED | INTERRUPTED | PRUNED |
FAILURE_TAG = "failure_reason"  # COMPLETE (a study's trial); and why, when it failed
NOTE_TAG = "mlflow.note.content"   # the description MLflow's UI shows for an experiment or a run
ROOT = Path(__file__).resolve().parents[1]
MetricKey = Union[str, Sequence[str]]


# ---- experiments -----------------------------------------------------------------------------------------
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


def in_chunks(items: list, size: int) -> Iterable[list]:
    """`items` in lists of at most `size` (one log_batch call each)."""
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
    for chunk in in_chunks(params, BATCH):
        client.log_batch(run_id, params=chunk)


def set_tags(client: MlflowClient, run_id: str, values: dict[str, Any]) -> None:
    """Tags, values cut to MLflow's limit."""
    for chunk in in_chunks(_tags(values), BATCH):
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
    for chunk in in_chunks(metrics, METRIC_BATCH):
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
