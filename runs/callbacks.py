"""How a training run stops and shows progress: the interrupt guard (Ctrl-C / SIGTERM -> a clean stop at the
next batch end, with a checkpoint), the exceptions a run ends with, and one plain line per epoch."""
from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.utilities.exceptions import SIGTERMException

from .checkpoint import EpochCheckpoint

# Ctrl-C, SIGTERM, and SLURM's warning before a time limit or a preemption (submitit's USR2, sbatch --signal)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


class Pruned(Exception):
    """Raised by a callback (a search pruner) to stop a run early: the run ends KILLED, tag state=PRUNED."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run after its checkpoint was saved; resume with
    train(None, RunOptions(resume=run_id))."""

    def __init__(self, run_id: str, signal_name: str, checkpoint: Optional[str], rank: int = 0):
        super().__init__(f"{signal_name}: run {run_id} interrupted")
        self.run_id, self.signal_name, self.checkpoint, self.rank = run_id, signal_name, checkpoint, rank

    @property
    def exit_code(self) -> int:
        """128 + the signal number: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + int(getattr(signal, self.signal_name, signal.SIGINT))


class StopRequested(BaseException):
    """Raised at a batch end after Ctrl-C/SIGTERM so training stops at a clean point."""


class InterruptGuard(pl.Callback):
    """Turns Ctrl-C/SIGTERM into a clean stop at the next batch end and saves a checkpoint on the way out."""

    def __init__(self, checkpoint: EpochCheckpoint) -> None:
        self.signal_name: Optional[str] = None
        self.fitting = False
        self.checkpoint = checkpoint
        self.saved: Optional[str] = None

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.signal_name:
            raise StopRequested(self.signal_name)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.signal_name is None and isinstance(exception, SIGTERMException):
            self.signal_name = "SIGTERM"
        elif self.signal_name is None and isinstance(exception, KeyboardInterrupt):
            self.signal_name = "SIGINT"
        if self.signal_name and trainer.state.fn == "fit":
            self.save(trainer)

    def save(self, trainer: pl.Trainer) -> None:
        """Write last.ckpt from rank 0 (no barrier: other processes may be gone)."""
        path = self.checkpoint.path
        if path is None:
            return
        if self.checkpoint.saved_step == trainer.global_step and path.exists():
            self.saved = str(path)          # the epoch-end checkpoint already holds this state
            return
        if not trainer.is_global_zero or trainer.global_step == 0:
            return
        try:
            self.saved = self.checkpoint.save(trainer, collective=False)
        except Exception as e:  # noqa: BLE001  (never hide the interrupt behind a save failure)
            print(f"could not save an interrupt checkpoint: {e}", file=sys.stderr)

    @contextmanager
    def watching(self) -> Iterator[None]:
        """While training: the first Ctrl-C/SIGTERM/SIGUSR2 asks for a clean stop, a second one (or one outside fit)
        raises KeyboardInterrupt at once. Lightning's own SIGTERM handling stays in front of this one."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            first = self.signal_name is None
            if first:
                self.signal_name = signal.Signals(signum).name
            if not (first and self.fitting):
                raise KeyboardInterrupt

        old = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        for s in old:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)

    def fit(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        """trainer.fit, ending with StopRequested if a signal asked to stop (Lightning may return quietly)."""
        self.fitting = True
        try:
            trainer.fit(*args, **kwargs)
        except (StopRequested, SystemExit):
            if self.signal_name is None:
                raise
        finally:
            self.fitting = False
        if self.signal_name is not None:
            raise StopRequested(self.signal_name)

    @contextmanager
    def as_interrupted(self, run_id: str, rank: int) -> Iterator[None]:
        """A stop by signal (or a second Ctrl-C) inside the block leaves it as Interrupted, checkpoint named."""
        try:
            yield
        except (StopRequested, KeyboardInterrupt):
            raise Interrupted(run_id, self.signal_name or "SIGINT", self.saved, rank) from None
        except SystemExit:
            if self.signal_name is None:
                raise
            raise Interrupted(run_id, self.signal_name, self.saved, rank) from None


class EpochBar(RichProgressBar):
    """Lightning's rich progress bar, counting epochs from 1 as the epoch lines and MLflow steps do
    ("Epoch 1/10"), with the epoch's running training loss beside the validation metrics. The loss is read at an
    epoch's first and last batch and every LOSS_EVERY batches between: reading it makes the host wait for the GPU."""
    LOSS_EVERY = 50
    _loss: Optional[float] = None

    def _get_train_description(self, current_epoch: int) -> str:
        total = self.trainer.max_epochs
        text = f"Epoch {current_epoch + 1}" + (f"/{total}" if total is not None and total > 0 else "")
        return f"{text:{len(self.validation_description)}}" if len(self.validation_description) > len(text) else text

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        running = getattr(pl_module, "running_train_loss", None)
        progress = trainer.fit_loop.epoch_loop.batch_progress
        due = progress.current.ready % self.LOSS_EVERY == 1 or progress.is_last_batch or self._loss is None
        if running is not None and trainer.training and due:
            self._loss = running()
        return {"train loss": round(self._loss, 4), **items} if self._loss is not None else items


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
