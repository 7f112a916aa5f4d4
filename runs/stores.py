"""Opening a store's database safely, whoever else opens it at the same moment: MLflow's tracking store and Optuna's
storage both create their tables on first use.

- A new SQLite file is built under a temporary name and renamed into place, under a file lock beside it: two
  commands starting together on a fresh folder wait for each other, and a kill at any moment leaves no half-made
  store (only a temporary file, removed by the next command).
- A SQLite store that a killed process left half-made anyway (by an older reslab) is moved aside and made anew
  when it holds nothing; when it holds records, one line says so and how to repair it.
- A database server's store is opened under an advisory lock (PostgreSQL, MySQL), so machines starting together on
  a new database do not collide in its catalog; a URL whose database driver is not installed is one line naming the
  package to install, before anything is opened.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import socket
import sqlite3
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar

from arches.errors import ReslabError, first_line

T = TypeVar("T")
SERVER_DIALECTS = ("postgresql", "postgres", "mysql", "mariadb")


def sqlite_path(url: str) -> Path | None:
    """The file of a sqlite:/// URL (None for other URLs and in-memory databases)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):]
    return Path(path).expanduser() if path and path != ":memory:" else None


def writable_folder(folder: Path, flag: str) -> None:
    """Create `folder` if needed and check that files can be written in it; one-line ReslabError if not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".reslab-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except FileExistsError:
        raise ReslabError(f"{folder} is a file, not a folder", file=flag) from None
    except OSError as e:
        raise ReslabError(f"cannot write in {folder}: {e.strerror or first_line(e)}", file=flag) from None


LOCK_NOTE_S = 5.0            # a lock not had within this long: one line says who holds it, then the wait goes on


def acquire(take: Callable[[Optional[float]], bool], what: str, holder: Callable[[], str]) -> None:
    """Take a lock with `take(wait_s)` (True once taken; None: wait as long as it takes); a wait longer than
    LOCK_NOTE_S is said once, on stderr, with its holder: the lock dies with its holder, so the wait ends at the
    latest when that process does."""
    if take(LOCK_NOTE_S):
        return
    print(f"waiting for {what}, held by {holder()}; until it is released (the lock dies with its holder)",
          file=sys.stderr, flush=True)
    take(None)


def _polled(try_take: Callable[[], bool]) -> Callable[[Optional[float]], bool]:
    """take(wait_s) from a non-blocking attempt, polled."""
    def take(wait_s: Optional[float]) -> bool:
        end, delay = None if wait_s is None else time.monotonic() + wait_s, 0.005
        while not try_take():
            if end is not None and time.monotonic() >= end:
                return False
            time.sleep(delay)
            delay = min(2 * delay, 0.25)
        return True
    return take


def _holder_process() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv[:3])[:200]})"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on <path>.lock (it dies with its process: a killed command never leaves it held); the
    holder writes who it is into the file, for those who wait."""
    lock = path.with_name(path.name + ".lock")
    with open(lock, "a+") as handle:
        def take() -> bool:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False

        def holder() -> str:
            with contextlib.suppress(OSError):
                return lock.read_text(errors="replace").strip()[:300] or "another process"
            return "another process"

        acquire(_polled(take), f"the lock {lock}", holder)
        try:
            with contextlib.suppress(OSError):
                handle.truncate(0)
                handle.write(_holder_process() + "\n")
                handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_sqlite(path: Path, open_store: Callable[[str], T], what: str, flag: str, records: dict[str, str],
                repair: bool = True) -> T:
    """open_store(url) on the SQLite store at `path`, made atomically first when missing (see the module).
    `records`: {table: SQL condition} of the rows that are the store's records (a half-made store has none)."""
    writable_folder(path.parent, flag)
    with file_lock(path):
        for stale in path.parent.glob(f".{path.name}.*.creating*"):   # left by a killed command
            stale.unlink(missing_ok=True)
        if not path.exists():
            tmp = path.with_name(f".{path.name}.{os.getpid()}.creating")
            try:
                open_store(f"sqlite:///{tmp}")
                os.replace(tmp, path)
            finally:
                for leftover in path.parent.glob(f"{tmp.name}*"):
                    leftover.unlink(missing_ok=True)
        try:
            return open_store(f"sqlite:///{path}")
        except ReslabError:
            raise
        except Exception as e:  # noqa: BLE001  (a store that cannot be opened: half-made, or not a store)
            problem = first_line(e) or type(e).__name__
            if not repair or _holds_records(path, records):
                raise ReslabError(f"cannot open the {what} at {path}: {problem}; it holds records, so it was left as "
                                  f"it is: copy it aside, then try to repair it (for MLflow: `mlflow db upgrade "
                                  f"sqlite:///{path}`)", file=flag) from None
            aside = path.with_name(f"{path.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(path, aside)
            print(f"note: the {what} at {path} was half-made and held no records ({problem}); moved it to {aside} "
                  f"and made a new one", file=sys.stderr)
    return open_sqlite(path, open_store, what, flag, records, repair=False)


def _holds_records(path: Path, records: dict[str, str]) -> bool:
    """Whether any of the tables that exist has a row meeting its condition."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            names = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            return any(db.execute(f"SELECT COUNT(*) FROM {table} WHERE {where}").fetchone()[0] > 0
                       for table, where in records.items() if table in names)
    except sqlite3.Error:
        return False              # not even a database: nothing to keep


DISK_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM)
DISK_MESSAGES = ("database or disk is full", "readonly database", "No space left on device", "Read-only file system")


def disk_problem(exc: BaseException) -> str | None:
    """The one-line reason when `exc` says the disk is full or cannot be written (an OSError, or SQLite saying so
    through MLflow or Optuna), else None."""
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else (exc.strerror or first_line(exc))
    text = first_line(exc)
    return text if any(m in text for m in DISK_MESSAGES) else None


def dialect_of(url: str) -> str:
    return url.split("://", 1)[0].split("+", 1)[0].lower()


# the package that provides each SQLAlchemy driver (module name -> pip name)
DRIVER_PACKAGES = {"psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]", "pg8000": "pg8000",
                   "asyncpg": "asyncpg", "MySQLdb": "mysqlclient", "pymysql": "PyMySQL",
                   "mysql": "mysql-connector-python"}


def check_driver(url: str, what: str, flag: str) -> None:
    """One-line ReslabError when the database URL names a dialect or driver that cannot be loaded here (nothing is
    connected or created). SQLite and non-database URLs (http://) pass."""
    if "://" not in url or dialect_of(url) in ("sqlite", "http", "https", "file"):
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    scheme = url.split("://", 1)[0]
    try:
        make_url(url).get_dialect().import_dbapi()
    except ImportError as e:
        module = getattr(e, "name", None) or first_line(e)
        package = "psycopg2-binary" if "+" not in scheme and module == "psycopg" else \
            DRIVER_PACKAGES.get(module.split(".")[0], module)
        raise ReslabError(f"{what} {scheme}://...: its database driver '{module}' is not installed (pip install "
                          f"{package})", file=flag) from None
    except (NoSuchModuleError, ArgumentError) as e:
        raise ReslabError(f"{what} {scheme}://...: {first_line(e)} (e.g. postgresql+psycopg2://user@host/db)",
                          file=flag) from None


@contextlib.contextmanager
def server_lock(engine, name: str) -> Iterator[None]:
    """Hold a server-wide named lock (PostgreSQL advisory lock, MySQL GET_LOCK); it dies with its connection."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    dialect = engine.dialect.name
    if dialect == "postgresql":
        key = _lock_key(name)
        args = {"k": key}
        take = ("SELECT set_config('lock_timeout', :wait, true)", "SELECT pg_advisory_lock(:k)")  # (waits queued)
        give = "SELECT pg_advisory_unlock(:k)"
        who = ("SELECT a.pid, a.client_addr FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid WHERE "
               "l.locktype = 'advisory' AND l.granted AND l.classid::bigint = :hi AND l.objid::bigint = :lo",
               {"hi": (key >> 32) & 0xFFFFFFFF, "lo": key & 0xFFFFFFFF})
    elif dialect in ("mysql", "mariadb"):
        args = {"k": f"reslab-{hashlib.sha1(name.encode()).hexdigest()[:40]}"}
        take, give = (None, "SELECT GET_LOCK(:k, :seconds)"), "SELECT RELEASE_LOCK(:k)"
        who = ("SELECT IS_USED_LOCK(:k), NULL", args)
    else:
        raise ReslabError(f"storage {dialect}: reslab can share studies through sqlite, postgresql or mysql",
                          file="--storage")
    with engine.connect() as conn:
        def try_take(wait_s: Optional[float]) -> bool:
            if dialect != "postgresql":
                got = conn.execute(text(take[1]), {**args, "seconds": -1 if wait_s is None else wait_s}).scalar()
                conn.commit()
                return bool(got)
            try:          # lock_timeout (this transaction only) bounds the wait for an advisory lock too
                conn.execute(text(take[0]), {"wait": "0" if wait_s is None else f"{int(wait_s * 1000)}ms"})
                conn.execute(text(take[1]), args)
                conn.commit()
                return True
            except OperationalError as e:
                conn.rollback()
                if getattr(getattr(e, "orig", None), "pgcode", None) == "55P03":     # lock_not_available
                    return False
                raise

        def holder() -> str:
            try:
                row = conn.execute(text(who[0]), who[1]).first()
                conn.commit()
            except Exception:  # noqa: BLE001  (no right to read the server's activity: say less)
                conn.rollback()
                row = None
            if row is None or row[0] is None:
                return "another connection"
            return f"server connection {row[0]}" + (f" from {row[1]}" if row[1] else "")

        acquire(try_take, f"the lock '{name}' on the {dialect} server", holder)
        try:
            yield
        finally:
            conn.execute(text(give), args)
            conn.commit()


@contextlib.contextmanager
def schema_lock(url: str, name: str, connect_timeout_s: int = 10) -> Iterator[None]:
    """On a database server, hold the advisory lock `name` while a store is opened (its tables created or
    upgraded); elsewhere nothing."""
    if dialect_of(url) not in SERVER_DIALECTS:
        yield
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": connect_timeout_s},
                                      poolclass=sqlalchemy.pool.NullPool)
    try:
        with server_lock(engine, name):
            yield
    finally:
        engine.dispose()


def _lock_key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"reslab/{name}".encode(), digest_size=8).digest(), "big", signed=True)
