"""Packs: P trials of one network trained together as one vmapped model (torch.func), each member as it trains alone.

    pack = Pack([spec_a, spec_b, spec_c])          # same network and batch size; seeds, lr, decay, ... may differ
    pack.fit()                                     # every member to its own last epoch (or pruned, or FAILED)
    pack.finished[0].history                       # one row per epoch, as runs.fit records a solo run
    pack.member_checkpoint(0)                      # a solo-format checkpoint: load_model, init_from, export read it

The members' weights are stacked (`torch.func.stack_module_state`) and the network is called once per step for all
of them (`vmap(functional_call)`: a conv becomes one grouped conv; BatchNorm, in training mode, updates each
member's own slice of the stacked running statistics, so eval results are each member's own). Each member starts
from the weights `build_model` gives its spec alone (seed-by-layer-name init, or its `init_from`), draws its own
split, order and augmentation from its own data module (runs.data.ReslabData, as a solo run does), has its own loss
(label smoothing a [P] tensor) and is stepped by StackedOptimizer, torch's SGD / AdamW update written on stacked
tensors with [P] hyperparameters and each member's own schedule (runs.recipe.LrSchedule).

A member whose loss goes non-finite is frozen at once (its update and its loss masked on the device, no host sync)
and leaves FAILED at the epoch's end; a member pruned or past its last epoch leaves at the epoch's end and the
stacked tensors are rebuilt without it, so its compute stops. `save`/`Pack.load` write and read the whole pack
atomically at an epoch boundary; a resumed pack goes on exactly as one never stopped.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from arches import Spec, build_model, plan_network, spec_from_dict
from arches.errors import ReslabError
from arches.layers import DropPath

from .checkpoint import init_checkpoint, write_atomically
from .data import ReslabData
from .datasets import DATA_SETS
from .recipe import LrSchedule, lr_schedule

# Settings the members of one pack may differ in (dotted spec paths), and why each fuses; every other setting is
# the pack's key (runs.pack.fusible_key): the network (every layer shape), batch size, data, optimizer kind,
# max_steps, precision, devices, threads, val_every, limit_batches, compile.
FUSIBLE: dict[str, str] = {
    "name": "a record's name only",
    "family": "a record's experiment only",
    "description": "a record's text only",
    "init_from": "each member loads its own weights before they are stacked (same shapes)",
    "init_strict": "idem",
    "init_map": "idem",
    "train.seed": "each member's own init, split, order and augmentation (its own data module)",
    "train.lr": "a [P] tensor in the stacked optimizer",
    "train.momentum": "idem (SGD)",
    "train.nesterov": "idem (SGD)",
    "train.weight_decay": "idem",
    "train.decay_bn_and_bias": "a per-member mask on each parameter's decay",
    "train.schedule": "each member's own LrSchedule, read on the host every step",
    "train.warmup": "idem",
    "train.label_smoothing": "a [P] tensor in the loss",
    "train.epochs": "a member leaves the pack after its last epoch",
}
ADAMW_BETAS, ADAMW_EPS = (0.9, 0.999), 1e-8          # torch.optim.AdamW's defaults, which runs.recipe uses
# train.optimizer -> the state tensors StackedOptimizer keeps per parameter, and its update method; an optimizer
# registered in runs.recipe but missing here does not pack
STACKED_UPDATES: dict[str, tuple[tuple[str, ...], str]] = {
    "sgd": (("momentum_buffer",), "_sgd"),
    "adamw": (("exp_avg", "exp_avg_sq"), "_adamw"),
}
PACK_FORMAT = 1                                        # version of the pack checkpoint's layout
MEMBER_OF = "reslab_pack"   # in a member's checkpoint: its pack's checkpoint file (a member resumes with its pack)


class PackError(ReslabError):
    """These specs cannot train as one pack (one line: which setting, which member)."""


# ---- which specs pack ------------------------------------------------------------------------------------------
def _drop_path(tree: dict, dotted: str) -> None:
    *head, last = dotted.split(".")
    for key in head:
        tree = tree.get(key, {})
    tree.pop(last, None)


def fusible_key(spec: Spec) -> str:
    """The spec minus its fusible settings, as canonical JSON: specs with equal keys can share a pack."""
    tree = spec.model_dump(mode="json")
    for dotted in FUSIBLE:
        _drop_path(tree, dotted)
    return json.dumps(tree, sort_keys=True, separators=(",", ":"))


def _random_layers(net: nn.Module) -> Optional[str]:
    """The first layer that draws random numbers in training (a solo run draws them from torch's global stream, which
    no pack member can reproduce), or None."""
    from arches.blocks.merges import ShortcutDropout

    for name, module in net.named_modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            return f"{name or 'network'} is a dropout (block.dropout / head.dropout > 0)"
        if isinstance(module, DropPath) and module.p > 0:
            return f"{name} drops paths (drop_path.rate > 0)"
        if isinstance(getattr(module, "merge", None), ShortcutDropout) and module.cfg.shortcut_dropout > 0:
            return f"{name} drops its shortcut (variant: dropout)"
    return None


# Settings that keep a spec out of any pack: (what, test on the spec -> reason or None).
UNPACKABLE: tuple[tuple[str, Callable[[Spec], Optional[str]]], ...] = (
    ("train.optimizer", lambda s: None if s.train.optimizer in STACKED_UPDATES else
     f"{s.train.optimizer} has no stacked update (packs step: {', '.join(STACKED_UPDATES)})"),
    ("train.devices", lambda s: "a pack trains on one device" if s.train.devices not in (1,) or
     s.train.num_nodes != 1 else None),
    ("data.name", lambda s: None if DATA_SETS[s.data.name].in_memory else
     f"data set {s.data.name} is not held in memory (packs batch in-memory sets)"),
    ("train.precision", lambda s: "16-mixed needs a gradient scaler, which packs do not have (use bf16-mixed or 32)"
     if s.train.precision == "16-mixed" else None),
)


def unpackable(spec: Spec, net: Optional[nn.Module] = None) -> Optional[str]:
    """Why `spec` cannot be a pack member ('key: reason'), or None."""
    for path, test in UNPACKABLE:
        why = test(spec)
        if why:
            return f"{path}: {why}"
    why = _random_layers(net if net is not None else _meta_model(spec))
    return f"network: {why}" if why else None


def _meta_model(spec: Spec) -> nn.Module:
    with torch.device("meta"):
        return build_model(spec)


def check_pack(specs: Sequence[Spec]) -> None:
    """PackError unless every spec can be a member and all share one fusible key."""
    if not specs:
        raise PackError("a pack needs at least one member", path="pack")
    for i, spec in enumerate(specs):
        why = unpackable(spec)
        if why:
            raise PackError(f"member {i} ({spec.name}, seed {spec.train.seed}) cannot pack: {why}", path="pack")
    first = json.loads(fusible_key(specs[0]))
    for i, spec in enumerate(specs[1:], 1):
        other = json.loads(fusible_key(spec))
        if other != first:
            where = _first_difference(first, other)
            raise PackError(f"member {i} differs from member 0 in {where}, which does not fuse (fusible: "
                            f"{', '.join(FUSIBLE)})", path="pack")


def _first_difference(a: object, b: object, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
    return f"{path} ({json.dumps(a)} vs {json.dumps(b)})"


# ---- the stacked optimizer -------------------------------------------------------------------------------------
def _shaped(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [P] tensor viewed to broadcast over a stacked [P, ...] tensor."""
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


class StackedOptimizer:
    """torch.optim.SGD (momentum, nesterov) or AdamW, as runs.recipe.build_optimizer configures them, on stacked
    [P, ...] parameters: each member's lr, momentum, nesterov and decay its own; members not alive are not updated.
    Per-member constants live on the device once; each step copies only the step's [P] lr (AdamW: and its two
    scalars, computed in float64 on the host as torch does)."""

    def __init__(self, specs: Sequence[Spec], params: dict[str, torch.Tensor]):
        self.trains = [s.train for s in specs]
        self.kind = self.trains[0].optimizer
        self.step_count = 0                                  # optimizer steps taken (AdamW's bias correction)
        self.ndim = {name: p.ndim - 1 for name, p in params.items()}   # a member's parameter's dimensions
        first = next(iter(params.values()))
        self.dtype, self.device = first.dtype, first.device
        names, method = STACKED_UPDATES[self.kind]
        self._update = getattr(self, method)
        self.state: dict[str, dict[str, torch.Tensor]] = {
            name: {k: torch.zeros_like(p) for k in names} for name, p in params.items()}
        self._constants()

    def _constants(self) -> None:
        """The members' fixed hyperparameters as [P] device tensors; per parameter, whether its group decays
        (runs.recipe.param_groups: 1-d parameters not, with decay_bn_and_bias false)."""
        trains, on = self.trains, lambda v, dtype=None: torch.tensor(v, dtype=dtype or self.dtype,  # noqa: E731
                                                                     device=self.device)
        self.decays = {name: on([t.decay_bn_and_bias or n > 1 for t in trains], torch.bool)
                       for name, n in self.ndim.items()}
        self.decay = {name: on([t.weight_decay if t.decay_bn_and_bias or n > 1 else 0.0 for t in trains])
                      for name, n in self.ndim.items()}
        self.momentum = on([t.momentum for t in trains])
        self.nesterov = on([bool(t.nesterov and t.momentum > 0) for t in trains], torch.bool)

    def keep(self, rows: Sequence[int]) -> None:
        """Only the members at `rows` stay (the pack was rebuilt smaller)."""
        self.trains = [self.trains[i] for i in rows]
        self._constants()
        index = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        self.state = {name: {k: v[index].clone() for k, v in s.items()} for name, s in self.state.items()}

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], grads: Sequence[torch.Tensor], lrs: Sequence[float],
             alive: torch.Tensor) -> None:
        """One update of every alive member with its lr (host floats: the schedule's value this step)."""
        self.step_count += 1
        values = self._step_values(lrs)
        for (name, p), g in zip(params.items(), grads):
            self._update(name, p, g, values, _shaped(alive, p))

    def _step_values(self, lrs: Sequence[float]) -> dict[str, torch.Tensor]:
        """This step's [P] tensors: lr; AdamW also 1 - lr wd and lr / (1 - b1^t) (float64 on the host, as torch)."""
        values = [list(lrs)]
        if self.kind == "adamw":
            b1, t = ADAMW_BETAS[0], self.step_count
            values += [[1 - lr * tr.weight_decay for lr, tr in zip(lrs, self.trains)],
                       [lr / (1 - b1 ** t) for lr in lrs]]
        stacked = torch.tensor(values, dtype=self.dtype).to(self.device, non_blocking=True)
        return dict(zip(("lr", "shrink", "step_size"), stacked))

    def _sgd(self, name: str, p: torch.Tensor, g: torch.Tensor, values: dict, mask: torch.Tensor) -> None:
        # torch: d = g + wd p; buf = m buf + d (buf = d at the first step: the same, from zeros); d = d + m buf
        # (nesterov) or buf; p -= lr d
        d = g + _shaped(self.decay[name], p) * p
        buf = self.state[name]["momentum_buffer"]
        momentum = _shaped(self.momentum, p)
        new_buf = momentum * buf + d
        d = torch.where(_shaped(self.nesterov, p), d + momentum * new_buf, new_buf)
        buf.copy_(torch.where(mask, new_buf, buf))
        p.copy_(torch.where(mask, p - _shaped(values["lr"], p) * d, p))

    def _adamw(self, name: str, p: torch.Tensor, g: torch.Tensor, values: dict, mask: torch.Tensor) -> None:
        # torch's single-tensor AdamW: p *= 1 - lr wd; m = lerp(m, g, 1 - b1); v = b2 v + (1 - b2) g^2;
        # p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
        (b1, b2), t = ADAMW_BETAS, self.step_count
        state = self.state[name]
        shrink = torch.where(self.decays[name], values["shrink"], torch.ones_like(values["shrink"]))
        decayed = p * _shaped(shrink, p)
        m = state["exp_avg"].lerp(g, 1 - b1)
        v = state["exp_avg_sq"] * b2 + (1 - b2) * g * g
        denom = v.sqrt() / math.sqrt(1 - b2 ** t) + ADAMW_EPS
        new_p = decayed - _shaped(values["step_size"], p) * (m / denom)
        state["exp_avg"].copy_(torch.where(mask, m, state["exp_avg"]))
        state["exp_avg_sq"].copy_(torch.where(mask, v, state["exp_avg_sq"]))
        p.copy_(torch.where(mask, new_p, p))

    def state_dict(self) -> dict:
        return {"kind": self.kind, "step_count": self.step_count, "state": self.state}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        for name, tensors in state["state"].items():
            for k, v in tensors.items():
                self.state[name][k].copy_(v)


# ---- members ---------------------------------------------------------------------------------------------------
@dataclass
class Member:
    """One trial inside a pack: its spec, data, schedule and what it has recorded so far."""
    spec: Spec
    index: int                          # its place in the pack as built (stable: tags, reports)
    data: ReslabData
    schedule: LrSchedule
    history: list[dict] = field(default_factory=list)   # one row per epoch, as ReslabModule.history
    status: str = "RUNNING"             # RUNNING | FINISHED | FAILED | PRUNED
    reason: Optional[str] = None        # why it failed or was pruned
    metrics: dict[str, float] = field(default_factory=dict)  # last row and the test metrics
    weights: Optional[dict[str, torch.Tensor]] = None   # its state_dict once it left the pack

    @property
    def epochs(self) -> int:
        return int(self.spec.train.epochs or 0)


def _member_data(spec: Spec, device: torch.device) -> ReslabData:
    """The member's data module as its solo run has it, its tensors moved to the pack's device."""
    data = ReslabData(spec)
    data.prepare_data()
    data.check()
    data.setup("fit")
    if device.type != "cpu" and spec.data.on_device != "never":
        data._sets = {k: (images.to(device), labels.to(device)) for k, (images, labels) in data._sets.items()}
    return data


def resolved_device(spec: Spec) -> torch.device:
    """Where the pack trains: the GPU when its solo run would use one, else the CPU."""
    cuda = spec.train.accelerator in ("auto", "gpu") and torch.cuda.is_available()
    return torch.device("cuda") if cuda else torch.device("cpu")


def train_alone(spec: Spec):
    """`spec` trained alone as runs.fit trains it (ReslabModule, ReslabData, its Trainer settings), without records:
    the run a pack member equals. Returns the module (history, results, model)."""
    import pytorch_lightning as pl

    from .fit import trainer_settings
    from .module import ReslabModule
    from .quiet import quiet

    with quiet():
        pl.seed_everything(spec.train.seed, verbose=False)
        module, data = ReslabModule(spec), ReslabData(spec)
        trainer = pl.Trainer(**trainer_settings(spec), enable_progress_bar=False)
        trainer.fit(module, datamodule=data)
        trainer.test(module, datamodule=data, verbose=False)
    return module


# ---- the pack --------------------------------------------------------------------------------------------------
class Pack:
    """P members of one network trained as one stacked model (see the module docstring)."""

    def __init__(self, specs: Sequence[Spec], *, device: Optional[torch.device] = None,
                 compile: Union[bool, str] = False, _state: Optional[dict] = None):
        """`compile`: torch.compile the vmapped forward (true, or a torch.compile mode such as "reduce-overhead")."""
        specs = list(specs)
        check_pack(specs)
        self.device = device or resolved_device(specs[0])
        self.key = fusible_key(specs[0])
        plan = plan_network(specs[0])
        train = specs[0].train
        self.batch_size, self.val_every = train.batch_size, train.val_every
        self.autocast = self.device.type == "cuda" and train.precision in ("auto", "bf16-mixed") and \
            torch.cuda.is_bf16_supported()
        self.members = [Member(s, i, _member_data(s, self.device), LrSchedule("constant", 1)) for i, s in
                        enumerate(specs)]
        self.steps_per_epoch = self.members[0].data.steps_per_epoch
        for m in self.members:
            m.schedule = lr_schedule(m.spec.train, self.steps_per_epoch)
            self._check_whole_epochs(m)
        nets = [build_model(s, plan, init=True, resolve=init_checkpoint).to(self.device) for s in specs]
        self.names = list(nets[0].state_dict().keys())     # a solo checkpoint's order of the model's tensors
        self.base = copy.deepcopy(nets[0]).to("meta")
        params, buffers = stack_module_state(nets)
        self.params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        self.buffers = {k: v.detach() for k, v in buffers.items()}
        del nets
        self.optimizer = StackedOptimizer(specs, self.params)
        self.epoch, self.step = 0, 0                        # epochs completed, optimizer steps taken
        self.finished: dict[int, Member] = {}               # members that left, by index
        self.images_per_s = math.nan                        # the last epoch's images/s of the whole pack
        self.file: Optional[Path] = None                    # where `save` last wrote the pack
        self._alive = torch.ones(len(specs), dtype=torch.bool, device=self.device)
        self._failed_step = torch.full((len(specs),), -1, dtype=torch.long, device=self.device)
        self._forward = vmap(self._member_loss, in_dims=(0, 0, 0, 0, 0), randomness="error")
        if compile:
            self._forward = torch.compile(self._forward, mode=None if compile is True else str(compile))
        if _state is not None:
            self._restore(_state)

    def _check_whole_epochs(self, m: Member) -> None:
        t = m.spec.train
        if t.epochs is None or (t.max_steps is not None and t.max_steps < t.epochs * self.steps_per_epoch):
            raise PackError(f"member {m.index} ({m.spec.name}) stops mid-epoch (train.max_steps {t.max_steps} < "
                            f"epochs x {self.steps_per_epoch} steps); a pack trains whole epochs",
                            path="train.max_steps")

    @property
    def size(self) -> int:
        """Members still training."""
        return len(self.members)

    # ---- one member's computation (vmapped over the pack) -------------------------------------------------------
    def _member_loss(self, params: dict, buffers: dict, images: torch.Tensor, labels: torch.Tensor,
                     smoothing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, correct count) of one member's batch: nn.CrossEntropyLoss(label_smoothing) as torch computes it."""
        logits = functional_call(self.base, (params, buffers), (images,))
        logits = logits.float()
        nll = F.cross_entropy(logits, labels)
        smooth = -logits.log_softmax(-1).sum(-1).mean() / logits.shape[-1]
        loss = (1 - smoothing) * nll + smoothing * smooth
        return loss, (logits.argmax(-1) == labels).sum()

    def _smoothing(self) -> torch.Tensor:
        return torch.tensor([m.spec.train.label_smoothing for m in self.members], device=self.device)

    def _stacked(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = zip(*batches)
        return (torch.stack([x.to(self.device, non_blocking=True) for x in images]),
                torch.stack([y.to(self.device, non_blocking=True) for y in labels]))

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast)

    # ---- training -----------------------------------------------------------------------------------------------
    def train_epoch(self) -> list[dict]:
        """One epoch of every member: per member its train/loss, train/acc, train/error, lr and images/s."""
        self.base.train()
        loaders = []
        for m in self.members:
            loader = m.data.train_dataloader()
            loader.set_epoch(self.epoch)
            loaders.append(loader)
        smoothing = self._smoothing()
        P = self.size
        loss_sum = torch.zeros(P, device=self.device)
        correct = torch.zeros(P, dtype=torch.long, device=self.device)
        seen, lrs = 0, [math.nan] * P
        start = time.perf_counter()
        for batches in zip(*loaders):
            losses, right, n, lrs = self._train_step(batches, smoothing)
            loss_sum += torch.where(self._alive, losses * n, torch.zeros_like(loss_sum))
            correct += torch.where(self._alive, right, torch.zeros_like(right))
            seen += n
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        self.images_per_s = seen * P / elapsed if elapsed > 0 else math.nan
        rows = []
        for i, m in enumerate(self.members):
            c = int(correct[i])
            rows.append({"epoch": self.epoch + 1, "train/loss": float(loss_sum[i]) / seen if seen else math.nan,
                         "train/acc": c / seen if seen else math.nan,
                         "train/error": (seen - c) / seen if seen else math.nan,
                         "lr": float(lrs[i]), "images_per_s": seen / elapsed if elapsed > 0 else math.nan})
        return rows

    def _train_step(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                    smoothing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, list[float]]:
        """One optimizer step of every live member on its batch: (losses [P], correct [P], images per member, lrs);
        a member whose loss is non-finite is frozen from this step on."""
        images, labels = self._stacked(batches)
        lrs = [m.spec.train.lr * m.schedule(self.step) for m in self.members]   # LambdaLR: base lr x factor
        with self._autocast():
            losses, right = self._forward(self.params, self.buffers, images, labels, smoothing)
        finite = torch.isfinite(losses.detach())
        self._failed_step = torch.where(self._alive & ~finite, self.step, self._failed_step)
        self._alive = self._alive & finite
        total = torch.where(self._alive, losses, torch.zeros_like(losses)).sum()
        grads = torch.autograd.grad(total, list(self.params.values()))
        self.optimizer.step(self.params, grads, lrs, self._alive)
        self.step += 1
        return losses.detach(), right, labels.shape[1], lrs

    def probe_step(self) -> None:
        """One training step of every member on its first batch, as train_epoch takes it (what the pack's memory
        peaks at: search.packing's probe). The pack has then moved on by a step: probe a pack made to be thrown
        away."""
        self.base.train()
        self._train_step([next(iter(m.data.train_dataloader())) for m in self.members], self._smoothing())

    @torch.no_grad()
    def evaluate(self, split: str, rows: Optional[Sequence[int]] = None) -> list[dict[str, float]]:
        """{split}/loss, acc, error of the members at `rows` (all by default), in eval mode, on their own split."""
        rows = list(range(self.size)) if rows is None else list(rows)
        if not rows:
            return []
        self.base.eval()
        index = torch.tensor(rows, device=self.device)
        params = {k: v.detach()[index] for k, v in self.params.items()}
        buffers = {k: v[index] for k, v in self.buffers.items()}
        members = [self.members[r] for r in rows]
        loaders = [m.data.val_dataloader() if split == "val" else m.data.test_dataloader() for m in members]
        smoothing = torch.tensor([m.spec.train.label_smoothing for m in members], device=self.device)
        loss_sum = torch.zeros(len(rows), device=self.device)
        correct = torch.zeros(len(rows), dtype=torch.long, device=self.device)
        seen = 0
        for batches in zip(*loaders):
            images, labels = self._stacked(batches)
            with self._autocast():
                losses, right = self._forward(params, buffers, images, labels, smoothing)
            loss_sum += losses * labels.shape[1]
            correct += right
            seen += labels.shape[1]
        out = []
        for i in range(len(rows)):
            c = int(correct[i])
            out.append({f"{split}/loss": float(loss_sum[i]) / seen if seen else math.nan,
                        f"{split}/acc": c / seen if seen else math.nan,
                        f"{split}/error": (seen - c) / seen if seen else math.nan})
        return out

    def run_epoch(self, prune: Optional[Callable[[Member, dict], Optional[str]]] = None) -> list[Member]:
        """Train one epoch, validate, close each member's row; members that failed, were pruned (`prune` returns a
        reason) or reached their last epoch (tested then) leave the pack. Returns the members that left."""
        rows = self.train_epoch()
        if self.members and self.members[0].data.num_val and (self.epoch + 1) % self.val_every == 0:
            for row, val in zip(rows, self.evaluate("val")):
                row.update(val)
        alive = self._alive.tolist()
        failed_at = self._failed_step.tolist()
        leaving: list[int] = []
        for i, (m, row) in enumerate(zip(self.members, rows)):
            m.history.append(row)
            m.metrics = dict(row)
            if not alive[i]:
                m.status = "FAILED"
                m.reason = (f"training loss became non-finite at step {failed_at[i]} (epoch {self.epoch}); "
                            f"lower train.lr or check the data")
                leaving.append(i)
                continue
            why = prune(m, row) if prune is not None else None
            if why:
                m.status, m.reason = "PRUNED", why
                leaving.append(i)
            elif self.epoch + 1 >= m.epochs:
                m.status = "FINISHED"
                leaving.append(i)
        done = [i for i in leaving if self.members[i].status == "FINISHED"]
        for i, test in zip(done, self.evaluate("test", done)):
            self.members[i].metrics.update(test)
        self.epoch += 1
        left = self._leave(leaving)
        return left

    def fit(self, prune: Optional[Callable[[Member, dict], Optional[str]]] = None,
            on_epoch: Optional[Callable[["Pack", list[Member]], None]] = None) -> dict[int, Member]:
        """Every member to its end; `on_epoch(pack, left)` after each epoch (e.g. `pack.save(path)`)."""
        while self.members:
            left = self.run_epoch(prune)
            if on_epoch is not None:
                on_epoch(self, left)
        return self.finished

    # ---- leaving and rebuilding ---------------------------------------------------------------------------------
    def member_weights(self, row: int) -> dict[str, torch.Tensor]:
        """Member `row`'s state_dict (the network's keys and order), on the CPU."""
        tensors = {**self.params, **self.buffers}
        return {k: tensors[k][row].detach().cpu().clone() for k in self.names}

    def _leave(self, rows: Sequence[int]) -> list[Member]:
        """The members at `rows` leave; the stacked tensors are rebuilt without them."""
        if not rows:
            return []
        left = []
        for r in rows:
            m = self.members[r]
            m.weights = self.member_weights(r)
            self.finished[m.index] = m
            left.append(m)
        keep = [i for i in range(self.size) if i not in set(rows)]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.params = {k: v.detach()[index].clone().requires_grad_(True) for k, v in self.params.items()}
        self.buffers = {k: v[index].clone() for k, v in self.buffers.items()}
        self.optimizer.keep(keep)
        self._alive, self._failed_step = self._alive[index], self._failed_step[index]
        self.members = [self.members[i] for i in keep]
        return left

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def member_checkpoint(self, index: int) -> dict:
        """A finished (or still training) member's checkpoint in a solo run's layout (runs.checkpoint): its spec in
        hyper_parameters and its network under `model.`, so load_model, init_from and export read it."""
        import pytorch_lightning as pl

        if index in self.finished:
            m, weights = self.finished[index], self.finished[index].weights
        else:
            row = next(r for r, m in enumerate(self.members) if m.index == index)
            m, weights = self.members[row], self.member_weights(row)
        return {"state_dict": {f"model.{k}": v for k, v in (weights or {}).items()},
                "hyper_parameters": {"spec": m.spec.model_dump(mode="json")},
                "epoch": len(m.history) - 1, "global_step": len(m.history) * self.steps_per_epoch,
                "pytorch-lightning_version": pl.__version__, MEMBER_OF: str(self.file or "")}

    def state_dict(self) -> dict:
        """Everything a resumed pack needs, plain data and tensors (loads with weights_only=True)."""
        def member(m: Member) -> dict:
            return {"spec": m.spec.model_dump(mode="json"), "index": m.index, "history": m.history,
                    "status": m.status, "reason": m.reason, "metrics": m.metrics, "weights": m.weights}
        return {"format": PACK_FORMAT, "epoch": self.epoch, "step": self.step,
                "members": [member(m) for m in self.members],
                "finished": [member(m) for m in self.finished.values()],
                "params": {k: v.detach().cpu() for k, v in self.params.items()},
                "buffers": {k: v.cpu() for k, v in self.buffers.items()},
                "optimizer": self.optimizer.state_dict(), "alive": self._alive.cpu(),
                "failed_step": self._failed_step.cpu()}

    def _restore(self, state: dict) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        for m, saved in zip(self.members, state["members"]):
            m.index, m.history, m.status = saved["index"], saved["history"], saved["status"]
            m.reason, m.metrics = saved["reason"], saved["metrics"]
        with torch.no_grad():
            for k, v in state["params"].items():
                self.params[k].copy_(v)
            for k, v in state["buffers"].items():
                self.buffers[k].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self._alive = state["alive"].to(self.device)
        self._failed_step = state["failed_step"].to(self.device)
        for saved in state["finished"]:
            m = Member(spec_from_dict(saved["spec"]), saved["index"], None, LrSchedule("constant", 1),  # type: ignore
                       saved["history"], saved["status"], saved["reason"], saved["metrics"], saved["weights"])
            self.finished[m.index] = m

    def save(self, path: Union[str, Path]) -> Path:
        """The pack's state written atomically (runs.checkpoint.write_atomically): a kill leaves the last one whole."""
        path = Path(path)
        state = self.state_dict()
        write_atomically(path, lambda tmp: torch.save(state, tmp))
        self.file = path
        return path

    @classmethod
    def load(cls, path: Union[str, Path], *, device: Optional[torch.device] = None,
             compile: Union[bool, str] = False) -> "Pack":
        """A pack saved by `save`, ready to go on from the epoch it had finished."""
        from .checkpoint import read_checkpoint

        state = read_checkpoint(path)
        if state.get("format") != PACK_FORMAT:
            raise PackError(f"not a pack checkpoint (format {state.get('format')!r}, expected {PACK_FORMAT})",
                            file=str(path))
        specs = [spec_from_dict(m["spec"]) for m in state["members"]]
        if not specs:
            raise PackError("the pack had finished: no member left to train", file=str(path))
        return cls(specs, device=device, compile=compile, _state=state)
