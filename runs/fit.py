"""One spec, one run: train with the PyTorch Lightning Trainer, record everything in one MLflow run.

    result = train(load_spec("specs/fmnist_resnet20.yaml"))      # or train(spec, RunOptions(output_dir=..., ...))
    result.run_id, result.status, result.metrics["test/acc"], result.history  # one row per epoch

Only global rank 0 talks to MLflow; under DDP (`devices: 2`) every process trains and the metrics cover the
whole data set. A NaN/inf loss ends the run FAILED (returned, not raised); Ctrl-C or SIGTERM saves a checkpoint,
ends the run KILLED and raises `Interrupted`; `train(None, RunOptions(resume=run_id))` continues it in the same
MLflow run. How each way out ends the MLflow run is the table runs.record.ENDINGS.

Several nodes (`num_nodes: M`, launched on every node by torchrun, SLURM's srun, or with the variables Lightning reads:
MASTER_ADDR, MASTER_PORT, NODE_RANK) make one MLflow run too: global rank 0 creates it. On a tracking server
(`tracking_uri="http://..."`) the checkpoint is written to a temporary folder and uploaded to the run's artifacts every
epoch; `resume=run_id` downloads it from there, so a run continues on any machine.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from arches import Spec, complexity, plan_network, spec_hash
from arches.errors import ReslabError, first_line

from .callbacks import EpochBar, EpochLines, InterruptGuard, Interrupted, Pruned, epoch_line  # noqa: F401  (the API)
from .checkpoint import (LAST, EpochCheckpoint, InitCheckpoint, checkpoint_dir, fetch_checkpoint, read_checkpoint,
                         spec_of)
from .data import ReslabData
from .environment import environment
from .mlflow_client import client_for, default_tracking_uri, remote_artifacts, with_driver
from .mlflow_recorder import MlflowRecorder
from .module import EpochSummary, ReslabModule
from .options import RunOptions
from .pack import MEMBER_OF
from .quiet import quiet
from .record import RUN_ID_ENV, RunRecord, RunResult
from .stores import disk_problem

CHECKPOINT_ENV = "RESLAB_CHECKPOINT"   # the checkpoint a resumed run starts from, for the DDP processes it launches
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", RUN_ID_ENV, CHECKPOINT_ENV)


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
        enable_checkpointing=False,          # reslab's EpochCheckpoint keeps last.ckpt; no second copy in output_dir
        enable_model_summary=False, use_distributed_sampler=False, benchmark=cuda if cuda else None,
        log_every_n_steps=50,
    )


def uses_channels_last(spec: Spec) -> bool:
    """train.channels_last; unset: on for CUDA runs."""
    last = spec.train.channels_last
    return uses_cuda(spec) if last is None else bool(last)


def build_trainer(spec: Spec, record: RunRecord, guard: InterruptGuard, options: RunOptions) -> pl.Trainer:
    """The Trainer `train` uses, with its callbacks in order: EpochSummary (closes each epoch's row), the MLflow
    recorder (writes the row to the record's run, on rank 0), progress (rich bar or one line per epoch), the
    caller's (options.callbacks), the interrupt guard and its EpochCheckpoint (last.ckpt every epoch)."""
    show_bar = sys.stdout.isatty() if options.progress is None else bool(options.progress)
    progress = EpochBar() if show_bar else EpochLines(spec.train.epochs)
    callbacks = [EpochSummary(), MlflowRecorder(record), progress, *options.callbacks, guard, guard.checkpoint]
    try:
        with quiet():
            trainer = pl.Trainer(**trainer_settings(spec), enable_progress_bar=show_bar, callbacks=callbacks,
                                 default_root_dir=str(options.output_dir))
    except (MisconfigurationException, ValueError, RuntimeError) as e:   # e.g. accelerator gpu without a GPU
        first = first_line(e) or type(e).__name__
        raise ReslabError(f"cannot train with accelerator={spec.train.accelerator}, devices={spec.train.devices}, "
                          f"precision={spec.train.precision}, strategy={spec.train.strategy}: {first}",
                          path="train") from None
    _check_launched(trainer, spec)
    return trainer


def _check_launched(trainer: pl.Trainer, spec: Spec) -> None:
    """Several nodes need a launcher on every node (torchrun, srun, or MASTER_ADDR/MASTER_PORT/NODE_RANK set by
    hand); without one, node 0 would wait for the others until DDP's timeout (half an hour): one line instead."""
    from lightning_fabric.plugins.environments import LightningEnvironment

    if spec.train.num_nodes == 1 or not isinstance(getattr(trainer.strategy, "cluster_environment", None),
                                                   LightningEnvironment):
        return                                   # (torchrun, SLURM, LSF, Kubeflow: their own environment)
    if not {"MASTER_ADDR", "NODE_RANK"} & set(os.environ):
        n = spec.train.num_nodes
        raise ReslabError(f"{n} nodes, but no launcher started this process: run the same command on each node "
                          f"under torchrun (--nnodes {n} --node-rank R --master-addr HOST --master-port PORT) or "
                          f"srun, or with MASTER_ADDR, MASTER_PORT and NODE_RANK set", path="train.num_nodes")


def _launcher_env(run_id: str, checkpoint: Optional[Path] = None):
    """Give DDP processes started by Lightning the run id (and the checkpoint it resumes from); undo the variables
    its launcher sets, so that a later run in this process starts its own processes again."""
    given = {RUN_ID_ENV: run_id, CHECKPOINT_ENV: str(checkpoint) if checkpoint is not None else ""}
    return environment({k: v for k, v in given.items() if v}, restore=LAUNCHER_ENV)


@contextmanager
def _threads(count: Optional[int]) -> Iterator[None]:
    """torch's CPU threads set to `count` for the run (restored after); None leaves them as they are."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _work_folder(remote: bool) -> Iterator[Optional[Path]]:
    """A temporary folder for the checkpoints of a run kept on a tracking server (removed after), else None."""
    if not remote:
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="reslab-run-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def resume_checkpoint(run_id: str, output_dir: Union[str, Path], tracking_uri: Optional[str] = None,
                      folder: Optional[Path] = None) -> Path:
    """The checkpoint to resume run `run_id` from: the one the launching process named (a DDP process of a resumed
    run), <output_dir>/checkpoints/<run_id>/last.ckpt, or, on a tracking server, the run's artifact
    checkpoints/last.ckpt downloaded into `folder`. One-line ReslabError when the run left none."""
    named = os.environ.get(CHECKPOINT_ENV)
    if named and os.environ.get(RUN_ID_ENV) == run_id and Path(named).is_file():
        return Path(named)
    path = checkpoint_dir(output_dir, run_id) / LAST
    if path.exists():
        return path
    if tracking_uri and remote_artifacts(tracking_uri):
        client = client_for(tracking_uri, output_dir)
        fetched = fetch_checkpoint(client, run_id, (folder or Path(tempfile.mkdtemp(prefix="reslab-"))) / "resume")
        if fetched is not None:
            return fetched
        raise ReslabError(f"no checkpoint to resume run {run_id} from: neither {path} nor the artifact "
                          f"checkpoints/last.ckpt of the run in {tracking_uri} exists", file="--resume")
    raise ReslabError(f"no checkpoint to resume run {run_id} from: {path} does not exist (same --output-dir "
                      f"as the original run?)", file="--resume")


def _resumed_spec(spec: Optional[Spec], checkpoint: Optional[Path], run_id: Optional[str]) -> Spec:
    """The spec to train: the given one, or the checkpoint's when resuming (they must agree)."""
    if checkpoint is not None:
        state = read_checkpoint(checkpoint)
        if MEMBER_OF in state:
            raise ReslabError(f"run {run_id} trained in a pack; it resumes with its pack (runs.pack.Pack.load"
                              f"('{state[MEMBER_OF]}')): a study's pack by running the study again (python cli.py "
                              f"ablate|search FILE)", file="--resume")
        stored = spec_of(state, str(checkpoint))
        if spec is not None and spec_hash(spec) != spec_hash(stored):
            raise ReslabError(f"the spec differs from run {run_id}'s (hash {spec_hash(spec)} vs "
                              f"{spec_hash(stored)}); resume without a spec file", file="--resume")
        spec = spec or stored
    if spec is None:
        raise ReslabError("give a spec to train (or --resume RUN_ID)", file="spec")
    return spec


# ---- the run --------------------------------------------------------------------------------------------
def train(spec: Optional[Spec], options: RunOptions = RunOptions()) -> RunResult:
    """Train `spec` and record it as one MLflow run, as `options` say (see the module docstring and
    runs.options.RunOptions). `spec` may be None when resuming: the checkpoint's spec is used."""
    output_dir = Path(options.output_dir).expanduser().resolve()
    uri = with_driver(options.tracking_uri or default_tracking_uri(output_dir))
    options = replace(options, tracking_uri=uri, output_dir=output_dir)
    with _work_folder(remote_artifacts(uri)) as work:     # (a run on a tracking server: its checkpoints)
        checkpoint = resume_checkpoint(options.resume, output_dir, uri, work) if options.resume else None
        spec = _resumed_spec(spec, checkpoint, options.resume)
        plan = plan_network(spec)                      # once: the module and the complexity share it
        cost = options.cost or complexity(spec, plan=plan)

        with quiet(), _threads(spec.train.threads):
            pl.seed_everything(spec.train.seed, workers=True, verbose=False)
            data = options.data or ReslabData(spec)
            data.prepare_data()
            if hasattr(data, "check"):
                data.check()                      # missing or corrupt data: one line, before any run is created
            module = ReslabModule(spec, plan, resolve=InitCheckpoint(uri, output_dir),   # init_from: RUN_ID here
                                  channels_last=uses_channels_last(spec))
            record = RunRecord(spec, cost, options, module=module, data=data, work_folder=work)
            guard = InterruptGuard(EpochCheckpoint(record))
            trainer = build_trainer(spec, record, guard, options)
            try:
                with record.for_rank(trainer.global_rank), _launcher_env(record.run_id, checkpoint), \
                        guard.watching():
                    with guard.as_interrupted(record.run_id, trainer.global_rank):
                        guard.fit(trainer, module, datamodule=data,
                                  ckpt_path=str(checkpoint) if checkpoint else None)
                        trainer.test(module, datamodule=data, verbose=False)
            except Exception as e:
                problem = disk_problem(e)   # a full or read-only disk: the run was ended FAILED above, if it could be
                if problem is None:
                    raise
                marked = "marked FAILED" if record.ended else "could not be marked FAILED (its store failed too)"
                raise ReslabError(f"{problem}; run {record.run_id} {marked}; its last complete checkpoint is kept",
                                  file=str(output_dir)) from None
            finally:
                if trainer.world_size > 1 and torch.distributed.is_available() and \
                        torch.distributed.is_initialized():
                    torch.distributed.destroy_process_group()
        return record.result


def summary_lines(result: RunResult, tracking_uri: str, output_dir: Optional[Union[str, Path]] = None) -> list[str]:
    """What the CLI prints after a run: result, run id and how to look at it (the store of `output_dir`)."""
    from .hints import program, ui_hint

    lines = []
    if "test/acc" in result.metrics:
        m = {k: result.metrics.get(k, float("nan")) for k in ("test/acc", "test/error", "test/loss")}
        lines.append(f"test accuracy {m['test/acc']:.4f}  (error {100 * m['test/error']:.2f}%, loss "
                     f"{m['test/loss']:.4f})")
    lines.append(f"run {result.run_id}  {result.status}" + (f"  checkpoint {result.checkpoint}" if result.checkpoint else ""))
    if result.model_uri:
        lines.append(f"model {result.model_uri}" + (f"  (registered version {result.model_version})"
                                                     if result.model_version else "") +
                     f"   (mlflow.pytorch.load_model; export: {program()} export RUN_ID --format torch.export)")
    elif result.model_error:
        lines.append(f"no MLflow model: {result.model_error}")
    lines.append(ui_hint(tracking_uri, output_dir))
    return lines

