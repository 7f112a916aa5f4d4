"""One trial: its spec (an ablation cell or sampled values), its training run (a nested MLflow child run through
runs.fit.train), its cost figures, and its outcome for Optuna.

Outcomes: complete | pruned | diverged (a NaN loss: a result, FAIL in Optuna) | invalid (sampled values give no
valid network) | error (an exception; retried) | interrupted (Ctrl-C/SIGTERM; retried, resuming its checkpoint).
A trial whose worker died has no outcome at all: the heartbeat marks it FAIL and it is retried, from the checkpoint
its run left (here, or among the run's artifacts on a tracking server: then on any machine), in the same MLflow run.

A trial of several devices trains with Lightning DDP. Its worker is rank 0: it alone asks Optuna (the pruner) and
writes to MLflow. Lightning starts the worker's command again for the other ranks; they find the trial in their
environment (FOLLOW_ENV) and follow it (follow_trial): same spec, same checkpoint, and the pruner's decision
broadcast from rank 0. A rank that dies takes its trial's worker with it (Lightning's launcher ends every process of
a job whose process failed): the trial is retried like any trial whose worker died.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import optuna
import pytorch_lightning as pl
import torch

from arches import Complexity, Spec, build_model, complexity, spec_from_dict
from arches.errors import ReslabError, SpecError, first_line
from runs.checkpoint import resumable
from runs.environment import environment
from runs.fit import CHECKPOINT_ENV, Interrupted, Pruned, RunOptions, train, uses_cuda
from runs.mlflow_write import STATE_TAG, set_tags
from runs.pack_record import PACK_TAG
from runs.quiet import quiet
from runs.record import RUN_ID_ENV

from . import keys, recording
from .plans import StudyDesign
from .trials import TrialRecord

LATENCY_REPEATS = 20
FOLLOW_ENV = "RESLAB_FOLLOW_TRIAL"   # the trial a worker trains on several devices, for the DDP ranks it starts


@dataclass
class TrialContext:
    """What a worker needs to run trials of one study."""
    plan: StudyDesign
    tracking_uri: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    output_dir: Path
    progress: Optional[bool] = False
    worker: int = 0
    client: Any = None
    threads: Optional[int] = None          # CPU threads of every trial (the study's), unless the spec says
    devices: int = 1                       # devices of every trial (the study's): DDP over them when above 1


@dataclass
class Outcome:
    state: optuna.trial.TrialState
    outcome: str
    values: Optional[list[float]] = None
    reason: Optional[str] = None
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: Optional[str] = None


class PruningCallback(pl.Callback):
    """Reports the per-epoch validation metric to Optuna; raises runs.fit.Pruned when the pruner says so.

    Under DDP only rank 0 has the trial (`trial` is None on the other ranks): it reports and asks the pruner, then
    broadcasts the decision, so that every rank stops at the same epoch. (Optuna's own Lightning callback stops rank 0
    alone, and the others wait for it at their next collective.)"""

    def __init__(self, trial: Optional[optuna.Trial], metric: str):
        self.trial, self.metric = trial, metric

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reason = self.verdict(getattr(pl_module, "history", None)) if trainer.is_global_zero and self.trial is not None \
            else None
        if trainer.world_size > 1:
            reason = trainer.strategy.broadcast(reason, src=0)
        if reason:
            raise Pruned(reason)

    def verdict(self, history: Optional[list[dict]]) -> Optional[str]:
        """Report the last epoch's value (a row of `history`) to the trial; why to prune (None: go on)."""
        if not history or self.metric not in history[-1]:
            return None
        row = history[-1]
        value, epoch = float(row[self.metric]), int(row["epoch"])
        if not math.isfinite(value):
            return None
        self.trial.report(value, step=epoch)
        return f"epoch {epoch}: {self.metric} {value:.4f}" if self.trial.should_prune() else None


def measure_latency(spec: Spec, batch: int = 1, repeats: int = LATENCY_REPEATS) -> float:
    """Median milliseconds of one forward pass of `batch` images (eval mode) on the device the run would use."""
    device = torch.device("cuda" if uses_cuda(spec) else "cpu")
    model = build_model(spec).to(device).eval()
    x = torch.randn(batch, spec.input.channels, spec.input.size, spec.input.size, device=device)
    times = []
    with torch.inference_mode():
        for i in range(repeats + 3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 3:
                times.append(1000.0 * (time.perf_counter() - t0))
    return statistics.median(times)


def costs(spec: Spec, latency: bool = False, cost: Optional[Complexity] = None) -> dict[str, float]:
    """params and MACs (of `cost`, else measured on the meta device), and the measured latency when asked."""
    c = cost or complexity(spec)
    out = {"params": float(c.params), "macs": float(c.macs)}
    if latency:
        out["latency_ms"] = measure_latency(spec)
    return out


def previous_run(ctx: TrialContext, trial: optuna.Trial) -> Optional[Any]:
    """The MLflow run of the attempt this trial retries, when it left a checkpoint to resume from: in this output
    folder, or among its artifacts on a tracking server (so any machine continues it)."""
    before = TrialRecord.of(trial).retry_of
    if before is None:
        return None
    runs = recording.trial_runs(ctx.client, ctx.experiment_id, ctx.parent_run_id).get(int(before), [])
    for run in runs:
        if run.info.status in ("RUNNING", "KILLED") and run.data.tags.get(STATE_TAG) != "PRUNED":
            if resumable(ctx.client, run, ctx.output_dir) and PACK_TAG not in run.data.tags:
                return run
            if run.info.status == "RUNNING":    # its worker died before any checkpoint (or in a pack): close it
                recording.mark_child(ctx.client, run.info.run_id, "FAILED", reason="worker died; retried as trial "
                                     f"{trial.number}" + (" from scratch (it trained in a pack)"
                                                          if PACK_TAG in run.data.tags else ""), status="FAILED")
    return None


def continue_run(ctx: TrialContext, run: Any, number: int) -> None:
    """One MLflow run for the cell: the run an attempt resumes is tagged with its new trial and its attempts."""
    attempts = run.data.tags.get(keys.ATTEMPTS_TAG) or run.data.tags.get(keys.TRIAL_TAG, "?")
    set_tags(ctx.client, run.info.run_id, {keys.TRIAL_TAG: number, keys.ATTEMPTS_TAG: f"{attempts}, {number}"})


def leading(ctx: TrialContext, trial: optuna.Trial, spec: Spec, prune: Optional[str]):
    """While rank 0 trains a trial of several devices: the trial in the environment of the ranks Lightning starts."""
    return environment({FOLLOW_ENV: json.dumps({
        "spec": spec.model_dump(mode="json"), "tracking_uri": ctx.tracking_uri, "output_dir": str(ctx.output_dir),
        "prune": prune, "label": f"[worker {ctx.worker}] trial {trial.number}", "leader": os.getpid()})})


def _end_with(leader: int) -> None:
    """End this process when the worker that started it (rank 0) ends: a rank left behind would wait for the dead
    rank 0 until DDP's timeout, half an hour. Linux's parent-death signal, else a thread watching the parent."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL) != 0:      # PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):
        def watch() -> None:
            while os.getppid() == leader:
                time.sleep(1)
            os._exit(1)

        threading.Thread(target=watch, daemon=True, name="leader-watch").start()
    if os.getppid() != leader:                        # it ended before the signal was asked for
        os._exit(1)


def following() -> Optional[dict]:
    """The trial this process follows when Lightning started it as a DDP rank > 0 of a worker's trial, else None."""
    text = os.environ.get(FOLLOW_ENV)
    if not text or os.environ.get("LOCAL_RANK", "0") == "0":
        return None
    return json.loads(text)


def follow_trial(trial: dict) -> int:
    """Train the trial as a DDP rank > 0: the same spec (and the checkpoint rank 0 resumes from), the pruner's
    decision from rank 0; nothing is written to Optuna or MLflow. Exit code 0 whenever the trial ended as rank 0
    decided (finished, pruned, diverged, interrupted): a rank that exits otherwise ends its trial's job."""
    _end_with(int(trial["leader"]))
    rank = os.environ.get("LOCAL_RANK")
    print(f"{trial['label']}: rank {rank} pid {os.getpid()}", flush=True)
    callbacks = [PruningCallback(None, trial["prune"])] if trial["prune"] else []
    resume = os.environ.get(RUN_ID_ENV) if os.environ.get(CHECKPOINT_ENV) else None
    try:
        with quiet():
            spec = spec_from_dict(trial["spec"])
            train(spec, RunOptions(tracking_uri=trial["tracking_uri"], callbacks=callbacks, resume=resume,
                                   output_dir=trial["output_dir"], progress=False))
    except (Pruned, Interrupted, KeyboardInterrupt):
        return 0                               # rank 0 records how the trial ended
    except Exception as e:  # noqa: BLE001  (one line: rank 0, or the launcher, ends the trial)
        print(f"{trial['label']}: rank {rank} failed: {type(e).__name__}: {first_line(e)}", file=sys.stderr,
              flush=True)
        return 1
    return 0


@dataclass
class Begun:
    """A trial ready to train: its start (values, run name, tags, params), spec and costs."""
    start: Any
    spec: Spec
    complexity: Complexity
    cost: dict[str, float]


def begin(ctx: TrialContext, trial: optuna.Trial) -> "Begun | Outcome":
    """The trial's start, spec, tags and costs, recorded on the trial; an INVALID Outcome when its values make no
    valid network (solo trials and pack members alike)."""
    plan = ctx.plan
    start = plan.start_trial(trial)
    if start.record:
        TrialRecord.put(trial, **start.record)
    try:
        spec = plan.trial_spec(start, threads=ctx.threads, devices=ctx.devices if ctx.devices > 1 else None)
    except SpecError as e:                               # sampled values that make no valid network
        return Outcome(optuna.trial.TrialState.FAIL, keys.INVALID, reason=str(e))
    start.tags.update({keys.STUDY_TAG: plan.name, keys.ROLE_TAG: "trial", keys.TRIAL_TAG: str(trial.number)})
    complexity_ = complexity(spec)                       # once: the costs and the run's records share it
    cost = costs(spec, latency=any(m.name == "latency_ms" for m in plan.metrics), cost=complexity_)
    device = torch.cuda.get_device_name() if uses_cuda(spec) else "cpu"
    device = f"{ctx.devices} x {device}" if ctx.devices > 1 else device
    TrialRecord.put(trial, cost=cost, width_multiplier=spec.width_multiplier, threads=spec.train.threads,
                    device=device)
    return Begun(start, spec, complexity_, cost)


def run_trial(ctx: TrialContext, trial: optuna.Trial) -> Outcome:
    """Build, train and judge one trial. Raises ReslabError (bad data, store) and KeyboardInterrupt only."""
    begun = begin(ctx, trial)
    if isinstance(begun, Outcome):
        return begun
    plan, spec, complexity_, cost = ctx.plan, begun.spec, begun.complexity, begun.cost
    values, run_name, tags, params = begun.start.values, begun.start.run_name, begun.start.tags, begun.start.params
    callbacks = []
    prune = None
    if plan.prune_metric is not None:
        prune = plan.prune_metric
        callbacks.append(PruningCallback(trial, prune))

    previous = previous_run(ctx, trial)
    resume = previous.info.run_id if previous is not None else None
    if previous is not None:
        continue_run(ctx, previous, trial.number)
    try:
        with leading(ctx, trial, spec, prune) if ctx.devices > 1 else contextlib.nullcontext():
            result = train(spec, RunOptions(tracking_uri=ctx.tracking_uri, experiment=ctx.experiment,
                                            run_name=run_name, parent_run_id=ctx.parent_run_id, tags=tags,
                                            callbacks=callbacks, resume=resume, output_dir=ctx.output_dir,
                                            progress=ctx.progress, cost=complexity_, params=params))
    except Pruned as e:
        run_id = _run_of(ctx, trial.number)
        if run_id:
            recording.mark_child(ctx.client, run_id, "PRUNED", values)
        return Outcome(optuna.trial.TrialState.PRUNED, keys.PRUNED, reason=str(e), run_id=run_id)
    except (Interrupted, KeyboardInterrupt) as e:
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):   # (already failed as stale)
            TrialRecord.put(trial, outcome=keys.INTERRUPTED, run_id=e.run_id if isinstance(e, Interrupted) else None)
        raise
    except ReslabError:
        raise
    except Exception as e:  # noqa: BLE001  (an error of one trial: recorded, retried, the study goes on)
        reason = f"{type(e).__name__}: {first_line(e)}"
        run_id = _run_of(ctx, trial.number)
        if run_id:
            recording.mark_child(ctx.client, run_id, "FAILED", values, reason=reason)
        return Outcome(optuna.trial.TrialState.FAIL, keys.ERROR, reason=reason, run_id=run_id)

    return judge(ctx, result, values, cost)


def judge(ctx: TrialContext, result: Any, values: dict, cost: dict[str, float]) -> Outcome:
    """The outcome of a trial whose run ended (a runs.record.RunResult, FINISHED or FAILED), its child run tagged."""
    metrics = {**result.metrics, **cost}
    if result.status != "FINISHED":
        recording.mark_child(ctx.client, result.run_id, "FAILED", values, reason=result.reason)
        return Outcome(optuna.trial.TrialState.FAIL, keys.DIVERGED, reason=result.reason, metrics=metrics,
                       run_id=result.run_id)
    missing = [m.name for m in ctx.plan.objectives if not _finite(metrics.get(m.name))]
    if missing:
        reason = f"{missing[0]} was not recorded (a validation metric needs data.val_size > 0)"
        recording.mark_child(ctx.client, result.run_id, "FAILED", values, reason=reason)
        return Outcome(optuna.trial.TrialState.FAIL, keys.INVALID, reason=reason, metrics=metrics,
                       run_id=result.run_id)
    recording.mark_child(ctx.client, result.run_id, "COMPLETE", values)
    return Outcome(optuna.trial.TrialState.COMPLETE, keys.COMPLETE,
                   values=[float(metrics[m.name]) for m in ctx.plan.objectives], metrics=metrics,
                   run_id=result.run_id)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _run_of(ctx: TrialContext, number: int) -> Optional[str]:
    runs = recording.trial_runs(ctx.client, ctx.experiment_id, ctx.parent_run_id).get(number, [])
    return runs[-1].info.run_id if runs else None


def record_outcome(trial: optuna.Trial, outcome: Outcome) -> None:
    """Store the outcome on the trial (its TrialRecord) before it is told to Optuna."""
    TrialRecord.put(trial, outcome=outcome.outcome, reason=outcome.reason or None, run_id=outcome.run_id,
                    metrics={k: v for k, v in outcome.metrics.items() if _finite(v)} if outcome.metrics else None)

