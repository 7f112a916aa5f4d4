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
import itertools
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Optional, Union

from pydantic import AfterValidator, Field, ValidationError

from arches.errors import Locator, ReslabError, SpecError, did_you_mean, located
from arches.schema import Strict  # unknown keys rejected, finite numbers
from arches.spec import Override, Source, build_document, display_path, parse_override, read_yaml

from .choices import PRUNERS, SAMPLERS
from .dimensions import Categorical, Dimension, FloatRange, Groups, IntRange
from .design_spaces import DESIGN_SPACE, check_design_spaces
from .launch import LauncherSpec
from .matching import match_arms
from .packing import pack_value
from .plans import AblationPlan, Arm, Metric, SearchPlan, StudyDesign
from .seeding import SeedRule, seed_list
from .settings import Setting, apply_setting, expand_key  # noqa: F401  (search.space.Setting: the loader's words)
from .overrides import set_study_key, split_overrides

# Final metrics of a training run (runs.fit) and cost figures reslab measures itself.
RUN_METRICS = ("train/loss", "train/acc", "train/error", "val/loss", "val/acc", "val/error", "test/loss",
               "test/acc", "test/error", "lr", "images_per_s")
COST_METRICS = ("params", "macs", "latency_ms")
OPTUNA_SCALARS = (str, int, float, bool, type(None))

SamplerName = Annotated[Any, AfterValidator(lambda v: SAMPLERS.check(v))]   # a name in search.choices.SAMPLERS
PrunerName = Annotated[Any, AfterValidator(lambda v: PRUNERS.check(v))]     # ... in PRUNERS
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]        # what train.seed accepts
PackValue = Annotated[Any, AfterValidator(pack_value)]   # auto | off | N >= 1 (search.packing)


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
    seeds: Union[Annotated[int, Field(ge=1, le=1000)], Annotated[list[Seed], Field(max_length=1000)], SeedRule] = 3
    # ^ N (seeds 0..N-1), a list, or {min, max, precision} (search.seeding); seed k sets train.seed = k
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
    type: PrunerName = "median"
    metric: str = "val/error"                            # per-epoch metric the pruner watches
    warmup_epochs: int = Field(1, ge=0, le=10**6)        # never prune before this many epochs


class SearchSpec(Strict):
    space: dict[str, Any]            # key -> list of values | {low, high, log, step} | {label: overrides}
    objectives: list[Union[str, MetricSpec]] = ["val/error"]
    sampler: SamplerName = "tpe"
    sampler_seed: Optional[Seed] = None
    pruner: Optional[Union[PrunerName, PrunerSpec]] = None  # null: median if 1 objective
    trials: int = Field(20, ge=1, le=100_000)            # total over all workers and restarts
    timeout: Optional[float] = Field(None, gt=0, le=10**8)  # seconds per command; no new trial starts after it
    max_attempts: int = Field(3, ge=1, le=100)
    importance: Literal["ped-anova", "fanova", "none"] = "ped-anova"  # Optuna's parameter-importance evaluator
    design_spaces: Optional[dict[str, dict[str, Any]]] = None  # name -> overrides; trials = nets per space


class StudyFile(Strict):
    base: str                                            # spec file, relative to this file
    name: Optional[str] = None                           # study name (default: this file's name)
    description: str = ""                                # default: the file's header comment
    set: dict[str, Any] = {}                             # dotted key -> value, for every trial
    devices_per_trial: Optional[int] = Field(None, ge=1, le=4096)  # GPUs (CPU processes) of each trial, DDP; null: 1
    pack: Optional[PackValue] = None                     # trials per pack: auto | off | N (null: auto)
    ablation: Optional[AblationSpec] = None
    search: Optional[SearchSpec] = None
    launcher: Optional[LauncherSpec] = None              # cluster jobs of `--launcher slurm|local` (search.launch)


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

    seeds, _ = seed_list(spec.seeds, where)
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
            dims.append((IntRange if ints else FloatRange)(key=key, low=r.low, high=r.high, log=r.log,
                                                           step=r.step, line=line))
            continue
        groups = _axis(key, value, where, "search")
        grouped = isinstance(value, dict) and any(isinstance(v, dict) for v in value.values())
        if grouped:
            dims.append(Groups(key=key, choices=list(groups), groups=groups, line=line))
        else:
            values = [g[0].value for g in groups.values()]
            bad = [v for v in values if not isinstance(v, OPTUNA_SCALARS)]
            if bad:
                raise where.error(f"choices must be strings, numbers, booleans or null (got {bad[0]!r}); for "
                                  f"structured values use labels: {{label: {{dotted.key: value}}}}", *path)
            dims.append(Categorical(key=key, choices=values, line=line))
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
    if PRUNERS.lookup(pruner.type).prunes and len(metrics) > 1:
        raise where.error("Optuna cannot prune multi-objective studies; use pruner: none", "search", "pruner")
    if pruner.metric not in RUN_METRICS:
        raise where.error(f"unknown metric '{pruner.metric}'{did_you_mean(pruner.metric, RUN_METRICS)}",
                          "search", "pruner", "metric")
    if SAMPLERS.lookup(spec.sampler).walks_grid:
        for d in dims:
            if d.grid_values() is None:
                raise where.error("sampler grid needs a step on float ranges (or a list of values)",
                                  "search", "space", d.key)
    return dims, metrics, pruner


def load_study_file(path: Union[str, Path], overrides: Iterable[Override] = (), name: Optional[str] = None,
                    match_multipliers: Optional[dict[str, float]] = None) -> StudyDesign:
    """Read and check an ablation or search file, with --set overrides for every trial.

    Every arm (or the space's corners) is built into a Spec here, so a bad key fails before any training.
    `match_multipliers` reuses widths chosen before (workers of a running study); otherwise a compute-matched
    ablation searches them with arches.complexity.
    """
    path = Path(path)
    lines: dict = {}
    raw = read_yaml(path, lines)
    where = Source(file=display_path(path), lines=lines)
    study_keys, overrides = split_overrides(overrides)    # --set search.trials=4: the file's own keys
    for key, value in study_keys:
        set_study_key(raw, where, key, value)
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
    common = dict(name=name or doc.name or path.stem, file=path, base=base, text=path.read_text(), document=data,
                  source=source, overrides=cli, devices_per_trial=doc.devices_per_trial,
                  devices_line=where.line("devices_per_trial"), pack=doc.pack, pack_line=where.line("pack"),
                  launcher=doc.launcher.model_dump(exclude_unset=True) if doc.launcher else {})
    common["description"] = doc.description or header_comment(common["text"])
    section = next(k for k in LOADERS if getattr(doc, k) is not None)
    plan = LOADERS[section](getattr(doc, section), common, where, match_multipliers)
    _check_validation_metrics(plan, where)
    return plan


def _ablation_plan(spec: AblationSpec, common: dict, where: Locator,
                   match_multipliers: Optional[dict[str, float]]) -> AblationPlan:
    """The checked AblationPlan of an `ablation:` section (every arm built once; widths matched)."""
    axes, arms, seeds, metrics = _load_ablation(spec, where)
    match = MatchSpec(by=spec.match) if isinstance(spec.match, str) else spec.match
    plan = AblationPlan(**common, axes=axes, arms=arms, seeds=seeds, metrics=metrics, max_attempts=spec.max_attempts,
                        match=match, pivot=spec.pivot, seed_rule=seed_list(spec.seeds, where)[1])
    _check_pivot(plan, where)
    for a in plan.arms:
        plan.arm_spec(a.name, plan.seeds[0])       # validate every arm now (one-line errors)
    if plan.match:
        if any(s.key == "width_multiplier" for a in plan.arms for s in a.settings):
            raise where.error("a compute-matched ablation chooses width_multiplier itself; do not set it in "
                              "an arm", "ablation", "match")
        match_arms(plan, known=match_multipliers)
    return plan


def _search_plan(spec: SearchSpec, common: dict, where: Locator, match_multipliers: Any = None) -> SearchPlan:
    """The checked SearchPlan of a `search:` section (the space's corners built once)."""
    dimensions, metrics, pruner = _load_search(spec, where)
    walks_grid = SAMPLERS.lookup(spec.sampler).walks_grid
    trials = grid_size(dimensions) if walks_grid and "trials" not in spec.model_fields_set else spec.trials
    plan = SearchPlan(**common, dimensions=dimensions, metrics=metrics, pruner=pruner, sampler=spec.sampler,
                      sampler_seed=spec.sampler_seed, trials=trials, timeout=spec.timeout,
                      max_attempts=spec.max_attempts, importance=spec.importance)
    if spec.design_spaces is not None:
        check_design_spaces(spec, [d.key for d in plan.dimensions], where)
        groups = {str(n): _settings(v, where, "search", "design_spaces", n) for n, v in spec.design_spaces.items()}
        plan.dimensions.insert(0, Groups(key=DESIGN_SPACE, choices=list(groups), groups=groups,
                                         line=where.line("search", "design_spaces")))
        plan.design_spaces, plan.sampler = list(groups), "random"
        plan.pruner = PrunerSpec(type="none")          # every net trains fully, or the EDFs favour fast starters
    _check_space(plan)
    return plan


LOADERS = {"ablation": _ablation_plan, "search": _search_plan}    # the file's section -> its plan


def _check_validation_metrics(plan: StudyDesign, where: Locator) -> None:
    """A val/ metric (objective or pruner) needs a validation split."""
    needs = [m.name for m in plan.metrics if m.name.startswith("val/")]
    if plan.prune_metric is not None:
        needs.append(plan.prune_metric)
    if needs and not plan.build([]).data.val_size:
        raise where.error(f"{needs[0]} needs a validation split, but data.val_size is 0", *plan.metric_path)


def grid_size(dims: list[Dimension]) -> int:
    n = 1
    for d in dims:
        n *= len(d.grid_values() or [0])
    return n


def _check_pivot(plan: AblationPlan, where: Locator) -> None:
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


def _check_space(plan: SearchPlan) -> None:
    """Build the spec at each choice and range end (others at their first value) to catch bad keys early."""
    first = {d.key: d.ends()[0] for d in plan.dimensions}
    plan.search_spec(first)
    for d in plan.dimensions:
        for v in d.ends()[1:]:
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
