"""Entry point of one worker process: `python -m search.worker '<json of StudyOptions + worker + status>'`.

Started by search.study.spawn_workers with its own CUDA_VISIBLE_DEVICES (K GPUs for trials of K devices) or CPU
thread share. A one-line error goes to the status file (the parent prints it), exit code 2; Ctrl-C exits 130.

A trial of K devices runs with Lightning DDP: the worker is rank 0, and Lightning starts this same command again for
ranks 1..K-1 (with LOCAL_RANK set). Those processes find the trial in their environment and follow it
(search.objective.follow_trial): they train it with rank 0 and never touch Optuna or MLflow.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import optuna

from arches.errors import ReslabError
from runs.mlflow_client import client_for
from runs.mlflow_write import ensure_experiment
from runs.quiet import quiet

from . import keys
from .objective import follow_trial, following
from .recording import experiment_name
from .report import finalize
from .space import load_study_file, study_name_of
from .storage import open_storage
from .study import Prepared, StudyOptions, run_worker


def work(opts: StudyOptions, worker: int, finalize_when_done: bool = False) -> int:
    """Join the stored study of `opts` (made by the command that started this worker) and run trials until it is
    done; returns the trials run. `finalize_when_done`: then record the study's report (a worker of a job array,
    with no command waiting for it), unless it stopped at its deadline."""
    storage = open_storage(opts.storage, opts.heartbeat, opts.grace)
    study = optuna.load_study(study_name=opts.study or study_name_of(opts.file), storage=storage)
    meta = study.user_attrs.get(keys.META, {})
    known = {a["name"]: a["width_multiplier"] for a in meta.get("arms", []) if a.get("width_multiplier")}
    plan = load_study_file(opts.file, opts.overrides, opts.study, match_multipliers=known or None)
    client = client_for(opts.tracking_uri, opts.output_dir)
    experiment = experiment_name(plan.kind, plan.name)
    prepared = Prepared(plan.name, experiment, ensure_experiment(client, experiment, opts.output_dir),
                        study.user_attrs[keys.PARENT], created=False,
                        threads=int(study.user_attrs[keys.TRIAL_THREADS]),
                        devices=int(study.user_attrs.get(keys.TRIAL_DEVICES, 1)), client=client)
    ran = run_worker(plan, opts, prepared, worker)
    if finalize_when_done and (opts.deadline is None or time.time() < opts.deadline):
        finalize(opts.storage, plan.name, client, storage=storage)
    return ran


def main(argv: list[str]) -> int:
    trial = following()
    if trial is not None:                   # a DDP rank > 0 of the trial its worker runs
        return follow_trial(trial)
    args = json.loads(argv[0])
    worker, status = args.pop("worker"), Path(args.pop("status"))
    try:
        with quiet():
            work(StudyOptions(**args), worker)
    except ReslabError as e:
        status.write_text(json.dumps({"error": str(e)}))
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main(sys.argv[1:]))
