"""What a training run is told besides its spec: where it is recorded, under which names, and what else it uses.

    train(spec, RunOptions(output_dir="runs/x", experiment="tests", progress=False))
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import pytorch_lightning as pl

from arches import Complexity


@dataclass(frozen=True)
class RunOptions:
    """How `train` runs a spec and records it (every field has a default)."""
    # the MLflow record: where, under which names, with what
    tracking_uri: Optional[str] = None            # MLflow store; None: sqlite:///<output_dir>/mlflow.db
    output_dir: Union[str, Path] = "outputs"      # the default store, artifacts and checkpoints/<run id>/
    experiment: Optional[str] = None              # None: spec.family, else the name without its depth (a child
    # ^ run: its parent's experiment)
    run_name: Optional[str] = None                # None: the spec's name
    parent_run_id: Optional[str] = None           # nest the run under this one (a study's trial under its study)
    tags: Optional[dict] = None                   # more tags (a study's trial number, role)
    params: Optional[dict] = None                 # more params (what the run stands for in a study: arm, seed)
    register: Optional[str] = None                # register the run's MLflow model under this name (a new version)
    resume: Optional[str] = None                  # continue this run (its id) from its last checkpoint
    # the training
    callbacks: Sequence[pl.Callback] = ()         # more Lightning callbacks (a study's pruner), after the progress
    progress: Optional[bool] = None               # rich bar (True), one line per epoch (False); None: a bar when
    # ^ stdout is a terminal
    cost: Optional[Complexity] = None             # the spec's complexity, when the caller has it already
    data: Optional[pl.LightningDataModule] = None  # train on this instead of the spec's data set
