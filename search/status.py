"""Where a running study stands: its cells (or trials) done / running / waiting / failed, the job and host of each,
and the SLURM states of the job arrays submitted for it (`cli.py status STUDY`). Reads only."""
from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Optional

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.table import Table

from arches.errors import ReslabError

from . import keys
from .launch import JOBS_ATTR
from .trials import TrialRecord

STATES = ("done", "running", "waiting", "failed")
ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "SUSPENDED",
          "RESIZING", "SIGNALING", "STAGE_OUT")   # SLURM job states of a task that has not ended


@dataclass
class Row:
    """One ablation cell (arm, seed) or one search trial, by its latest attempt."""
    name: str
    state: str                                 # one of STATES
    trial: Optional[int] = None                # its latest trial number
    attempts: int = 0
    job: Optional[str] = None
    host: Optional[str] = None
    outcome: Optional[str] = None


@dataclass
class StudyStatus:
    study: str
    kind: str
    rows: list[Row]
    jobs: list[dict] = field(default_factory=list)     # {"job", "state", "node", "reason"} per array task

    @property
    def counts(self) -> dict[str, int]:
        return {s: sum(r.state == s for r in self.rows) for s in STATES}

    @property
    def total(self) -> int:
        return len(self.rows)

    def line(self) -> str:
        """'2 done, 1 running, 1 waiting, 0 failed'."""
        return ", ".join(f"{n} {s}" for s, n in self.counts.items())


def _state(t: optuna.trial.FrozenTrial) -> str:
    rec = TrialRecord.of(t)
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (t.state == TrialState.FAIL and rec.final):
        return "done"
    return {TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}.get(t.state, "failed")


def _cell(t: optuna.trial.FrozenTrial) -> Optional[tuple]:
    params = t.system_attrs.get(keys.QUEUED) or t.params
    return (params["arm"], params["seed"]) if "arm" in params and "seed" in params else None


def _rows(kind: str, meta: dict, trials: list) -> list[Row]:
    if kind == "ablation":
        latest: dict[tuple, list] = {(a["name"], s): [] for a in meta["arms"] for s in meta["seeds"]}
        for t in trials:
            cell = _cell(t)
            if cell in latest and TrialRecord.of(t).outcome != keys.DISCARDED:
                latest[cell].append(t)
        named = {f"{arm} seed {seed}": ts for (arm, seed), ts in latest.items()}
    else:                                       # a search: one row per chain of retries, named by its first trial
        first: dict[int, int] = {}
        for t in trials:
            before = TrialRecord.of(t).retry_of
            first[t.number] = first.get(int(before), int(before)) if before is not None else t.number
        named = {}
        for t in trials:
            named.setdefault(f"trial {first[t.number]}", []).append(t)
    rows = []
    for name, ts in named.items():
        if not ts:
            rows.append(Row(name, "waiting"))
            continue
        done = [t for t in ts if _state(t) == "done"]
        last = done[-1] if done else max(ts, key=lambda t: t.number)
        rec = TrialRecord.of(last)
        state = _state(last)
        if state == "failed" and rec.outcome == keys.INTERRUPTED:
            state = "waiting"                   # stopped by a signal (a preemption): retried, not a failure
        rows.append(Row(name, state, last.number, len(ts), rec.job, rec.host, rec.outcome))
    return rows


class QueueUnreadable(ReslabError):
    """squeue gave no answer (slurmctld busy or down): the jobs' states are unknown, not ended."""


def slurm_jobs(arrays: list[str]) -> list[dict]:
    """The SLURM state of every task of these job arrays, as squeue knows them (ended ones stay a few minutes, then
    squeue calls their ids invalid: none is listed). QueueUnreadable when squeue fails otherwise (a timeout, no
    slurmctld): an unanswered query must never read as "every job ended"."""
    if not arrays or shutil.which("squeue") is None:
        return []
    try:
        out = subprocess.run(["squeue", "-h", "-r", "--states=all", "-j", ",".join(arrays), "-o", "%i|%T|%N|%r"],
                             capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise QueueUnreadable("squeue did not answer in 60 s (is slurmctld up?)", file="squeue") from None
    if out.returncode != 0:
        if "invalid job id" in out.stderr.lower():
            return []                           # (ended long enough ago that slurmctld forgot them)
        message = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        raise QueueUnreadable(f"squeue failed: {message}", file="squeue")
    jobs = []
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4:
            jobs.append(dict(zip(("job", "state", "node", "reason"), parts)))
    return jobs


def study_status(name: str, storage_url: str, jobs_state: bool = True) -> StudyStatus:
    """The status of stored study `name` (one-line ReslabError when it is not there)."""
    from .report import load_study_by_ref
    from .storage import with_driver

    study = load_study_by_ref(name, with_driver(storage_url))
    meta = study.user_attrs.get(keys.META) or {}
    kind = meta.get("kind", "search")
    rows = _rows(kind, meta, study.get_trials(deepcopy=False))
    arrays = [str(a) for a in study.user_attrs.get(JOBS_ATTR, [])]
    return StudyStatus(study.study_name, kind, rows, slurm_jobs(arrays) if jobs_state else [])


def print_status(status: StudyStatus, as_json: bool = False, console: Optional[Console] = None) -> None:
    """A table of the rows, then one of the jobs (or the same as JSON)."""
    if as_json:
        print(json.dumps({"study": status.study, "kind": status.kind, "counts": status.counts,
                          "cells": [r.__dict__ for r in status.rows], "jobs": status.jobs}, indent=2))
        return
    console = console or Console(width=160)
    console.print(f"[bold]{status.kind} {status.study}[/bold]: {status.line()}")
    table = Table("cell" if status.kind == "ablation" else "trial", "state", "trial", "attempts", "job", "host",
                  "outcome")
    for r in status.rows:
        table.add_row(r.name, r.state, "" if r.trial is None else str(r.trial), str(r.attempts), r.job or "",
                      r.host or "", r.outcome or "")
    console.print(table)
    if status.jobs:
        jobs = Table("job", "SLURM state", "node", "reason")
        for j in status.jobs:
            jobs.add_row(j["job"], j["state"], j["node"], j["reason"])
        console.print(jobs)
