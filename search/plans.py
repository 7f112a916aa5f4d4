"""A loaded study file: an AblationPlan (arms x seeds) or a SearchPlan (a space Optuna samples), one interface.

Whatever runs or records a study asks its plan, never which kind it holds: the trials given up front
(fixed_cells), Optuna's sampler and pruner, the spec and the run of one trial (start_trial), the labels it prints,
and what a report needs (meta). `search.space.load_study_file` makes one.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Optional

from arches import Spec, spec_from_dict, spec_hash
from arches.spec import Override, Source

from .choices import PRUNERS, SAMPLERS
from .design_spaces import design_space_cells
from .dimensions import Dimension
from .settings import Setting, apply_setting


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
class TrialStart:
    """What one trial trains and how its run is named: the plan's answer for one Optuna trial."""
    values: dict[str, Any]                               # what the trial stands for (MLflow records of a failure)
    settings: list[Setting]                              # applied to the plan's document: the trial's spec
    run_name: str                                        # the MLflow child run's name
    tags: dict[str, str] = field(default_factory=dict)   # the child run's own tags
    params: Optional[dict[str, Any]] = None              # the child run's params (None: the spec's)
    record: dict[str, Any] = field(default_factory=dict)  # TrialRecord fields to put on the trial first
    width_multiplier: Optional[float] = None             # compute-matched width


@dataclass(kw_only=True)
class StudyDesign:
    """What every study file holds, and the questions a study asks of it (answered by each kind)."""
    name: str                                            # study name
    file: Path
    base: Path
    text: str                                            # the file as written
    document: dict                                       # the base spec with `set:` and --set applied
    source: Source
    metrics: list[Metric] = field(default_factory=list)  # ablation: reported metrics (first = objective)
    overrides: list[Override] = field(default_factory=list)  # the command line's --set
    max_attempts: int = 3                                # a cell whose worker died this often is given up
    description: str = ""                                # `description:`, else the file's header comment
    devices_per_trial: Optional[int] = None              # the file's devices_per_trial (the study's: search.study)
    devices_line: Optional[int] = None                   # where the file says it
    pack: Any = None                                     # the file's `pack:` (auto | off | N; search.packing)
    pack_line: Optional[int] = None                      # where the file says it
    launcher: dict = field(default_factory=dict)         # the `launcher:` keys the file sets (search.launch)
    timeout: Optional[float] = None                      # seconds per command after which no new trial starts
    kind: ClassVar[str] = ""                             # ablation | search: its section, stored as reslab.kind
    metric_path: ClassVar[tuple] = ()                    # where the file lists the metrics (for errors)
    how_to_read: ClassVar[str] = ""                      # the MLflow description's second paragraph

    @property
    def objectives(self) -> list[Metric]:
        """What Optuna optimises."""
        return self.metrics

    @property
    def prune_metric(self) -> Optional[str]:
        """The per-epoch metric a pruner watches (None: trials are never pruned)."""
        return None

    def fixed_cells(self) -> Optional[list[dict]]:
        """Trials given up front (their Optuna params), or None when a sampler draws them."""
        raise NotImplementedError

    def wants_sampled(self, used: int) -> bool:
        """Whether a new sampled trial is due, `used` trials counting against the budget."""
        return False

    def make_sampler(self, worker: int, workers: int) -> Any:
        """Optuna's sampler for worker `worker` of `workers`."""
        raise NotImplementedError

    def make_pruner(self) -> Any:
        """Optuna's pruner."""
        return PRUNERS.lookup("none").make(0)

    def start_trial(self, trial: Any) -> TrialStart:
        """The values, settings and run of an Optuna trial (enqueued values come back; others are sampled)."""
        raise NotImplementedError

    def cell_label(self, trial: Any) -> str:
        """' [what]' naming the trial's cell on its 'started' line ('' when it has none)."""
        return ""

    def params_label(self, params: dict) -> str:
        """The trial's params as its result line shows them."""
        raise NotImplementedError

    def size(self) -> str:
        """'3 arms x 2 seeds', '4 dimensions, 20 trials': what `validate` says it holds."""
        raise NotImplementedError

    def trials_planned(self) -> int:
        """How many trials the study trains at most: its fixed cells."""
        return len(self.fixed_cells() or [])

    def variants(self, threads: Optional[int] = None) -> dict[str, list[Spec]]:
        """Specs standing for what the study varies, by name (search.packing asks whether they can share a pack)."""
        raise NotImplementedError

    def trial_spec(self, start: TrialStart, threads: Optional[int] = None, devices: Optional[int] = None) -> Spec:
        """The spec of one trial (`threads`: the study's CPU threads when the spec gives none; `devices`: the
        study's devices per trial)."""
        return self.build(start.settings, start.width_multiplier, threads, devices)

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
        source.data = copy.deepcopy(data)     # diff_from_base: what the arm or sample (and seed) changed
        if threads is not None and (data.get("train") or {}).get("threads") is None:
            apply_setting(data, source, Setting("train.threads", threads, "<study>", None))
        if devices is not None:
            apply_setting(data, source, Setting("train.devices", devices, "<study>", None))
        return spec_from_dict(data, source)

    def fingerprint_parts(self) -> Any:
        """What decides the trials, as JSON."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Hash of everything that decides the trials: a study must not be resumed with another definition."""
        parts = {"kind": self.kind, "parts": self.fingerprint_parts()}
        text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def meta(self) -> dict:
        """What a report needs without the file: arms, references, seeds, metrics, views (JSON)."""
        return {
            "kind": self.kind, "name": self.name, "file": str(self.file), "base": str(self.base),
            "metrics": [{"name": m.name, "goal": m.goal} for m in self.metrics],
            "axes": {}, "seeds": [], "arms": [], "match": None, "pivot": None, "dimensions": [], "importance": None,
            "description": self.description,
        }

    def mlflow_description(self) -> str:
        """The study's description in MLflow (experiment and parent run): the file's own words, then how to read
        it."""
        return f"{self.description}\n\n{self.how_to_read}" if self.description else self.how_to_read


@dataclass(kw_only=True)
class AblationPlan(StudyDesign):
    """A grid of arms x seeds, every arm compared with its reference arm."""
    axes: dict[str, list[str]] = field(default_factory=dict)   # axis -> its labels
    arms: list[Arm] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    match: Any = None                                    # MatchSpec: compute-matched widths (None: as written)
    pivot: Any = None                                    # PivotSpec: an extra report view (None: none)
    seed_rule: Any = None                                # SeedRule: how many of `seeds` run (search.seeding)
    kind: ClassVar[str] = "ablation"
    metric_path: ClassVar[tuple] = ("ablation", "metric")
    how_to_read: ClassVar[str] = (
        "Each arm x seed is a child run (params arm, seed; tags arm, seed). The parent run's description is the "
        "report (per arm: n, mean ± std over seeds, Δ with 95% CI and p); its artifacts results/ hold the per-seed "
        "values (results.md), the per-arm table arms.json and curves.png.")

    @property
    def objectives(self) -> list[Metric]:
        """The first metric: the one Optuna records."""
        return self.metrics[:1]

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(name)

    def cells(self) -> list[tuple[str, int]]:
        """Every (arm, seed) an ablation trains, arms in file order."""
        return [(a.name, s) for a in self.arms for s in self.seeds]

    def fixed_cells(self) -> Optional[list[dict]]:
        return [{"arm": a, "seed": s} for a, s in self.cells()]

    def make_sampler(self, worker: int, workers: int) -> Any:
        return SAMPLERS.lookup("random").make(None, workers)   # (every trial is enqueued: nothing is sampled)

    def cell_of(self, trial: Any) -> tuple[str, int]:
        """The (arm, seed) an enqueued ablation trial was given."""
        return (trial.suggest_categorical("arm", [a.name for a in self.arms]),
                trial.suggest_categorical("seed", self.seeds))

    def arm_settings(self, arm: str, seed: int) -> list[Setting]:
        return self.arm(arm).settings + [Setting("train.seed", seed, "<seed>", None)]

    def arm_spec(self, arm: str, seed: int, threads: Optional[int] = None, devices: Optional[int] = None) -> Spec:
        """The spec of one ablation cell."""
        return self.build(self.arm_settings(arm, seed), self.arm(arm).width_multiplier, threads, devices)

    def variants(self, threads: Optional[int] = None) -> dict[str, list[Spec]]:
        """Each arm's spec at the first seed."""
        return {f"arm {a.name}": [self.arm_spec(a.name, self.seeds[0], threads)] for a in self.arms}

    def start_trial(self, trial: Any) -> TrialStart:
        arm, seed = self.cell_of(trial)
        a = self.arm(arm)
        values: dict[str, Any] = {"arm": arm, "seed": seed, **a.labels}
        if a.width_multiplier is not None:
            values["width_multiplier"] = a.width_multiplier
        return TrialStart(values, self.arm_settings(arm, seed), f"{arm} seed {seed}", {"arm": arm, "seed": str(seed)},
                          {"arm": arm, "seed": seed}, {"arm": arm, "seed": seed}, a.width_multiplier)

    def cell_label(self, trial: Any) -> str:
        return " [{} seed {}]".format(*self.cell_of(trial))

    def params_label(self, params: dict) -> str:
        return f"{params.get('arm')} seed {params.get('seed')}"

    def size(self) -> str:
        rule = self.seed_rule
        seeds = f"{rule.min}..{rule.max} seeds to ±{rule.precision:g}" if rule else f"{len(self.seeds)} seeds"
        return f"{len(self.arms)} arms x {seeds}"

    def fingerprint_parts(self) -> Any:
        return [[a.name, s, spec_hash(self.arm_spec(a.name, s))] for a in self.arms for s in self.seeds]

    def meta(self) -> dict:
        return {**super().meta(), "axes": self.axes, "seeds": self.seeds,
                "arms": [{"name": a.name, "labels": a.labels, "reference": a.reference,
                          "width_multiplier": a.width_multiplier} for a in self.arms],
                "match": self.match.model_dump() if self.match else None,
                "pivot": self.pivot.model_dump() if self.pivot else None,
                "seed_rule": self.seed_rule.model_dump() if self.seed_rule else None}


@dataclass(kw_only=True)
class SearchPlan(StudyDesign):
    """A space Optuna samples (or a grid it walks), judged on one or more objectives."""
    dimensions: list[Dimension] = field(default_factory=list)
    sampler: str = "tpe"                                 # a name in search.choices.SAMPLERS
    sampler_seed: Optional[int] = None                   # worker w seeds its sampler with sampler_seed + 1000 w
    pruner: Any = None                                   # PrunerSpec
    trials: int = 0                                      # the budget, over all workers and restarts
    importance: str = "ped-anova"                        # Optuna's parameter-importance evaluator
    design_spaces: list[str] = field(default_factory=list)  # the same draws in each (search.design_spaces)
    kind: ClassVar[str] = "search"
    metric_path: ClassVar[tuple] = ("search", "objectives")
    how_to_read: ClassVar[str] = ("Each trial is a child run (params trial.*). The parent run holds the report "
                                  "(results/results.md, pareto.png, importances).")

    @property
    def prune_metric(self) -> Optional[str]:
        return self.pruner.metric if self.pruner is not None and PRUNERS.lookup(self.pruner.type).prunes else None

    def fixed_cells(self) -> Optional[list[dict]]:
        if self.design_spaces:
            return design_space_cells(self)
        if not SAMPLERS.lookup(self.sampler).walks_grid:
            return None
        keys = [d.key for d in self.dimensions]
        grid = [dict(zip(keys, combo)) for combo in itertools.product(*(d.grid_values() for d in self.dimensions))]
        return grid[:self.trials]

    def wants_sampled(self, used: int) -> bool:
        return self.fixed_cells() is None and used < self.trials

    def make_sampler(self, worker: int, workers: int) -> Any:
        seed = None if self.sampler_seed is None else self.sampler_seed + 1000 * worker
        return SAMPLERS.lookup(self.sampler).make(seed, workers)

    def make_pruner(self) -> Any:
        if self.pruner is None:
            return super().make_pruner()
        return PRUNERS.lookup(self.pruner.type).make(self.pruner.warmup_epochs)

    def sample(self, trial: Any) -> dict[str, Any]:
        """Draw one value per dimension (enqueued retries get their fixed values back)."""
        return {d.key: d.suggest(trial) for d in self.dimensions}

    def value_settings(self, values: dict[str, Any]) -> list[Setting]:
        return [s for d in self.dimensions for s in d.settings(values[d.key], str(self.file))]

    def search_spec(self, values: dict[str, Any], threads: Optional[int] = None,
                    devices: Optional[int] = None) -> Spec:
        """The spec of one search trial from its sampled values (Optuna params)."""
        return self.build(self.value_settings(values), threads=threads, devices=devices)

    def trials_planned(self) -> int:
        """The grid's or design spaces' cells, else the trial budget."""
        cells = self.fixed_cells()
        return len(cells) if cells is not None else self.trials

    def variants(self, threads: Optional[int] = None) -> dict[str, list[Spec]]:
        """Per searched key: a spec at each end of its range (or each choice), the other keys at their first."""
        first = {d.key: d.ends()[0] for d in self.dimensions}
        return {d.key: [self.search_spec({**first, d.key: v}, threads=threads) for v in d.ends()]
                for d in self.dimensions}

    def start_trial(self, trial: Any) -> TrialStart:
        values = self.sample(trial)
        return TrialStart(values, self.value_settings(values), f"trial {trial.number}")

    def params_label(self, params: dict) -> str:
        return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())

    def size(self) -> str:
        if self.design_spaces:
            return f"{len(self.design_spaces)} design spaces x {self.trials} nets"
        return f"{len(self.dimensions)} dimensions, {self.trials} trials"

    def fingerprint_parts(self) -> Any:
        parts = {"document": self.document, "space": [d.as_json() for d in self.dimensions],
                 "objectives": [(m.name, m.goal) for m in self.metrics]}
        return {**parts, "draws": design_space_cells(self)} if self.design_spaces else parts

    def meta(self) -> dict:
        return {**super().meta(), "dimensions": [d.key for d in self.dimensions], "importance": self.importance,
                "design_spaces": self.design_spaces or None}


PLANS: dict[str, type[StudyDesign]] = {p.kind: p for p in (AblationPlan, SearchPlan)}   # file section -> plan
