"""reslab's training side: data, one training run, tracking, checkpoints and exports.

The Lightning pieces are API for any Trainer (see runs.module):

    from runs import ReslabData, ReslabModule      # LightningModule and LightningDataModule of a spec
    from runs import RunOptions, train, load_model, export_model      # train(spec, RunOptions(output_dir=...))
"""
from __future__ import annotations

__all__ = ["ReslabData", "ReslabModule", "RunOptions", "export_model", "load_model", "train"]

_WHERE = {"ReslabData": "data", "ReslabModule": "module", "RunOptions": "options", "train": "fit",
          "load_model": "checkpoint", "export_model": "export"}


def __getattr__(name: str):  # torch, Lightning and MLflow load on first use
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(name)
