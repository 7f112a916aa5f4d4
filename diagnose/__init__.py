"""reslab's diagnostics: what residual learning does to gradients, and how a trained net survives lesions.

    rows = measure_gradients(resolve_targets([(path, load_spec(path))]), GradientOptions(seeds=3))
    with lesioned(model, ["layer2.1"]): ...          # that block computes only its shortcut
    run_diagnostics(DiagnoseRequest(specs=[...], gradients=True))   # what `reslab diagnose` calls
"""
from .gradients import (block_gradient_norms, calibrate_bn, gradient_correlation, line_between,
                        neighbour_correlation, network_depth, parse_readout, path_gradients)
from .lesion import is_downsampling, lesion_study, lesioned, resolve_blocks
from .session import DiagnoseRequest, run_diagnostics
from .suite import GradientOptions, Target, measure_gradients, measure_lesions, resolve_targets

__all__ = ["DiagnoseRequest", "GradientOptions", "Target", "block_gradient_norms", "calibrate_bn",
           "gradient_correlation", "is_downsampling", "lesion_study", "lesioned", "line_between",
           "measure_gradients", "measure_lesions", "neighbour_correlation", "network_depth", "parse_readout",
           "path_gradients", "resolve_blocks", "resolve_targets", "run_diagnostics"]
