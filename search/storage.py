"""Optuna storage shared by worker processes (and machines), and a lock that serialises their bookkeeping.

Default: an SQLite file in outputs/ (no server). Optuna's RDB storage is the one with heartbeats (stale
trials of killed workers are failed and retried), so both SQLite and PostgreSQL go through RDBStorage:
SQLite transactions start with BEGIN IMMEDIATE and wait up to SQLITE_TIMEOUT_S for the write lock, so
several processes never meet 'database is locked'.

The lock (`study_lock`) guards what must not run twice at once: creating a study and its MLflow parent run,
enqueueing ablation cells and retries, and claiming the next trial. It is an flock on a file beside the SQLite
database, and a PostgreSQL/MySQL advisory lock for servers; both die with their process, so a killed worker
never leaves it held. On a server, opening the storage itself is also done under an advisory lock: Optuna
creates its tables then, and machines starting together on a new database would collide.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import warnings
from pathlib import Path
from typing import Iterator

import optuna

from arches.errors import ReslabError, first_line
from runs.tracking import with_driver

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
    kwargs: dict = {}
    sqlite = url.startswith("sqlite:")
    if sqlite:
        path = url[len("sqlite:///"):]
        if not path or path == ":memory:":
            raise ReslabError("an in-memory SQLite storage cannot be shared by workers; give a file",
                              file="--storage")
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    try:
        with warnings.catch_warnings(), _schema_lock(url):
            warnings.simplefilter("ignore")
            storage = optuna.storages.RDBStorage(url, heartbeat_interval=int(heartbeat),
                                                 grace_period=int(grace or 3 * heartbeat), **kwargs)
    except ImportError as e:
        driver = "psycopg2-binary" if url.startswith("postgres") else "the database driver"
        raise ReslabError(f"cannot open Optuna storage {shown(url)}: {first_line(e) or type(e).__name__} (pip install {driver})",
                          file="--storage") from None
    except Exception as e:  # noqa: BLE001  (any failure to open is a bad --storage)
        raise ReslabError(f"cannot open Optuna storage {shown(url)}: {first_line(e) or type(e).__name__}", file="--storage") from None
    if sqlite:
        _begin_immediate(storage.engine)
    return storage


@contextlib.contextmanager
def _schema_lock(url: str, connect_timeout_s: int = 10) -> Iterator[None]:
    """On a database server, hold an advisory lock while Optuna opens the storage: it creates its tables on first
    use, and two machines doing that at once on a new database collide (a duplicate-key error in PostgreSQL's
    catalog). SQLite needs none: the command creates its file before it starts workers."""
    dialect = url.split("://", 1)[0].split("+", 1)[0].lower()
    if dialect not in ("postgresql", "postgres", "mysql", "mariadb"):
        yield
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": connect_timeout_s},
                                      poolclass=sqlalchemy.pool.NullPool)
    try:
        with _server_lock(engine, "schema"):                         # (study locks are "study/<name>")
            yield
    finally:
        engine.dispose()


@contextlib.contextmanager
def _server_lock(engine, name: str) -> Iterator[None]:
    """Hold a server-wide named lock (PostgreSQL advisory lock, MySQL GET_LOCK); it dies with its connection."""
    from sqlalchemy import text

    dialect = engine.dialect.name
    if dialect == "postgresql":
        take, give, args = "SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)", {"k": _lock_key(name)}
    elif dialect in ("mysql", "mariadb"):
        take, give = "SELECT GET_LOCK(:k, -1)", "SELECT RELEASE_LOCK(:k)"
        args = {"k": f"reslab-{hashlib.sha1(name.encode()).hexdigest()[:40]}"}
    else:
        raise ReslabError(f"storage {dialect}: reslab can share studies through sqlite, postgresql or mysql",
                          file="--storage")
    with engine.connect() as conn:
        conn.execute(text(take), args)
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text(give), args)
            conn.commit()


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


def _lock_key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"reslab/{name}".encode(), digest_size=8).digest(), "big", signed=True)


@contextlib.contextmanager
def study_lock(storage: optuna.storages.RDBStorage, name: str) -> Iterator[None]:
    """Hold the study's lock (every process and machine that shares the storage waits for it)."""
    engine = storage.engine
    dialect = engine.dialect.name
    if dialect == "sqlite":
        path = Path(engine.url.database).expanduser()
        lock_path = path.with_name(path.name + ".lock")
        with open(lock_path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    with _server_lock(engine, f"study/{name}"):
        yield
