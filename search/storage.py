"""Optuna storage shared by worker processes (and machines), and a lock that serialises their bookkeeping.

Default: an SQLite file in outputs/ (no server). Optuna's RDB storage is the one with heartbeats (stale
trials of killed workers are failed and retried), so both SQLite and PostgreSQL go through RDBStorage:
SQLite transactions start with BEGIN IMMEDIATE and wait up to SQLITE_TIMEOUT_S for the write lock, so
several processes never meet 'database is locked'.

The lock (`study_lock`) guards what must not run twice at once: creating a study and its MLflow parent run,
enqueueing ablation cells and retries, and claiming the next trial. It is an flock on a file beside the SQLite
database, and a PostgreSQL/MySQL advisory lock for servers; both die with their process, so a killed worker
never leaves it held. Opening the storage (Optuna creates its tables then) goes through runs.stores: a new
SQLite file is made atomically under the same file lock, a server database under an advisory lock.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterator

import optuna

from arches.errors import ReslabError, first_line
from runs.stores import check_driver, file_lock, open_sqlite, schema_lock, server_lock
from runs.mlflow_client import reachable, with_driver

SQLITE_TIMEOUT_S = 120


def default_storage(output_dir: str | Path = "outputs") -> str:
    """sqlite:///<abs output_dir>/optuna.db."""
    out = Path(output_dir).expanduser().resolve()
    return f"sqlite:///{out / 'optuna.db'}"


def shown(url: str) -> str:
    """The URL with any password hidden."""
    try:
        from sqlalchemy.engine import make_url
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return url


def open_storage(url: str, heartbeat: int = 10, grace: int | None = None) -> optuna.storages.RDBStorage:
    """An RDBStorage with heartbeats (a RUNNING trial silent for `grace` seconds is failed as stale)."""
    url = with_driver(url)
    if "://" not in url:
        raise ReslabError(f"storage URL '{url}' has no scheme; use sqlite:///path/optuna.db or "
                          f"postgresql://user@host:port/db", file="--storage")
    check_driver(url, "Optuna storage", "--storage")
    kwargs: dict = {}
    sqlite = url.startswith("sqlite:")
    if sqlite:
        path = url[len("sqlite:///"):]
        if not path or path == ":memory:":
            raise ReslabError("an in-memory SQLite storage cannot be shared by workers; give a file",
                              file="--storage")
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}

    def open_rdb(at: str) -> optuna.storages.RDBStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.storages.RDBStorage(at, heartbeat_interval=int(heartbeat),
                                              grace_period=int(grace or 3 * heartbeat), **kwargs)

    try:
        if sqlite:
            storage = open_sqlite(Path(path).expanduser(), open_rdb, "Optuna storage", "--storage",
                                  {"studies": "1"})
        else:
            problem = reachable(url)          # (within seconds: a connection attempt alone may take minutes)
            if problem:
                raise ReslabError(f"cannot reach Optuna storage {shown(url)}: {problem}", file="--storage")
            with schema_lock(url, "schema"):                         # (study locks are "study/<name>")
                storage = open_rdb(url)
    except ReslabError:
        raise
    except Exception as e:  # noqa: BLE001  (any failure to open is a bad --storage)
        raise ReslabError(f"cannot open Optuna storage {shown(url)}: {first_line(e) or type(e).__name__}", file="--storage") from None
    if sqlite:
        _begin_immediate(storage.engine)
    return storage


def _begin_immediate(engine) -> None:
    """Make every SQLite transaction take the write lock up front (waiting for it), never fail half-way."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()


@contextlib.contextmanager
def study_lock(storage: optuna.storages.RDBStorage, name: str) -> Iterator[None]:
    """Hold the study's lock (every process and machine that shares the storage waits for it)."""
    engine = storage.engine
    dialect = engine.dialect.name
    if dialect == "sqlite":
        with file_lock(Path(engine.url.database).expanduser()):
            yield
        return
    with server_lock(engine, f"study/{name}"):
        yield
