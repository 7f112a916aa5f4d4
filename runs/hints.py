"""The commands reslab's messages suggest, spelled as the user started reslab: `python cli.py` from a checkout,
`reslab` (the console script) from an installed package; and the one that opens a run's store in the MLflow UI."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Union

DEFAULT_OUTPUT_DIR = "outputs"   # the CLI's default --output-dir


PROGRAM_ENV = "RESLAB_PROGRAM"   # set by `python cli.py`, so that its worker processes name it too


def program() -> str:
    """'python cli.py' when this process is cli.py (or a worker it started), else 'reslab'."""
    entry = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return os.environ.get(PROGRAM_ENV) or ("python cli.py" if entry == "cli.py" else "reslab")


def ui_hint(tracking_uri: str, output_dir: Union[str, Path, None] = None) -> str:
    """'see it: reslab ui --output-dir runs/x' (the flag that names this store: none for the default one); a
    tracking server's own URL."""
    from .mlflow_client import default_tracking_uri, remote_artifacts

    if remote_artifacts(tracking_uri):
        return f"see it: {tracking_uri.rstrip('/')}/#/experiments   (the tracking server's UI)"
    folder: Optional[Union[str, Path]] = output_dir or DEFAULT_OUTPUT_DIR
    if tracking_uri != default_tracking_uri(folder, create=False):
        flag = f" --tracking-uri {tracking_uri}"
    elif Path(folder).expanduser().resolve() != Path(DEFAULT_OUTPUT_DIR).resolve():
        flag = f" --output-dir {folder}"
    else:
        flag = ""
    return f"see it: {program()} ui{flag}   (or: mlflow ui --backend-store-uri {tracking_uri})"
