"""The MLflow record of one training run: opened (or reopened, to resume) on entry, ended on exit with the status
that the way out maps to (ENDINGS), its curves and final checkpoint kept as artifacts.

    record = RunRecord(spec, cost, options, module=module, data=data)     # options: runs.options.RunOptions
    with record.for_rank(trainer.global_rank):
        ...train: record.run_id names the run, the callbacks read it in their setup()...
    result = record.result           # RunResult, read back from what MLflow holds

On a tracking server the checkpoint written every epoch is also kept among the run's artifacts (`keep_checkpoint`),
so that any machine can resume the run. A finished run also gets its MLflow model (runs.mlflow_model.log_model:
`runs:/<run id>/model`, registered when asked); a failure to log it is noted in the tag `model_error` and never fails
the run. Only global rank 0 writes; on other ranks the record is a name (run id) and builds its result from the module.
"""
from __future__ import annotations

import copy
import io
import os
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import psutil
import torch
from rich.console import Console

from arches import Complexity, Spec, diff_from_base, spec_hash, to_yaml
from arches.errors import ReslabError, first_line
from arches.report import complexity_table

from .callbacks import Interrupted, Pruned
from .checkpoint import LAST, checkpoint_dir
from .mlflow_client import client_for
from .mlflow_model import log_model
from .mlflow_read import read_history
from .mlflow_recorder import start_system_metrics, stop_system_metrics
from .mlflow_write import (FAILURE_TAG, STATE_TAG, create_run, end_run, ensure_experiment, experiment_name,
                           log_checkpoint, log_params, set_tags, spec_params, spec_tags)
from .module import NonFiniteLoss
from .options import RunOptions
from .plots import error_curves

RUN_ID_ENV = "RESLAB_RUN_ID"   # hands the MLflow run id to DDP processes started by the launcher
HOST_TAG, PID_TAG = "reslab.host", "reslab.pid"   # the process that has the run open (a stale RUNNING run: gone)
STARTED_TAG = "reslab.pid_started"                 # ... and when it started (a pid reused later is not that process)
ENDING_TAGS = ("pruned_reason", "interrupted_by")  # said by an ending; cleared when the run is reopened
MODEL_ERROR_TAG = "model_error"  # why a finished run has no MLflow model


@dataclass
class RunResult:
    run_id: str
    status: str                                   # 'FINISHED' | 'FAILED'
    metrics: dict[str, float]                     # final: last epoch's row and the test metrics
    history: list[dict] = field(default_factory=list)  # one row per epoch (epoch numbers start at 1)
    checkpoint: Optional[str] = None              # path of the final checkpoint (on a tracking server: artifact URI)
    reason: Optional[str] = None                  # why it failed
    rank: int = 0                                 # global rank of the process that returns it
    model_uri: Optional[str] = None               # runs:/<run id>/model when the MLflow model was logged
    model_version: Optional[str] = None           # its registered version (register=NAME)
    model_error: Optional[str] = None             # why the model could not be logged or registered


@dataclass(frozen=True)
class Ending:
    """How a run ends: its MLflow status, reslab's `state` tag, the tag that says why (with what), and whether
    train() returns a FAILED result for it instead of raising."""
    status: str
    state: str
    why_tag: str = ""
    why: Callable[[BaseException], str] = lambda e: f"{type(e).__name__}: {first_line(e)}"
    returns: bool = False


FINISHED = Ending("FINISHED", "FINISHED")
# What stopped the run -> how it ends (the first matching type wins).
ENDINGS: tuple[tuple[type, Ending], ...] = (
    (NonFiniteLoss, Ending("FAILED", "FAILED", FAILURE_TAG, str, returns=True)),
    (Pruned, Ending("KILLED", "PRUNED", "pruned_reason", lambda e: str(e) or "pruned")),
    (Interrupted, Ending("KILLED", "INTERRUPTED", "interrupted_by", lambda e: e.signal_name)),
    (BaseException, Ending("FAILED", "FAILED", FAILURE_TAG)),
)


def ending_for(exc: Optional[BaseException]) -> Ending:
    if exc is None:
        return FINISHED
    return next(ending for kind, ending in ENDINGS if isinstance(exc, kind))


class RunRecord:
    """One run's MLflow record (see the module docstring), as `options` say: its store (tracking_uri and output_dir,
    resolved), names, tags, params, resume and register. `module`: where the epochs, test results and network come
    from (a ReslabModule, or a pack member's view of them); `data`: the data module (the model's input example);
    `work_folder`: where a run on a tracking server writes its checkpoints (uploaded every epoch)."""

    def __init__(self, spec: Spec, cost: Complexity, options: RunOptions, *, module: Any = None, data: Any = None,
                 work_folder: Optional[Path] = None):
        self.spec, self.cost, self.options = spec, cost, options
        self.uri, self.output_dir = options.tracking_uri, Path(options.output_dir)
        self.work_folder = work_folder
        self.rank = 0                      # global rank of this process (for_rank)
        self.client: Any = None
        self.run_id = os.environ.get(RUN_ID_ENV) or options.resume or ""
        self.recorded_through = 0          # epochs already in MLflow (a resumed run)
        self.result: Optional[RunResult] = None
        self.ended = False                 # the MLflow run was ended (rank 0)
        self._monitor: Any = None
        self._module, self._data = module, data
        self._model: dict[str, Any] = {}
        self._kept: Optional[tuple] = None  # (file, mtime, size) of the checkpoint last uploaded by keep_checkpoint
        self._artifact_uri: Optional[str] = None

    # ---- opening ---------------------------------------------------------------------------------------
    def for_rank(self, rank: int) -> "RunRecord":
        """The record, to enter in the process of global rank `rank` (known once the Trainer is built): rank 0 makes
        (or reopens) the MLflow run and writes it; the other ranks only name it."""
        self.rank = rank
        return self

    def __enter__(self) -> "RunRecord":
        if self.rank == 0:
            self.client = client_for(self.uri, self.output_dir)
            if self.options.resume:
                self.recorded_through = self._reopen()
            else:
                self.run_id = self._create()
            self._monitor = start_system_metrics(self.run_id, self.uri, resume=bool(self.options.resume))
        return self

    def __getstate__(self) -> dict:
        """What a process that DDP's spawn starts gets through the callbacks that read the record: its names, not
        the store's client or the system-metrics monitor."""
        return {**self.__dict__, "client": None, "_monitor": None}

    @property
    def checkpoint(self) -> Path:
        """Where the run's last.ckpt is written: <output_dir>/checkpoints/<run id>/, or the work folder of a run on a
        tracking server."""
        return (self.work_folder or checkpoint_dir(self.output_dir, self.run_id or "rank-unknown")) / LAST

    def keep_checkpoint(self, path: Path) -> Optional[str]:
        """On a tracking server (rank 0), upload the checkpoint just written to the run's artifacts
        (checkpoints/last.ckpt), where any machine finds it to resume the run; returns its artifact URI (None when
        not on a server). A failed upload is a note: training goes on, and a resume starts from the checkpoint
        uploaded before."""
        if self.work_folder is None or self.client is None:
            return None
        try:
            log_checkpoint(self.client, self.run_id, path)
        except Exception as e:  # noqa: BLE001
            print(f"note: could not upload run {self.run_id}'s checkpoint to {self.uri}: {first_line(e)}",
                  file=sys.stderr)
            return None
        self._kept = _stamp(path)
        return self._artifact(path)

    def _artifact(self, path: Path) -> str:
        """The artifact URI of a checkpoint kept among the run's artifacts."""
        if self._artifact_uri is None:
            self._artifact_uri = self.client.get_run(self.run_id).info.artifact_uri
        return f"{self._artifact_uri}/checkpoints/{path.name}"

    def _create(self) -> str:
        """Create the run and record what identifies it: params, tags, spec, model table."""
        client, spec, options = self.client, self.spec, self.options
        if options.parent_run_id and options.experiment is None:   # a nested child lives in its parent's experiment
            exp_id = client.get_run(options.parent_run_id).info.experiment_id
        else:
            name = options.experiment or experiment_name(spec)
            exp_id = ensure_experiment(client, name, self.output_dir, description=(
                f"reslab training runs of the {name} family (`python cli.py run SPEC`): params are the resolved "
                f"spec, metrics per epoch (step = epoch), the trained network is each run's model."))
        tags = {**spec_tags(spec, self.cost), **owner_tags(),
                **{k: str(v) for k, v in (options.tags or {}).items()}}
        run_id = create_run(client, exp_id, options.run_name or spec.name, parent_run_id=options.parent_run_id)
        try:
            log_params(client, run_id, spec_params(spec))
            if options.params:                   # what the run stands for in a study (arm, seed)
                log_params(client, run_id, options.params)
            set_tags(client, run_id, tags)
            client.log_text(run_id, to_yaml(spec), "spec.yaml")
            client.log_text(run_id, model_table(self.cost), "model.txt")
            client.log_dict(run_id, self.cost.to_dict(), "complexity.json")
            diff = diff_from_base(spec)
            if diff:
                client.log_dict(run_id, {k: {"base": a, "value": b} for k, (a, b) in diff.items()},
                                "diff_from_base.json")
        except BaseException as e:
            end_run(client, run_id, "FAILED",
                    {FAILURE_TAG: f"recording the run failed: {type(e).__name__}: {e}"})
            raise
        return run_id

    def _reopen(self) -> int:
        """Mark a stopped run RUNNING again; returns the last epoch it recorded."""
        client, run_id = self.client, self.options.resume
        run = client.get_run(run_id)
        if run.info.status == "FINISHED":
            raise ReslabError(f"run {run_id} already finished; nothing to resume", file="--resume")
        recorded = run.data.tags.get("spec_hash")
        if recorded and recorded != spec_hash(self.spec):
            raise ReslabError(f"the spec differs from run {run_id}'s (hash {spec_hash(self.spec)} vs {recorded}); "
                              f"resume without a spec file to continue the recorded one", file="--resume")
        if run.info.status == "RUNNING":
            owner = run_owner(run)
            if owner == "alive":
                raise ReslabError(f"run {run_id} is still running (process {run.data.tags.get(PID_TAG)} on this "
                                  f"machine); stop it first", file="--resume")
            print(f"note: run {run_id} was left RUNNING by process {run.data.tags.get(PID_TAG, '?')} on "
                  f"{run.data.tags.get(HOST_TAG, 'an unknown machine')}, "
                  f"{'which is gone (killed?)' if owner == 'gone' else 'which cannot be checked from here'}; "
                  f"resuming from its last checkpoint", file=sys.stderr)
        for tag in (FAILURE_TAG, STATE_TAG, *ENDING_TAGS):
            if tag in run.data.tags:
                client.delete_tag(run_id, tag)
        set_tags(client, run_id, {"resumed": int(run.data.tags.get("resumed", "0")) + 1, **owner_tags()})
        client.update_run(run_id, status="RUNNING")
        history = read_history(client, run_id, ("train/loss",))
        return max((int(r["epoch"]) for r in history), default=0)

    # ---- closing ---------------------------------------------------------------------------------------
    def __exit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> bool:
        ending = ending_for(exc)
        why = ending.why(exc) if exc is not None and ending.why_tag else None
        final = self.checkpoint if ending is FINISHED and self._module is not None and self.checkpoint.exists() \
            else None
        history = list(self._module.history) if self._module is not None else []
        test = dict((self._module.results.get("test") or {}) if self._module is not None else {})
        if self.client is not None:
            stop_system_metrics(self._monitor)
            try:
                history = read_history(self.client, self.run_id)
                test = {k: v for k, v in self.client.get_run(self.run_id).data.metrics.items()
                        if k.startswith("test/")}
                self._log_artifacts(history, final)
                if final is not None:
                    self._log_model(step=int(history[-1]["epoch"]) if history else 0)
            except Exception as e:  # noqa: BLE001  (a run that could not be trained is still ended below)
                if exc is None:
                    raise
                print(f"note: could not keep run {self.run_id}'s curves: {first_line(e)}", file=sys.stderr)
            try:
                end_run(self.client, self.run_id, ending.status,
                        {STATE_TAG: ending.state, **({ending.why_tag: why} if why else {})})
                self.ended = True
            except Exception as e:  # noqa: BLE001  (the store itself failed: say so, keep the first error)
                if exc is None:
                    raise
                print(f"note: could not mark run {self.run_id} {ending.status} in MLflow: {first_line(e)}",
                      file=sys.stderr)
        metrics = {k: v for k, v in (history[-1] if history else {}).items() if k != "epoch"}
        metrics.update(test)
        where = None
        if final is not None:
            where = self._artifact(final) if self._kept is not None and self.client is not None else str(final)
        self.result = RunResult(run_id=self.run_id, status="FINISHED" if ending is FINISHED else "FAILED",
                                metrics=metrics, history=history, checkpoint=where,
                                reason=why if ending.returns else None, rank=self.rank,
                                model_uri=self._model.get("model_uri"), model_version=self._model.get("version"),
                                model_error=self._model.get("error"))
        return ending.returns

    def _log_artifacts(self, history: list[dict], checkpoint: Optional[Path]) -> None:
        """Training-curve PNG and (when given) the final checkpoint, as run artifacts."""
        with tempfile.TemporaryDirectory(prefix="reslab-") as tmp:
            if history:
                png = error_curves({self.spec.name: history}, Path(tmp) / "curves.png",
                                   title=f"{self.spec.name} ({self.run_id[:8]})")
                self.client.log_artifact(self.run_id, str(png))
        if checkpoint is not None and _stamp(checkpoint) != self._kept:     # (not uploaded already, as it is)
            log_checkpoint(self.client, self.run_id, checkpoint)

    def _log_model(self, step: int) -> None:
        """The trained network as the run's MLflow model, the resolved spec beside it (a failure is noted)."""
        if self._module is None:
            return
        try:
            network = copy.deepcopy(self._module.model).cpu().to(memory_format=torch.contiguous_format).eval()
            example = self._data.example_input() if hasattr(self._data, "example_input") else torch.zeros(
                2, self.spec.input.channels, self.spec.input.size, self.spec.input.size)
            with tempfile.TemporaryDirectory(prefix="reslab-") as tmp:
                spec_file = Path(tmp) / "spec.yaml"
                spec_file.write_text(to_yaml(self.spec))
                self._model = log_model(
                    self.client, self.run_id, network, example, step=step,
                    files=[spec_file], register=self.options.register,
                    metadata={"reslab_spec": self.spec.name, "reslab_spec_hash": spec_hash(self.spec)})
        except Exception as e:  # noqa: BLE001  (the run's record stays whole without its model)
            self._model = {"error": f"{type(e).__name__}: {first_line(e)}"}
            set_tags(self.client, self.run_id, {MODEL_ERROR_TAG: self._model["error"]})


def _stamp(path: Path) -> tuple:
    """What tells one write of a file from another: its path, modification time and size."""
    st = path.stat()
    return str(path), st.st_mtime_ns, st.st_size


def owner_tags() -> dict[str, str]:
    """Which process has the run open: this machine's name and this process's id."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()),
            STARTED_TAG: f"{psutil.Process().create_time():.2f}"}


def run_owner(run: Any) -> str:
    """For a RUNNING run: 'alive' when its process still runs on this machine, 'gone' when it does not (the run
    is stale: killed without ending it), 'unknown' when it ran on another machine (or says nothing)."""
    host, pid = run.data.tags.get(HOST_TAG), run.data.tags.get(PID_TAG)
    if host != socket.gethostname() or not (pid or "").isascii() or not (pid or "").isdecimal():
        return "unknown"
    if int(pid) == os.getpid():                 # this very process: it is not training that run any more
        return "gone"
    tag = run.data.tags.get(STARTED_TAG)
    try:
        started = float(tag) if tag else None
    except ValueError:
        started = None                          # (an unreadable start time: any process with that pid)
    return "alive" if process_alive(int(pid), started) else "gone"


START_TOLERANCE_S = 0.5      # a process's recorded start time vs psutil's reading of it (same process: equal)


def process_alive(pid: int, started: Optional[float] = None) -> bool:
    """Whether process `pid` of this machine still runs (not a zombie) and is the one that started at `started`
    (psutil's create_time; None: any process with that pid). Another user's process counts as running."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:       # killed, not yet reaped by its parent
            return False
        return started is None or abs(process.create_time() - started) <= START_TOLERANCE_S  # (else: a later process)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
    return "alive"


def model_table(cost: Complexity) -> str:
    """The `show` tables (stages, then blocks) as plain text."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=110, force_terminal=False, color_system=None)
    complexity_table(cost, console=console)
    complexity_table(cost, console=console, blocks=True)
    return buffer.getvalue()
