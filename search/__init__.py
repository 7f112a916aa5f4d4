"""reslab's study side: ablations and Optuna searches over specs, their workers, records and reports.

    plan = load_study_file("specs/ablations/shortcuts.yaml", ["train.epochs=2"])   # checked, one-line errors
    report = study_run(StudyOptions("specs/ablations/shortcuts.yaml", workers=2))  # train every trial
    print_report(study_report("shortcuts"))                                        # n, mean ± std, Δ, CI, p
    (run_study and report_study: the same reports as JSON)
"""
from __future__ import annotations

import argparse

__all__ = ["AblationPlan", "SearchPlan", "StudyDesign", "StudyOptions", "launch_from_args", "load_study_file",
           "options_from_args", "print_report", "report_study", "run_study", "serve_ui", "study_name_of",
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
