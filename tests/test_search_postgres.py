"""Two `ablate --workers 1` commands started separately share one study through a real PostgreSQL server (as
two machines would): every cell runs exactly once, one MLflow parent run holds every trial's child."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT, free_port, tiny_study

pytestmark = pytest.mark.slow

PG_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name)
             if p.parent.name.isdigit() else 0, default=Path("/usr/lib/postgresql/15/bin"))  # Debian's layout



def _unavailable(reason: str) -> None:
    """Skip on a developer's machine; fail under CI, whose setup (.ci/setup --tests) installs PostgreSQL."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}: CI must run the PostgreSQL test")
    pytest.skip(reason)


def _as_postgres_user() -> list[str]:
    """Run the server as a non-root user: initdb refuses root."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    try:
        import pwd
        pwd.getpwnam("postgres")
    except KeyError:
        _unavailable("running as root and there is no 'postgres' user to run the server as")
    if runuser is None:
        _unavailable("running as root without runuser")
    return [runuser, "-u", "postgres", "--"]


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL 15 cluster on 127.0.0.1 (trust auth); yields its base URL, stops it after."""
    if not (PG_BIN / "initdb").exists() or not (PG_BIN / "pg_ctl").exists():
        _unavailable("PostgreSQL binaries missing (apt-get install postgresql)")
    prefix = _as_postgres_user()
    home = Path(tempfile.mkdtemp(prefix="reslab-pg-"))
    if prefix:
        shutil.chown(home, user="postgres")
    data, port = home / "data", free_port()
    subprocess.run([*prefix, str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"],
                   check=True, capture_output=True)
    subprocess.run([*prefix, str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(home / "log"), "-w", "-t", "60",
                    "-o", f"-h 127.0.0.1 -p {port} -k {home}", "start"], check=True, capture_output=True)
    try:
        subprocess.run([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow"],
                       check=True, capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*prefix, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


def test_two_machines_share_a_study_through_postgres(tmp_path, postgres, fashion_mnist):
    path = tmp_path / "shared.yaml"
    path.write_text(tiny_study(data=(600, 200, 300), widths=(8, 16), epochs=2, batch_size=100) + textwrap.dedent("""\
        ablation:
          axes: {block.shortcut: [A, B, C]}
          baseline: A
          seeds: 2
        """))
    storage, tracking = f"{postgres}/postgres", f"{postgres}/mlflow"

    def machine(name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "ablate", str(path), "--workers", "1",
                                 "--storage", storage, "--tracking-uri", tracking, "--heartbeat", "5",
                                 "--output-dir", str(tmp_path / name)],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    first, second = machine("a"), machine("b")          # both at once: they also race to create the study
    out_b, _ = second.communicate(timeout=600)
    out_a, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out_a
    assert second.returncode == 0, out_b
    ran_a, ran_b = out_a.count(" started"), out_b.count(" started")
    assert ran_a >= 1 and ran_b >= 1 and ran_a + ran_b == 6, (out_a, out_b)

    from search.storage import with_driver
    trials = optuna.load_study(study_name="shared", storage=with_driver(storage)).get_trials()
    assert len(trials) == 6 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted((t.params["arm"], t.params["seed"]) for t in trials) == [
        (a, s) for a in "ABC" for s in (0, 1)]

    client = MlflowClient(with_driver(tracking))
    exp = client.get_experiment_by_name("ablation/shared")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("reslab.role") == "study"]
    kids = [r for r in runs if r.data.tags.get("reslab.role") == "trial"]
    assert len(parents) == 1 and len(kids) == 6
    assert {k.data.tags["mlflow.parentRunId"] for k in kids} == {parents[0].info.run_id}
    assert all(k.data.tags["state"] == "COMPLETE" and "test/error" in k.data.metrics for k in kids)


def test_machines_opening_a_new_database_at_once(postgres):
    """Optuna creates its tables on first use; several machines doing that at once on a new database collided
    (a duplicate key in PostgreSQL's catalog) until reslab took a server lock around it."""
    subprocess.run([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", postgres.rsplit(":", 1)[1], "-U", "postgres",
                    "fresh"], check=True, capture_output=True)
    code = f"from search.storage import open_storage; open_storage({postgres + '/fresh'!r})"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(6)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
