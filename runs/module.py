"""The LightningModule that trains a compiled spec: reslab's own runs use it, and so can any Lightning Trainer.

    from arches import load_spec
    from runs import ReslabData, ReslabModule
    spec = load_spec("specs/fmnist_resnet20.yaml")
    trainer = pl.Trainer(max_epochs=spec.train.epochs, logger=CSVLogger("logs"))    # any logger, callbacks
    trainer.fit(ReslabModule(spec), datamodule=ReslabData(spec))
    trainer.test(datamodule=...)

Every metric goes through Lightning's logging under the names reslab records in MLflow: per epoch `train/loss
train/acc train/error lr images_per_s` (logged at the end of each training epoch) and `val/loss val/acc val/error`
(at the end of each validation), then `test/loss test/acc test/error`. Accuracy and error are exact ratios of
counts (correct / seen, float64), synced across DDP processes; `module.history` keeps one row per epoch (epochs
counted from 1), which is what reslab's MLflow recorder, epoch lines and pruners read.

Hyperparameters are plain data (the spec as a JSON-style dict), so checkpoints load with
`torch.load(path, weights_only=True)`; `ReslabModule(spec)` takes a validated Spec (or that dict).
"""
from __future__ import annotations

import math
import time
from typing import Any, Optional, Union

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MeanMetric, Metric

from arches import Spec, build_model, spec_from_dict
from arches.init import Resolve
from arches.plan import NetworkPlan

from .checkpoint import init_checkpoint
from .recipe import build_optimizer, build_scheduler

SPLITS = ("train", "val", "test")
# How often a CUDA run reads its device-side "loss was non-finite" flag (CPU runs check every step;
# reading on CUDA forces a sync, and a non-finite step is still caught, at most this many steps late).
NONFINITE_CHECK_EVERY_CUDA = 20


def compile_mode(setting: Any) -> Optional[str]:
    """train.compile as a torch.compile mode: None = eager, true = "default"."""
    if setting is False or setting is None:
        return None
    return "default" if setting is True else str(setting)


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


class CorrectCount(Metric):
    """Correct top-1 predictions and images seen, as integer counts (summed across DDP processes): accuracy and
    error are then exact ratios, computed in float64 (a float32 accuracy shows as 0.81599999)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("seen", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        self.correct += (predictions == labels).sum()
        self.seen += labels.numel()

    def compute(self) -> torch.Tensor:
        return torch.stack((self.correct, self.seen))


def _as_logged(value: float) -> torch.Tensor:
    """A value for Lightning's self.log as a float64 tensor (a Python float would become float32)."""
    return torch.tensor(value, dtype=torch.float64)


class ReslabModule(pl.LightningModule):
    """Cross-entropy training of `build_model(spec)` with the spec's optimizer, schedule and metrics."""

    def __init__(self, spec: Union[Spec, dict], plan: Optional[NetworkPlan] = None,
                 resolve: Optional[Resolve] = None, channels_last: bool = False):
        """`resolve`: turns `init_from: RUN_ID` into that run's checkpoint (default: runs.checkpoint.init_checkpoint,
        $MLFLOW_TRACKING_URI else outputs/mlflow.db; a command passes its own store). `channels_last`: weights and
        inputs in channels-last memory format (runs.fit.uses_channels_last: GPU runs)."""
        super().__init__()
        self.spec: Spec = spec if isinstance(spec, Spec) else spec_from_dict(spec)
        self.save_hyperparameters({"spec": self.spec.model_dump(mode="json") if isinstance(spec, Spec) else spec})
        self.model = build_model(self.spec, plan, init=True, resolve=resolve or init_checkpoint)   # init_from's weights, if any
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.spec.train.label_smoothing)
        # ModuleDict keys cannot be 'train' (an nn.Module method): keys are 'train_', 'val_', 'test_'
        # nan_strategy="disable": MeanMetric's NaN check reads the tensor on the host, a GPU sync every step
        # (a NaN loss is caught by _watch_loss instead)
        self.metric_loss = nn.ModuleDict({f"{s}_": MeanMetric(nan_strategy="disable") for s in SPLITS})
        self.metric_acc = nn.ModuleDict({f"{s}_": CorrectCount() for s in SPLITS})
        for metric in [*self.metric_loss.values(), *self.metric_acc.values()]:
            metric.persistent(True)      # in checkpoints: an epoch resumed part-way keeps what it had summed
        self.channels_last = channels_last
        self.compile_mode = compile_mode(self.spec.train.compile)   # None: eager
        self.results: dict[str, dict[str, float]] = {}  # split -> last computed metrics
        self.history: list[dict[str, float]] = []        # one row per epoch (close_epoch)
        self._compiled: Optional[Any] = None  # torch.compile(self.model), kept out of the submodules
        self._nonfinite = torch.zeros((), dtype=torch.bool)
        self._nonfinite_step = torch.full((), -1, dtype=torch.long)
        self._t0 = self._train_time = 0.0          # the epoch's training time (validation excluded),
        self._images, self._lr = 0, math.nan       # images seen by this process and the last learning rate
        self._val_epoch = -1                       # the last epoch whose validation ran

    # ---- model ----------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.compile_mode is not None and self._compiled is None:   # not a submodule: state_dict keys stay put
            object.__setattr__(self, "_compiled", torch.compile(self.model, mode=self.compile_mode))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        model = self.model if self._compiled is None else self._compiled   # (an OptimizedModule has no truth value)
        return model(images)

    def configure_optimizers(self) -> Any:
        train = self.spec.train
        optimizer = build_optimizer(self.model, train)
        steps_per_epoch = max(1, int(_batches_per_epoch(self.trainer)))
        scheduler = build_scheduler(optimizer, train, steps_per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- steps ----------------------------------------------------------------------------------------
    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = self.criterion(logits, labels)
        detached = loss.detach()
        # the weight as a device tensor: a Python number would be copied to the GPU, a sync every step
        self.metric_loss[f"{split}_"].update(detached, weight=detached.new_full((), labels.shape[0]))
        self.metric_acc[f"{split}_"].update(logits.detach().argmax(1), labels)
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        self._watch_loss(loss.detach(), batch_idx)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    # ---- non-finite loss guard ------------------------------------------------------------------------
    def _watch_loss(self, loss: torch.Tensor, batch_idx: int) -> None:
        """Note a non-finite loss on the device (no sync); raise NonFiniteLoss when a check finds one."""
        if self._nonfinite.device != loss.device:
            self._nonfinite = self._nonfinite.to(loss.device)
            self._nonfinite_step = self._nonfinite_step.to(loss.device)
        bad = ~torch.isfinite(loss)
        self._nonfinite_step = torch.where(bad & ~self._nonfinite, self.global_step, self._nonfinite_step)
        self._nonfinite |= bad
        every = NONFINITE_CHECK_EVERY_CUDA if loss.device.type == "cuda" else 1
        last = batch_idx + 1 >= self.trainer.num_training_batches
        if (batch_idx + 1) % every == 0 or last:
            self.check_loss_finite(loss)

    def check_loss_finite(self, loss: Optional[torch.Tensor] = None) -> None:
        """Raise NonFiniteLoss (on every rank) if any step so far had a NaN/inf loss."""
        flag = self._nonfinite
        if self.trainer.world_size > 1:
            flag = torch.as_tensor(self.trainer.strategy.reduce_boolean_decision(bool(flag), all=False))
        if bool(flag):
            step = int(self._nonfinite_step)
            what = "nan" if loss is not None and torch.isnan(loss).any() else "non-finite"
            where = f"step {step}" if step >= 0 else "another process"
            raise NonFiniteLoss(f"training loss became {what} at {where} (epoch {self.current_epoch}); "
                                f"lower train.lr or check the data")

    # ---- epoch results --------------------------------------------------------------------------------
    def collect(self, split: str) -> dict[str, float]:
        """Compute (synced across processes) and reset one split's loss, accuracy and error."""
        loss_metric, acc_metric = self.metric_loss[f"{split}_"], self.metric_acc[f"{split}_"]
        correct, seen = (int(v) for v in acc_metric.compute())
        loss = float(loss_metric.compute()) if seen else math.nan
        loss_metric.reset()
        acc_metric.reset()
        acc, error = (correct / seen, (seen - correct) / seen) if seen else (math.nan, math.nan)
        result = {f"{split}/loss": loss, f"{split}/acc": acc, f"{split}/error": error}
        self.results[split] = result
        return result

    def running_train_loss(self) -> Optional[float]:
        """The mean training loss of the epoch so far (this process), or None before the first step."""
        metric = self.metric_loss["train_"]
        weight = float(metric.weight)
        return float(metric.mean_value) / weight if weight > 0 else None

    def log_metrics(self, values: dict[str, float], prog_bar: bool = False) -> None:
        """Through Lightning's logging (every logger the Trainer has, callback_metrics, the progress bar)."""
        self.log_dict({k: _as_logged(v) for k, v in values.items()}, prog_bar=prog_bar, on_step=False,
                      on_epoch=True)

    def on_train_epoch_start(self) -> None:
        self._t0, self._train_time, self._images = time.perf_counter(), 0.0, 0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not self._t0:   # also when a run resumes mid-epoch (no on_train_epoch_start then)
            self._t0 = time.perf_counter()
        self._lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self._images += int(batch[1].shape[0])

    def on_validation_start(self) -> None:
        if self.trainer.training and self._t0:
            self._train_time += time.perf_counter() - self._t0
            self._t0 = 0.0

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self.metric_loss["val_"].reset()
            self.metric_acc["val_"].reset()
            return
        self._val_epoch = self.current_epoch
        self.log_metrics(self.collect("val"), prog_bar=True)

    def on_train_epoch_end(self) -> None:
        self.close_epoch()

    def close_epoch(self) -> dict[str, float]:
        """The epoch's row (train metrics, the epoch's validation, lr, images/s), appended to `history` and logged;
        once per epoch (reslab's EpochSummary calls it before the callbacks that read the row)."""
        trainer, epoch = self.trainer, self.current_epoch + 1
        if self.history and self.history[-1]["epoch"] == epoch:
            return self.history[-1]
        if self._t0:
            self._train_time += time.perf_counter() - self._t0
            self._t0 = 0.0
        self.check_loss_finite()
        row: dict[str, float] = {"epoch": epoch}
        row.update(self.collect("train"))
        if self._val_epoch == self.current_epoch and "val" in self.results:
            row.update(self.results["val"])
        row["lr"] = float(self._lr)
        images = self._images * trainer.world_size
        row["images_per_s"] = images / self._train_time if self._train_time > 0 else math.nan
        self._images, self._train_time = 0, 0.0
        self.history.append(row)
        self.log_metrics({k: v for k, v in row.items() if k != "epoch" and not k.startswith("val/")})
        return row

    def on_test_epoch_end(self) -> None:
        self.log_metrics(self.collect("test"))


class EpochSummary(pl.Callback):
    """reslab's first callback: closes each training epoch into its row (ReslabModule.close_epoch) before the
    callbacks after it (the MLflow recorder, epoch lines, pruners) read `module.history[-1]`. (Lightning calls the
    callbacks' on_train_epoch_end before the module's own.)"""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.close_epoch()  # type: ignore[operator]


def _batches_per_epoch(trainer: pl.Trainer) -> float:
    """Optimizer steps in one epoch: the data module's batches (it is set up before the optimizers), cut by
    limit_batches as Lightning will. Lightning's own count would set up its train loader now, before a checkpoint
    is restored, and a run resumed mid-epoch would then go on with a loader made for epoch 0; it is asked only
    for data that does not say its steps_per_epoch."""
    batches = getattr(trainer.datamodule, "steps_per_epoch", 0)
    if not batches:
        trainer.estimated_stepping_batches  # noqa: B018  (sets up the train data, counts batches)
        if math.isfinite(trainer.num_training_batches):
            return trainer.num_training_batches
        batches = 1
    limit = trainer.limit_train_batches              # a count (int) or a fraction (float), as Lightning takes it
    return min(batches, limit) if isinstance(limit, int) else max(1, int(batches * limit))
