"""One spec, one run: train with the PyTorch Lightning Trainer, record everything in one MLflow run.

    result = train(load_spec("specs/fmnist_resnet20.yaml"))
    result.run_id, result.status, result.metrics["test/acc"], result.history  # one row per epoch

Only global rank 0 talks to MLflow; under DDP (`devices: 2`) every process trains and the metrics cover the
whole data set. A NaN/inf loss ends the run FAILED (returned, not raised); Ctrl-C or SIGTERM saves a checkpoint,
ends the run KILLED and raises `Interrupted`; `train(..., resume=run_id)` continues it in the same MLflow run.
"""
from __future__ import annotations

import io
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from arches import Spec, complexity, diff_from_base, spec_hash, to_yaml
from arches.errors import ReslabError, first_line

from . import tracking
from .checkpoint import LAST, checkpoint_dir, read_checkpoint, spec_of
from .module import EpochSummary, NonFiniteLoss, ReslabModule
from .plots import error_curves

RUN_ID_ENV = "RESLAB_RUN_ID"   # hands the MLflow run id to DDP processes started by the launcher
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", RUN_ID_ENV)
QUIET_LOGGERS = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric")
for _name in QUIET_LOGGERS:   # Lightning's info banners (GPU available, distributed init...) off, in every process
    logging.getLogger(_name).setLevel(logging.WARNING)


class Pruned(Exception):
    """Raised by a callback (a search pruner) to stop a run early: the run ends KILLED, tag state=PRUNED."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run after its checkpoint was saved; resume with train(..., resume=run_id)."""

    def __init__(self, run_id: str, signal_name: str, checkpoint: Optional[str], rank: int = 0):
        super().__init__(f"{signal_name}: run {run_id} interrupted")
        self.run_id, self.signal_name, self.checkpoint, self.rank = run_id, signal_name, checkpoint, rank

    @property
    def exit_code(self) -> int:
        """128 + the signal number: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + int(getattr(signal, self.signal_name, signal.SIGINT))


@dataclass
class RunResult:
    run_id: str
    status: str                                   # 'FINISHED' | 'FAILED'
    metrics: dict[str, float]                     # final: last epoch's row and the test metrics
    history: list[dict] = field(default_factory=list)  # one row per epoch (epoch numbers start at 1)
    checkpoint: Optional[str] = None              # path of the final checkpoint
    reason: Optional[str] = None                  # why it failed
    rank: int = 0                                 # global rank of the process that returns it


# ---- settings derived from the spec ---------------------------------------------------------------------
def uses_cuda(spec: Spec) -> bool:
    """Whether the run goes on CUDA GPUs."""
    return spec.train.accelerator in ("auto", "gpu") and torch.cuda.is_available()


def resolved_precision(spec: Spec) -> str:
    """Lightning precision: auto -> bf16-mixed on CUDA (16-mixed without bf16), 32-true otherwise."""
    p = spec.train.precision
    if p == "auto":
        if not uses_cuda(spec):
            return "32-true"
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true" if p == "32" else p


def trainer_settings(spec: Spec) -> dict[str, Any]:
    """Keyword arguments of pl.Trainer for the spec's recipe (no callbacks)."""
    t = spec.train
    cuda = uses_cuda(spec)
    return dict(
        accelerator="gpu" if t.accelerator == "gpu" else ("cpu" if t.accelerator == "cpu" else "auto"),
        devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy, precision=resolved_precision(spec),
        max_epochs=t.epochs if t.epochs is not None else -1,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        limit_train_batches=t.limit_batches if t.limit_batches is not None else 1.0,
        check_val_every_n_epoch=t.val_every, num_sanity_val_steps=0, logger=False,
        enable_model_summary=False, use_distributed_sampler=False, benchmark=cuda if cuda else None,
        log_every_n_steps=50,
    )


# ---- callbacks ------------------------------------------------------------------------------------------
class EpochLines(pl.Callback):
    """Plain progress for logs and pipes: one line per epoch on rank 0."""

    def __init__(self, total_epochs: Optional[int], stream: Any = None):
        self.total, self.stream, self._t0 = total_epochs, stream, time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        history = getattr(pl_module, "history", None)
        if trainer.is_global_zero and history:
            print(epoch_line(history[-1], self.total, time.perf_counter() - self._t0),
                  file=self.stream or sys.stdout, flush=True)


def epoch_line(row: dict, total: Optional[int] = None, elapsed: Optional[float] = None) -> str:
    """'epoch 2/10  train loss 0.4312 acc 0.8412  val loss ... acc ...  lr 0.1  2310 img/s  31s'."""
    parts = [f"epoch {row['epoch']}" + (f"/{total}" if total else "")]
    for split in ("train", "val", "test"):
        if f"{split}/loss" in row:
            parts.append(f"{split} loss {row[f'{split}/loss']:.4f} acc {row[f'{split}/acc']:.4f}")
    if "lr" in row:
        parts.append(f"lr {row['lr']:.4g}")
    if row.get("images_per_s", float("nan")) == row.get("images_per_s"):
        parts.append(f"{row['images_per_s']:.0f} img/s")
    if elapsed is not None:
        parts.append(f"{elapsed:.0f}s")
    return "  ".join(parts)


class _StopRequested(BaseException):
    """Raised at a batch end after Ctrl-C/SIGTERM so training stops at a clean point."""


class InterruptGuard(pl.Callback):
    """Turns Ctrl-C/SIGTERM into a clean stop at the next batch end and saves a checkpoint on the way out."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self.fitting = False
        self.path: Optional[Path] = None
        self.saved: Optional[str] = None

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.signal_name:
            raise _StopRequested(self.signal_name)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if self.signal_name is None and isinstance(exception, SIGTERMException):
            self.signal_name = "SIGTERM"
        elif self.signal_name is None and isinstance(exception, KeyboardInterrupt):
            self.signal_name = "SIGINT"
        if self.signal_name and trainer.state.fn == "fit" and self.path is not None:
            self.save(trainer)

    def save(self, trainer: pl.Trainer) -> None:
        """Write last.ckpt from rank 0 (no barrier: other processes may be gone)."""
        ckpt = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
        if ckpt is not None and ckpt._last_global_step_saved == trainer.global_step and self.path.exists():
            self.saved = str(self.path)     # the epoch-end checkpoint already holds this state
            return
        if not trainer.is_global_zero or trainer.global_step == 0:
            return
        try:
            state = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            trainer.strategy.checkpoint_io.save_checkpoint(state, str(self.path))
            self.saved = str(self.path)
        except Exception as e:  # noqa: BLE001  (never hide the interrupt behind a save failure)
            print(f"could not save an interrupt checkpoint: {e}", file=sys.stderr)


@contextmanager
def _signal_handlers(guard: InterruptGuard) -> Iterator[None]:
    """While training: the first Ctrl-C/SIGTERM asks for a clean stop, a second one (or one outside fit) raises
    KeyboardInterrupt at once. Lightning's own SIGTERM handling stays in front of this one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        first = guard.signal_name is None
        if first:
            guard.signal_name = signal.Signals(signum).name
        if not (first and guard.fitting):
            raise KeyboardInterrupt

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's info banners and advisory warnings off while training."""
    loggers = [logging.getLogger(n) for n in QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"(pytorch_)?lightning.*")
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch.*")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


@contextmanager
def _launcher_env(run_id: str) -> Iterator[None]:
    """Give DDP processes started by Lightning the run id; undo the variables its launcher sets, so that a later
    run in this process starts its own processes again."""
    before = {k: os.environ.get(k) for k in LAUNCHER_ENV}
    if run_id:
        os.environ[RUN_ID_ENV] = run_id
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---- MLflow side (rank 0) -------------------------------------------------------------------------------
def _model_report(spec: Spec) -> tuple[str, dict, Any]:
    """The `show` table (stages and blocks) as text, the complexity as a dict, and the Complexity."""
    from rich.console import Console

    from arches.report import complexity_table

    cost = complexity(spec)
    buffer = io.StringIO()
    console = Console(file=buffer, width=110, force_terminal=False, color_system=None)
    complexity_table(cost, console=console)
    complexity_table(cost, console=console, blocks=True)
    return buffer.getvalue(), cost.to_dict(), cost


def _open_run(client: Any, spec: Spec, *, experiment: Optional[str], run_name: Optional[str],
              parent_run_id: Optional[str], tags: Optional[dict], output_dir: Path) -> str:
    """Create the MLflow run and record what identifies it: params, tags, spec, model table."""
    from arches import build_model

    text, cost_dict, cost = _model_report(spec)
    with torch.device("meta"):
        block_types = [b.name for _, b in build_model(spec).blocks()]
    if parent_run_id and experiment is None:   # a nested child lives in its parent's experiment
        exp_id = client.get_run(parent_run_id).info.experiment_id
    else:
        exp_id = tracking.ensure_experiment(client, experiment or tracking.experiment_name(spec), output_dir)
    run_tags = tracking.spec_tags(spec, block_types, cost.params, cost.macs)
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run_tags.update({k: str(v) for k, v in (tags or {}).items()})
    run = client.create_run(exp_id, run_name=run_name or spec.name)
    run_id = run.info.run_id
    try:
        tracking.log_params_and_tags(client, run_id, tracking.spec_params(spec), run_tags)
        client.log_text(run_id, to_yaml(spec), "spec.yaml")
        client.log_text(run_id, text, "model.txt")
        client.log_dict(run_id, cost_dict, "complexity.json")
        diff = diff_from_base(spec)
        if diff:
            client.log_dict(run_id, {k: {"base": a, "value": b} for k, (a, b) in diff.items()},
                            "diff_from_base.json")
    except BaseException as e:
        _end_run(client, run_id, "FAILED", {"failure_reason": f"recording the run failed: {type(e).__name__}: {e}"})
        raise
    return run_id


def _reopen_run(client: Any, run_id: str, spec: Spec) -> int:
    """Mark a stopped run RUNNING again; returns the last epoch it recorded."""
    run = client.get_run(run_id)
    if run.info.status == "FINISHED":
        raise ReslabError(f"run {run_id} already finished; nothing to resume", file="--resume")
    recorded = run.data.tags.get("spec_hash")
    if recorded and recorded != spec_hash(spec):
        raise ReslabError(f"the spec differs from run {run_id}'s (hash {spec_hash(spec)} vs {recorded}); "
                          f"resume without a spec file to continue the recorded one", file="--resume")
    for tag in ("failure_reason", "state"):
        if tag in run.data.tags:
            client.delete_tag(run_id, tag)
    client.set_tag(run_id, "resumed", str(int(run.data.tags.get("resumed", "0")) + 1))
    client.update_run(run_id, status="RUNNING")
    history = tracking.read_history(client, run_id, ("train/loss",))
    return max((int(r["epoch"]) for r in history), default=0)


def _finish_artifacts(client: Any, run_id: str, spec: Spec, history: list[dict],
                      checkpoint: Optional[Path]) -> None:
    """Training-curve PNG and (when given) the final checkpoint, as run artifacts."""
    with tempfile.TemporaryDirectory(prefix="reslab-") as tmp:
        if history:
            png = error_curves({spec.name: history}, Path(tmp) / "curves.png", title=f"{spec.name} ({run_id[:8]})")
            client.log_artifact(run_id, str(png))
    if checkpoint is not None and checkpoint.exists():
        client.log_artifact(run_id, str(checkpoint), "checkpoints")


def _end_run(client: Any, run_id: str, status: str, tags: dict[str, str]) -> None:
    for k, v in tags.items():
        client.set_tag(run_id, k, str(v)[: tracking.MAX_TAG_VALUE])
    client.set_terminated(run_id, status=status)


# ---- the run --------------------------------------------------------------------------------------------
def build_trainer(spec: Spec, output_dir: Union[str, Path], progress: Optional[bool] = None,
                  callbacks: Sequence[pl.Callback] = ()) -> tuple[pl.Trainer, tuple]:
    """The Trainer `train` uses, with its callbacks in order: EpochSummary, progress (rich bar or lines), the
    caller's, InterruptGuard, ModelCheckpoint (last.ckpt every epoch). Returns (trainer, (summary, guard,
    checkpoint)); the MLflow recorder is inserted after the summary by `train` on rank 0."""
    show_bar = sys.stdout.isatty() if progress is None else bool(progress)
    summary, guard = EpochSummary(), InterruptGuard()
    ckpt = ModelCheckpoint(filename="epoch{epoch}", save_top_k=0, save_last=True, every_n_epochs=1,
                           save_on_train_epoch_end=True, enable_version_counter=False,
                           auto_insert_metric_name=False)
    progress_cb = RichProgressBar() if show_bar else EpochLines(spec.train.epochs)
    try:
        with _quiet_lightning():
            trainer = pl.Trainer(**trainer_settings(spec), enable_progress_bar=show_bar,
                                 callbacks=[summary, progress_cb, *callbacks, guard, ckpt],
                                 default_root_dir=str(output_dir))
    except (MisconfigurationException, ValueError, RuntimeError) as e:   # e.g. accelerator gpu without a GPU
        first = first_line(e) or type(e).__name__
        raise ReslabError(f"cannot train with accelerator={spec.train.accelerator}, devices={spec.train.devices}, "
                          f"precision={spec.train.precision}, strategy={spec.train.strategy}: {first}",
                          path="train") from None
    return trainer, (summary, guard, ckpt)


def resume_checkpoint(run_id: str, output_dir: Union[str, Path]) -> Path:
    """<output_dir>/checkpoints/<run_id>/last.ckpt; one-line ReslabError when the run left none."""
    path = checkpoint_dir(output_dir, run_id) / LAST
    if not path.exists():
        raise ReslabError(f"no checkpoint to resume run {run_id} from: {path} does not exist (same --output-dir "
                          f"as the original run?)", file="--resume")
    return path


def train(spec: Optional[Spec], *, tracking_uri: Optional[str] = None, experiment: Optional[str] = None,
          run_name: Optional[str] = None, parent_run_id: Optional[str] = None, tags: Optional[dict] = None,
          callbacks: Sequence[pl.Callback] = (), resume: Optional[str] = None,
          output_dir: Union[str, Path] = "outputs", progress: Optional[bool] = None) -> RunResult:
    """Train `spec` and record it as one MLflow run (see the module docstring). `spec` may be None when
    resuming: the checkpoint's spec is used. `progress`: rich bar (True), one line per epoch (False), or by
    whether stdout is a terminal (None)."""
    output_dir = Path(output_dir).expanduser().resolve()
    resume_path = resume_checkpoint(resume, output_dir) if resume else None
    if resume_path is not None:
        stored = spec_of(read_checkpoint(resume_path), str(resume_path))
        if spec is None:
            spec = stored
        elif spec_hash(spec) != spec_hash(stored):
            raise ReslabError(f"the spec differs from run {resume}'s (hash {spec_hash(spec)} vs "
                              f"{spec_hash(stored)}); resume without a spec file", file="--resume")
    if spec is None:
        raise ReslabError("give a spec to train (or --resume RUN_ID)", file="spec")
    uri = tracking.with_driver(tracking_uri or tracking.default_tracking_uri(output_dir))

    pl.seed_everything(spec.train.seed, workers=True, verbose=False)
    from .data import ReslabData

    data = ReslabData(spec)
    data.prepare_data()                       # missing data: one-line error before any run is created
    module = ReslabModule(spec.model_dump(mode="json"))
    cuda = uses_cuda(spec)
    module.channels_last = cuda if spec.train.channels_last is None else bool(spec.train.channels_last)

    trainer, (summary, guard, ckpt) = build_trainer(spec, output_dir, progress, callbacks)
    rank = trainer.global_rank

    client, run_id, recorded_through, monitor = None, os.environ.get(RUN_ID_ENV) or resume or "", 0, None
    if rank == 0:
        client = tracking.client_for(uri, output_dir)
        if resume:
            run_id = resume
            recorded_through = _reopen_run(client, resume, spec)
        else:
            run_id = _open_run(client, spec, experiment=experiment, run_name=run_name,
                               parent_run_id=parent_run_id, tags=tags, output_dir=output_dir)
        recorder = tracking.MlflowRecorder(uri, run_id, recorded_through)
        trainer.callbacks.insert(trainer.callbacks.index(summary) + 1, recorder)
    ckpt.dirpath = str(checkpoint_dir(output_dir, run_id or "rank-unknown"))
    guard.path = Path(ckpt.dirpath) / LAST

    def finish(status: str, end_tags: dict, reason: Optional[str] = None,
               final: Optional[Path] = None) -> RunResult:
        """End the MLflow run (rank 0) and build the result from what it recorded."""
        history = list(module.history)
        test = dict(module.results.get("test") or {})
        if client is not None:
            try:
                history = tracking.read_history(client, run_id)
                test = {k: v for k, v in client.get_run(run_id).data.metrics.items() if k.startswith("test/")}
                _finish_artifacts(client, run_id, spec, history, final)
            finally:
                tracking.stop_system_metrics(monitor)
                _end_run(client, run_id, status, end_tags)
        metrics = {k: v for k, v in (history[-1] if history else {}).items() if k != "epoch"}
        metrics.update(test or {})
        return RunResult(run_id=run_id, status="FINISHED" if status == "FINISHED" else "FAILED",
                         metrics=metrics, history=history, checkpoint=str(final) if final else None,
                         reason=reason, rank=rank)

    try:
        if client is not None:
            monitor = tracking.start_system_metrics(run_id, uri, resume=bool(resume))
        with _quiet_lightning(), _launcher_env(run_id), _signal_handlers(guard):
            guard.fitting = True
            try:
                trainer.fit(module, datamodule=data, ckpt_path=str(resume_path) if resume_path else None)
            except (_StopRequested, SystemExit):
                if guard.signal_name is None:
                    raise
            guard.fitting = False
            if guard.signal_name is not None:
                raise _StopRequested(guard.signal_name)
            trainer.test(module, datamodule=data, verbose=False)
        final = Path(ckpt.dirpath) / LAST
        return finish("FINISHED", {"state": "FINISHED"}, final=final if final.exists() else None)
    except NonFiniteLoss as e:
        return finish("FAILED", {"failure_reason": str(e), "state": "FAILED"}, reason=str(e))
    except Pruned as e:
        finish("KILLED", {"state": "PRUNED", "pruned_reason": str(e) or "pruned"})
        raise
    except (_StopRequested, KeyboardInterrupt, SystemExit) as e:
        if isinstance(e, SystemExit) and guard.signal_name is None:
            finish("FAILED", {"failure_reason": f"SystemExit: {e.code}", "state": "FAILED"})
            raise
        name = guard.signal_name or "SIGINT"
        finish("KILLED", {"state": "INTERRUPTED", "interrupted_by": name})
        raise Interrupted(run_id, name, guard.saved, rank) from None
    except BaseException as e:
        reason = f"{type(e).__name__}: {first_line(e)}"
        finish("FAILED", {"failure_reason": reason, "state": "FAILED"}, reason=reason)
        raise
    finally:
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def summary_lines(result: RunResult, tracking_uri: str) -> list[str]:
    """What the CLI prints after a run: result, run id and how to look at it."""
    lines = []
    if "test/acc" in result.metrics:
        m = result.metrics
        lines.append(f"test accuracy {m['test/acc']:.4f}  (error {100 * m['test/error']:.2f}%, loss "
                     f"{m['test/loss']:.4f})")
    lines.append(f"run {result.run_id}  {result.status}" + (f"  checkpoint {result.checkpoint}" if result.checkpoint else ""))
    lines.append(f"see it: mlflow ui --backend-store-uri {tracking_uri}   (or: python cli.py ui)")
    return lines


def json_result(result: RunResult) -> str:
    """The RunResult as JSON (for scripts)."""
    return json.dumps({"run_id": result.run_id, "status": result.status, "metrics": result.metrics,
                       "checkpoint": result.checkpoint, "reason": result.reason}, indent=2)
