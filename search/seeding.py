"""Adaptive seeds: an ablation adds paired seeds until every arm's difference from its baseline is known to
+-precision (the 95% CI's half-width), or `max` seeds ran. It stops on precision, never on p: stopping when p
crosses 0.05 ("optional stopping") inflates false positives, a fixed precision target does not look at the sign
or size of the difference at all.

    ablation:
      seeds: {min: 3, max: 12, precision: 0.3}   # metric units; percentage points for error and accuracy

The rule, evaluated on the objective (the first metric): with n = min, while every cell of the first n seeds is
finished, n < max and some comparison's half-width exceeds `precision`, n += 1 (one more seed for every arm). A
comparison uses the seeds both arms completed. The rule reads only finished trials, so every worker, a resumed
study and the report reach the same n.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import integrate, optimize, stats

CONFIDENCE = 0.95                                        # the CI whose half-width is held to `precision`
POWER = 0.80                                             # of the detectable difference the report gives
PRECISION = "precision"                                  # why the seeds stopped: every CI narrow enough ...
AT_MAX = "max"                                           # ... the largest number of seeds ran ...
RUNNING = "running"                                      # ... or not stopped yet


class SeedRule(BaseModel):
    """`seeds: {min, max, precision}` of an ablation file."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    min: int = Field(3, ge=2, le=1000)                   # paired seeds every arm trains before the rule looks
    max: int = Field(12, ge=2, le=1000)                  # never more seeds than this
    precision: float = Field(gt=0, le=1e12)              # the 95% CI of each difference: narrower than +-this


def in_points(metric: str) -> bool:
    """Errors and accuracies are fractions in the record, percentage points in `precision`."""
    return metric.endswith("/error") or metric.endswith("/acc")


def scale(metric: str) -> float:
    """Factor from the recorded value to the units `precision` is written in."""
    return 100.0 if in_points(metric) else 1.0


def detectable_difference(sd: float, n: int, confidence: float = CONFIDENCE, power: float = POWER) -> Optional[float]:
    """The smallest true mean difference a two-sided paired t-test on n pairs with difference std `sd` detects
    with the given power (noncentral t); None below 2 pairs."""
    if n < 2 or not math.isfinite(sd):
        return None
    if sd == 0:
        return 0.0
    df, crit = n - 1, float(stats.t.ppf(0.5 + confidence / 2, n - 1))
    high = crit + 1.0
    while t_power(high, df, crit) < power:
        high *= 2
    nc = optimize.brentq(lambda x: t_power(x, df, crit) - power, 0.0, high, xtol=1e-10)
    return nc * sd / math.sqrt(n)


def t_power(nc: float, df: int, crit: float) -> float:
    """P(|T| > crit) for T noncentral t (df, nc), integrated over the chi-square of the variance (scipy's nct
    returns NaN at small df and large nc)."""
    def density(v: float) -> float:
        shift = crit * math.sqrt(v / df)
        return (stats.norm.cdf(nc - shift) + stats.norm.cdf(-nc - shift)) * stats.chi2.pdf(v, df)

    return float(integrate.quad(density, 0, math.inf, limit=200)[0])


@dataclass
class Precision:
    """How well one arm's difference from its reference is known, in `precision` units."""
    arm: str
    reference: str
    n: int                                               # paired seeds both completed
    diff: Optional[float]                                # mean difference
    half_width: Optional[float]                          # of its 95% CI (None below 2 pairs: unknown)
    detectable: Optional[float]                          # smallest difference this n detects (80% power)

    def narrow_enough(self, precision: float) -> bool:
        return self.half_width is not None and self.half_width < precision


def precision_of(arm: str, reference: str, values: Mapping[str, Mapping[int, float]], seeds: Iterable[int],
                 factor: float = 1.0, detectable: bool = True) -> Precision:
    """The paired CI half-width and (if `detectable`) the detectable difference of arm - reference over `seeds`
    both completed."""
    seeds = [s for s in seeds if s in values.get(arm, {}) and s in values.get(reference, {})]
    d = np.array([values[arm][s] - values[reference][s] for s in seeds], dtype=float) * factor
    if len(d) < 2:
        return Precision(arm, reference, len(d), float(d.mean()) if len(d) else None, None, None)
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(d) - 1)) * sd / math.sqrt(len(d))
    return Precision(arm, reference, len(d), float(d.mean()), half,
                     detectable_difference(sd, len(d)) if detectable else None)


@dataclass
class SeedDecision:
    """Where the rule stands: how many seeds are in play, and why it stopped (or not yet)."""
    n: int                                               # the first n seeds of the plan are to run
    reason: str                                          # PRECISION | AT_MAX | RUNNING
    precision: float
    metric: str
    comparisons: list[Precision]                         # at n, one per arm with a reference other than itself

    def sentence(self) -> str:
        """Why the seeds stopped, for the report."""
        unit = " percentage points" if in_points(self.metric) else f" ({self.metric} units)"
        if self.reason == PRECISION:
            return (f"seeds: stopped at n = {self.n}: every 95% CI of {self.metric} is narrower than "
                    f"±{self.precision:g}{unit}")
        wide = [c.arm for c in self.comparisons if not c.narrow_enough(self.precision)]
        if self.reason == AT_MAX:
            return (f"seeds: stopped at the maximum n = {self.n}; still wider than ±{self.precision:g}{unit}: "
                    f"{', '.join(wide)}")
        return f"seeds: {self.n} in play, not stopped yet (wider than ±{self.precision:g}{unit}: {', '.join(wide)})"

    def to_dict(self) -> dict:
        return {**asdict(self), "sentence": self.sentence()}


def decide(rule: SeedRule, seeds: list[int], references: Mapping[str, str], metric: str,
           values: Mapping[str, Mapping[int, float]], finished: set[tuple[str, int]]) -> SeedDecision:
    """Apply the rule: `values` arm -> seed -> the metric of complete trials; `finished` the (arm, seed) cells
    that will not run again (complete, or failed for good); `references` arm -> its baseline arm."""
    factor = scale(metric)
    arms = list(references)
    n = min(rule.min, rule.max, len(seeds))

    def at(n: int, reason: str) -> SeedDecision:
        return SeedDecision(n, reason, rule.precision, metric, [precision_of(a, references[a], values, seeds[:n],
                                                                             factor) for a in arms if references[a] != a])
    while True:
        if not all((a, s) in finished for a in arms for s in seeds[:n]):
            return at(n, RUNNING)
        if all(precision_of(a, references[a], values, seeds[:n], factor, detectable=False).narrow_enough(
                rule.precision) for a in arms if references[a] != a):
            return at(n, PRECISION)
        if n >= min(rule.max, len(seeds)):
            return at(n, AT_MAX)
        n += 1


def seed_list(value, where) -> tuple[list[int], Optional[SeedRule]]:
    """(the seeds a plan may use, its rule) from an ablation's `seeds:`: N -> 0..N-1, a list, or a rule (0..max-1).
    `where` (an arches.errors.Locator of the file) places one-line errors."""
    if isinstance(value, SeedRule):
        if value.max < value.min:
            raise where.error(f"seeds: max ({value.max}) must be at least min ({value.min})", "ablation", "seeds",
                              "max")
        return list(range(value.max)), value
    seeds = list(range(value)) if isinstance(value, int) else list(value)
    if not seeds or len(set(seeds)) < len(seeds):
        raise where.error("seeds must be a positive count, a list of distinct integers or {min, max, precision}",
                          "ablation", "seeds")
    return seeds, None


def cells_in_play(plan, cells: dict[str, dict]) -> dict[str, dict]:
    """The ablation cells (search.study.cell_status) of the seeds the plan's rule has in play; all without a rule."""
    if getattr(plan, "seed_rule", None) is None:          # searches, and ablations of fixed seeds
        return cells
    decision = plan_decision(plan, cells)
    seeds = set(plan.seeds[:decision.n])
    return {k: c for k, c in cells.items() if c["params"]["seed"] in seeds}


def plan_decision(plan, cells: dict[str, dict]) -> SeedDecision:
    """The rule applied to a study's cells: complete trials give values, done or given-up cells are finished."""
    from optuna.trial import TrialState

    from .trials import TrialRecord

    metric = plan.metrics[0].name
    values: dict[str, dict[int, float]] = {a.name: {} for a in plan.arms}
    finished = set()
    for cell in cells.values():
        arm, seed = cell["params"]["arm"], cell["params"]["seed"]
        if cell["done"] or cell["attempts"] >= plan.max_attempts:
            finished.add((arm, seed))
        for t in cell["trials"]:
            record = TrialRecord.of(t)
            if t.state == TrialState.COMPLETE and metric in record.metrics:
                values[arm][seed] = float(record.metrics[metric])
    return decide(plan.seed_rule, plan.seeds, {a.name: a.reference for a in plan.arms}, metric, values, finished)


def summary_decision(meta: dict, values: Mapping[str, Mapping[int, float]], arms: Mapping[str, Any]) -> dict:
    """The rule applied to a report's data (search.report.AblationReport): `values` arm -> seed -> the objective
    of complete trials, `arms` its ArmRows (complete and failed seeds). As a dict for the report."""
    rule = SeedRule(**meta["seed_rule"])
    finished = {(a, s) for a, row in arms.items() for s in [*row.complete, *(f.seed for f in row.failed)]}
    references = {a: row.reference for a, row in arms.items()}
    return decide(rule, meta["seeds"], references, meta["metrics"][0]["name"], values, finished).to_dict()


def seeding_lines(seeding: dict) -> list[str]:
    """The report's lines: why the seeds stopped; per comparison n, CI half-width, smallest detectable difference."""
    unit = " pp" if in_points(seeding["metric"]) else ""
    lines = [seeding["sentence"] + ". Seeds stop on the CI's width, never on p (stopping when p < 0.05 would "
             "inflate false positives)."]
    for c in seeding["comparisons"]:
        half = "—" if c["half_width"] is None else f"±{c['half_width']:.3g}{unit}"
        mdd = "—" if c["detectable"] is None else f"{c['detectable']:.3g}{unit}"
        lines.append(f"  {c['arm']} vs {c['reference']}: n = {c['n']}, 95% CI half-width {half}, smallest "
                     f"difference this n detects (80% power, paired t) {mdd}")
    return lines
