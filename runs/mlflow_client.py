"""Which MLflow store a command uses, and a client on it: the default store of an output folder, tracking servers,
database drivers, whether a server answers, and opening the store safely (runs.stores).

Default store: `sqlite:///<abs output_dir>/mlflow.db`, artifacts in `<output_dir>/mlartifacts`. With a tracking
server (`http://host:port`, `mlflow server --serve-artifacts`) the server's artifact store holds every artifact,
checkpoints included, so that any machine (and the UI) reads them: nothing goes into a local folder. Only global
rank 0 talks to MLflow.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.tracking import MlflowClient

from arches.errors import ReslabError, first_line

from .quiet import quiet
from .stores import check_driver, open_sqlite, schema_lock, sqlite_path, writable_folder


def default_tracking_uri(output_dir: str | Path = "outputs", create: bool = True) -> str:
    """sqlite:///<abs output_dir>/mlflow.db (the folder is created unless `create` is false: then the store's first
    opening makes it; one-line error when it cannot be)."""
    out = Path(output_dir).expanduser().resolve()
    if create:
        writable_folder(out, "--output-dir")
    return f"sqlite:///{out / 'mlflow.db'}"


def artifact_root(output_dir: str | Path = "outputs") -> str:
    """file:// URI of <abs output_dir>/mlartifacts, where experiments created here keep their artifacts."""
    return (Path(output_dir).expanduser().resolve() / "mlartifacts").as_uri()


def remote_artifacts(uri: str) -> bool:
    """Whether the tracking URI is a tracking server (http/https), whose own artifact store keeps the runs' artifacts
    (experiments are made without a local artifact location, checkpoints are uploaded every epoch)."""
    return uri.split("://", 1)[0].lower() in ("http", "https")


def with_driver(url: str) -> str:
    """postgresql://... -> postgresql+psycopg2://... when only psycopg2 is installed (SQLAlchemy 2.1 defaults
    to psycopg 3 for a bare postgresql:// URL)."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgresql", "postgres") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    return url


def reachable(uri: str, timeout_s: float = 5.0) -> Optional[str]:
    """None when a server-backed store answers within timeout_s, else why not (MLflow itself retries for
    minutes before giving up). SQL databases are tried with SQLAlchemy, tracking servers over HTTP."""
    scheme = uri.split("://", 1)[0].lower()
    try:
        if scheme.startswith(("postgresql", "postgres", "mysql", "mssql")):
            import sqlalchemy

            args = {"connect_timeout": int(timeout_s)} if scheme.startswith(("postgres", "mysql")) else {}
            engine = sqlalchemy.create_engine(uri, connect_args=args, poolclass=sqlalchemy.pool.NullPool)
            with engine.connect():
                pass
        elif scheme in ("http", "https"):
            import urllib.request

            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except Exception as e:  # noqa: BLE001  (any failure to connect is the answer)
        return first_line(e) or type(e).__name__
    return None


def _open_client(uri: str) -> MlflowClient:
    """A client on the store, its tables created or upgraded (quietly: MLflow logs that at INFO). When that fails,
    MLflow's cached engine for the URI is dropped, so that a store made anew in its place is opened afresh."""
    try:
        with quiet():
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)
    except Exception:
        engine = getattr(SqlAlchemyStore, "_engine_map", {}).pop(uri, None)
        if engine is not None:
            engine.dispose()
        raise
    return client


def client_for(tracking_uri: Optional[str], output_dir: str | Path = "outputs") -> MlflowClient:
    """An MlflowClient on the given store (default: the sqlite file in output_dir), opened safely against other
    commands opening it too (runs.stores); one-line error if unusable."""
    given = bool(tracking_uri) and tracking_uri != default_tracking_uri(output_dir, create=False)
    flag = "--tracking-uri" if given else "--output-dir"        # (a study passes the default on, resolved)
    uri = with_driver(tracking_uri or default_tracking_uri(output_dir))
    if "://" not in uri:
        raise ReslabError(f"tracking URI '{uri}' has no scheme; use sqlite:///path/mlflow.db, "
                          f"postgresql://..., or http://host:port", file="--tracking-uri")
    check_driver(uri, "MLflow store", "--tracking-uri")
    path = sqlite_path(uri)
    if path is not None:
        return open_sqlite(path, _open_client, "MLflow store", flag,
                           {"runs": "1", "experiments": "experiment_id != 0"})   # (0: MLflow's Default)
    problem = reachable(uri)
    if problem:
        raise ReslabError(f"cannot reach MLflow store {uri}: {problem}", file="--tracking-uri")
    try:
        with schema_lock(uri, "mlflow-schema"):
            return _open_client(uri)
    except Exception as e:  # noqa: BLE001  (any store failure is a bad --tracking-uri)
        first = first_line(e) or type(e).__name__
        raise ReslabError(f"cannot open MLflow store {uri}: {first}", file="--tracking-uri") from None
