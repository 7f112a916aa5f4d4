"""Ablation and search files: schema (pydantic, unknown keys rejected), loading, and the per-trial specs.

    base: ../resnet20.yaml                 # the spec every trial starts from (path relative to this file)
    set: {data.name: fashion-mnist, ...}   # --set-style overrides applied to every trial
    devices_per_trial: 2                   # each trial trains on 2 GPUs (or 2 CPU processes) with Lightning DDP
    ablation:                              # a grid of arms x seeds ...
      axes: {block.shortcut: [A, B, C]}
      baseline: {block.shortcut: A}
      seeds: 3
      metric: {name: test/error, goal: minimize}
    search:                                # ... or an Optuna search (one of the two per file)
      space: {block.type: [plain, basic], width_multiplier: {low: 0.5, high: 2.0, log: true}}
      objectives: [val/error, macs]
      sampler: nsga2

Overrides apply in this order: the base spec < `set:` < the command line's --set < the arm or sampled values
< the seed (train.seed) < a compute-matched width_multiplier. A dotted key may use `*` for every item of a list
(`stages.*.depth: 5`). Every error is one line naming the file and line of the key at fault.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from arches import Spec, spec_from_dict, spec_hash
from arches.errors import Locator, ReslabError, SpecError, did_you_mean, index_of, located
from arches.spec import Override, Source, build_document, display_path, parse_override, read_yaml, set_path

from .matching import match_arms

# Final metrics of a training run (runs.fit) and cost figures reslab measures itself.
RUN_METRICS = ("train/loss", "train/acc", "train/error", "val/loss", "val/acc", "val/error", "test/loss",
               "test/acc", "test/error", "lr", "images_per_s")
COST_METRICS = ("params", "macs", "latency_ms")
SAMPLERS = ("tpe", "random", "grid", "nsga2")
PRUNERS = ("median", "hyperband", "none")
OPTUNA_SCALARS = (str, int, float, bool, type(None))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]        # what train.seed accepts


class MetricSpec(Strict):
    name: str                                            # a run metric (test/error) or a cost (params, macs)
    goal: Optional[Literal["minimize", "maximize"]] = None  # null: maximize accuracies, minimize the rest


class MatchSpec(Strict):
    by: Literal["macs", "params"]                        # the cost every arm is matched on
    tolerance: float = Field(0.03, gt=0.0, lt=1.0)       # relative: |cost / baseline's cost - 1| <= tolerance


class PivotSpec(Strict):
    rows: str                                            # an axis name: one row per label (e.g. depth)
    columns: str                                         # an axis name: one column per label (e.g. block.type)
    metrics: list[str] = []                              # default: every metric of the ablation


class AblationSpec(Strict):
    axes: dict[str, Any] = {}        # axis -> list of values (axis = a dotted spec key) or {label: overrides}
    arms: Union[dict[str, dict[str, Any]], list[dict[str, Any]]] = {}  # named arms: {name: {key: value, ...}}
    baseline: Union[str, int, float, bool, dict[str, Any]]  # an arm name, or {axis: label} (per-group baseline)
    seeds: Union[Annotated[int, Field(ge=1, le=1000)], Annotated[list[Seed], Field(max_length=1000)]] = 3
    # ^ N (seeds 0..N-1) or a list; seed k sets train.seed = k
    metric: Union[str, MetricSpec, list[Union[str, MetricSpec]]] = "test/error"  # first one = the objective
    match: Optional[Union[Literal["macs", "params"], MatchSpec]] = None  # compute-matched widths
    pivot: Optional[PivotSpec] = None                    # extra report view: metric by rows x columns
    max_attempts: int = Field(3, ge=1, le=100)           # a cell whose worker died this often is given up


class RangeSpec(Strict):
    low: float = Field(ge=-1e9, le=1e9)
    high: float = Field(ge=-1e9, le=1e9)
    log: bool = False
    step: Optional[float] = Field(None, gt=0.0)
    type: Optional[Literal["int", "float"]] = None       # null: int when low and high are integers


class PrunerSpec(Strict):
    type: Literal["median", "hyperband", "none"] = "median"
    metric: str = "val/error"                            # per-epoch metric the pruner watches
    warmup_epochs: int = Field(1, ge=0, le=10**6)        # never prune before this many epochs


class SearchSpec(Strict):
    space: dict[str, Any]            # key -> list of values | {low, high, log, step} | {label: overrides}
    objectives: list[Union[str, MetricSpec]] = ["val/error"]
    sampler: Literal["tpe", "random", "grid", "nsga2"] = "tpe"
    sampler_seed: Optional[Seed] = None
    pruner: Optional[Union[Literal["median", "hyperband", "none"], PrunerSpec]] = None  # null: median if 1 objective
    trials: int = Field(20, ge=1, le=100_000)            # total over all workers and restarts
    timeout: Optional[float] = Field(None, gt=0, le=10**8)  # seconds per command; no new trial starts after it
    max_attempts: int = Field(3, ge=1, le=100)
    importance: Literal["ped-anova", "fanova", "none"] = "ped-anova"  # Optuna's parameter-importance evaluator


class StudyFile(Strict):
    base: str                                            # spec file, relative to this file
    name: Optional[str] = None                           # study name (default: this file's name)
    description: str = ""                                # default: the file's header comment
    set: dict[str, Any] = {}                             # dotted key -> value, for every trial
    devices_per_trial: Optional[int] = Field(None, ge=1, le=4096)  # GPUs (CPU processes) of each trial, DDP; null: 1
    ablation: Optional[AblationSpec] = None
    search: Optional[SearchSpec] = None


# ---- plan objects --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One dotted override and where it was written (for errors)."""
    key: str
    value: Any
    file: str
    line: Optional[int]


@dataclass(frozen=True)
class Metric:
    name: str
    goal: str                                            # minimize | maximize: the Optuna direction


@dataclass
class Arm:
    name: str
    labels: dict[str, str]                               # axis -> label
    settings: list[Setting]
    reference: str = ""                                  # the arm this one is compared with
    width_multiplier: Optional[float] = None             # chosen by compute matching


@dataclass
class Dimension:
    """One searched key: categorical choices, labelled override groups, or an int/float range."""
    key: str
    kind: str                                            # categorical | groups | int | float
    choices: list = field(default_factory=list)          # categorical values or group labels
    groups: dict[str, list[Setting]] = field(default_factory=dict)
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: Optional[float] = None
    line: Optional[int] = None

    def grid_values(self) -> Optional[list]:
        """Every value a grid sampler would try, or None for an unbounded float range."""
        if self.kind in ("categorical", "groups"):
            return list(self.choices)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step:
            n = int(round((self.high - self.low) / self.step))
            return [round(self.low + i * self.step, 12) for i in range(n + 1)]
        return None


@dataclass
class StudyPlan:
    """A loaded ablation or search file: what to train and how to judge it."""
    kind: str                                            # ablation | search
    name: str                                            # study name
    file: Path
    base: Path
    text: str                                            # the file as written
    document: dict                                       # the base spec with `set:` and --set applied
    source: Source
    metrics: list[Metric]                                # ablation: reported metrics (first = objective)
    overrides: list[tuple[str, Any]] = field(default_factory=list)  # the command line's --set
    # ablation
    axes: dict[str, list[str]] = field(default_factory=dict)
    arms: list[Arm] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    match: Optional[MatchSpec] = None
    pivot: Optional[PivotSpec] = None
    max_attempts: int = 3
    # search
    dimensions: list[Dimension] = field(default_factory=list)
    sampler: str = "tpe"
    sampler_seed: Optional[Seed] = None
    pruner: Optional[PrunerSpec] = None
    trials: int = 0
    timeout: Optional[float] = None
    importance: str = "ped-anova"
    description: str = ""                                # `description:`, else the file's header comment
    devices_per_trial: Optional[int] = None              # the file's devices_per_trial (the study's: search.study)
    devices_line: Optional[int] = None                   # where the file says it

    @property
    def objectives(self) -> list[Metric]:
        """What Optuna optimises: the first metric of an ablation, every objective of a search."""
        return self.metrics[:1] if self.kind == "ablation" else self.metrics

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(name)

    def cells(self) -> list[tuple[str, int]]:
        """Every (arm, seed) an ablation trains, arms in file order."""
        return [(a.name, s) for a in self.arms for s in self.seeds]

    def arm_spec(self, arm: str, seed: int, threads: Optional[int] = None, devices: Optional[int] = None) -> Spec:
        """The spec of one ablation cell (`threads`: the study's CPU threads, when the spec gives none; `devices`:
        the study's devices per trial)."""
        a = self.arm(arm)
        return self.build(a.settings + [Setting("train.seed", seed, "<seed>", None)], a.width_multiplier,
                          threads, devices)

    def search_spec(self, values: dict[str, Any], threads: Optional[int] = None,
                    devices: Optional[int] = None) -> Spec:
        """The spec of one search trial from its sampled values (Optuna params)."""
        settings: list[Setting] = []
        for dim in self.dimensions:
            value = values[dim.key]
            if dim.kind == "groups":
                settings += dim.groups[str(value)]
            else:
                settings.append(Setting(dim.key, value, str(self.file), dim.line))
        return self.build(settings, threads=threads, devices=devices)

    def build(self, settings: Iterable[Setting], width_multiplier: Optional[float] = None,
              threads: Optional[int] = None, devices: Optional[int] = None) -> Spec:
        """The base document with these settings applied (then a compute-matched width_multiplier, the study's
        CPU threads where the spec sets none, and its devices per trial), validated into a Spec (errors point at
        the settings)."""
        data = copy.deepcopy(self.document)
        source = copy.deepcopy(self.source)
        match = [] if width_multiplier is None else [Setting("width_multiplier", width_multiplier, "<match>", None)]
        for s in [*settings, *match]:
            apply_setting(data, source, s)
        if threads is not None and (data.get("train") or {}).get("threads") is None:
            apply_setting(data, source, Setting("train.threads", threads, "<study>", None))
        if devices is not None:
            apply_setting(data, source, Setting("train.devices", devices, "<study>", None))
        return spec_from_dict(data, source)

    def fingerprint(self) -> str:
        """Hash of everything that decides the trials: a study must not be resumed with another definition."""
        if self.kind == "ablation":
            parts: Any = [[a.name, s, spec_hash(self.arm_spec(a.name, s))] for a in self.arms for s in self.seeds]
        else:
            parts = {"document": self.document, "space": [dim_json(d) for d in self.dimensions],
                     "objectives": [(m.name, m.goal) for m in self.metrics]}
        parts = {"kind": self.kind, "parts": parts}
        text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def meta(self) -> dict:
        """What a report needs without the file: arms, references, seeds, metrics, views (JSON)."""
        return {
            "kind": self.kind, "name": self.name, "file": str(self.file), "base": str(self.base),
            "metrics": [{"name": m.name, "goal": m.goal} for m in self.metrics],
            "axes": self.axes, "seeds": self.seeds,
            "arms": [{"name": a.name, "labels": a.labels, "reference": a.reference,
                      "width_multiplier": a.width_multiplier} for a in self.arms],
            "match": self.match.model_dump() if self.match else None,
            "pivot": self.pivot.model_dump() if self.pivot else None,
            "dimensions": [d.key for d in self.dimensions],
            "importance": self.importance if self.kind == "search" else None,
            "description": self.description,
        }


def dim_json(d: Dimension) -> dict:
    return {"key": d.key, "kind": d.kind, "choices": d.choices, "low": d.low, "high": d.high, "log": d.log,
            "step": d.step, "groups": {k: [(s.key, s.value) for s in v] for k, v in d.groups.items()}}


# ---- applying dotted keys ------------------------------------------------------------------------------
def expand_key(data: Any, dotted: str) -> list[str]:
    """'stages.*.depth' -> ['stages.0.depth', 'stages.1.depth', ...] for the lists in `data`."""
    parts = dotted.split(".")
    if "*" not in parts:
        return [dotted]
    i = parts.index("*")
    node: Any = data
    for p in parts[:i]:
        if isinstance(node, list) and index_of(p) is not None and -len(node) <= index_of(p) < len(node):
            node = node[index_of(p)]
        elif isinstance(node, dict) and p in node:
            node = node[p]
        else:
            raise SpecError(f"'*' needs a list or mapping at '{'.'.join(parts[:i]) or '.'}'", path=dotted)
    if isinstance(node, list):
        keys = [str(k) for k in range(len(node))]
    elif isinstance(node, dict):
        keys = [str(k) for k in node]
    else:
        raise SpecError(f"'*' needs a list or mapping at '{'.'.join(parts[:i])}'", path=dotted)
    out = []
    for k in keys:
        out += expand_key(data, ".".join(parts[:i] + [k] + parts[i + 1:]))
    return out


def _keypath(dotted: str) -> tuple:
    return tuple(p if index_of(p) is None else index_of(p) for p in dotted.split("."))


def apply_setting(data: dict, source: Source, s: Setting) -> None:
    """Set one dotted key in a spec document, noting the file and line it came from."""
    try:
        keys = expand_key(data, s.key)
        for key in keys:
            set_path(data, key, copy.deepcopy(s.value))
            source.lines[_keypath(key)] = (s.file, s.line)
            _note_nested(source, _keypath(key), s.value, s.file, s.line)
    except SpecError as e:
        raise SpecError(e.message, file=s.file, line=s.line, path=e.path or s.key) from None


def _note_nested(source: Source, prefix: tuple, value: Any, file: str, line: Optional[int]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            source.lines[prefix + (k,)] = (file, line)
            _note_nested(source, prefix + (k,), v, file, line)


# ---- loading -------------------------------------------------------------------------------------------
def _label(value: Any) -> str:
    """A YAML value as the label a table shows: A, 20, true, 0.5."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _metric(item: Union[str, MetricSpec], known: tuple, where: Locator, *path: Any) -> Metric:
    m = MetricSpec(name=item) if isinstance(item, str) else item
    if m.name not in known:
        raise where.error(f"unknown metric '{m.name}'{did_you_mean(m.name, known)}; expected one of: "
                          f"{', '.join(known)}", *path)
    goal = m.goal or ("maximize" if m.name.endswith("/acc") or m.name == "images_per_s" else "minimize")
    return Metric(m.name, goal)


def _settings(overrides: Any, where: Locator, *path: Any) -> list[Setting]:
    """{dotted key: value} of an arm or a group -> Settings with the line of each key."""
    if not isinstance(overrides, dict) or not overrides:
        raise where.error("expected a mapping of dotted spec keys to values, e.g. {block.shortcut: B}", *path)
    return [Setting(str(k), v, where.file, where.line(*path, k)) for k, v in overrides.items()]


def _axis(key: str, values: Any, where: Locator, section: str) -> dict[str, list[Setting]]:
    """label -> settings of one axis (or search dimension given as choices)."""
    path = (section, "axes" if section == "ablation" else "space", key)
    if isinstance(values, list):
        if not values:
            raise where.error("needs at least one value", *path)
        out: dict[str, list[Setting]] = {}
        for i, v in enumerate(values):
            label = _label(v)
            if label in out:
                raise where.error(f"value {label} is listed twice", *path, i)
            out[label] = [Setting(key, v, where.file, where.line(*path, i))]
        return out
    if isinstance(values, dict) and values:
        out = {}
        for label, v in values.items():
            if isinstance(v, dict):          # label -> several keys at once
                out[_label(label)] = _settings(v, where, *path, label)
            else:                            # label -> the value of `key`
                out[_label(label)] = [Setting(key, v, where.file, where.line(*path, label))]
        return out
    raise where.error("expected a list of values or a mapping {label: {dotted key: value}}", *path)


def _arm_name(labels: dict[str, str], axes: list[str]) -> str:
    if len(axes) == 1:
        return labels[axes[0]]
    shorts = [a.split(".")[-1] for a in axes]
    if len(set(shorts)) < len(shorts):
        shorts = axes
    return ",".join(labels[a] if a == "arm" else f"{s}={labels[a]}" for a, s in zip(axes, shorts))


def _load_ablation(spec: AblationSpec, where: Locator) -> tuple[dict, list[Arm], list[int], list[Metric]]:
    axes: dict[str, dict[str, list[Setting]]] = {}
    if isinstance(spec.arms, list):              # [{name: x, set: {...}}, ...]
        groups: dict[str, list[Setting]] = {}
        for i, item in enumerate(spec.arms):
            if set(item) != {"name", "set"}:
                raise where.error("each arm in a list needs exactly the keys 'name' and 'set'", "ablation", "arms", i)
            if _label(item["name"]) in groups:
                raise where.error(f"arm '{item['name']}' is listed twice", "ablation", "arms", i)
            groups[_label(item["name"])] = _settings(item["set"], where, "ablation", "arms", i, "set")
        axes["arm"] = groups
    elif spec.arms:                               # {name: {key: value, ...}, ...}
        axes["arm"] = {_label(n): _settings(v, where, "ablation", "arms", n) for n, v in spec.arms.items()}
    for key, values in spec.axes.items():
        if key == "arm":
            raise where.error("'arm' is the axis of `arms:`; name this axis otherwise", "ablation", "axes", key)
        axes[key] = _axis(key, values, where, "ablation")
    if not axes:
        raise where.error("give `axes:` (a grid) or `arms:` (named arms), or both", "ablation")
    names = list(axes)
    arms = []
    for combo in itertools.product(*(axes[a].items() for a in names)):
        labels = {a: label for a, (label, _) in zip(names, combo)}
        settings = [s for _, group in combo for s in group]
        arms.append(Arm(_arm_name(labels, names), labels, settings))
    if len({a.name for a in arms}) < len(arms):
        raise where.error("two arms get the same name; use distinct labels", "ablation")

    # baseline: an arm name, or {axis: label} for some axes (the other axes vary alongside)
    base = spec.baseline
    if isinstance(base, dict):
        for axis, label in base.items():
            if axis not in axes:
                raise where.error(f"'{axis}' is not an axis{did_you_mean(axis, names)}; axes: {', '.join(names)}",
                                  "ablation", "baseline", axis)
            if _label(label) not in axes[axis]:
                raise where.error(f"'{_label(label)}' is not among the arms' labels of {axis}"
                                  f"{did_you_mean(_label(label), axes[axis])}; labels: "
                                  f"{', '.join(axes[axis])}", "ablation", "baseline", axis)
        fixed = {a: _label(v) for a, v in base.items()}
    else:
        by_name = {a.name: a for a in arms}
        label = _label(base)
        if label not in by_name:
            raise where.error(f"baseline '{label}' is not among the arms{did_you_mean(label, by_name)}; arms: "
                              f"{', '.join(by_name)}", "ablation", "baseline")
        fixed = dict(by_name[label].labels)
    by_labels = {tuple(a.labels[n] for n in names): a for a in arms}
    for a in arms:
        ref = {**a.labels, **fixed}
        a.reference = by_labels[tuple(ref[n] for n in names)].name

    seeds = list(range(spec.seeds)) if isinstance(spec.seeds, int) else list(spec.seeds)
    if not seeds or len(set(seeds)) < len(seeds):
        raise where.error("seeds must be a positive count or a list of distinct integers", "ablation", "seeds")
    items = spec.metric if isinstance(spec.metric, list) else [spec.metric]
    if not items:
        raise where.error("needs at least one metric", "ablation", "metric")
    metrics = [_metric(m, RUN_METRICS + COST_METRICS, where, "ablation", "metric") for m in items]
    if len({m.name for m in metrics}) < len(metrics):
        raise where.error("a metric is listed twice", "ablation", "metric")
    return {a: list(g) for a, g in axes.items()}, arms, seeds, metrics


def _load_search(spec: SearchSpec, where: Locator) -> tuple[list[Dimension], list[Metric], PrunerSpec]:
    dims = []
    for key, value in spec.space.items():
        path = ("search", "space", key)
        line = where.line(*path)
        if isinstance(value, dict) and ("low" in value or "high" in value):
            fields = list(RangeSpec.model_fields)
            for sub in value:
                if sub not in fields:
                    raise where.error(f"unknown key '{sub}'{did_you_mean(sub, fields)}; expected one of: "
                                      f"{', '.join(fields)}", *path, sub)
            try:
                r = RangeSpec.model_validate(value)
            except ValidationError as e:
                raise located(e, RangeSpec, where, value, prefix=path) from None
            if r.low >= r.high:
                raise where.error(f"low ({r.low:g}) must be below high ({r.high:g})", *path)
            if r.log and r.low <= 0:
                raise where.error("a log range needs low > 0", *path)
            if r.log and r.step:
                raise where.error("a log range cannot have a step", *path)
            ints = r.type == "int" or (r.type is None and all(isinstance(value.get(k), int) and
                                                               not isinstance(value.get(k), bool)
                                                               for k in ("low", "high")))
            if ints and (r.low != int(r.low) or r.high != int(r.high) or (r.step and r.step != int(r.step))):
                raise where.error("an int range needs integer low, high and step", *path)
            dims.append(Dimension(key, "int" if ints else "float", low=r.low, high=r.high, log=r.log,
                                  step=r.step, line=line))
            continue
        groups = _axis(key, value, where, "search")
        grouped = isinstance(value, dict) and any(isinstance(v, dict) for v in value.values())
        if grouped:
            dims.append(Dimension(key, "groups", choices=list(groups), groups=groups, line=line))
        else:
            values = [g[0].value for g in groups.values()]
            bad = [v for v in values if not isinstance(v, OPTUNA_SCALARS)]
            if bad:
                raise where.error(f"choices must be strings, numbers, booleans or null (got {bad[0]!r}); for "
                                  f"structured values use labels: {{label: {{dotted.key: value}}}}", *path)
            dims.append(Dimension(key, "categorical", choices=values, line=line))
    if not dims:
        raise where.error("the space needs at least one key", "search", "space")
    if not spec.objectives:
        raise where.error("needs at least one objective", "search", "objectives")
    metrics = [_metric(m, RUN_METRICS + COST_METRICS, where, "search", "objectives", i)
               for i, m in enumerate(spec.objectives)]
    if len({m.name for m in metrics}) < len(metrics):
        raise where.error("an objective is listed twice", "search", "objectives")
    if all(m.name in COST_METRICS for m in metrics):
        raise where.error("at least one objective must be a training metric (e.g. val/error)", "search",
                          "objectives")
    pruner = spec.pruner
    if pruner is None:
        pruner = PrunerSpec(type="median" if len(metrics) == 1 else "none")
    elif isinstance(pruner, str):
        pruner = PrunerSpec(type=pruner)
    if pruner.type != "none" and len(metrics) > 1:
        raise where.error("Optuna cannot prune multi-objective studies; use pruner: none", "search", "pruner")
    if pruner.metric not in RUN_METRICS:
        raise where.error(f"unknown metric '{pruner.metric}'{did_you_mean(pruner.metric, RUN_METRICS)}",
                          "search", "pruner", "metric")
    if spec.sampler == "grid":
        for d in dims:
            if d.grid_values() is None:
                raise where.error("sampler grid needs a step on float ranges (or a list of values)",
                                  "search", "space", d.key)
    return dims, metrics, pruner


def load_study_file(path: Union[str, Path], overrides: Iterable[Override] = (), name: Optional[str] = None,
                    match_multipliers: Optional[dict[str, float]] = None) -> StudyPlan:
    """Read and check an ablation or search file, with --set overrides for every trial.

    Every arm (or the space's corners) is built into a Spec here, so a bad key fails before any training.
    `match_multipliers` reuses widths chosen before (workers of a running study); otherwise a compute-matched
    ablation searches them with arches.complexity.
    """
    path = Path(path)
    lines: dict = {}
    raw = read_yaml(path, lines)
    where = Source(file=display_path(path), lines=lines)
    if isinstance(raw, dict) and not {"ablation", "search"} & raw.keys() and {"stages", "block", "train"} & raw.keys():
        raise SpecError(f"this is a network spec, not an ablation or search file; train it with `python cli.py run "
                        f"{path}`", file=where.file)
    try:
        doc = StudyFile.model_validate(raw)
    except ValidationError as e:
        raise located(e, StudyFile, where, raw) from None
    if (doc.ablation is None) == (doc.search is None):
        raise SpecError("give exactly one of `ablation:` and `search:`", file=where.file, line=1)

    base = (path.parent / doc.base).expanduser()
    if not base.is_file():
        raise where.error(f"base spec not found: {base}", "base")
    data, source = build_document(base)
    for key, value in doc.set.items():
        apply_setting(data, source, Setting(str(key), value, where.file, where.line("set", key)))
    cli = [parse_override(o) for o in overrides]
    for key, value in cli:
        apply_setting(data, source, Setting(key, value, "--set", None))
        source.overrides.append((key, value))
    source.base_data = copy.deepcopy(data)     # a trial's diff_from_base: what its arm or sample changed
    plan = StudyPlan(kind="ablation" if doc.ablation else "search", name=name or doc.name or path.stem, file=path,
                     base=base, text=path.read_text(), document=data, source=source, metrics=[], overrides=cli)
    plan.description = doc.description or header_comment(plan.text)
    plan.devices_per_trial, plan.devices_line = doc.devices_per_trial, where.line("devices_per_trial")
    if doc.ablation is not None:
        plan.axes, plan.arms, plan.seeds, plan.metrics = _load_ablation(doc.ablation, where)
        plan.max_attempts = doc.ablation.max_attempts
        match = doc.ablation.match
        plan.match = MatchSpec(by=match) if isinstance(match, str) else match
        plan.pivot = doc.ablation.pivot
        _check_pivot(plan, where)
        for a in plan.arms:
            plan.arm_spec(a.name, plan.seeds[0])       # validate every arm now (one-line errors)
        if plan.match:
            if any(s.key == "width_multiplier" for a in plan.arms for s in a.settings):
                raise where.error("a compute-matched ablation chooses width_multiplier itself; do not set it in "
                                  "an arm", "ablation", "match")
            match_arms(plan, known=match_multipliers)
    else:
        s = doc.search
        plan.dimensions, plan.metrics, plan.pruner = _load_search(s, where)
        plan.sampler, plan.sampler_seed, plan.trials, plan.timeout = s.sampler, s.sampler_seed, s.trials, s.timeout
        plan.max_attempts, plan.importance = s.max_attempts, s.importance
        if s.sampler == "grid" and "trials" not in s.model_fields_set:
            plan.trials = grid_size(plan.dimensions)
        _check_space(plan)
    _check_validation_metrics(plan, where)
    return plan


def _check_validation_metrics(plan: StudyPlan, where: Locator) -> None:
    """A val/ metric (objective or pruner) needs a validation split."""
    needs = [m.name for m in plan.metrics if m.name.startswith("val/")]
    if plan.pruner is not None and plan.pruner.type != "none":
        needs.append(plan.pruner.metric)
    if needs and not plan.build([]).data.val_size:
        section = ("ablation", "metric") if plan.kind == "ablation" else ("search", "objectives")
        raise where.error(f"{needs[0]} needs a validation split, but data.val_size is 0", *section)


def grid_size(dims: list[Dimension]) -> int:
    n = 1
    for d in dims:
        n *= len(d.grid_values() or [0])
    return n


def _check_pivot(plan: StudyPlan, where: Locator) -> None:
    if plan.pivot is None:
        return
    for key in ("rows", "columns"):
        axis = getattr(plan.pivot, key)
        if axis not in plan.axes:
            raise where.error(f"'{axis}' is not an axis{did_you_mean(axis, plan.axes)}; axes: "
                              f"{', '.join(plan.axes)}", "ablation", "pivot", key)
    names = [m.name for m in plan.metrics]
    for i, m in enumerate(plan.pivot.metrics):
        if m not in names:
            raise where.error(f"'{m}' is not a metric of this ablation{did_you_mean(m, names)}", "ablation",
                              "pivot", "metrics", i)


def _check_space(plan: StudyPlan) -> None:
    """Build the spec at each choice and range end (others at their first value) to catch bad keys early."""
    first = {d.key: d.choices[0] if d.kind in ("categorical", "groups") else
             (int(d.low) if d.kind == "int" else d.low) for d in plan.dimensions}
    plan.search_spec(first)
    for d in plan.dimensions:
        values = d.choices[1:] if d.kind in ("categorical", "groups") else \
            [int(d.high) if d.kind == "int" else d.high]
        for v in values:
            plan.search_spec({**first, d.key: v})


def header_comment(text: str) -> str:
    """The comment lines a YAML file starts with, without their '#': what the file says it is."""
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        lines.append(stripped[1:].strip())
    return "\n".join(lines).strip()


def study_name_of(ref: str) -> str:
    """A study reference (name, or an ablation/search file) -> the study's name."""
    p = Path(ref)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ReslabError("no such file", file=ref)
        data = read_yaml(p)
        name = data.get("name")
        return str(name) if name else p.stem
    return ref
