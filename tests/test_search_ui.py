"""`cli.py ui`: an MLflow server on 127.0.0.1 over the local store, its URL printed; Ctrl-C stops it."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from conftest import ROOT, free_port, run_cli



def test_ui_serves_the_local_store(outputs):
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{outputs / 'mlflow.db'}").create_experiment("ablation/demo")
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "ui", "--port", str(port), "--output-dir",
                             str(outputs)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith(f"MLflow UI: http://127.0.0.1:{port}") and str(outputs / "mlflow.db") in first
        body, deadline = None, time.time() + 120
        while body is None and time.time() < deadline and proc.poll() is None:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search?max_results=10")
                with urllib.request.urlopen(request, timeout=5) as reply:
                    body = json.loads(reply.read())
            except OSError:
                time.sleep(1)
        assert body is not None, "the MLflow server did not answer"
        assert "ablation/demo" in [e["name"] for e in body["experiments"]]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0


def test_ui_port_in_use_is_one_line(outputs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        result = run_cli("ui", "--port", str(busy), "--output-dir", str(outputs))
    assert result.returncode == 2
    assert result.stderr.strip() == f"--port: port {busy} on 127.0.0.1 is in use; pick another with --port"


def _wait_for_server(port: int, proc, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
            return
        except OSError:
            time.sleep(1)
    raise AssertionError("the MLflow server did not answer")


def test_sigterm_stops_the_server_too(outputs):
    """SIGTERM to `cli.py ui` (what a service manager or `kill` sends) ends the mlflow server and every process it
    started: nothing is left serving, no orphan."""
    import psutil

    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "ui", "--port", str(port), "--output-dir",
                             str(outputs)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_server(port, proc)
        server = psutil.Process(proc.pid).children(recursive=True)
        assert server, "cli.py ui started no server process"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        gone, alive = psutil.wait_procs(server, timeout=30)
        assert not alive, f"left running: {[p.cmdline() for p in alive]}"
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "the port still answers"
    finally:
        if proc.poll() is None:
            proc.kill()
