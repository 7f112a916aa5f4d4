"""The training recipe of a spec: optimizer with weight-decay groups, and one per-step learning-rate schedule.

Every schedule is a factor on the spec's lr as a function of the optimizer step (0 = the first update), used by
a LambdaLR stepped after every optimizer step, so milestones given in epochs or in iterations work alike:

    He et al. 2015 CIFAR: lr 0.1, /10 at 32k and 48k iterations  -> schedule {type: multistep,
                          milestones: [32000, 48000], unit: step}
    ResNet-110 warmup:   lr/10 for 400 iterations, then 0.1     -> warmup {steps: 400, start_factor: 0.1,
                          mode: constant}
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from arches.registry import OPTIMIZERS, SCHEDULES
from arches.schema import TrainSpec

# torch.optim.lr_scheduler.OneCycleLR's defaults: start at lr/25, peak at pct_start, end at lr/25/1e4.
ONECYCLE_PCT_START = 0.3
ONECYCLE_DIV = 25.0
ONECYCLE_FINAL_DIV = 1e4


def total_steps(train: TrainSpec, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole run: epochs x steps per epoch, capped by max_steps."""
    candidates = []
    if train.epochs is not None:
        candidates.append(train.epochs * steps_per_epoch)
    if train.max_steps is not None:
        candidates.append(train.max_steps)
    return max(1, min(candidates))


@dataclass
class LrSchedule:
    """lr factor at optimizer step k: warmup(k) x schedule(k). Plain fields only (it is saved in checkpoints)."""
    type: str                      # constant | multistep | cosine | onecycle
    total: int                     # optimizer steps of the whole run
    milestones: list = field(default_factory=list)  # multistep: steps at which the factor is multiplied by gamma
    gamma: float = 0.1
    floor: float = 0.0             # cosine: min_lr / lr
    warmup_steps: int = 0
    start_factor: float = 0.1
    warmup_mode: str = "linear"    # linear ramp from start_factor to 1, or constant start_factor (He 2015)

    def __call__(self, step: int) -> float:
        return self.warmup(step) * self.schedule(step)

    def warmup(self, step: int) -> float:
        """Warmup factor: < 1 during the first `warmup_steps` steps, then 1."""
        if step >= self.warmup_steps:
            return 1.0
        if self.warmup_mode == "constant":
            return self.start_factor
        return self.start_factor + (1.0 - self.start_factor) * step / self.warmup_steps

    def schedule(self, step: int) -> float:
        """Schedule factor without warmup."""
        return SCHEDULES.lookup(self.type).factor(self, step)


# ---- schedules (train.schedule.type): the lr factor at a step, warmup aside ----
@SCHEDULES.register("constant")
class Constant:
    @staticmethod
    def factor(s: LrSchedule, step: int) -> float:
        """1 throughout."""
        return 1.0


@SCHEDULES.register("multistep")
class MultiStep:
    @staticmethod
    def factor(s: LrSchedule, step: int) -> float:
        """gamma to the number of milestones passed."""
        return s.gamma ** sum(step >= m for m in s.milestones)


@SCHEDULES.register("cosine")
class Cosine:
    @staticmethod
    def factor(s: LrSchedule, step: int) -> float:
        """A half cosine from 1 down to the floor at the run's last step."""
        t = min(step, s.total) / s.total
        return s.floor + (1.0 - s.floor) * 0.5 * (1.0 + math.cos(math.pi * t))


@SCHEDULES.register("onecycle")
class OneCycle:
    @staticmethod
    def factor(s: LrSchedule, step: int) -> float:
        """torch's OneCycleLR (cosine, two phases, no momentum cycling) as a factor of the peak lr."""
        start, peak = 1.0 / ONECYCLE_DIV, 1.0
        end = start / ONECYCLE_FINAL_DIV
        up_end = ONECYCLE_PCT_START * s.total - 1
        if step <= up_end:
            a, b, pct = start, peak, step / up_end if up_end > 0 else 1.0
        else:
            a, b, pct = peak, end, (step - up_end) / max(s.total - 1 - up_end, 1e-12)
        pct = min(pct, 1.0)
        return b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1.0)


def lr_schedule(train: TrainSpec, steps_per_epoch: int) -> LrSchedule:
    """The spec's schedule and warmup as one step-indexed factor (epoch milestones converted to steps)."""
    sched = train.schedule
    per = steps_per_epoch if sched.unit == "epoch" else 1
    return LrSchedule(type=sched.type, total=total_steps(train, steps_per_epoch),
                      milestones=[int(m) * per for m in sched.milestones], gamma=float(sched.gamma),
                      floor=float(sched.min_lr / train.lr), warmup_steps=int(train.warmup.steps),
                      start_factor=float(train.warmup.start_factor), warmup_mode=train.warmup.mode)


def param_groups(model: nn.Module, weight_decay: float, decay_bn_and_bias: bool) -> list[dict]:
    """Parameter groups: with decay_bn_and_bias false, 1-d parameters (BN scales/shifts, biases, gate scalars)
    get no weight decay."""
    if decay_bn_and_bias or weight_decay == 0:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---- optimizers (train.optimizer) ----
@OPTIMIZERS.register("sgd")
class SGD:
    @staticmethod
    def build(groups: list[dict], train: TrainSpec) -> torch.optim.Optimizer:
        """SGD with the spec's momentum (nesterov only with momentum)."""
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum,
                               nesterov=train.nesterov and train.momentum > 0)


@OPTIMIZERS.register("adamw")
class AdamW:
    @staticmethod
    def build(groups: list[dict], train: TrainSpec) -> torch.optim.Optimizer:
        """AdamW at the spec's lr (its weight decay per group)."""
        return torch.optim.AdamW(groups, lr=train.lr)


def build_optimizer(model: nn.Module, train: TrainSpec) -> torch.optim.Optimizer:
    """The spec's optimizer with its lr and weight-decay groups."""
    groups = param_groups(model, train.weight_decay, train.decay_bn_and_bias)
    return OPTIMIZERS.lookup(train.optimizer).build(groups, train)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainSpec,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR to be stepped after every optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(train, steps_per_epoch))
