"""Studies on a real SLURM cluster (munged, slurmctld and slurmd on 127.0.0.1, tests/slurm_cluster.py) with the
stores every node reaches (PostgreSQL for Optuna, an `mlflow server` with proxied artifacts): `ablate --launcher
slurm` submits two workers as one submitit job array and returns; one worker gets submitit's signal (USR2) mid-trial,
stops at a batch end with a checkpoint and requeues itself, its trial resuming in the same MLflow run; the other is
killed outright, its trial retried through the heartbeat. Every cell completes exactly once. Then `--dry-run` and
the bad inputs (no SLURM, partition unknown, too many GPUs, stores no node can share, conflicting flags)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from cli import main
from conftest import ROOT, tiny_study
from slurm_cluster import missing, slurm_cluster
from test_search_postgres import PG_BIN, postgres  # noqa: F401  (postgres: the fixture)
from test_search_server import tracking_server  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow

STUDY = tiny_study(data=(1000, 100, 200), widths=(8, 16), epochs=4, batch_size=25) + """\
ablation:
  axes: {block.shortcut: [A, B]}
  baseline: A
  seeds: 2
launcher:
  workers: 2
  timeout_min: 10
  signal_delay_s: 30
"""


@pytest.fixture
def cluster(tmp_path):
    """The test cluster (CI installs slurm-wlm and munge: .ci/setup --tests; elsewhere the test is skipped)."""
    absent = missing()
    if absent:
        if os.environ.get("CI"):
            pytest.fail(f"{', '.join(absent)} missing: CI must run the SLURM tests (.ci/setup --tests installs them)")
        pytest.skip(f"{', '.join(absent)} missing (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        pytest.skip("the test cluster's daemons run as root")
    with slurm_cluster(tmp_path / "slurm") as c:
        yield c


@pytest.fixture
def stores(postgres, tracking_server):  # noqa: F811  (the imported fixtures)
    """(Optuna storage URL on PostgreSQL, MLflow tracking server URL)."""
    subprocess.run([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", postgres.rsplit(":", 1)[1], "-U", "postgres",
                    "optuna"], check=True, capture_output=True)
    return f"{postgres}/optuna", tracking_server[0]


def cli(folder: Path, env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=timeout)


def environment(cluster) -> dict:
    keep = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RESLAB_STORAGE")}
    return {**keep, **cluster.env}


def trials_of(storage: str, name: str = "cells") -> list:
    from search.storage import with_driver

    return optuna.load_study(study_name=name, storage=with_driver(storage)).get_trials()


def until(condition, what: str, timeout: float, why=lambda: ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} did not happen in {timeout:.0f} s\n{why()}")


def test_ablation_on_slurm_survives_a_preemption_and_a_killed_job(tmp_path, cluster, stores, fashion_mnist):
    storage, url = stores
    (tmp_path / "cells.yaml").write_text(STUDY)
    env = environment(cluster)
    command = [sys.executable, str(ROOT / "cli.py"), "ablate", "cells.yaml", "--launcher", "slurm", "--wait",
               "--storage", storage, "--tracking-uri", url, "--heartbeat", "2"]
    launcher = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    printed = [launcher.stdout.readline()]
    while "submitted to slurm as job" not in printed[-1]:
        printed.append(launcher.stdout.readline())
        assert printed[-1] or launcher.poll() is None, "".join(printed)
    line = printed[-1]
    array = line.split("as job ")[1].split()[0]
    assert f"({array}_0, {array}_1)" in line, line
    assert launcher.stdout.readline().startswith("follow: python cli.py status cells --storage ")
    logs = tmp_path / "outputs" / "submitit"

    def why() -> str:
        text = cluster.run("squeue", "--states=all", "-r", check=False).stdout
        for f in sorted(logs.glob("*.out")) + sorted(logs.glob("*.err")):
            text += f"\n--- {f.name}\n{f.read_text()[-4000:]}"
        return text + "".join(f"\n{t.number} {t.state.name} {t.params} {t.user_attrs}" for t in trials_of(storage))

    client = MlflowClient(url)

    def running_with_checkpoint(job=None):
        """(trial, run) of a trial (of `job`) whose first epoch's checkpoint is on the server, still running."""
        exp = client.get_experiment_by_name("ablation/cells")
        if exp is None:
            return None
        for run in client.search_runs([exp.experiment_id], "tags.`reslab.role` = 'trial' and "
                                      "attributes.status = 'RUNNING'"):
            if "checkpoints/last.ckpt" in [f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")]:
                number = int(run.data.tags["reslab.trial"])
                trial = next(t for t in trials_of(storage) if t.number == number)
                if trial.state == optuna.trial.TrialState.RUNNING and trial.user_attrs.get("reslab.job") and \
                        job in (None, trial.user_attrs["reslab.job"]):
                    return trial, run
        return None

    # one worker gets submitit's signal mid-trial: a clean stop, the trial left to retry, the task requeued
    signalled, run = until(running_with_checkpoint, "a trial with a checkpoint", 240, why)
    job = signalled.user_attrs["reslab.job"]
    cluster.run("scancel", "--signal=USR2", job)
    stopped = until(lambda: next((t for t in trials_of(storage) if t.number == signalled.number
                                  and t.state == optuna.trial.TrialState.FAIL), None), "the signalled stop", 120, why)
    assert stopped.user_attrs.get("reslab.outcome") == "interrupted", why()
    epochs_before = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))

    def held() -> bool:
        shown = cluster.run("scontrol", "show", "job", job, check=False).stdout
        return "Restarts=1" in shown and "JobState=PENDING" in shown and "Reason=BeginTime" in shown

    until(held, f"job {job} requeued", 120, why)
    # SLURM holds a requeued job for two minutes (its EligibleTime); as an admin would, let it start now
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")

    # the other worker dies mid-trial (its processes SIGKILLed, as when its node fails): the heartbeat gives the
    # trial back, and it resumes from its checkpoint too
    other = f"{array}_{1 - int(job.split('_')[1])}"
    victim, victim_run = until(lambda: running_with_checkpoint(other), f"a trial with a checkpoint in {other}", 240,
                               why)
    raw = cluster.run("squeue", "-h", "-j", other, "-o", "%A").stdout.strip()        # (the task's own job id)
    pids = [int(row.split()[0]) for row in cluster.run("scontrol", "listpids", raw).stdout.splitlines()[1:]
            if row.split()[1] == raw]
    assert pids, why()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    # the study ends with every cell done exactly once; `status` follows it
    report, _ = launcher.communicate(timeout=480)            # --wait: until the jobs have ended, then the report
    assert launcher.returncode == 0, "".join(printed) + report + why()
    summary = next(ln for ln in report.splitlines() if ln.startswith("ablation cells  trials:"))
    assert "4 complete" in summary, report
    out = cli(tmp_path, env, "status", "cells", "--storage", storage, "--json", timeout=120)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["counts"] == {"done": 4, "running": 0, "waiting": 0, "failed": 0}, status
    assert {c["name"] for c in status["cells"]} == {f"{a} seed {s}" for a in "AB" for s in (0, 1)}
    assert all(c["job"].startswith(f"{array}_") and c["host"] for c in status["cells"]), status
    states = {j["job"]: j["state"] for j in status["jobs"]}
    assert states.get(job) == "COMPLETED" and set(states) <= {f"{array}_0", f"{array}_1"}, status

    trials = trials_of(storage)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted((t.params["arm"], t.params["seed"]) for t in complete) == [(a, s) for a in "AB" for s in (0, 1)]
    retry = next(t for t in complete if t.user_attrs.get("reslab.retry_of") == signalled.number)
    killed = next(t for t in trials if t.number == victim.number)
    assert killed.state == optuna.trial.TrialState.FAIL and "reslab.outcome" not in killed.user_attrs, why()
    assert any(t.user_attrs.get("reslab.retry_of") == victim.number for t in complete), why()
    assert client.get_run(victim_run.info.run_id).data.tags["resumed"] == "1"        # from its checkpoint too

    # the signalled trial resumed in its own MLflow run: its epochs each recorded once
    resumed = client.get_run(run.info.run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.tags["resumed"] == "1"
    assert resumed.data.tags["reslab.attempts"] == f"{signalled.number}, {retry.number}"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [1, 2, 3, 4]
    assert 1 <= len(epochs_before) < 4
    exp = client.get_experiment_by_name("ablation/cells")
    kids = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("reslab.role") == "trial"]
    assert len(kids) == 4 and all(k.data.tags["state"] == "COMPLETE" for k in kids), why()
    worker_log = (logs / f"{job}_0_log.out").read_text()
    assert "stopped by SIGUSR2" in worker_log and f"Requeued job {job}" in worker_log, why()
    assert worker_log.count("Starting with JobEnvironment") == 2, why()      # it ran again after its requeue


def test_dry_run_and_bad_requests_submit_nothing(tmp_path, cluster, fashion_mnist, capsys, monkeypatch):
    (tmp_path / "cells.yaml").write_text(STUDY)
    monkeypatch.chdir(tmp_path)
    for name, value in cluster.env.items():
        monkeypatch.setenv(name, value)
    storage, url = "postgresql://postgres@127.0.0.1:1/optuna", "http://127.0.0.1:1"      # no server: none is opened
    base = ["ablate", "cells.yaml", "--launcher", "slurm", "--storage", storage, "--tracking-uri", url]

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    code, script, err = run(*base, "--dry-run", "--launcher-set", "partition=debug", "mem_gb=2")
    assert code == 0, err
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --partition=debug", "#SBATCH --time=10", "#SBATCH --mem=2GB",
                 "#SBATCH --signal=USR2@30", "#SBATCH --cpus-per-task=1", "-m submitit.core._submit"):
        assert line in script, script
    (tmp_path / "dry-run.sh").write_text(script)
    assert cluster.run("sbatch", "--test-only", str(tmp_path / "dry-run.sh"), check=False).returncode == 0

    bad = {
        "partition": (base + ["--launcher-set", "partition=nope"],
                      "--launcher: SLURM refuses the request: invalid partition"),
        "gpus": (base + ["--launcher-set", "gpus_per_node=8"],
                 "--launcher: SLURM refuses the request: invalid generic resource"),
        "sqlite": (["ablate", "cells.yaml", "--launcher", "slurm", "--tracking-uri", url],
                   "--storage: the workers run on other machines and cannot share sqlite:///"),
        "mlflow store": (["ablate", "cells.yaml", "--launcher", "slurm", "--storage", storage],
                         "--tracking-uri: the workers run on other machines and cannot share sqlite:///"),
        "unreachable": (base, "--tracking-uri"),
        "key": (base + ["--launcher-set", "partiton=debug"], "--launcher-set: unknown key 'partiton' (did you mean 'partition'?)"),
        "value": (base + ["--launcher-set", "timeout_min=-3"], "--launcher-set: timeout_min:"),
        "flags": (base + ["--dry-run", "--wait"], "--dry-run: "),
        "no launcher": (["ablate", "cells.yaml", "--wait"], "--wait: needs --launcher slurm"),
        "json": (base + ["--json"], "--json: "),
    }
    for name, args in bad.items():
        code, out, err = run(*args[0])
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].lower().startswith(args[1].lower()), (name, err)
    with monkeypatch.context() as m:
        m.setenv("PATH", str(Path(sys.executable).parent))
        code, out, err = run(*base)
    assert code == 2 and err.startswith("--launcher: no SLURM on this machine: sbatch, srun"), err
    assert cluster.run("squeue", "-h", "--states=all").stdout.strip() == ""        # nothing was ever submitted
    assert not (tmp_path / "outputs").exists()                                   # nor written

    # a queue that cannot be read is unknown, never "every job ended" (--wait would stop early); ids squeue has
    # forgotten (ended more than MinJobAge ago) are ended
    from conftest import free_port
    from search.status import QueueUnreadable, slurm_jobs

    assert slurm_jobs(["999999"]) == []
    conf = Path(cluster.env["SLURM_CONF"])
    dead = tmp_path / "dead-slurm.conf"
    text = "\n".join(f"SlurmctldPort={free_port()}" if ln.startswith("SlurmctldPort=") else ln
                     for ln in conf.read_text().splitlines())
    dead.write_text(text + "\nMessageTimeout=2\n")
    monkeypatch.setenv("SLURM_CONF", str(dead))
    with pytest.raises(QueueUnreadable, match="^squeue"):
        slurm_jobs(["1"])
