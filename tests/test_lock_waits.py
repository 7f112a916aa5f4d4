"""A command waiting for a store's lock says so, naming who holds it (issue 23): every study's bookkeeping runs
under a lock (a flock beside a SQLite store, an advisory lock on a database server), and a holder that stays away
made every other worker wait without a word. Two real processes each time: this one holds the lock."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT
from runs.stores import file_lock, server_lock
from test_search_postgres import postgres  # noqa: F401  (the fixture: a throwaway PostgreSQL server)

BOUND_S = 120


def waiter(code: str) -> subprocess.Popen:
    """A Python process that takes a lock, then prints 'taken'."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def first_line_then_release(proc: subprocess.Popen, release) -> tuple[str, str]:
    """(the waiter's first stderr line, its stdout once the lock is released); kills it past BOUND_S."""
    try:
        import threading

        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(proc.stderr.readline()), daemon=True)
        reader.start()
        reader.join(BOUND_S)
        assert lines and lines[0], "the waiting command said nothing"
        release()
        out, _ = proc.communicate(timeout=BOUND_S)
        return lines[0].strip(), out
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_command_waiting_for_a_file_lock_says_who_holds_it(tmp_path):
    store = tmp_path / "optuna.db"
    held = file_lock(store)
    held.__enter__()
    proc = waiter(f"""
        from pathlib import Path
        from runs.stores import file_lock
        with file_lock(Path({str(store)!r})):
            print("taken", flush=True)
        """)
    line, out = first_line_then_release(proc, lambda: held.__exit__(None, None, None))
    assert line.startswith(f"waiting for the lock {store}.lock, held by pid {os.getpid()} on "
                           f"{socket.gethostname()} (")
    assert line.endswith("); until it is released (the lock dies with its holder)"), line
    assert out == "taken\n" and proc.returncode == 0


def test_a_command_waiting_for_a_server_lock_says_who_holds_it(postgres):  # noqa: F811
    import sqlalchemy

    from runs.mlflow_client import with_driver

    url = with_driver(postgres + "/mlflow")
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    held = server_lock(engine, "study/x")
    held.__enter__()
    proc = waiter(f"""
        import sqlalchemy
        from runs.stores import server_lock
        engine = sqlalchemy.create_engine({url!r}, poolclass=sqlalchemy.pool.NullPool)
        with server_lock(engine, "study/x"):
            print("taken", flush=True)
        """)
    line, out = first_line_then_release(proc, lambda: held.__exit__(None, None, None))
    assert line.startswith("waiting for the lock 'study/x' on the postgresql server, held by server connection ")
    assert line.endswith(" from 127.0.0.1; until it is released (the lock dies with its holder)"), line
    assert out == "taken\n" and proc.returncode == 0
    engine.dispose()
