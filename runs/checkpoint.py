"""Checkpoints: where a run keeps them, and loading a trained network back (weights_only=True, no pickles).

A checkpoint is Lightning's dict; its `hyper_parameters` hold the resolved spec as plain data, so the network
is rebuilt from the checkpoint alone.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Union
from urllib.parse import unquote, urlparse

import torch

from arches import Network, Spec, build_model, spec_from_dict
from arches.errors import ReslabError, first_line

LAST = "last.ckpt"
ARTIFACT = "checkpoints/last.ckpt"  # where a finished run keeps its final checkpoint among its artifacts


def checkpoint_dir(output_dir: Union[str, Path], run_id: str) -> Path:
    """<output_dir>/checkpoints/<run_id>: the run's last.ckpt, rewritten every epoch and on interrupts."""
    return Path(output_dir).expanduser().resolve() / "checkpoints" / run_id


def read_checkpoint(path: Union[str, Path]) -> dict:
    """The checkpoint dict, loaded with weights_only=True; one-line ReslabError if unreadable."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ReslabError("no such checkpoint", file=str(path)) from None
    except Exception as e:  # noqa: BLE001  (corrupt file, foreign pickle, ...)
        first = first_line(e) or type(e).__name__
        raise ReslabError(f"cannot load checkpoint: {first}", file=str(path)) from None


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
                    output_dir: Union[str, Path, None] = None) -> Path:
    """The checkpoint of an MLflow run: its artifact checkpoints/last.ckpt, else
    <output_dir>/checkpoints/<run_id>/last.ckpt (output_dir defaults to the sqlite store's folder)."""
    from .tracking import client_for

    if tracking_uri is None and not (Path(output_dir or "outputs") / "mlflow.db").exists():
        raise ReslabError(f"no MLflow store at {Path(output_dir or 'outputs') / 'mlflow.db'} to find run "
                          f"'{run_id}' in; give a .ckpt path or --tracking-uri", file="run id")
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
        try:
            names = [f.path for f in client.list_artifacts(run_id, "checkpoints")]
            if ARTIFACT in names:
                return Path(client.download_artifacts(run_id, ARTIFACT, tempfile.mkdtemp(prefix="reslab-")))
        except Exception:  # noqa: BLE001
            pass
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


def init_checkpoint(run_id: str) -> Path:
    """The file a spec's `init_from: RUN_ID` starts from: that run's checkpoint, looked up in $MLFLOW_TRACKING_URI
    (else the default store, outputs/mlflow.db). Passed to arches.build_model as `resolve`."""
    return find_checkpoint(run_id, os.environ.get("MLFLOW_TRACKING_URI"))


def load_model(ref: Union[str, Path], tracking_uri: Optional[str] = None) -> tuple[Spec, Network]:
    """(spec, network with trained weights, eval mode) from a .ckpt path or an MLflow run id."""
    path = Path(str(ref)).expanduser()
    if not (path.suffix == ".ckpt" or path.exists()):
        path = find_checkpoint(str(ref), tracking_uri)
    checkpoint = read_checkpoint(path)
    spec = spec_of(checkpoint, str(path))
    model = build_model(spec)
    state = {k[len("model."):]: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ReslabError(f"checkpoint does not fit its spec: {first_line(e)}", file=str(path)) from None
    return spec, model.eval()
