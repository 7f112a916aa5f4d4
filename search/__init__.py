"""reslab's study side: ablations and Optuna searches over specs, their workers, records and reports.

    plan = load_study_file("specs/ablations/shortcuts.yaml", ["train.epochs=2"])   # checked, one-line errors
    report = study_run(StudyOptions("specs/ablations/shortcuts.yaml", workers=2))  # train every trial
    print_report(study_report("shortcuts"))                                        # n, mean ± std, Δ, CI, p
    (run_study and report_study: the same reports as JSON)
"""
from __future__ import annotations

import argparse

__all__ = ["AblationPlan", "SearchPlan", "StudyDesign", "StudyOptions", "add_study_arguments", "launch_from_args",
           "load_study_file", "options_from_args", "print_report", "report_study", "run_study", "serve_ui", "study_name_of",
           "study_report", "study_run"]


def __getattr__(name: str):  # heavy modules (torch, optuna, mlflow) load on first use
    if name in ("AblationPlan", "SearchPlan", "StudyDesign"):
        from . import plans
        return getattr(plans, name)
    if name in ("load_study_file", "study_name_of"):
        from . import space
        return getattr(space, name)
    if name in ("StudyOptions", "run_study", "study_run"):
        from . import study
        return getattr(study, name)
    if name in ("print_report", "report_study", "study_report"):
        from . import report
        return getattr(report, name)
    if name == "serve_ui":
        from .ui import serve_ui
        return serve_ui
    raise AttributeError(name)


def add_study_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments shared by `ablate` and `search`."""
    p.add_argument("file", help="ablation or search YAML file, or a shipped one's name (shortcuts)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override the base spec for every trial (applied after the file's `set:`), or a key of "
                        "the file itself: search.trials=4, ablation.seeds=5, devices_per_trial=2, study.name=x")
    p.add_argument("--workers", type=int, help="worker processes, each running one trial at a time (default: 1; "
                                               "with GPUs and --devices-per-trial K: GPUs / K)")
    p.add_argument("--devices-per-trial", type=int, metavar="K",
                   help="devices of every trial: K GPUs (or K CPU processes) trained with Lightning DDP; each worker "
                        "gets its own K GPUs (default: the file's devices_per_trial, else 1; fixed when the study "
                        "is made)")
    p.add_argument("--pack", metavar="auto|off|N",
                   help="train up to N waiting trials of the same network as one vmapped model (runs.pack), each "
                        "still its own trial and run; auto: off on a CPU, sized by a memory probe on a GPU "
                        "(default: the file's pack:, else auto)")
    p.add_argument("--storage", help="Optuna storage URL shared by workers and machines (default: $RESLAB_STORAGE, "
                                     "else sqlite:///OUTPUT_DIR/optuna.db; e.g. postgresql://user@host/db)")
    p.add_argument("--tracking-uri", help="MLflow store: a tracking server http://host:port for several machines "
                                          "(default: $MLFLOW_TRACKING_URI, else sqlite:///OUTPUT_DIR/mlflow.db)")
    p.add_argument("--output-dir", default="outputs", help="local stores, checkpoints (default: outputs)")
    p.add_argument("--study", help="study name (default: the file's `name:` or file name)")
    p.add_argument("--heartbeat", type=int, default=10, metavar="SECONDS",
                   help="trial heartbeat; a trial silent for 3x this long is retried (default: 10)")
    p.add_argument("--json", action="store_true", help="print the final report as JSON")
    p.add_argument("--launcher", choices=("slurm", "local"),
                   help="submit the workers as one submitit job array (SLURM, or submitit's local executor) and "
                        "return; settings: the file's `launcher:` section, --launcher-set, --workers")
    p.add_argument("--launcher-set", dest="launcher_settings", nargs="+", action="extend", default=[],
                   metavar="KEY=VALUE", help="override a `launcher:` key (partition=gpu timeout_min=240 "
                                             "gpus_per_node=1 ...), values parsed as YAML")
    p.add_argument("--wait", action="store_true", help="with --launcher: follow the jobs with a progress bar until "
                                                       "they end, then print the report (local always waits)")
    p.add_argument("--dry-run", action="store_true", help="with --launcher slurm: print the sbatch script; submit "
                                                          "and record nothing")



def launch_from_args(args: argparse.Namespace):
    """LaunchOptions from parsed `ablate`/`search` arguments (None: run the workers here); one-line errors for
    launcher flags without --launcher and for flags that conflict."""
    from arches.errors import ReslabError

    from .launch import LaunchOptions, check_flags

    if args.launcher is None:
        given = [f for f, v in (("--wait", args.wait), ("--dry-run", args.dry_run),
                                ("--launcher-set", args.launcher_settings)) if v]
        if given:
            raise ReslabError("needs --launcher slurm (or local)", file=given[0])
        return None
    launch = LaunchOptions(args.launcher, list(args.launcher_settings), wait=args.wait, dry_run=args.dry_run)
    check_flags(launch, args.json)
    return launch


def options_from_args(args: argparse.Namespace, kind: str):
    """StudyOptions from parsed `ablate`/`search` arguments."""
    from .study import StudyOptions

    return StudyOptions(file=args.file, overrides=list(args.overrides), study=args.study, storage=args.storage,
                        tracking_uri=args.tracking_uri, output_dir=args.output_dir, workers=args.workers,
                        devices_per_trial=args.devices_per_trial, heartbeat=args.heartbeat, kind=kind,
                        pack=args.pack)
