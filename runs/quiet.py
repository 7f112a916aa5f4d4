"""Library chatter off while reslab works, restored afterwards: Lightning's banners ("GPU available..."), MLflow's
and alembic's store messages, the run links and download progress bars MLflow prints for a tracking server, Optuna's
per-trial info lines, and the advisory warnings of those libraries.

Nothing is changed at import time: `train`, `run_study` and the CLI enter `quiet()` around their work.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator

from .environment import environment

LOGGERS = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric", "alembic",
           "mlflow.store.db.utils", "mlflow.tracking", "mlflow.system_metrics", "optuna")
WARNING_MODULES = (r"(pytorch_)?lightning.*", r"torch.*", r"optuna.*", r"mlflow.*")
ENVIRONMENT = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",   # "🏃 View run ... at: http://..." per run
               "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}    # a tqdm bar per artifact downloaded


@contextmanager
def quiet() -> Iterator[None]:
    """Raise the libraries' loggers to WARNING and ignore their UserWarnings inside the block."""
    if "optuna" in sys.modules:      # optuna sets its logger's level when first used: make sure that happened
        sys.modules["optuna"].logging.get_verbosity()
    loggers = [logging.getLogger(name) for name in LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.WARNING))
    unset = {k: v for k, v in ENVIRONMENT.items() if k not in os.environ}    # (a user's own setting wins)
    with warnings.catch_warnings(), environment(unset):
        warnings.filterwarnings("ignore", module=WARNING_MODULES[0])
        for module in WARNING_MODULES[1:]:
            warnings.filterwarnings("ignore", category=UserWarning, module=module)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
