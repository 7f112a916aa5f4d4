"""How many workers this machine holds, checked before any worker starts: CPU cores and memory per worker.

Memory per worker is measured where the study has run before (the peak resident memory of the worker process,
recorded on each trial it ran: `record_peak`), else estimated from the plan: this process's resident memory now
(Python with torch, Lightning, Optuna and MLflow loaded, as every worker has them) plus, for the largest of the
study's networks, weights, gradients and optimizer state, the batch's activations kept for the backward pass, and
the data set's images held in memory. More workers than the cores (PER_CORE busy threads each) or the available
memory hold are refused in one line, before anything starts: they would only slow each other down, or be killed by
the kernel with their trials half done.
"""
from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass
from typing import Any, Optional

import optuna
import psutil

from arches import complexity
from arches.errors import ReslabError

from . import keys
from .plans import StudyDesign

MB = 1 << 20
TRAINER_MARGIN = 1.25       # a worker's trainer, loaders and MLflow buffers beyond the above (measured 1.1-1.2x)
ACTIVATION_COPIES = 3        # per activation kept for backward: its value, its gradient, BN/ReLU intermediates
OPTIMIZER_STATES = {"sgd": 1, "adamw": 2}   # tensors of state per parameter (SGD: momentum)
PER_CORE = 2                 # CPU threads of busy workers a core is given at most (more only slows every trial)
DATASET_IMAGES = {"fashion-mnist": 70_000, "cifar10": 60_000, "cifar100": 60_000}   # train + test images


@dataclass
class WorkerNeeds:
    """What one worker process needs of this machine."""
    memory: int          # bytes of resident memory at its peak
    threads: int         # CPU threads it keeps busy (trial threads x its CPU processes)
    how: str             # where the memory figure comes from (measured, or the estimate's terms)


def peak_memory() -> int:
    """Peak resident memory of this process so far, in bytes (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def record_peak(trial: optuna.Trial, devices: int = 1) -> None:
    """Record on a trial the peak memory of the worker that ran it (x `devices`: its DDP ranks are as large)."""
    trial.set_user_attr(keys.WORKER_MEMORY_MB, round(peak_memory() * devices / MB, 1))


def measured(storage: Any, name: str) -> tuple[Optional[int], Optional[int]]:
    """(the largest worker memory recorded on a stored study's trials in bytes, the study's CPU threads per trial);
    None for what is not stored (no such study yet, no trial recorded)."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None, None
    found = [t.user_attrs.get(keys.WORKER_MEMORY_MB) for t in study.get_trials(deepcopy=False)]
    found = [float(m) for m in found if isinstance(m, (int, float))]
    threads = study.user_attrs.get(keys.TRIAL_THREADS)
    return (int(max(found) * MB) if found else None), (int(threads) if threads else None)


def study_specs(plan: StudyDesign, limit: int = 64) -> list[Any]:
    """The distinct networks of a study's fixed cells (the first `limit`; seeds aside), else its base spec (a
    sampled search: its trials are not known beforehand)."""
    cells = plan.fixed_cells()
    if not cells:
        return [plan.build([])]
    specs: dict[str, Any] = {}
    for cell in cells[:limit]:
        spec = plan.trial_spec(plan.start_trial(optuna.trial.FixedTrial(cell)))
        specs.setdefault(spec.model_dump_json(exclude={"train": {"seed"}}), spec)
    return list(specs.values())


def estimate(plan: StudyDesign, devices: int = 1, on_gpu: bool = False) -> tuple[int, str]:
    """(bytes, how) of one worker's peak host memory, from the plan: see the module (`on_gpu`: weights, optimizer
    state and activations live in GPU memory, not the host's)."""
    base = psutil.Process().memory_info().rss
    train = 0
    for spec in study_specs(plan):
        data = DATASET_IMAGES.get(spec.data.name, spec.data.synthetic_size if spec.data.name == "synthetic" else 0)
        need = data * spec.input.channels * spec.input.size ** 2 * 2      # its images: uint8, read then held
        if not on_gpu:
            cost = complexity(spec)
            states = OPTIMIZER_STATES.get(str(spec.train.optimizer), 2)
            need += cost.params * 4 * (2 + states) + cost.acts * spec.train.batch_size * 4 * ACTIVATION_COPIES
        train = max(train, need)
    total = int((base + train) * TRAINER_MARGIN * devices)
    ddp = f", x {devices} DDP processes" if devices > 1 else ""
    what = "data (the networks train in GPU memory)" if on_gpu else "training and data"
    return total, (f"estimated: ({base / MB:.0f} MB of libraries + {train / MB:.0f} MB for the largest network's "
                   f"{what}) x {TRAINER_MARGIN:g} for the trainer{ddp}")


def needs(plan: StudyDesign, storage: Any, threads: int, devices: int = 1, gpus: Optional[list] = None) -> WorkerNeeds:
    """What a worker of this study needs: memory measured on its trials if it ran before, else estimated; `threads`:
    CPU threads per trial of a new study (a stored study's own are used)."""
    memory, stored_threads = measured(storage, plan.name)
    threads = (stored_threads or threads) * (1 if gpus else devices)        # (CPU DDP: a process per device)
    if memory is not None:
        return WorkerNeeds(memory, threads, "measured: the peak of this study's workers")
    memory, how = estimate(plan, devices, on_gpu=bool(gpus))
    return WorkerNeeds(memory, threads, how)


def machine() -> tuple[int, int]:
    """(CPU cores this process may use, bytes of memory available now)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:                   # (not on Linux)
        cores = os.cpu_count() or 1
    return cores, psutil.virtual_memory().available


def check_workers(workers: int, need: WorkerNeeds) -> None:
    """One-line ReslabError (--workers) when `workers` processes do not fit this machine's cores or memory."""
    if workers <= 1:
        return
    cores, available = machine()
    by_cores = max(1, PER_CORE * cores // max(1, need.threads))
    by_memory = max(1, int(available // max(1, need.memory)))
    fits = min(by_cores, by_memory)
    if workers <= fits:
        return
    short = "cores" if by_cores < by_memory else "memory"
    raise ReslabError(f"{workers} workers do not fit this machine ({short}): each keeps {need.threads} CPU "
                      f"thread{'s' if need.threads > 1 else ''} busy and needs about {need.memory / MB:,.0f} MB "
                      f"({need.how}); {cores} cores ({PER_CORE} threads each at most) and {available / MB:,.0f} MB "
                      f"available hold {fits}; give --workers {fits} or fewer (more machines can share the study: "
                      f"--storage, --tracking-uri)", file="--workers")
