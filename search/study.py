"""Run a study: create or resume it in the shared storage, start workers, let each pull trials until done.

Every worker loops: under the study lock it fails stale trials (workers that stopped sending heartbeats),
enqueues what is missing (ablation cells and grid points that never ran or whose attempt died; retries of
dead search trials) and claims the next trial; then it trains that trial outside the lock with a heartbeat
thread running. The loop is Optuna's ask-and-tell interface (study.ask, study.tell) and the storage's public
methods only (a trial's storage id from its study name and number, for the heartbeat). So no ablation cell runs
twice, the trial budget holds across workers and machines, and a restart loses nothing that finished.

A study fixes, when it is made, the CPU threads and the devices of every trial (`devices_per_trial` K): a trial
of K devices trains with Lightning DDP over K GPUs (K CPU processes with gloo); its worker is rank 0, the only
process that talks to Optuna and MLflow, and Lightning starts the other ranks (search.objective.follow_trial).
With N GPUs, each of the N / K workers gets K GPUs of its own.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import optuna
import torch
from optuna.trial import TrialState

from arches.errors import ReslabError

from runs.fit import uses_cuda
from runs.mlflow_client import client_for, default_tracking_uri
from runs.mlflow_read import run_exists
from runs.mlflow_write import ensure_experiment, log_files
from runs.quiet import quiet

from . import capacity, keys, liveness, packing, recording, views
from .launch import placement
from .objective import TrialContext, record_outcome, run_trial
from .report import StudyReport, finalize
from .kinds import STUDY_KINDS
from .plans import StudyDesign
from .seeding import cells_in_play
from .space import load_study_file
from .storage import default_storage, open_storage, shown, study_lock, with_driver
from .trials import TrialRecord

ROOT = Path(__file__).resolve().parents[1]
RUN, WAIT, STOP = "run", "wait", "stop"


@dataclass
class StudyOptions:
    """How to run a study file: where its storage and MLflow store are, how many workers."""
    file: str
    overrides: list[str] = field(default_factory=list)
    study: Optional[str] = None              # study name (default: the file's `name:` or its file name)
    storage: Optional[str] = None            # default: sqlite:///<output_dir>/optuna.db
    tracking_uri: Optional[str] = None       # default: sqlite:///<output_dir>/mlflow.db
    output_dir: str = "outputs"
    workers: Optional[int] = None            # default: 1; with GPUs and devices_per_trial K > 1: GPUs / K
    devices_per_trial: Optional[int] = None  # default: the file's, else the study's, else 1
    heartbeat: int = 10                      # seconds between a running trial's heartbeats
    grace: Optional[int] = None              # seconds without heartbeat before a trial counts as dead (3 x)
    progress: Optional[bool] = None
    deadline: Optional[float] = None         # time.time() after which no new trial starts
    kind: Optional[str] = None               # ablation | search: what the command expects
    pack: Optional[Any] = None               # auto | off | N trials per pack (search.packing; default: the file's)

    def resolved(self) -> "StudyOptions":
        out = Path(self.output_dir).expanduser().resolve()
        return StudyOptions(**{**asdict(self), "output_dir": str(out),
                               "storage": with_driver(self.storage or default_storage(out)),
                               "tracking_uri": with_driver(self.tracking_uri or default_tracking_uri(out, False))})


# ---- study bookkeeping (all under the lock) -------------------------------------------------------------
def _params(t: optuna.trial.FrozenTrial) -> dict:
    """The values a trial stands for: its queued values when it was enqueued (a running trial's own params fill
    in one suggest at a time, so half-way they name no cell), else what it sampled."""
    return dict(t.system_attrs.get(keys.QUEUED) or t.params)


def _final(t: optuna.trial.FrozenTrial) -> bool:
    return t.state in (TrialState.COMPLETE, TrialState.PRUNED) or \
        (t.state == TrialState.FAIL and TrialRecord.of(t).final)


def _counts_as_attempt(t: optuna.trial.FrozenTrial) -> bool:
    """A FAIL that is not a result: the worker died (no outcome) or the trial raised an error."""
    return t.state == TrialState.FAIL and TrialRecord.of(t).retryable_failure


def _cell_key(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def cell_status(plan: StudyDesign, trials: list) -> dict[str, dict]:
    """Per fixed cell: its trials, whether it is done, active (waiting/running), and its failed attempts."""
    cells = {_cell_key(c): {"params": c, "trials": [], "done": False, "active": False, "attempts": 0}
             for c in plan.fixed_cells() or []}
    for t in trials:
        cell = cells.get(_cell_key(_params(t)))
        if cell is None:
            continue
        cell["trials"].append(t)
        if _final(t):
            cell["done"] = True
        elif t.state in (TrialState.WAITING, TrialState.RUNNING):
            cell["active"] = True
        elif _counts_as_attempt(t):
            cell["attempts"] += 1
    return cells


def enqueue_missing(study: optuna.Study, plan: StudyDesign) -> int:
    """Enqueue every fixed cell that is neither done nor active nor given up; returns how many."""
    n = 0
    for cell in cells_in_play(plan, cell_status(plan, study.get_trials(deepcopy=False))).values():
        if cell["done"] or cell["active"] or cell["attempts"] >= plan.max_attempts:
            continue
        attrs = {keys.ATTEMPT: cell["attempts"] + 1}
        failed = [t for t in cell["trials"] if t.state == TrialState.FAIL]
        if failed:
            attrs[keys.RETRY_OF] = failed[-1].number
        study.enqueue_trial(cell["params"], user_attrs=attrs)
        n += 1
    return n


def enqueue_retries(study: optuna.Study, plan: StudyDesign) -> int:
    """Search: re-enqueue the values of trials that died or raised, up to max_attempts per chain."""
    trials = study.get_trials(deepcopy=False)
    retried = {TrialRecord.of(t).retry_of for t in trials}
    n = 0
    for t in trials:
        rec = TrialRecord.of(t)
        if t.state != TrialState.FAIL or rec.final or t.number in retried:
            continue
        attempt = int(rec.attempt or 1)
        if rec.outcome == keys.INTERRUPTED:
            attempt -= 1                      # a Ctrl-C is not the trial's fault
        if attempt >= plan.max_attempts or not _params(t):
            continue
        study.enqueue_trial(_params(t), user_attrs={keys.RETRY_OF: t.number, keys.ATTEMPT: attempt + 1})
        n += 1
    return n


def search_used(plan: StudyDesign, trials: list) -> int:
    """Trials that count against the budget: results, given-up attempts, and those waiting or running."""
    retried = {TrialRecord.of(t).retry_of for t in trials}
    used = 0
    for t in trials:
        if _final(t) or t.state in (TrialState.WAITING, TrialState.RUNNING):
            used += 1
        elif t.state == TrialState.FAIL and t.number not in retried:
            used += 1                         # given up (no retry): counts, or the budget would never end
    return used


def next_action(study: optuna.Study, plan: StudyDesign, deadline: Optional[float]) -> str:
    trials = study.get_trials(deepcopy=False)
    waiting = any(t.state == TrialState.WAITING for t in trials)
    running = any(t.state == TrialState.RUNNING for t in trials)
    if deadline is not None and time.time() >= deadline:
        return STOP
    if waiting:
        return RUN
    if plan.wants_sampled(search_used(plan, trials)):
        return RUN
    return WAIT if running else STOP


# ---- creating / resuming --------------------------------------------------------------------------------
@dataclass
class Prepared:
    name: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    created: bool
    threads: int = 1                         # CPU threads of every trial (keys.TRIAL_THREADS)
    client: Any = None
    devices: int = 1                         # devices of every trial (keys.TRIAL_DEVICES)


def prepare(plan: StudyDesign, opts: StudyOptions, storage: Any, devices: int = 1,
            where: Optional[ReslabError] = None, client: Any = None) -> Prepared:
    """Create (or load and check) the Optuna study and its MLflow parent run, once, under the lock. `devices`: the
    devices per trial this command found (`where`: who asked for them); a study made meanwhile with others refuses
    it. `client`: the MLflow store already opened (default: opened here)."""
    fingerprint = plan.fingerprint()
    experiment = recording.experiment_name(plan.kind, plan.name)
    with quiet(), study_lock(storage, plan.name):
        client = client or client_for(opts.tracking_uri, opts.output_dir)
        created = False
        try:
            study = optuna.load_study(study_name=plan.name, storage=storage)
        except KeyError:
            study = optuna.create_study(study_name=plan.name, storage=storage,
                                        directions=[m.goal for m in plan.objectives])
            created = True
        attrs = study.user_attrs
        if attrs.get(keys.FINGERPRINT, fingerprint) != fingerprint:
            raise ReslabError(f"study '{plan.name}' in {shown(opts.storage)} was made from another definition "
                              f"(the file, its base spec or --set changed); run it under a new name with --study "
                              f"NAME", file=str(plan.file))
        if attrs.get(keys.TRIAL_DEVICES, devices) != devices:           # (made meanwhile by another command)
            raise devices_differ(plan, attrs[keys.TRIAL_DEVICES], devices, opts,
                                 where or ReslabError("", file="--devices-per-trial"))
        if keys.TRIAL_THREADS not in attrs:   # fixed once: a cell's result must not depend on the worker count
            study.set_user_attr(keys.TRIAL_THREADS, trial_threads(plan))
        if keys.TRIAL_DEVICES not in attrs:   # fixed once too: DDP over K devices trains on K batches a step
            study.set_user_attr(keys.TRIAL_DEVICES, devices)
        threads = int(study.user_attrs[keys.TRIAL_THREADS])
        names = [m.name for m in plan.objectives]
        if study.metric_names != names:               # optuna-dashboard and Optuna's plots name the objectives
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(names)
        if created or keys.FINGERPRINT not in attrs:
            study.set_user_attr(keys.FINGERPRINT, fingerprint)
            study.set_user_attr(keys.KIND, plan.kind)
            study.set_user_attr(keys.META, plan.meta())
            study.set_user_attr(keys.TEXT, plan.text)
            study.set_user_attr(keys.BASE_TEXT, plan.base.read_text())
        experiment_id = ensure_experiment(client, experiment, opts.output_dir, description=plan.mlflow_description())
        parent = attrs.get(keys.PARENT)
        if not run_exists(client, parent):
            if parent:
                print(f"note: parent run {parent} of study '{plan.name}' is not in {opts.tracking_uri}; "
                      f"starting a new one (give every worker the same --tracking-uri)", file=sys.stderr)
            parent = recording.create_parent_run(client, experiment_id, plan.name, plan.kind, plan.mlflow_description())
            study.set_user_attr(keys.PARENT, parent)
            log_files(client, parent, [plan.file, plan.base], "study")
        else:
            recording.reopen(client, parent)
    return Prepared(plan.name, experiment, experiment_id, parent, created, threads, client, devices)


# ---- devices of a trial ---------------------------------------------------------------------------------
def requested_devices(plan: StudyDesign, opts: StudyOptions) -> tuple[Optional[int], ReslabError]:
    """Devices per trial this command asks for (--devices-per-trial, else the file's devices_per_trial, else the
    spec's train.devices when above 1; None: whatever the study has) and, as an error to fill in, where it asked."""
    flag = ReslabError("", file="--devices-per-trial")
    in_file = ReslabError("", file=str(plan.file), line=plan.devices_line, path="devices_per_trial")
    in_spec = ReslabError("", file=str(plan.file), path="train.devices")
    spec_devices = (plan.document.get("train") or {}).get("devices", 1)
    if spec_devices == "auto":
        in_spec.message = "a study's trials cannot take 'auto' devices: give devices_per_trial (or " \
                          "--devices-per-trial) K, the GPUs of each trial"
        raise in_spec
    given = [(k, where) for k, where in ((opts.devices_per_trial, flag), (plan.devices_per_trial, in_file),
                                         (spec_devices if spec_devices != 1 else None, in_spec)) if k is not None]
    for k, where in given:
        if k < 1:
            where.message = f"must be at least 1 (got {k})"
            raise where
    for k, where in given[1:]:
        if k != given[0][0]:
            first = given[0][1]
            where.message = f"{k} devices per trial, but {first.file}{f' ({first.path})' if first.path else ''} " \
                            f"says {given[0][0]}; say it once"
            raise where
    return given[0] if given else (None, flag)


def stored_devices(storage: Any, name: str) -> Optional[int]:
    """The devices per trial a stored study was made with (None: no such study yet, or made before they were
    stored: one device). Reads only."""
    try:
        attrs = storage.get_study_user_attrs(storage.get_study_id_from_name(name))
    except KeyError:
        return None
    return int(attrs.get(keys.TRIAL_DEVICES, 1))


def devices_differ(plan: StudyDesign, stored: int, asked: int, opts: StudyOptions, where: ReslabError) -> ReslabError:
    where.message = f"study '{plan.name}' in {shown(opts.storage)} trains every trial on {stored} device" \
                    f"{'s' if stored != 1 else ''}, fixed when it was made (a result depends on it); {asked} needs a " \
                    f"new study: --study NEW_NAME"
    return where


def check_devices(k: int, plan: StudyDesign, where: ReslabError) -> list[str]:
    """That this machine can give every trial k devices; returns the GPUs the workers share ([] on CPU). One-line
    errors (at `where`) for k above the devices present and for k that does not divide the GPUs."""
    spec = plan.build([])
    if spec.train.num_nodes != 1:
        raise ReslabError("a study's trial trains on one machine; give devices_per_trial (--devices-per-trial) K "
                          "instead of train.num_nodes", file=str(plan.file), path="train.num_nodes")
    if k > 1 and spec.train.strategy == "ddp_spawn":
        raise ReslabError("a study's trials of several devices run with strategy ddp (the worker is rank 0 and "
                          "Lightning starts the other ranks); ddp_spawn cannot carry the trial to them",
                          file=str(plan.file), path="train.strategy")
    if spec.train.accelerator == "gpu" or uses_cuda(spec):
        gpus = _gpus()
        shown_ids = f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})" \
            if os.environ.get("CUDA_VISIBLE_DEVICES") else ""
        if k > len(gpus):
            where.message = f"{k} GPU{'s' if k != 1 else ''} per trial, but {len(gpus)} GPU" \
                            f"{'s are' if len(gpus) != 1 else ' is'} visible{shown_ids}"
            raise where
        if len(gpus) % k:
            where.message = f"{k} does not divide the {len(gpus)} visible GPUs{shown_ids}: each worker takes {k} of " \
                            f"its own; make CUDA_VISIBLE_DEVICES name a multiple of {k} GPUs"
            raise where
        return gpus
    cores = os.cpu_count() or 1
    if k > cores:
        where.message = f"{k} processes per trial, but this machine has {cores} CPU core{'s' if cores != 1 else ''}"
        raise where
    return []


def device_groups(gpus: list[str], k: int) -> list[list[str]]:
    """The GPUs split into groups of k, one group per worker (k divides the GPUs: check_devices)."""
    return [gpus[i:i + k] for i in range(0, len(gpus), k)]


def trial_threads(plan: StudyDesign) -> int:
    """CPU threads per trial of a new study: the spec's train.threads, else 1. Never the number of workers or of
    cores: CPU arithmetic depends on the thread count, and a cell's result must not depend on how it was run
    (more cores: more workers)."""
    given = (plan.document.get("train") or {}).get("threads")
    return int(given) if isinstance(given, int) and given > 0 else 1


# ---- the worker loop ------------------------------------------------------------------------------------
class Heartbeat:
    """Records a running trial's heartbeat every `interval` seconds from a thread."""

    def __init__(self, storage: Any, trial_id: int, interval: int):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as e:  # noqa: BLE001  (a missed beat is retried next interval)
                print(f"heartbeat of trial {self.trial_id} failed: {e}", file=sys.stderr)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def trial_id_of(storage: Any, trial: optuna.Trial) -> int:
    """The storage's id of a trial asked from it (what heartbeats are recorded under), by the storage's public API."""
    study_id = storage.get_study_id_from_name(trial.study.study_name)
    return storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)


def _claim(study: optuna.Study, storage: Any, plan: StudyDesign, deadline: Optional[float], pack: int = 1,
           threads: int = 1) -> tuple[str, Any]:
    """Under the lock: fail stale trials, enqueue missing cells/retries, then claim a trial (or wait/stop); with
    `pack` > 1 up to that many trials of one network (a list: search.packing)."""
    with study_lock(storage, plan.name):
        for note in liveness.fail_orphans(study, storage, storage.grace_period):   # workers gone: retried at once
            print(note, file=sys.stderr, flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optuna.storages.fail_stale_trials(study)
        if plan.fixed_cells() is not None:
            enqueue_missing(study, plan)
        else:
            enqueue_retries(study, plan)
        action = next_action(study, plan, deadline)
        if action != RUN:
            return action, None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # "heartbeat is meant for Study.optimize": we beat ourselves
            trial = study.ask()
        trial_id = trial_id_of(storage, trial)
        liveness.claim(trial)                       # who runs it (a worker gone on this machine: retried at once)
        if plan.fixed_cells() is not None and keys.QUEUED not in storage.get_trial(trial_id).system_attrs:
            # ask() found no queued cell to pop and made a fresh, sampled trial: a study of fixed cells never
            # runs one (it could repeat a cell). Close it as discarded and look again.
            TrialRecord.put(trial, outcome=keys.DISCARDED)
            study.tell(trial, state=TrialState.FAIL)
            print(f"note: trial {trial.number} was sampled, not taken from the queue of cells; discarded",
                  file=sys.stderr, flush=True)
            return WAIT, None
        storage.record_heartbeat(trial_id)   # a trial without any heartbeat would never turn stale
        if pack > 1:
            return RUN, packing.claim_members(study, storage, plan, trial, pack, threads)
        return RUN, trial


def outcome_line(plan: StudyDesign, trial: optuna.Trial, outcome: Any) -> str:
    what = plan.params_label(trial.params)
    if outcome.values is not None:
        res = ", ".join(f"{m.name} {v:.4g}" for m, v in zip(plan.objectives, outcome.values))
    else:
        res = outcome.reason or ""
    return f"trial {trial.number} [{what}] {outcome.outcome.upper()}" + (f": {res}" if res else "")


def run_worker(plan: StudyDesign, opts: StudyOptions, prepared: Prepared, worker: int = 0) -> int:
    """Pull and run trials until the study is done (or the deadline passes). Returns trials run."""
    storage = open_storage(opts.storage, opts.heartbeat, opts.grace)
    prefix = f"[worker {worker}] " if (opts.workers or 1) > 1 else ""
    pack, notes = packing.pack_size(plan, opts, prepared.threads, prepared.devices)
    for note in notes:
        print(prefix + note, file=sys.stderr, flush=True)
    study = optuna.load_study(study_name=plan.name, storage=storage,
                              sampler=plan.make_sampler(worker, (opts.workers or 1) * pack), pruner=plan.make_pruner())
    client = prepared.client or client_for(opts.tracking_uri, opts.output_dir)   # (a worker process opens its own)
    ctx = TrialContext(plan, opts.tracking_uri, prepared.experiment, prepared.experiment_id, prepared.parent_run_id,
                       Path(opts.output_dir), progress=opts.progress, worker=worker, client=client,
                       threads=prepared.threads, devices=prepared.devices)
    ran, waiting = 0, None
    while True:
        action, trial = _claim(study, storage, plan, opts.deadline, pack, prepared.threads)
        if action == STOP:
            return ran
        if action == WAIT:
            note = liveness.waiting_note(study, storage.grace_period)
            if note != waiting and note:                 # once per change of what it waits for
                print(prefix + note, file=sys.stderr, flush=True)
            waiting = note
            time.sleep(max(1, opts.heartbeat))
            continue
        waiting = None
        if isinstance(trial, list):              # a pack of trials of one network
            ran += packing.run_members(ctx, study, storage, trial, opts.heartbeat, prefix)
            continue
        TrialRecord.put(trial, **placement())     # which job and host runs it (cli.py status)
        cell = plan.cell_label(trial)
        ranks = f" on {prepared.devices} devices" if prepared.devices > 1 else ""
        print(f"{prefix}trial {trial.number}{cell} started{ranks}", flush=True)
        try:
            with Heartbeat(storage, trial_id_of(storage, trial), opts.heartbeat):
                outcome = run_trial(ctx, trial)
        except optuna.exceptions.UpdateFinishedTrialError:      # failed as stale while setting up; retried
            print(prefix + stale_note(trial, storage), file=sys.stderr, flush=True)
            continue
        except BaseException as e:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):   # (already failed as stale)
                if not TrialRecord.of(trial).outcome:
                    TrialRecord.put(trial, outcome=keys.INTERRUPTED if isinstance(e, KeyboardInterrupt) else keys.ERROR,
                                    reason=str(e))
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):   # (failed as stale meanwhile)
            views.link_trial(trial, ctx.tracking_uri, ctx.experiment_id, outcome.run_id, opts.output_dir)
        if tell_outcome(study, trial, outcome, client, prepared.devices):
            print(prefix + outcome_line(plan, trial, outcome), flush=True)
        else:
            print(prefix + stale_note(trial, storage), file=sys.stderr, flush=True)
        ran += 1
        if prepared.devices > 1 and outcome.outcome == keys.ERROR:
            # Lightning's launcher ends every process of a DDP job one of whose processes failed, this worker
            # included, within seconds: stop here rather than be killed in the middle of the next trial
            print(f"{prefix}stops: a process of trial {trial.number} failed, and Lightning ends the whole job; the "
                  f"trial is retried (by another worker, or when the study is run again)", file=sys.stderr,
                  flush=True)
            return ran


def stale_note(trial: optuna.Trial, storage: Any) -> str:
    return (f"trial {trial.number}: failed as stale (no heartbeat reached the storage for {storage.grace_period} s); "
            f"it is retried")


def tell_outcome(study: optuna.Study, trial: optuna.Trial, outcome: Any, client: Any, devices: int = 1) -> bool:
    """Record the outcome on the trial and tell Optuna. False when the trial had meanwhile been failed as stale
    (its heartbeats stopped reaching the storage): Optuna retries it, so its MLflow run is ended FAILED too."""
    try:
        record_outcome(trial, outcome)
        capacity.record_peak(trial, devices)          # what a worker needs (search.capacity)
        study.tell(trial, outcome.values if outcome.state == TrialState.COMPLETE else None, state=outcome.state)
        return True
    except optuna.exceptions.UpdateFinishedTrialError:
        if outcome.run_id and client is not None:
            recording.mark_child(client, outcome.run_id, "FAILED", status="FAILED",
                                 reason="failed as stale in Optuna (no heartbeat) while it ran; retried")
        return False


# ---- several workers ------------------------------------------------------------------------------------
def _gpus() -> list[str]:
    """CUDA devices visible to this process (ids as CUDA_VISIBLE_DEVICES would name them)."""
    try:
        n = torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        n = 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(n)]
    return ids[:n]


def worker_env(index: int, gpus: list[str], threads: int, devices: int = 1) -> dict[str, str]:
    """Environment of worker `index`: its own group of `devices` GPUs (round robin over the groups) and the study's
    CPU threads per trial (per process)."""
    env = {"OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if gpus:
        groups = device_groups(gpus, devices)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(groups[index % len(groups)])
    return env


def spawn_workers(opts: StudyOptions, status_dir: Path, threads: int, devices: int = 1,
                  gpus: Optional[list[str]] = None) -> list[tuple[subprocess.Popen, Path]]:
    """Start the worker processes (`python -m search.worker`), each with its worker_env."""
    gpus = _gpus() if gpus is None else gpus
    procs = []
    for i in range(opts.workers or 1):
        status = status_dir / f"worker-{i}.json"
        env = {**os.environ, **worker_env(i, gpus, threads, devices)}
        args = json.dumps({**asdict(opts), "worker": i, "status": str(status)})
        proc = subprocess.Popen([sys.executable, "-m", "search.worker", args], env=env, cwd=os.getcwd())
        if gpus:
            device = f"GPU{'s' if devices > 1 else ''} {env['CUDA_VISIBLE_DEVICES']}"
        else:
            device = (f"{devices} processes x " if devices > 1 else "") + f"{env['OMP_NUM_THREADS']} CPU threads"
        print(f"worker {i}: pid {proc.pid} ({device})", flush=True)
        procs.append((proc, status))
    return procs


def wait_workers(procs: list[tuple[subprocess.Popen, Path]]) -> list[str]:
    """Wait for every worker; returns the one-line errors of those that stopped on one."""
    errors = []
    try:
        for i, (proc, status) in enumerate(procs):
            code = proc.wait()
            if code < 0:
                print(f"worker {i} (pid {proc.pid}) died by signal {-code}; its trial is retried", file=sys.stderr)
            elif code != 0:
                message = ""
                if status.exists():
                    message = json.loads(status.read_text()).get("error", "")
                errors.append(message or f"worker {i} exited with code {code}")
    except KeyboardInterrupt:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc, _ in procs:
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise
    return errors


def run_study(opts: StudyOptions) -> dict:
    """study_run's report as JSON."""
    return study_run(opts).to_json()


def study_run(opts: StudyOptions) -> StudyReport:
    """Load the file, create/resume the study, run its workers, then record and return the report."""
    with quiet():
        return _run_study(opts)


@dataclass
class Opened:
    """A study file checked against this command's flags and its stores (nothing recorded yet)."""
    plan: StudyDesign
    storage: Any
    client: Any
    devices: int                             # devices per trial: asked for, else the stored study's, else 1
    where: ReslabError                       # who asked for them (an error about them points there)
    gpus: Optional[list[str]]                # the GPUs visible here (None: not checked here)


def load_plan(opts: StudyOptions) -> StudyDesign:
    """The study file of `opts`, checked against the command's flags (nothing opened yet)."""
    if opts.workers is not None and opts.workers < 1:
        raise ReslabError("must be at least 1", file="--workers")
    if opts.heartbeat < 1:
        raise ReslabError("must be at least 1 (seconds)", file="--heartbeat")
    plan = load_study_file(opts.file, opts.overrides, opts.study)
    packing.requested(plan, opts)             # a bad --pack: one line before anything is opened
    if opts.kind and plan.kind != opts.kind:
        raise ReslabError(f"this is {STUDY_KINDS[plan.kind].a_file}; run it with `python cli.py "
                          f"{STUDY_KINDS[plan.kind].command}`", file=str(plan.file))
    if plan.timeout and opts.deadline is None:
        opts.deadline = time.time() + plan.timeout
    return plan


def open_study(opts: StudyOptions, check_here: bool = True, plan: Optional[StudyDesign] = None) -> Opened:
    """Load the file (unless given its `plan`) and check the flags, the devices asked for (on this machine when
    `check_here`), the MLflow store, then the storage: bad input is found before anything is recorded. `opts` is
    resolved."""
    plan = plan or load_plan(opts)
    asked, where = requested_devices(plan, opts)
    gpus = check_devices(asked, plan, where) if asked is not None and check_here else None
    client = client_for(opts.tracking_uri, opts.output_dir)
    storage = open_storage(opts.storage, opts.heartbeat, opts.grace)
    stored = stored_devices(storage, plan.name)
    if asked is not None and stored is not None and asked != stored:
        raise devices_differ(plan, stored, asked, opts, where)
    devices = asked or stored or 1
    if gpus is None and check_here:           # (nothing asked: the stored study's devices, checked here)
        gpus = check_devices(devices, plan, where)
    return Opened(plan, storage, client, devices, where, gpus)


def _run_study(opts: StudyOptions) -> StudyReport:
    opts = opts.resolved()
    opened = open_study(opts)
    plan, storage, devices, where, gpus = opened.plan, opened.storage, opened.devices, opened.where, opened.gpus
    packing.check(plan, opts, devices)
    client = opened.client
    if opts.workers is None:
        opts.workers = len(gpus) // devices if gpus and devices > 1 else 1
    capacity.check_workers(opts.workers, capacity.needs(plan, storage, trial_threads(plan), devices, gpus))
    if opts.progress is None and opts.workers > 1:
        opts.progress = False                 # several workers: one line per epoch, not interleaved bars
    prepared = prepare(plan, opts, storage, devices, where, client)
    client = prepared.client
    print(f"study '{plan.name}' ({'new' if prepared.created else 'resumed'}) in {shown(opts.storage)}; "
          f"MLflow experiment '{prepared.experiment}', parent run {prepared.parent_run_id}", flush=True)
    interrupted = False
    errors: list[str] = []
    try:
        if opts.workers == 1 and devices == 1:
            run_worker(plan, opts, prepared, 0)
        else:   # (a trial of several devices: its DDP ranks are started again from the worker's command line)
            with tempfile.TemporaryDirectory(prefix="reslab-workers-") as tmp:
                errors = wait_workers(spawn_workers(opts, Path(tmp), prepared.threads, devices, gpus))
    except KeyboardInterrupt:
        interrupted = True
    except BaseException:        # a worker's error: close the parent run rather than leave it RUNNING
        client.set_terminated(prepared.parent_run_id, status="FAILED")
        raise
    report = finalize(opts.storage, plan.name, client, storage=storage, interrupted=interrupted)
    if errors:
        raise ReslabError(errors[0])
    if interrupted:
        raise KeyboardInterrupt
    return report
