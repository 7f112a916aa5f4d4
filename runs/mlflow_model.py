"""A trained network as its run's MLflow model (the mlflow.pytorch flavour, serialised with torch.export), and
versions of it in MLflow's model registry."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS   # on a logged model: its versions [{name, version}]

from arches.errors import ReslabError, first_line

from .mlflow_write import METRIC_BATCH, in_chunks
from .quiet import quiet

MODEL_NAME = "model"           # a finished run's MLflow model: runs:/<run id>/model


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
        for chunk in in_chunks(linked, METRIC_BATCH):
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
