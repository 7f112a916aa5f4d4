"""Export a trained network (a checkpoint or an MLflow run) to torch.export, ONNX or TorchScript, and check that
the exported file gives the checkpoint's logits.

    result = export_model("outputs/checkpoints/RUN/last.ckpt", "onnx")    # or a run id
    result.path, result.max_abs_diff                                        # checked on a fresh batch size

Every format is exported with a free batch dimension, reloaded from the file written (torch.export.load,
torch.jit.load, onnxruntime or onnx's reference evaluator) and run on seeded inputs of another batch size than
the one it was traced with; their logits must match the eager network's within `atol` (ExportMismatch if not).
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from arches.errors import ReslabError, first_line

from .checkpoint import LAST, load_model
from .quiet import quiet
from .stores import writable_folder
from .mlflow_client import default_tracking_uri

FORMATS = ("torch.export", "onnx", "torchscript")
SUFFIX = {"torch.export": ".pt2", "onnx": ".onnx", "torchscript": ".ts.pt"}
TRACE_BATCH, CHECK_BATCH = 2, 3        # traced with one batch size, checked with another
ATOL = 1e-4


class ExportMismatch(RuntimeError):
    """The exported file's logits differ from the checkpoint's."""


@dataclass
class ExportResult:
    path: Path
    format: str
    runtime: str                       # what ran the exported file for the check
    max_abs_diff: float                # largest |exported - eager| logit on the check batch
    shape: tuple[int, ...]             # the check batch's logits


def check_format(fmt: str) -> str:
    """The format, or a one-line error (for --format); ONNX needs the `onnx` package."""
    if fmt not in FORMATS:
        raise ReslabError(f"unknown format '{fmt}'; expected one of: {', '.join(FORMATS)}", file="--format")
    if fmt == "onnx" and importlib.util.find_spec("onnx") is None:
        raise ReslabError("ONNX export needs the onnx package: pip install onnx (or choose --format torch.export "
                          "or torchscript)", file="--format")
    return fmt


def inputs(spec: Any, batch: int, seed: int) -> torch.Tensor:
    """Seeded standard-normal images of the spec's input shape (the scale of normalised images)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, spec.input.channels, spec.input.size, spec.input.size, generator=gen)


def _torch_export(network: torch.nn.Module, example: torch.Tensor, path: Path) -> Callable:
    program = torch.export.export(network, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()
    return lambda x: loaded(x)


def _torchscript(network: torch.nn.Module, example: torch.Tensor, path: Path) -> Callable:
    traced = torch.jit.trace(network, example)
    traced.save(str(path))
    loaded = torch.jit.load(str(path))
    return lambda x: loaded(x)


def _onnx(network: torch.nn.Module, example: torch.Tensor, path: Path) -> tuple[Callable, str]:
    import onnx

    dynamo = importlib.util.find_spec("onnxscript") is not None    # the current exporter needs onnxscript
    if dynamo:
        torch.onnx.export(network, (example,), str(path), dynamo=True, input_names=["images"],
                          output_names=["logits"], dynamic_shapes=({0: torch.export.Dim.AUTO},),
                          external_data=False)
    else:
        torch.onnx.export(network, (example,), str(path), dynamo=False, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    onnx.checker.check_model(onnx.load(str(path)))
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return (lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])), "onnxruntime"
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(onnx.load(str(path)))
    return (lambda x: torch.from_numpy(evaluator.run(None, {"images": x.numpy()})[0])), "onnx.reference"


def export_model(ref: Union[str, Path], fmt: str, output: Optional[Union[str, Path]] = None,
                 tracking_uri: Optional[str] = None, output_dir: Union[str, Path] = "outputs",
                 atol: float = ATOL) -> ExportResult:
    """Export the network of `ref` (.ckpt path or MLflow run id) as `fmt` to `output` (default
    <output_dir>/exports/<spec name>-<run id or checkpoint name><suffix>) and check its logits."""
    check_format(fmt)
    if tracking_uri is None and (Path(output_dir) / "mlflow.db").exists():
        tracking_uri = default_tracking_uri(output_dir)
    spec, network = load_model(ref, tracking_uri, output_dir)
    network = network.eval()
    given = Path(str(ref)).expanduser()
    if output is None:
        stem = (given.parent.name if given.name == LAST else given.stem) if given.suffix == ".ckpt" else str(ref)
        output = Path(output_dir) / "exports" / f"{spec.name}-{stem}{SUFFIX[fmt]}"
    path = output_path(Path(output).expanduser(), given, SUFFIX[fmt])
    tmp = path.with_name(f".{os.getpid()}.tmp-{path.name}")       # checked first, then renamed into place
    example, check = inputs(spec, TRACE_BATCH, 0), inputs(spec, CHECK_BATCH, 1)
    try:
        try:
            with quiet(), warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")          # exporters' deprecation and tracer notes
                if fmt == "torch.export":
                    run, runtime = _torch_export(network, example, tmp), "torch.export.load"
                elif fmt == "torchscript":
                    run, runtime = _torchscript(network, example, tmp), "torch.jit.load"
                else:
                    run, runtime = _onnx(network, example, tmp)
                expected, got = network(check), run(check)
        except Exception as e:  # noqa: BLE001  (an exporter's failure: one line, nothing half-written left)
            raise ReslabError(f"{fmt} export failed: {type(e).__name__}: {first_line(e)}", file=str(ref)) from None
        diff = float((got.float() - expected).abs().max())
        if got.shape != expected.shape or not diff <= atol:
            raise ExportMismatch(f"{path}: {fmt} logits differ from the checkpoint's (max |diff| {diff:.3g} > "
                                 f"{atol:g}, shape {tuple(got.shape)} vs {tuple(expected.shape)}); not written")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportResult(path, fmt, runtime, diff, tuple(got.shape))


def output_path(path: Path, source: Path, suffix: str) -> Path:
    """The file an export writes: not a folder, not the checkpoint it exports, in a folder that can be written
    (made if missing); one-line ReslabError (--output) otherwise."""
    if path.is_dir():
        raise ReslabError(f"{path} is a folder; give the file to write (e.g. {path / ('model' + suffix)})",
                          file="--output")
    if path.exists() and source.exists() and path.resolve() == source.resolve():
        raise ReslabError(f"{path} is the checkpoint being exported; writing there would destroy it",
                          file="--output")
    writable_folder(path.parent, "--output")
    return path
