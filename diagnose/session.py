"""One `reslab diagnose` call: load specs, resolve checkpoints, measure, print tables, log MLflow runs."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from rich.console import Console

from arches import load_spec
from arches.errors import ReslabError
from runs.mlflow_client import default_tracking_uri

from .record import DEFAULT_EXPERIMENT, gradient_metrics, gradient_table, lesion_metrics, lesion_table, \
    parent_experiment, plot_gradients, plot_lesions, log_diagnostic
from .suite import GradientOptions, check_lesion_request, measure_gradients, measure_lesions, resolve_targets
from .landscape_record import landscape_metrics, landscape_table, plot_landscapes
from .landscape_suite import LandscapeOptions, check_landscape_request, measure_landscapes


@dataclass
class DiagnoseRequest:
    """Everything `reslab diagnose` was asked for."""
    specs: Sequence[str]                        # spec files
    overrides: Sequence[str] = ()               # --set, applied to every spec
    gradients: bool = False
    lesion: bool = False
    landscape: bool = False
    checkpoints: Sequence[str] = ()             # paths or MLflow run ids of trained networks
    gradient_options: GradientOptions = field(default_factory=GradientOptions)
    landscape_options: LandscapeOptions = field(default_factory=LandscapeOptions)
    blocks: Optional[Sequence[str]] = None      # lesion only these blocks (default: every block)
    limit: Optional[int] = None                 # lesion on this many test images (seeded subset)
    tracking_uri: Optional[str] = None          # default: runs.mlflow_client.default_tracking_uri(output_dir)
    experiment: str = DEFAULT_EXPERIMENT
    parent_run_id: Optional[str] = None         # log as nested children of this run
    output_dir: str = "outputs"


def run_diagnostics(req: DiagnoseRequest, console: Optional[Console] = None) -> dict[str, str]:
    """Measure what `req` asks, print a table per diagnostic, log each as an MLflow run: {kind: run id}."""
    if console is None:
        console = Console()
        if not console.is_terminal:     # logs and pipes: wide enough for the tables, never wrapped to 80
            console = Console(width=max(console.width, 140))
    if not (req.gradients or req.lesion or req.landscape):
        raise ReslabError("say what to measure: --gradients, --lesion and/or --landscape")
    if req.landscape:
        req.landscape_options.check()
    uri = req.tracking_uri or default_tracking_uri(req.output_dir)
    if req.parent_run_id:
        parent_experiment(uri, req.parent_run_id, req.output_dir)   # fail before measuring, not after
    specs = [(path, load_spec(path, req.overrides)) for path in req.specs]
    targets = resolve_targets(specs, req.checkpoints, tracking_uri=uri, at_init=req.gradients)
    if req.lesion:
        check_lesion_request(targets, req.blocks)
    if req.landscape:
        check_landscape_request(targets)
    where = dict(tracking_uri=uri, experiment=req.experiment, parent_run_id=req.parent_run_id,
                 output_dir=req.output_dir)
    common = {"specs": ",".join(req.specs), "overrides": " ".join(req.overrides) or "-",
              "checkpoints": ",".join(req.checkpoints) or "-"}
    run_ids = {}
    if req.gradients:
        opts = req.gradient_options
        rows = measure_gradients(targets, opts, progress=lambda r: console.print(
            f"gradients {r.label} seed {r.seed}: correlation {r.correlation:.3f}"))
        gradient_table(rows, console)
        run_ids["gradients"] = log_diagnostic(
            "gradients", {**common, **{k: v for k, v in asdict(opts).items()}},
            gradient_metrics(rows), {"options": asdict(opts), "rows": [r.to_dict() for r in rows]},
            lambda folder: plot_gradients(rows, folder), run_name="gradients: " + ", ".join(t.label for t in targets),
            **where)
    if req.lesion:
        results = measure_lesions(targets, req.blocks, req.limit, req.gradient_options.device,
                                  progress=lambda r: console.print(f"lesion {r.label}: intact {r.intact:.3f}"))
        lesion_table(results, console)
        run_ids["lesion"] = log_diagnostic(
            "lesion", {**common, "blocks": ",".join(req.blocks or []) or "all", "limit": req.limit or "all"},
            lesion_metrics(results), {"results": [r.to_dict() for r in results]},
            lambda folder: plot_lesions(results, folder),
            run_name="lesion: " + ", ".join(r.label for r in results), **where)
    if req.landscape:
        opts = req.landscape_options
        results = measure_landscapes(targets, opts, progress=lambda r: console.print(
            f"landscape {r.label}: loss {r.loss:.4f}, curvature {sum(r.curvatures) / len(r.curvatures):.3g} "
            f"({r.seconds:.1f} s)"))
        landscape_table(results, console)
        run_ids["landscape"] = log_diagnostic(
            "landscape", {**common, **opts.to_dict()}, landscape_metrics(results),
            {"options": opts.to_dict(), "results": [r.to_dict() for r in results]},
            lambda folder: plot_landscapes(results, folder),
            run_name="landscape: " + ", ".join(r.label for r in results), **where)
    for kind, run_id in run_ids.items():
        console.print(f"{kind}: MLflow run {run_id} ({uri})")
    return run_ids
