"""One trial: its spec (an ablation cell or sampled values), its training run (a nested MLflow child run through
runs.fit.train), its cost figures, and its outcome for Optuna.

Outcomes: complete | pruned | diverged (a NaN loss: a result, FAIL in Optuna) | invalid (sampled values give no
valid network) | error (an exception; retried) | interrupted (Ctrl-C/SIGTERM; retried, resuming its checkpoint).
A trial whose worker died has no outcome at all: the heartbeat marks it FAIL and it is retried.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import optuna
import pytorch_lightning as pl
import torch

from arches import Complexity, Spec, build_model, complexity
from arches.errors import ReslabError, SpecError, first_line
from runs import tracking
from runs.checkpoint import LAST, checkpoint_dir
from runs.fit import Interrupted, Pruned, train, uses_cuda

from . import keys, recording
from .space import StudyPlan
from .trials import TrialRecord

LATENCY_REPEATS = 20


@dataclass
class TrialContext:
    """What a worker needs to run trials of one study."""
    plan: StudyPlan
    tracking_uri: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    output_dir: Path
    progress: Optional[bool] = False
    worker: int = 0
    client: Any = None
    threads: Optional[int] = None          # CPU threads of every trial (the study's), unless the spec says


@dataclass
class Outcome:
    state: optuna.trial.TrialState
    outcome: str
    values: Optional[list[float]] = None
    reason: Optional[str] = None
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: Optional[str] = None


class PruningCallback(pl.Callback):
    """Reports the per-epoch validation metric to Optuna; raises runs.fit.Pruned when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str):
        self.trial, self.metric = trial, metric

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        history = getattr(pl_module, "history", None)
        if not history or self.metric not in history[-1]:
            return
        row = history[-1]
        value, epoch = float(row[self.metric]), int(row["epoch"])
        if not math.isfinite(value):
            return
        self.trial.report(value, step=epoch)
        if self.trial.should_prune():
            raise Pruned(f"epoch {epoch}: {self.metric} {value:.4f}")


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


def sample(trial: optuna.Trial, plan: StudyPlan) -> dict[str, Any]:
    """Draw one value per search dimension (enqueued retries get their fixed values back)."""
    values = {}
    for d in plan.dimensions:
        if d.kind in ("categorical", "groups"):
            values[d.key] = trial.suggest_categorical(d.key, d.choices)
        elif d.kind == "int":
            values[d.key] = trial.suggest_int(d.key, int(d.low), int(d.high), step=int(d.step or 1), log=d.log)
        else:
            values[d.key] = trial.suggest_float(d.key, d.low, d.high, step=d.step, log=d.log)
    return values


def ablation_cell(trial: optuna.Trial, plan: StudyPlan) -> tuple[str, int]:
    """The (arm, seed) an enqueued ablation trial was given."""
    return (trial.suggest_categorical("arm", [a.name for a in plan.arms]),
            trial.suggest_categorical("seed", plan.seeds))


def _previous_run(ctx: TrialContext, trial: optuna.Trial) -> Optional[str]:
    """The MLflow run of the attempt this trial retries, when it left a checkpoint here to resume from."""
    before = TrialRecord.of(trial).retry_of
    if before is None:
        return None
    runs = recording.trial_runs(ctx.client, ctx.experiment_id, ctx.parent_run_id).get(int(before), [])
    for run in runs:
        if run.info.status in ("RUNNING", "KILLED") and run.data.tags.get(tracking.STATE_TAG) != "PRUNED":
            if (checkpoint_dir(ctx.output_dir, run.info.run_id) / LAST).exists():
                return run.info.run_id
            if run.info.status == "RUNNING":    # its worker died before any checkpoint: close it
                recording.mark_child(ctx.client, run.info.run_id, "FAILED", reason="worker died; retried as trial "
                                     f"{trial.number}", status="FAILED")
    return None


def run_trial(ctx: TrialContext, trial: optuna.Trial) -> Outcome:
    """Build, train and judge one trial. Raises ReslabError (bad data, store) and KeyboardInterrupt only."""
    plan = ctx.plan
    if plan.kind == "ablation":
        arm, seed = ablation_cell(trial, plan)
        spec = plan.arm_spec(arm, seed, threads=ctx.threads)
        values: dict[str, Any] = {"arm": arm, "seed": seed, **plan.arm(arm).labels}
        if plan.arm(arm).width_multiplier is not None:
            values["width_multiplier"] = plan.arm(arm).width_multiplier
        TrialRecord.put(trial, arm=arm, seed=seed)
        run_name = f"{arm} seed {seed}"
        tags = {"arm": arm, "seed": str(seed)}
        params: Optional[dict[str, Any]] = {"arm": arm, "seed": seed}    # the runs table's columns
    else:
        values = sample(trial, plan)
        try:
            spec = plan.search_spec(values, threads=ctx.threads)
        except SpecError as e:
            return Outcome(optuna.trial.TrialState.FAIL, keys.INVALID, reason=str(e))
        run_name = f"trial {trial.number}"
        tags, params = {}, None
    tags.update({keys.STUDY_TAG: plan.name, keys.ROLE_TAG: "trial",
                 keys.TRIAL_TAG: str(trial.number)})
    complexity_ = complexity(spec)                       # once: the costs and the run's records share it
    cost = costs(spec, latency=any(m.name == "latency_ms" for m in plan.metrics), cost=complexity_)
    device = torch.cuda.get_device_name() if uses_cuda(spec) else "cpu"
    TrialRecord.put(trial, cost=cost, width_multiplier=spec.width_multiplier, threads=spec.train.threads,
                    device=device)
    callbacks = []
    if plan.kind == "search" and plan.pruner is not None and plan.pruner.type != "none":
        callbacks.append(PruningCallback(trial, plan.pruner.metric))

    resume = _previous_run(ctx, trial)
    if resume:
        ctx.client.set_tag(resume, keys.TRIAL_TAG, str(trial.number))
    try:
        result = train(spec, tracking_uri=ctx.tracking_uri, experiment=ctx.experiment,
                       run_name=run_name, parent_run_id=ctx.parent_run_id, tags=tags, callbacks=callbacks,
                       resume=resume, output_dir=ctx.output_dir, progress=ctx.progress, cost=complexity_,
                       params=params)
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

    metrics = {**result.metrics, **cost}
    if result.status != "FINISHED":
        recording.mark_child(ctx.client, result.run_id, "FAILED", values, reason=result.reason)
        return Outcome(optuna.trial.TrialState.FAIL, keys.DIVERGED, reason=result.reason, metrics=metrics,
                       run_id=result.run_id)
    missing = [m.name for m in plan.objectives if not _finite(metrics.get(m.name))]
    if missing:
        reason = f"{missing[0]} was not recorded (a validation metric needs data.val_size > 0)"
        recording.mark_child(ctx.client, result.run_id, "FAILED", values, reason=reason)
        return Outcome(optuna.trial.TrialState.FAIL, keys.INVALID, reason=reason, metrics=metrics,
                       run_id=result.run_id)
    recording.mark_child(ctx.client, result.run_id, "COMPLETE", values)
    return Outcome(optuna.trial.TrialState.COMPLETE, keys.COMPLETE,
                   values=[float(metrics[m.name]) for m in plan.objectives], metrics=metrics, run_id=result.run_id)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _run_of(ctx: TrialContext, number: int) -> Optional[str]:
    runs = recording.trial_runs(ctx.client, ctx.experiment_id, ctx.parent_run_id).get(number, [])
    return runs[-1].info.run_id if runs else None


def record(trial: optuna.Trial, outcome: Outcome) -> None:
    """Store the outcome on the trial (its TrialRecord) before it is told to Optuna."""
    TrialRecord.put(trial, outcome=outcome.outcome, reason=outcome.reason or None, run_id=outcome.run_id,
                    metrics={k: v for k, v in outcome.metrics.items() if _finite(v)} if outcome.metrics else None)

