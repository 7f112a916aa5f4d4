"""Whether a RUNNING trial's worker is still there, so a killed study never waits on a trial nobody runs.

A worker records who it is on the trial it claims (`claim`, before the trial's first heartbeat): machine (host name,
boot time, PID namespace) and process (pid, start time). Under the study lock, `fail_orphans` then fails at once
every RUNNING trial whose worker ran on this machine and is gone (no such pid, a zombie, or the pid reused by a
later process), as `run --resume` does for runs; and a RUNNING trial that no worker ever recorded itself on (killed
between Optuna's ask and the record) once it is older than the heartbeat grace. Trials of workers on other machines
are left to Optuna's heartbeat: failed as stale once silent for the grace period (`optuna.storages.
fail_stale_trials`). Failed trials carry no outcome, so the study retries them (search.trials.TrialRecord).
`waiting_note` says what a worker that has nothing to run waits for, and for how long at most.
"""
from __future__ import annotations

import datetime
import functools
import os
import socket
from dataclasses import asdict, dataclass
from typing import Any, Optional

import optuna
import psutil
from optuna.trial import TrialState

from runs.record import process_alive

from . import keys

def _pid_namespace() -> int:
    """The inode of this process's PID namespace (0 where unknown): pids compare only within one namespace."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


@dataclass(frozen=True)
class WorkerId:
    """Who claimed a trial: the machine (host, boot, PID namespace) and the process (pid, start time)."""
    host: str            # socket.gethostname()
    boot: float          # psutil.boot_time(): a reboot makes every recorded pid meaningless
    pidns: int           # PID namespace inode (containers sharing a host name have different ones)
    pid: int
    started: float       # psutil.Process(pid).create_time(): tells the worker from a later process given its pid

    @classmethod
    def this_process(cls) -> "WorkerId":
        return _this_process(os.getpid())

    @classmethod
    def of(cls, trial: Any) -> Optional["WorkerId"]:
        """The worker recorded on a trial (None when none was, or the record is not one)."""
        value = trial.user_attrs.get(keys.WORKER)
        try:
            return cls(str(value["host"]), float(value["boot"]), int(value["pidns"]), int(value["pid"]),
                       float(value["started"]))
        except (TypeError, KeyError, ValueError):
            return None

    def here(self) -> bool:
        """Whether it ran on this machine, in this boot and PID namespace (its pid can be checked from here)."""
        me = WorkerId.this_process()
        return (self.host, self.pidns) == (me.host, me.pidns) and abs(self.boot - me.boot) < 2

    def alive(self) -> bool:
        """Whether its process still runs (call only when `here`)."""
        return process_alive(self.pid, self.started)

    def where(self) -> str:
        return f"pid {self.pid} on {'this machine' if self.here() else self.host}"


@functools.lru_cache(maxsize=4)
def _this_process(pid: int) -> WorkerId:
    return WorkerId(socket.gethostname(), psutil.boot_time(), _pid_namespace(), pid, psutil.Process(pid).create_time())


def claim(trial: optuna.Trial) -> None:
    """Record this process as the worker of `trial` (right after asking for it, under the study lock)."""
    trial.set_user_attr(keys.WORKER, asdict(WorkerId.this_process()))


def _age_s(trial: optuna.trial.FrozenTrial) -> float:
    started = trial.datetime_start or datetime.datetime.now()
    return (datetime.datetime.now() - started).total_seconds()


def orphan_reason(trial: optuna.trial.FrozenTrial, grace_s: float) -> Optional[str]:
    """Why a RUNNING trial has no worker any more, or None while it may have one."""
    worker = WorkerId.of(trial)
    if worker is None:
        if _age_s(trial) <= grace_s:
            return None
        return f"no worker recorded itself on it within {grace_s:g} s of its start (killed as it started)"
    if worker == WorkerId.this_process():       # this process claims trials one at a time: not running it now
        return "its worker (this process) stopped running it"
    if worker.here() and not worker.alive():
        return f"its worker ({worker.where()}) is gone (killed?)"
    return None


def fail_orphans(study: optuna.Study, storage: Any, grace_s: float) -> list[str]:
    """Under the study lock: fail the RUNNING trials whose worker is gone (see the module); returns a note for each."""
    notes = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        why = orphan_reason(trial, grace_s)
        if why is None:
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(study.study_name), trial.number)
        try:
            storage.set_trial_user_attr(trial_id, keys.REASON, why)
            storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:     # it ended meanwhile
            continue
        notes.append(f"trial {trial.number} left RUNNING: {why}; it is retried now")
    return notes


def waiting_note(study: optuna.Study, grace_s: float) -> Optional[str]:
    """What a worker with nothing to run waits for (the trials other workers run) and how long at most; None when
    nothing runs."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return None
    shown = []
    for trial in running[:5]:
        worker = WorkerId.of(trial)
        shown.append(f"trial {trial.number} ({worker.where() if worker else 'worker not recorded yet'})")
    more = f" and {len(running) - 5} more" if len(running) > 5 else ""
    elsewhere = all(not (w := WorkerId.of(t)) or not w.here() for t in running)
    who = "other machines' workers" if elsewhere else "other workers"
    return (f"waiting for {len(running)} trial{'s' if len(running) > 1 else ''} that {who} run: {', '.join(shown)}"
            f"{more}; until they end, or, for one whose heartbeats stop, {grace_s:g} s after its last heartbeat "
            f"(then it is retried here)")
