"""A study never waits on a trial nobody runs, and never starts more workers than the machine holds (issue 23):
a whole `ablate` SIGKILLed right after a trial started, then rerun, retries that trial at once (its worker's pid is
gone); a trial left RUNNING with no worker recorded on it, and another machine's trial whose heartbeats stop, are
retried after the heartbeat grace, the command saying what it waits for meanwhile; `--workers N` beyond this
machine's cores or memory (measured on the study's trials, else estimated) is one line before anything starts;
and `run --resume` counts a killed run process that is not reaped yet, or a reused pid, as gone."""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import ROOT, tiny_study

pytestmark = pytest.mark.slow

STUDY = tiny_study(data=(300, 100, 100), widths=(4, 8, 8), epochs=1, batch_size=100) + """\
ablation: {axes: {block.shortcut: [A, B]}, baseline: A, seeds: 1}
"""
BOUND_S = 300          # every command here ends well within this (each trial trains for seconds)


def ablate(path: Path, out: Path, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), "ablate", str(path), "--output-dir", str(out), *args]


def lines_of(stream) -> "queue.Queue[str]":
    """The lines of a process's stream, as they come (a thread reads them)."""
    q: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [q.put(line) for line in stream], daemon=True).start()
    return q


def wait_for(q: "queue.Queue[str]", pattern: str, log: list[str]) -> str:
    """The first line matching `pattern` (fails after BOUND_S)."""
    while True:
        try:
            line = q.get(timeout=BOUND_S)
        except queue.Empty:
            pytest.fail(f"no line matching {pattern!r} within {BOUND_S} s:\n{''.join(log)}")
        log.append(line)
        if re.search(pattern, line):
            return line


def check_every_cell_done_once(out: Path) -> list:
    trials = optuna.load_study(study_name="s", storage=f"sqlite:///{out / 'optuna.db'}").get_trials()
    complete = sorted((t.params["arm"], t.params["seed"]) for t in trials if t.state == TrialState.COMPLETE)
    assert complete == [("A", 0), ("B", 0)], [(t.number, t.state, t.params, t.user_attrs) for t in trials]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and all(r.info.status != "RUNNING" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    return trials


def refused_before_anything_starts(path: Path, out: Path) -> None:
    """`--workers` far beyond this machine: one line, exit 2, no worker started, no study made, no run recorded."""
    workers = 1000 * (os.cpu_count() or 1)        # no machine holds a thousand trials per core
    proc = subprocess.Popen(ablate(path, out, "--workers", str(workers)), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    started = proc.stdout.readline()              # (a worker started: stop them all at once, then fail)
    if started.startswith("study ") or started.startswith("worker "):
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"workers were started: {started}")
    assert proc.wait(timeout=BOUND_S) == 2
    err = proc.stderr.read().strip()
    found = re.fullmatch(rf"--workers: {workers} workers do not fit this machine \((cores|memory)\): each keeps 1 "
                         r"CPU thread busy and needs about [\d,]+ MB \(estimated: .+\); \d+ cores \(2 threads each "
                         r"at most\) and [\d,]+ MB available hold (\d+); give --workers (\d+) or fewer \(more "
                         r"machines can share the study: --storage, --tracking-uri\)", err)
    assert found and found.group(2) == found.group(3) and 1 <= int(found.group(2)) < workers, err
    assert optuna.get_all_study_names(f"sqlite:///{out / 'optuna.db'}") == []       # no study made, no trial
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_too_many_workers_are_refused_and_a_sigkilled_ablate_reruns_retrying_its_trial_at_once(tmp_path, capsys):
    path, out = tmp_path / "s.yaml", tmp_path / "out"
    path.write_text(STUDY)
    refused_before_anything_starts(path, out)       # (an estimate: the study has not run yet)

    # --heartbeat 300: a silent trial counts as dead after 900 s, far past BOUND_S: only the dead pid ends it in time
    first = subprocess.Popen(ablate(path, out, "--heartbeat", "300"), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log: list[str] = []
    started = wait_for(lines_of(first.stdout), r"^trial \d+ \[\w+ seed \d+\] started", log)
    os.killpg(first.pid, signal.SIGKILL)                      # the whole process group, right after the start
    first.wait(timeout=BOUND_S)
    killed = int(started.split()[1])
    storage = f"sqlite:///{out / 'optuna.db'}"
    assert optuna.load_study(study_name="s", storage=storage).trials[killed].state == TrialState.RUNNING

    again = subprocess.run(ablate(path, out, "--heartbeat", "300"), cwd=ROOT, capture_output=True, text=True,
                           timeout=BOUND_S)
    assert again.returncode == 0, again.stdout + again.stderr
    note = (f"trial {killed} left RUNNING: its worker (pid {first.pid} on this machine) is gone (killed?); it is "
            f"retried now")
    assert note in again.stderr.splitlines(), again.stderr
    trials = check_every_cell_done_once(out)
    assert trials[killed].state == TrialState.FAIL and "reslab.outcome" not in trials[killed].user_attrs
    retry = [t for t in trials if t.user_attrs.get("reslab.retry_of") == killed]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == trials[killed].params

    # the study's workers measured their memory: a count this machine cannot hold is refused on that figure
    from cli import main

    peak = max(t.user_attrs["reslab.worker_memory_mb"] for t in trials if t.state == TrialState.COMPLETE)
    capsys.readouterr()
    assert main(["ablate", str(path), "--output-dir", str(out), "--workers", "100000"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("--workers: 100000 workers do not fit this machine") and "\n" not in line, line
    assert f"about {peak:,.0f} MB (measured: the peak of this study's workers)" in line, line
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == len(trials)     # nothing started


def test_trials_without_a_live_worker_are_retried_after_the_grace_and_the_wait_is_announced(tmp_path):
    """A trial Optuna handed out whose worker died before recording itself (killed between ask and record), and a
    trial recorded by a worker on another machine whose heartbeats then stop: a rerun says what it waits for and
    for how long, and retries both once the grace (3 x --heartbeat) has passed."""
    from search import keys
    from search.space import load_study_file
    from search.storage import open_storage
    from search.study import Heartbeat, StudyOptions, enqueue_missing, prepare, trial_id_of

    path, out = tmp_path / "s.yaml", tmp_path / "out"
    path.write_text(STUDY)
    opts = StudyOptions(str(path), output_dir=str(out), heartbeat=1).resolved()
    plan = load_study_file(str(path))
    storage = open_storage(opts.storage, heartbeat=1)
    prepare(plan, opts, storage)
    study = optuna.load_study(study_name="s", storage=storage)
    enqueue_missing(study, plan)
    unrecorded = study.ask()                              # RUNNING; its worker died before recording anything
    elsewhere = study.ask()                               # RUNNING on another machine, beating
    elsewhere.set_user_attr(keys.WORKER, {"host": "elsewhere", "boot": 1.0, "pidns": 1, "pid": 4242,
                                          "started": 2.0})
    with Heartbeat(storage, trial_id_of(storage, elsewhere), 1):
        storage.record_heartbeat(trial_id_of(storage, elsewhere))
        rerun = subprocess.Popen(ablate(path, out, "--heartbeat", "1"), cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            log: list[str] = []
            waiting = wait_for(lines_of(rerun.stderr), r"^waiting for 1 trial ", log).strip()
        except BaseException:
            os.killpg(rerun.pid, signal.SIGKILL)
            raise
    # (the heartbeats stop here: the machine "elsewhere" is gone)
    assert waiting == (f"waiting for 1 trial that other machines' workers run: trial {elsewhere.number} (pid 4242 on "
                       f"elsewhere); until they end, or, for one whose heartbeats stop, 3 s after its last heartbeat "
                       f"(then it is retried here)"), log
    try:
        assert rerun.wait(timeout=BOUND_S) == 0, "".join(log) + rerun.stderr.read()
    finally:
        if rerun.poll() is None:
            os.killpg(rerun.pid, signal.SIGKILL)
    trials = check_every_cell_done_once(out)
    assert trials[unrecorded.number].state == TrialState.FAIL and trials[elsewhere.number].state == TrialState.FAIL
    assert trials[unrecorded.number].user_attrs["reslab.reason"] == \
        "no worker recorded itself on it within 3 s of its start (killed as it started)"
    assert {t.user_attrs.get("reslab.retry_of") for t in trials} >= {unrecorded.number, elsewhere.number}


def test_run_resume_counts_a_killed_but_unreaped_run_process_as_gone(tmp_path):
    """`run --resume` judges a RUNNING run by its process: a SIGKILLed process its parent has not reaped yet (a
    zombie) is gone, not alive; so is a pid whose process started after the run's."""
    from runs.record import HOST_TAG, PID_TAG, STARTED_TAG, owner_tags, run_owner

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("x", artifact_location=str(tmp_path / "art"))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        import psutil

        started = f"{psutil.Process(child.pid).create_time():.2f}"
        run = client.create_run(experiment, tags={**owner_tags(), PID_TAG: str(child.pid), STARTED_TAG: started})
        assert run_owner(client.get_run(run.info.run_id)) == "alive"
        reused = client.create_run(experiment, tags={**owner_tags(), PID_TAG: str(child.pid),
                                                     STARTED_TAG: f"{float(started) - 60:.2f}"})
        assert run_owner(client.get_run(reused.info.run_id)) == "gone"            # the pid names a later process
        os.kill(child.pid, signal.SIGKILL)
        for _ in range(BOUND_S * 100):                                          # dead, not reaped (no wait yet)
            if psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE:
                break
            time.sleep(0.01)
        assert run_owner(client.get_run(run.info.run_id)) == "gone"
        other = client.create_run(experiment, tags={HOST_TAG: "elsewhere", PID_TAG: str(os.getpid())})
        assert run_owner(client.get_run(other.info.run_id)) == "unknown"
    finally:
        child.kill()
        child.wait()
