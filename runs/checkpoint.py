"""Checkpoints: where a run keeps them, and loading a trained network back (weights_only=True, no pickles).

A checkpoint is Lightning's dict; its `hyper_parameters` hold the resolved spec as plain data, so the network
is rebuilt from the checkpoint alone. A run recorded in a local store keeps its last.ckpt in
<output_dir>/checkpoints/<run_id>/; a run recorded on a tracking server keeps it among the run's artifacts
(checkpoints/last.ckpt, replaced every epoch), where every machine can read it.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union
from urllib.parse import unquote, urlparse

import pytorch_lightning as pl
import torch

from arches import Network, Spec, build_model, spec_from_dict
from arches.errors import ReslabError, first_line
from arches.init import refusal

from .mlflow_client import client_for
from .stores import sqlite_path

if TYPE_CHECKING:
    from .record import RunRecord

LAST = "last.ckpt"
ARTIFACT = "checkpoints/last.ckpt"  # where a finished run keeps its final checkpoint among its artifacts


def checkpoint_dir(output_dir: Union[str, Path], run_id: str) -> Path:
    """<output_dir>/checkpoints/<run_id>: the run's last.ckpt, rewritten every epoch and on interrupts."""
    return Path(output_dir).expanduser().resolve() / "checkpoints" / run_id


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """write(tmp) then rename over `path`, flushed to disk first: a kill or a full disk at any moment leaves the
    previous complete file (or the new one), never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class EpochCheckpoint(pl.Callback):
    """last.ckpt, written atomically at the end of every training epoch (and by the interrupt guard on a signal):
    model, optimizer, schedule, loop progress and the data loader's position, so `--resume` continues exactly.
    Where it goes is the run's record's to say (runs.record.RunRecord.checkpoint), read in setup(): the record makes
    the MLflow run, and so knows its id, after the Trainer is built."""

    def __init__(self, record: RunRecord) -> None:
        self.record = record
        self.path: Optional[Path] = None      # <output_dir>/checkpoints/<run_id>/last.ckpt, once set up
        self.saved_step = -1                  # global step of the state last written

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.path = self.record.checkpoint

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)

    def save(self, trainer: pl.Trainer, *, collective: bool = True) -> Optional[str]:
        """Write the trainer's state (collective: every rank calls; rank 0 writes). Returns the path on rank 0."""
        if self.path is None:
            return None
        if collective:
            state = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            trainer.strategy.barrier("checkpoint")
        elif trainer.is_global_zero:
            state = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        if not trainer.is_global_zero:
            return None
        write_atomically(self.path, lambda tmp: trainer.strategy.checkpoint_io.save_checkpoint(state, tmp))
        self.saved_step = trainer.global_step
        return self.record.keep_checkpoint(self.path) or str(self.path)   # (on a tracking server: kept there too)


def read_checkpoint(path: Union[str, Path]) -> dict:
    """The checkpoint dict, loaded with weights_only=True; one-line ReslabError if unreadable."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise ReslabError("no such checkpoint", file=str(path)) from None
    except OSError as e:
        raise ReslabError(f"cannot read checkpoint: {e.strerror}", file=str(path)) from None
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":     # torch.save's zip archive, or an old pickle
        raise ReslabError("not a checkpoint (a file written by torch.save / Lightning)", file=str(path))
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (pickled objects, which reslab never loads; a truncated archive, ...)
        raise ReslabError(f"cannot load checkpoint: {refusal(e)}", file=str(path)) from None


def spec_of(checkpoint: dict, where: str = "checkpoint") -> Spec:
    """The spec stored in a reslab checkpoint."""
    spec = (checkpoint.get("hyper_parameters") or {}).get("spec")
    if not isinstance(spec, dict):
        raise ReslabError("not a reslab checkpoint (no spec in its hyper_parameters)", file=where)
    return spec_from_dict(spec)


def _local_path(uri: str) -> Optional[Path]:
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path))
    return None


def find_checkpoint(run_id: str, tracking_uri: Optional[str] = None,
                    output_dir: Union[str, Path, None] = None, store_hint: str = "--tracking-uri") -> Path:
    """The checkpoint of an MLflow run: its artifact checkpoints/last.ckpt, else
    <output_dir>/checkpoints/<run_id>/last.ckpt (output_dir defaults to the sqlite store's folder); `store_hint`: how
    the caller names another store in the error when there is none."""
    store = sqlite_path(tracking_uri) if tracking_uri else Path(output_dir or "outputs") / "mlflow.db"
    if store is not None and not store.is_file():           # (a look-up never makes a store)
        raise ReslabError(f"no MLflow store at {store} to find run '{run_id}' in; give a .ckpt path or "
                          f"{store_hint}", file="run id")
    client = client_for(tracking_uri, output_dir or "outputs")
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001
        uri = tracking_uri or "the default store"
        raise ReslabError(f"no MLflow run '{run_id}' in {uri}", file="run id") from None
    tried = []
    local = _local_path(run.info.artifact_uri)
    if local is not None:
        candidate = local / ARTIFACT
        tried.append(str(candidate))
        if candidate.exists():
            return candidate
    else:
        fetched = fetch_checkpoint(client, run_id, Path(tempfile.mkdtemp(prefix="reslab-")))
        if fetched is not None:
            return fetched
        tried.append(f"{run.info.artifact_uri}/{ARTIFACT}")
    folders = [Path(output_dir)] if output_dir else []
    if tracking_uri and tracking_uri.startswith("sqlite:///"):
        folders.append(Path(tracking_uri[len("sqlite:///"):]).parent)
    folders.append(Path("outputs"))
    for folder in folders:
        candidate = checkpoint_dir(folder, run_id) / LAST
        tried.append(str(candidate))
        if candidate.exists():
            return candidate
    raise ReslabError(f"run {run_id} has no checkpoint (looked in: {', '.join(dict.fromkeys(tried))})",
                      file="run id")


def stored_checkpoint(client: Any, run_id: str) -> bool:
    """Whether the run's artifacts hold checkpoints/last.ckpt (a run on a tracking server keeps it there)."""
    try:
        return ARTIFACT in [f.path for f in client.list_artifacts(run_id, "checkpoints")]
    except Exception:  # noqa: BLE001  (an unreadable listing: no checkpoint to be had)
        return False


def fetch_checkpoint(client: Any, run_id: str, folder: Path) -> Optional[Path]:
    """The run's artifact checkpoints/last.ckpt downloaded into `folder` (None when the run has none)."""
    if not stored_checkpoint(client, run_id):
        return None
    folder.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, ARTIFACT, str(folder)))


def resumable(client: Any, run: Any, output_dir: Union[str, Path]) -> bool:
    """Whether a stopped run left a checkpoint to continue from: <output_dir>/checkpoints/<run_id>/last.ckpt here, or
    (a run whose artifacts are not in a local folder: a tracking server's) its artifact checkpoints/last.ckpt."""
    if (checkpoint_dir(output_dir, run.info.run_id) / LAST).exists():
        return True
    return _local_path(run.info.artifact_uri) is None and stored_checkpoint(client, run.info.run_id)


@dataclass(frozen=True)
class InitCheckpoint:
    """The file a spec's `init_from: RUN_ID` starts from: that run's checkpoint, in the MLflow store of the command
    that builds the network. Passed to arches.build_model as `resolve`."""
    tracking_uri: Optional[str] = None              # the command's --tracking-uri; None: $MLFLOW_TRACKING_URI, else
    # ^ the store in output_dir
    output_dir: Union[str, Path, None] = None       # the command's --output-dir (its mlflow.db and checkpoints/);
    # ^ None: outputs

    def __call__(self, run_id: str) -> Path:
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "").strip() or None
        return find_checkpoint(run_id, uri, self.output_dir)


init_checkpoint = InitCheckpoint()   # $MLFLOW_TRACKING_URI, else outputs/mlflow.db (a module built outside a command)


def load_model(ref: Union[str, Path], tracking_uri: Optional[str] = None,
               output_dir: Union[str, Path, None] = None) -> tuple[Spec, Network]:
    """(spec, network with trained weights, eval mode: call .train() to go on training it) from a .ckpt path or an
    MLflow run id. A run id is looked up in `tracking_uri`, else MLflow's own tracking URI when one is set
    (mlflow.set_tracking_uri or $MLFLOW_TRACKING_URI), else the store in `output_dir` (default outputs/mlflow.db)."""
    import mlflow

    path = Path(str(ref)).expanduser()
    if not (path.suffix == ".ckpt" or path.exists()):
        if tracking_uri is None and output_dir is None and mlflow.is_tracking_uri_set():
            tracking_uri = mlflow.get_tracking_uri()
        path = find_checkpoint(str(ref), tracking_uri, output_dir,
                               store_hint="tracking_uri= (or mlflow.set_tracking_uri)")
    checkpoint = read_checkpoint(path)
    spec = spec_of(checkpoint, str(path))
    model = build_model(spec)
    state = {k[len("model."):]: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ReslabError(f"checkpoint does not fit its spec: {first_line(e)}", file=str(path)) from None
    return spec, model.eval()
