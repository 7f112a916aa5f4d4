"""`python cli.py ui`: the MLflow UI (an `mlflow server` subprocess) on 127.0.0.1 over the local store."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Optional

from arches.errors import ReslabError
from runs.tracking import artifact_root, client_for, default_tracking_uri


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def ui_command(output_dir: str = "outputs", port: int = 5000, tracking_uri: Optional[str] = None,
               host: str = "127.0.0.1") -> list[str]:
    """The mlflow server command line for this store (sqlite in output_dir, artifacts in output_dir/mlartifacts)."""
    uri = tracking_uri or default_tracking_uri(output_dir)
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
            "--default-artifact-root", artifact_root(output_dir), "--host", host, "--port", str(port),
            "--workers", "1"]


def serve_ui(output_dir: str = "outputs", port: int = 5000, tracking_uri: Optional[str] = None,
             host: str = "127.0.0.1") -> int:
    """Start the MLflow UI, print its URL, and wait until it stops (Ctrl-C stops it)."""
    if not 0 < port < 65536:
        raise ReslabError(f"port {port} is out of range", file="--port")
    if not port_free(host, port):
        raise ReslabError(f"port {port} on {host} is in use; pick another with --port", file="--port")
    client_for(tracking_uri, output_dir)    # the store made (or upgraded) safely, as every command does, first
    cmd = ui_command(output_dir, port, tracking_uri, host)
    print(f"MLflow UI: http://{host}:{port}   (store {cmd[cmd.index('--backend-store-uri') + 1]}; Ctrl-C stops it)",
          flush=True)
    # the server's background job runner (LLM judges, trace rollups) is of no use here and slows start and stop
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        return 0
