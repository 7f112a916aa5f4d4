#!/usr/bin/env python3
"""reslab's command line: parsing and error printing only; every command calls one library function.

    python cli.py show specs/resnet34.yaml          # table of stages: blocks, output shape, params, MACs
    python cli.py validate specs/*.yaml             # exit 0 when every spec (ablation, search) file is valid
    python cli.py run specs/x.yaml --set train.epochs=3

Any bad input (spec, flag, data, storage) prints one line, `file:line: key.path: message`, and exits 2.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import sys

EXIT_BAD_INPUT = 2
# flags whose default comes from the environment, as MLflow's own tools read it (--flag: variable)
ENVIRONMENT_DEFAULTS = {"--tracking-uri": "MLFLOW_TRACKING_URI", "--storage": "RESLAB_STORAGE"}


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line with a 'did you mean', exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        hint = ""
        words = []
        if "unrecognized arguments:" in message:
            words = message.split("unrecognized arguments:", 1)[1].split()
        elif "invalid choice:" in message:
            words = [message.split("invalid choice:", 1)[1].split("'")[1]]
        if words:
            subparsers = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
            choices = [c for a in subparsers for c in a.choices]
            parsers = [self] + [p for a in subparsers for p in a.choices.values()]
            options = [o for p in parsers for a in p._actions for o in a.option_strings]
            for w in words:
                close = difflib.get_close_matches(w, options + choices, n=1, cutoff=0.6)
                if close and close[0] != w:
                    hint = f" (did you mean '{close[0]}'?)"
                    break
        print(f"{self.prog}: error: {message}{hint}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


# ---- arguments several commands take: each defined once, its help saying what it is for in the command ---------
def add_overrides(p: argparse.ArgumentParser, what: str) -> None:
    """--set KEY=VALUE ... (args.overrides)."""
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help=what)


def add_output_dir(p: argparse.ArgumentParser, what: str) -> None:
    """--output-dir: the folder of the default stores (and of what the command writes)."""
    p.add_argument("--output-dir", default="outputs", help=f"{what} (default: outputs)")


def add_tracking_uri(p: argparse.ArgumentParser, what: str = "MLflow store") -> None:
    """--tracking-uri: the MLflow store (its default: $MLFLOW_TRACKING_URI, else the one in --output-dir)."""
    p.add_argument("--tracking-uri", help=f"{what} (default: ${ENVIRONMENT_DEFAULTS['--tracking-uri']}, else "
                                          f"sqlite:///OUTPUT_DIR/mlflow.db)")


def add_storage(p: argparse.ArgumentParser, what: str = "Optuna storage URL") -> None:
    """--storage: the Optuna storage (its default: $RESLAB_STORAGE, else the one in --output-dir)."""
    p.add_argument("--storage", help=f"{what} (default: ${ENVIRONMENT_DEFAULTS['--storage']}, else "
                                     f"sqlite:///OUTPUT_DIR/optuna.db)")


def add_spec_args(p: argparse.ArgumentParser, many: bool = False) -> None:
    p.add_argument("spec", nargs="+" if many else None, help="spec YAML file" + ("s" if many else "") +
                   " (or the name of a shipped one: resnet20)")
    add_overrides(p, "override spec values by dotted path, values parsed as YAML (stages.2.depth=8)")


def add_study_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by `ablate` and `search`."""
    p.add_argument("file", help="ablation or search YAML file, or a shipped one's name (shortcuts)")
    add_overrides(p, "override the base spec for every trial (applied after the file's `set:`), or a key of the "
                     "file itself: search.trials=4, ablation.seeds=5, devices_per_trial=2, study.name=x")
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
    add_storage(p, "Optuna storage URL shared by workers and machines, e.g. postgresql://user@host/db")
    add_tracking_uri(p, "MLflow store: a tracking server http://host:port for several machines")
    add_output_dir(p, "local stores, checkpoints")
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


def study_kind(path: str):
    """'ablation' or 'search' when the YAML file is one of those (None for specs and unreadable files)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except Exception:  # noqa: BLE001  (whoever reads the file properly says what is wrong with it)
        return None
    from search.kinds import STUDY_KINDS

    return next((k for k in STUDY_KINDS if isinstance(doc, dict) and k in doc), None)


def load_network_spec(path: str, overrides=()):
    """arches.load_spec, pointing to `ablate`/`search` when the file given is an ablation or search file."""
    from arches import SpecError, load_spec

    try:
        return load_spec(path, overrides)
    except SpecError:
        kind = study_kind(path)
        if kind is None:
            raise
        from search.kinds import STUDY_KINDS

        raise SpecError(f"this is {STUDY_KINDS[kind].a_file}, not a network spec; run it with `python cli.py "
                        f"{STUDY_KINDS[kind].command} {path}`", file=path) from None


# ---- commands --------------------------------------------------------------------------------------------
def cmd_show(args) -> int:
    from arches import complexity
    from arches.report import complexity_table, init_lines

    spec = load_network_spec(args.spec, args.overrides)
    cost = complexity(spec)
    init = init_from_report(spec, args.tracking_uri, args.output_dir)
    if args.json:
        print(json.dumps({**cost.to_dict(), **({"init": init.to_dict()} if init else {})}, indent=2))
    else:
        complexity_table(cost)
        if init:
            print("\n".join(init_lines(init, len(init.loaded) + len(init.mismatched) + len(init.missing))))
    return 0


def init_from_report(spec, tracking_uri=None, output_dir="outputs"):
    """What the spec's `init_from` loads (None without one); a run id is resolved as `run` resolves it (in
    --tracking-uri, else the store in --output-dir)."""
    from arches.compile import init_report
    from arches.init import is_run_id

    if not spec.init_from:
        return None
    resolve = None
    if is_run_id(spec.init_from):
        from runs.checkpoint import InitCheckpoint

        resolve = InitCheckpoint(tracking_uri, output_dir)
    return init_report(spec, resolve)


def cmd_validate(args) -> int:
    from arches.spec import check_partial_base, is_partial_base

    for path in args.spec:
        if is_partial_base(path):
            check_partial_base(path)
            print(f"ok  {path}  (partial base)")
        elif study_kind(path):
            from search.space import load_study_file

            plan = load_study_file(path, args.overrides)
            print(f"ok  {path}  ({plan.kind} '{plan.name}': {plan.size()})")
        else:
            print(f"ok  {path}  ({load_network_spec(path, args.overrides).name})")
    return 0


def cmd_diagnose(args) -> int:
    from diagnose import DiagnoseRequest, GradientOptions, parse_readout, run_diagnostics
    from diagnose.landscape_suite import Axis, LandscapeOptions

    options = GradientOptions(seeds=args.seeds, points=args.points, bn=args.bn, readout=parse_readout(args.readout),
                              batch_size=args.batch_size, device=args.device)
    landscape = LandscapeOptions(
        line=Axis.parse(args.line, "--line"), directions=args.directions, seed=args.direction_seed,
        surface=None if args.surface == "none" else Axis.parse(args.surface, "--surface"), images=args.images,
        ignore=args.ignore, max_minutes=args.max_minutes, device=args.device)
    run_diagnostics(DiagnoseRequest(
        specs=args.spec, overrides=args.overrides, gradients=args.gradients, lesion=args.lesion,
        landscape=args.landscape, landscape_options=landscape,
        checkpoints=args.checkpoint, gradient_options=options, blocks=args.blocks, limit=args.limit,
        tracking_uri=args.tracking_uri, experiment=args.experiment, parent_run_id=args.run,
        output_dir=args.output_dir))
    return 0


def cmd_run(args) -> int:
    from arches.errors import ReslabError

    if args.spec is None and (not args.resume or args.overrides):
        raise ReslabError("give a spec file to train" if not args.resume else
                          "--set needs a spec file; --resume alone continues the recorded spec", file="run")
    from runs.fit import Interrupted, RunOptions, summary_lines, train
    from runs.hints import program
    from runs.mlflow_client import default_tracking_uri, remote_artifacts

    overrides = list(args.overrides)
    for key, value in (("train.devices", args.devices), ("train.num_nodes", args.num_nodes)):
        if value is not None:
            overrides.append((key, value))
    spec = load_network_spec(args.spec, overrides) if args.spec else None
    if args.register is not None:
        from runs.mlflow_model import check_model_name

        check_model_name(args.register)
    uri = args.tracking_uri or default_tracking_uri(args.output_dir)
    progress = {"auto": None, "bar": True, "lines": False}[args.progress]
    try:
        result = train(spec, RunOptions(tracking_uri=uri, experiment=args.experiment, run_name=args.run_name,
                                         resume=args.resume, output_dir=args.output_dir, progress=progress,
                                         register=args.register))
    except Interrupted as e:
        if e.rank == 0:
            store = f"--tracking-uri {uri}" if remote_artifacts(uri) else f"--output-dir {args.output_dir}"
            print(f"interrupted ({e.signal_name}): run {e.run_id} KILLED, checkpoint {e.checkpoint}; continue "
                  f"with: {program()} run --resume {e.run_id} {store}", file=sys.stderr)
        return e.exit_code
    if result.rank != 0:
        return 0 if result.status == "FINISHED" else 1
    if result.status != "FINISHED":
        print(f"run {result.run_id} failed: {result.reason}", file=sys.stderr)
        return 1
    print("\n".join(summary_lines(result, uri, args.output_dir)))
    if args.register and not result.model_version:
        print(f"--register: the model was not registered: {result.model_error}", file=sys.stderr)
        return 1
    return 0


def cmd_export(args) -> int:
    from runs.export import ExportMismatch, check_format, export_model

    check_format(args.format)
    try:
        result = export_model(args.ref, args.format, output=args.output, tracking_uri=args.tracking_uri,
                              output_dir=args.output_dir)
    except ExportMismatch as e:
        print(str(e), file=sys.stderr)
        return 1
    print(f"{result.format}: {result.path}  (checked with {result.runtime}: logits of a batch of {result.shape[0]} "
          f"equal the checkpoint's, max |diff| {result.max_abs_diff:.2g})")
    return 0


def cmd_ablate(args) -> int:
    from search import launch_from_args, options_from_args, print_report, study_run

    from search.kinds import KIND_OF_COMMAND

    launch = launch_from_args(args)
    options = options_from_args(args, kind=KIND_OF_COMMAND[args.command])
    if launch is not None:
        from search.launch import launch_study

        report = launch_study(options, launch)
        if report is None:
            return 0
    else:
        report = study_run(options)
    print(json.dumps(report.to_json(), indent=2)) if args.json else print_report(report)
    return 0


def cmd_search(args) -> int:
    return cmd_ablate(args)


def cmd_report(args) -> int:
    from search import print_report, study_report

    report = study_report(args.study, storage=args.storage, output_dir=args.output_dir,
                          tracking_uri=args.tracking_uri)
    print(json.dumps(report.to_json(), indent=2)) if args.json else print_report(report)
    return 0


def cmd_status(args) -> int:
    from search.status import print_status, study_status
    from search.storage import default_storage

    print_status(study_status(args.study, args.storage or default_storage(args.output_dir)), as_json=args.json)
    return 0


def cmd_ui(args) -> int:
    from search import serve_ui

    return serve_ui(output_dir=args.output_dir, port=args.port, tracking_uri=args.tracking_uri, host=args.host)


def build_parser() -> Parser:
    parser = Parser(prog="reslab", description="A declarative lab for residual-family networks.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("show", help="print a spec's stages, output shapes, params and MACs")
    add_spec_args(p)
    p.add_argument("--json", action="store_true", help="print the complexity as JSON")
    add_output_dir(p, "where the MLflow store of an init_from run id lives")
    add_tracking_uri(p, "MLflow store of an init_from run id")
    p.set_defaults(handler=cmd_show)

    p = sub.add_parser("validate", help="check spec, ablation and search files; exit 0 when all are valid")
    add_spec_args(p, many=True)
    p.set_defaults(handler=cmd_validate)

    p = sub.add_parser("diagnose", help="gradient norms and shattered-gradient correlation by depth; lesions "
                                        "of trained checkpoints; each logged as an MLflow run")
    add_spec_args(p, many=True)
    p.add_argument("--gradients", action="store_true",
                   help="per-block gradient norms and input-gradient correlation (Balduzzi et al. 2017), at "
                        "initialisation and at each --checkpoint")
    p.add_argument("--lesion", action="store_true",
                   help="test accuracy of each --checkpoint with one block deleted at a time (Veit et al. 2016)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="PATH_OR_RUN_ID",
                   help="a trained network: checkpoint file or MLflow run id (repeatable); must match a spec")
    p.add_argument("--seeds", type=int, default=3, help="gradients: seeds (inits, image pairs), mean ± std")
    p.add_argument("--points", type=int, default=256, help="gradients: inputs on the path between two images")
    p.add_argument("--bn", choices=("batch", "eval"), default="batch",
                   help="gradients: BN on batch statistics, whole path in one batch (as Balduzzi et al.), or "
                        "running statistics (calibrated on a real batch at initialisation)")
    p.add_argument("--readout", default="projection", metavar="projection|INDEX",
                   help="gradients: the scalar output: a fixed random projection of the logits, or a logit index")
    p.add_argument("--batch-size", type=int, default=128, help="gradients: images in the cross-entropy batch")
    p.add_argument("--blocks", nargs="+", metavar="NAME", help="lesion: only these blocks (layer2.0 ...)")
    p.add_argument("--limit", type=int, help="lesion: measure on this many test images (seeded subset)")
    p.add_argument("--landscape", action="store_true",
                   help="the training loss around each --checkpoint along filter-normalised random directions "
                        "(Li et al. 2018): 1-D line, 2-D contour, curvature")
    p.add_argument("--line", default="-1:1:41", metavar="MIN:MAX:N", help="landscape: steps of the 1-D line (write --line=-1:1:41)")
    p.add_argument("--surface", default="-1:1:21", metavar="MIN:MAX:N|none",
                   help="landscape: steps of both axes of the 2-D surface (none: no surface)")
    p.add_argument("--directions", type=int, default=3, help="landscape: random directions for the curvature")
    p.add_argument("--direction-seed", type=int, default=0, help="landscape: seed of the first direction")
    p.add_argument("--images", type=int, default=512, help="landscape: training images the loss is averaged over")
    p.add_argument("--ignore", choices=("biasbn", "none"), default="biasbn",
                   help="landscape: biases and BN weights not moved (biasbn, as Li et al.) or moved along themselves")
    p.add_argument("--max-minutes", type=float, default=30.0,
                   help="landscape: refuse a grid whose estimated time (measured per evaluation) is longer")
    p.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda, cuda:1 ...")
    p.add_argument("--run", metavar="RUN_ID", help="log as nested child runs of this MLflow run (e.g. the "
                                                    "training run); default: own runs in --experiment")
    p.add_argument("--experiment", default="diagnostics", help="MLflow experiment (without --run)")
    add_output_dir(p, "where the default MLflow store lives")
    add_tracking_uri(p, "MLflow tracking URI")
    p.set_defaults(handler=cmd_diagnose)

    p = sub.add_parser("run", help="train one spec with Lightning and record it as one MLflow run")
    p.add_argument("spec", nargs="?", help="spec YAML file, or a shipped spec's name (optional with --resume)")
    add_overrides(p, "override spec values by dotted path, values parsed as YAML (train.epochs=3)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue an interrupted run (same MLflow run)")
    add_output_dir(p, "MLflow store, artifacts and checkpoints")
    add_tracking_uri(p, "MLflow tracking URI")
    p.add_argument("--experiment", help="MLflow experiment (default: spec.family, else the name without depth)")
    p.add_argument("--run-name", help="MLflow run name (default: the spec's name)")
    p.add_argument("--devices", type=int, help="processes/GPUs per node (sets train.devices; >1 = DDP)")
    p.add_argument("--num-nodes", type=int, help="nodes (sets train.num_nodes)")
    p.add_argument("--progress", choices=("auto", "bar", "lines"), default="auto",
                   help="rich progress bar, one line per epoch, or by whether stdout is a terminal")
    p.add_argument("--register", metavar="NAME", help="register the run's MLflow model as a new version of NAME "
                                                      "in the model registry")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("export", help="export a trained network to torch.export, ONNX or TorchScript, checked "
                                      "to give the checkpoint's logits")
    p.add_argument("ref", metavar="RUN_ID_OR_CHECKPOINT", help="an MLflow run id or a .ckpt file")
    p.add_argument("--format", required=True, metavar="|".join(("torch.export", "onnx", "torchscript")),
                   help="torch.export (.pt2), onnx (needs the onnx package) or torchscript (.ts.pt)")
    p.add_argument("--output", help="file to write (default: OUTPUT_DIR/exports/<spec>-<run or checkpoint>.<ext>)")
    add_output_dir(p, "where the default store and exports live")
    add_tracking_uri(p, "MLflow store of the run")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("ablate", help="train an ablation (arms x paired seeds) with N workers; report n, mean ± "
                                      "std, Δ vs baseline with 95%% CI and paired t-test")
    add_study_args(p)
    p.set_defaults(handler=cmd_ablate)

    p = sub.add_parser("search", help="run an Optuna search (TPE, random, grid, NSGA-II; pruning) over a spec")
    add_study_args(p)
    p.set_defaults(handler=cmd_search)

    p = sub.add_parser("report", help="per-arm statistics (or a search's trials) of a stored study")
    p.add_argument("study", help="study name, or its ablation/search file")
    add_storage(p)
    add_tracking_uri(p, "MLflow store of the study's runs, named in the report")
    add_output_dir(p, "where the default stores live")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser("status", help="a study's cells done / running / waiting / failed, the job and host of "
                                      "each, the SLURM states of its job arrays (while it runs)")
    p.add_argument("study", help="study name, or its ablation/search file")
    add_storage(p)
    add_output_dir(p, "where the default storage lives")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 over the local store")
    p.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    p.add_argument("--host", default="127.0.0.1", help="interface (default: 127.0.0.1, this machine only)")
    add_output_dir(p, "where the default store lives")
    add_tracking_uri(p)
    p.set_defaults(handler=cmd_ui)

    # (each command: one parser block here, one cmd_ function above)
    return parser


def environment_defaults(args: argparse.Namespace) -> dict[str, str]:
    """Fill --tracking-uri and --storage left out from $MLFLOW_TRACKING_URI and $RESLAB_STORAGE; returns
    {flag: variable} for those taken from the environment (an error about one names the variable)."""
    taken = {}
    for flag, variable in ENVIRONMENT_DEFAULTS.items():
        attr = flag[2:].replace("-", "_")
        if hasattr(args, attr) and getattr(args, attr) is None and os.environ.get(variable, "").strip():
            setattr(args, attr, os.environ[variable].strip())
            taken[flag] = variable
    return taken


def shipped_files(args: argparse.Namespace) -> None:
    """Spec and study files given by name (resnet20, shortcuts) -> the files shipped with reslab (a path wins)."""
    from arches.shipped import resolve_spec_file

    for attr in ("spec", "file"):
        value = getattr(args, attr, None)
        if isinstance(value, list):
            setattr(args, attr, [resolve_spec_file(v) for v in value])
        elif isinstance(value, str):
            setattr(args, attr, resolve_spec_file(value))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from arches.errors import ReslabError
    from runs.quiet import quiet

    from_environment = environment_defaults(args)
    try:
        shipped_files(args)
        with quiet():
            return args.handler(args) or 0
    except ReslabError as e:
        if e.file in from_environment:      # the value came from a variable, not from the flag
            e.file = f"{e.file} (${from_environment[e.file]})"
        print(str(e), file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:          # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    os.environ.setdefault("RESLAB_PROGRAM", "python cli.py")   # (runs.hints.program: what messages suggest)
    sys.exit(main())
