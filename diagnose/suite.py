"""What `reslab diagnose` runs: resolve specs and checkpoints into networks, load real images, measure.

    targets = resolve_targets([(path, spec)], checkpoints=["<run id>"])  # spec at init + trained network
    report = measure_gradients(targets, GradientOptions(seeds=3))       # rows: one per network and seed
    lesions = measure_lesions(targets, limit=1000)                      # rows: one per checkpoint and block
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from arches import build_model, plan_network
from arches.errors import ReslabError
from arches.schema import Spec
from arches.spec import flatten
from runs.checkpoint import load_model
from runs.data import ReslabData
from runs.mlflow_write import experiment_name
from search.stats import Summary

from .gradients import (BNMode, Readout, block_gradient_norms, calibrate_bn, gradient_correlation, is_residual,
                        network_depth, pick_pair)
from .lesion import LesionRow, lesion_study, resolve_blocks

# Parts of a spec that do not change the network's tensors or computation (what a checkpoint may differ in).
NOT_ARCHITECTURE = ("name", "family", "description", "data", "train")


@dataclass
class Target:
    """One network to diagnose: a spec at initialisation, or a trained checkpoint of that spec."""
    label: str                      # 'resnet20' at init, 'resnet20:<checkpoint>' when trained
    spec: Spec                      # the spec given on the command line (its data set is the one measured on)
    checkpoint: Optional[str] = None  # path or MLflow run id; None = at initialisation
    model: Optional[nn.Module] = field(default=None, repr=False)  # the trained network, when checkpoint


def family_of(spec: Spec) -> str:
    """The spec's family as its training runs name their experiment: spec.family, else resnet56 -> resnet."""
    return experiment_name(spec)


def resolved_architecture(spec: Spec) -> dict:
    """The network a spec builds, however it is written: input, stem, every block's resolved settings, head."""
    plan = plan_network(spec)
    return {"input": spec.input.model_dump(), "classes": spec.classes, "stem": spec.stem.model_dump(),
            "stem_channels": plan.stem_channels, "head": spec.head.model_dump(),
            "blocks": [(b.name, b.cls.name, b.cfg.model_dump(mode="json"), b.in_channels, b.width, b.out_channels,
                        b.stride) for b in plan.blocks]}


def architecture_diff(a: Spec, b: Spec) -> dict[str, tuple]:
    """Dotted spec keys where two specs build different networks: key -> (a's value, b's value); {} when the
    networks are the same (also when the specs say it differently, e.g. per-stage instead of spec-wide)."""
    fa = flatten(a.model_dump(mode="json", exclude=set(NOT_ARCHITECTURE)))
    fb = flatten(b.model_dump(mode="json", exclude=set(NOT_ARCHITECTURE)))
    diff = {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}
    if diff and resolved_architecture(a) == resolved_architecture(b):
        return {}
    return diff


def _checkpoint_label(ref: str) -> str:
    path = Path(ref)
    return path.stem if path.suffix else ref[:8]


def resolve_targets(specs: Sequence[tuple[str, Spec]], checkpoints: Sequence[str] = (), *,
                    tracking_uri: Optional[str] = None, at_init: bool = True) -> list[Target]:
    """Targets for `specs` ((file, Spec) pairs): each at initialisation (if at_init), then each checkpoint,
    matched to the given spec that builds the same network. A checkpoint matching none: ReslabError."""
    targets = [Target(spec.name, spec) for _, spec in specs] if at_init else []
    for ref in checkpoints:
        trained_spec, model = load_model(ref, tracking_uri)
        diffs = [(file, spec, architecture_diff(spec, trained_spec)) for file, spec in specs]
        match = next(((f, s) for f, s, d in diffs if not d), None)
        if match is None:
            file, _, diff = min(diffs, key=lambda item: len(item[2]))
            shown = "; ".join(f"{k}: {theirs!r} in the checkpoint, {mine!r} in the spec"
                              for k, (mine, theirs) in list(diff.items())[:3])
            more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
            raise ReslabError(f"checkpoint {ref} ({trained_spec.name}) is not the network {file} describes: "
                              f"{shown}{more}", path="--checkpoint")
        file, spec = match
        targets.append(Target(f"{spec.name}:{_checkpoint_label(ref)}", spec, ref, model))
    seen: dict[str, int] = {}
    for target in targets:                      # the same name twice (two files, or one checkpoint twice)
        seen[target.label] = seen.get(target.label, 0) + 1
        if seen[target.label] > 1:
            target.label = f"{target.label}#{seen[target.label]}"
    return targets


def pick_device(device: str = "auto") -> torch.device:
    """'auto' -> the GPU when there is one, else the CPU; a device that is not there: one-line ReslabError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ReslabError(f"'{device}' is not a device; use auto, cpu, cuda or cuda:N", file="--device") from None
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (chosen.index or 0) >= count:
            raise ReslabError(f"there is no {device} here ({count} CUDA devices); use --device cpu or auto",
                              file="--device")
    elif chosen.type != "cpu":
        raise ReslabError(f"device type '{chosen.type}' is not supported; use auto, cpu or cuda", file="--device")
    return chosen


def eval_batches(spec: Spec, limit: Optional[int] = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The spec's test set as normalised (images, labels) batches, via runs.data; `limit`: a seeded subset."""
    if limit is not None:
        if limit < 1:
            raise ReslabError(f"--limit must be a positive number of images, not {limit}", path="--limit")
        subset = min(limit, spec.data.test_subset or limit)
        spec = spec.model_copy(update={"data": spec.data.model_copy(update={"test_subset": subset})})
    data = ReslabData(spec)
    data.setup("test")
    return [(images.float(), labels.long()) for images, labels in data.test_dataloader()]


# ---------------------------------------------------------------- gradients

@dataclass
class GradientOptions:
    seeds: int = 3                  # independent inits (specs) / image pairs and readouts (checkpoints)
    points: int = 256               # points on the path between two images
    bn: BNMode = "batch"            # 'batch': BN on batch statistics, whole path one batch; 'eval': running stats
    readout: Readout = "projection"  # scalar output: a fixed random projection of the logits, or a logit index
    batch_size: int = 128           # images in the cross-entropy batch of the block gradient norms
    max_lag: int = 32               # autocorrelation view: correlation at lags 1..max_lag
    device: str = "auto"


@dataclass
class GradientRow:
    """One network at one seed."""
    label: str
    family: str
    residual: bool
    depth: int                      # weighted layers: stem conv + branch convs + classifier
    state: str                      # 'init' or 'trained'
    seed: int
    correlation: float              # mean cosine of neighbouring input gradients (Balduzzi et al. 2017)
    correlation_by_lag: list[float]
    block_norms: dict[str, float]   # block name -> ||dL/d(block output)||

    def to_dict(self) -> dict:
        return asdict(self)


def _pool(spec: Spec, size: int, cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `size` test images of the spec's data set (loaded once per data set)."""
    key = (spec.data.model_dump_json(), spec.input.model_dump_json(), spec.classes, spec.train.seed)
    if key not in cache:
        images, labels, n = [], [], 0
        for x, y in eval_batches(spec):
            images.append(x)
            labels.append(y)
            n += len(y)
            if n >= size:
                break
        cache[key] = (torch.cat(images)[:size], torch.cat(labels)[:size])
    return cache[key]


def measure_gradients(targets: Sequence[Target], options: Optional[GradientOptions] = None,
                      progress=None) -> list[GradientRow]:
    """Gradient norms per block and gradient correlation for every target and seed (see diagnose.gradients).

    Seed k (k = 0..seeds-1, offset by the spec's train.seed) sets the initial weights (specs at init), the pair
    of test images the path joins, the readout projection and the cross-entropy batch."""
    options = options or GradientOptions()
    if options.seeds < 1 or options.points < 3 or options.batch_size < 2:
        raise ReslabError("--seeds must be >= 1, --points >= 3 and --batch-size >= 2")
    device, cache, rows = pick_device(options.device), {}, []
    for target in targets:
        images, labels = _pool(target.spec, max(options.batch_size, 256), cache)
        for k in range(options.seeds):
            seed = target.spec.train.seed + k
            if target.model is None:
                spec = target.spec.model_copy(update={"train": target.spec.train.model_copy(update={"seed": seed})})
                model, state = build_model(spec), "init"
            else:
                model, state = target.model, "trained"
            model = model.to(device)
            g = torch.Generator().manual_seed(seed)
            batch = torch.randperm(len(labels), generator=g)[:options.batch_size]
            x, y = images[batch].to(device), labels[batch].to(device)
            if state == "init" and options.bn == "eval":
                calibrate_bn(model, x)          # an untrained net's running stats are 0/1: use real ones
            norms = block_gradient_norms(model, x, y, bn=options.bn)
            i, j = pick_pair(labels, seed)
            corr, by_lag = gradient_correlation(model, images[i].to(device), images[j].to(device),
                                                options.points, options.readout, seed, options.bn,
                                                options.max_lag)
            rows.append(GradientRow(target.label, family_of(target.spec), is_residual(model), network_depth(model),
                                    state, seed, corr, by_lag, dict(norms)))
            if progress:
                progress(rows[-1])
    return rows


def summarise_gradients(rows: Sequence[GradientRow]) -> list[dict]:
    """One dict per network (label): family, depth, state, correlation Summary, mean norm per block."""
    out: dict[str, dict] = {}
    for row in rows:
        out.setdefault(row.label, {"label": row.label, "family": row.family, "residual": row.residual,
                                   "depth": row.depth, "state": row.state, "rows": []})["rows"].append(row)
    for item in out.values():
        rs = item.pop("rows")
        item["correlation"] = Summary.of([r.correlation for r in rs])
        blocks = list(rs[0].block_norms)
        item["block_norms"] = {b: Summary.of([r.block_norms[b] for r in rs]) for b in blocks}
        item["lag"] = [Summary.of([r.correlation_by_lag[i] for r in rs]) for i in range(len(rs[0].correlation_by_lag))]
    return list(out.values())


# ---------------------------------------------------------------- lesions

@dataclass
class LesionResult:
    """Lesions of one trained checkpoint."""
    label: str
    spec_name: str
    checkpoint: str
    images: int                     # test images measured
    intact: float                   # accuracy of the whole network
    rows: list[LesionRow]

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "rows"}, "rows": [r.to_dict() for r in self.rows]}


def check_lesion_request(targets: Sequence[Target], blocks: Optional[Sequence[str]]) -> None:
    """Fail early, one line each: no checkpoint to lesion; a block name the network does not have."""
    if not any(t.checkpoint for t in targets):
        raise ReslabError("--lesion deletes blocks of a trained network: give --checkpoint PATH_OR_RUN_ID "
                          "(a checkpoint file or the MLflow run id of a training run)")
    if blocks:
        for target in targets:
            resolve_blocks(target.model if target.model is not None else build_model(target.spec), blocks)


def measure_lesions(targets: Sequence[Target], blocks: Optional[Sequence[str]] = None,
                    limit: Optional[int] = None, device: str = "auto", progress=None) -> list[LesionResult]:
    """For every trained target: test accuracy intact and with each block (or each of `blocks`) deleted alone."""
    dev, results = pick_device(device), []
    for target in targets:
        if target.model is None:
            continue
        batches = [(x.to(dev), y.to(dev)) for x, y in eval_batches(target.spec, limit)]
        model = target.model.to(dev)
        intact, rows = lesion_study(model, batches, blocks)
        results.append(LesionResult(target.label, target.spec.name, target.checkpoint,
                                    sum(len(y) for _, y in batches), intact, rows))
        if progress:
            progress(results[-1])
    return results
