"""`python cli.py ui`: the MLflow UI (an `mlflow server` subprocess) on 127.0.0.1 over the local store.

The server runs in its own process group (mlflow starts uvicorn below it): Ctrl-C (SIGINT) or SIGTERM to
`cli.py ui` stops the whole group, so no server is left serving once the command is gone.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from typing import Any, Optional

from arches.errors import ReslabError
from runs.mlflow_client import artifact_root, client_for, default_tracking_uri


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
    """Start the MLflow UI, print its URL, and wait until it stops (Ctrl-C or SIGTERM stops it and its server)."""
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

    def stop(signum: int, frame: Any) -> None:    # SIGTERM as Ctrl-C: the server group is stopped below
        raise KeyboardInterrupt

    proc: Optional[subprocess.Popen] = None
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if proc is not None:             # whatever the way out, no part of the server is left behind
            stop_group(proc)


def stop_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM to the server's process group, SIGKILL to what is left after `timeout` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
            # the group leader is gone; its children (uvicorn) may not be: make sure
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
        return
