"""Comparing arms over seeds: n, mean, std, and the difference from a reference arm with a 95% CI and p-value.

Arms run with the same seeds share data order and initial weights, so their results are paired by seed: the
paired t-test (scipy.stats.ttest_rel) on the per-seed differences. Arms whose seeds do not match (a seed
failed in one of them) are compared with Welch's t-test (scipy.stats.ttest_ind, equal_var=False).

With more than one comparison per metric (more than two arms), each p-value is also given Holm-adjusted
(Holm 1979, step-down Bonferroni; controls the family-wise error rate over the metric's comparisons).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass
class Comparison:
    diff: float                      # mean(arm) - mean(reference) (paired: mean of the per-seed differences)
    ci_low: float
    ci_high: float
    p: float                         # two-sided; NaN when it cannot be computed (n < 2, no variance)
    test: str                        # 'paired t' | 'Welch t'
    n: int                           # pairs (paired) or arm's n (Welch)
    p_holm: Optional[float] = None   # Holm-adjusted p over the metric's comparisons (None: only one)


@dataclass
class ArmStats:
    arm: str
    reference: str
    n: int
    mean: float
    std: float                       # sample standard deviation (ddof=1); NaN for n < 2
    values: dict[int, float] = field(default_factory=dict)   # seed -> value
    comparison: Optional[Comparison] = None                  # None for the reference arm itself

    def to_dict(self) -> dict:
        d = asdict(self)
        d["values"] = {str(k): v for k, v in self.values.items()}
        return d


def count_mean_std(values: Sequence[float]) -> tuple[int, float, float]:
    """n, mean, sample std (NaN when undefined)."""
    a = np.asarray(values, dtype=float)
    n = len(a)
    mean = float(a.mean()) if n else math.nan
    std = float(a.std(ddof=1)) if n >= 2 else math.nan
    return n, mean, std


@dataclass(frozen=True)
class Summary:
    """n, mean and sample std of one quantity over seeds (count_mean_std's figures); std is None when n < 2."""
    n: int
    mean: float
    std: Optional[float]

    @classmethod
    def of(cls, values: Sequence[float]) -> "Summary":
        n, mean, std = count_mean_std(values)
        return cls(n, mean, std if n >= 2 else None)

    def __str__(self) -> str:
        return f"{self.mean:.3f}" + (f" ± {self.std:.3f}" if self.std is not None else "")


def compare(arm: dict[int, float], reference: dict[int, float]) -> Optional[Comparison]:
    """Difference of `arm` from `reference` (seed -> value each); paired when their seeds match."""
    if not arm or not reference:
        return None
    seeds = sorted(arm)
    if set(arm) == set(reference) and len(seeds) >= 2:
        a = np.array([arm[s] for s in seeds], dtype=float)
        b = np.array([reference[s] for s in seeds], dtype=float)
        d = a - b
        n, mean, sd = len(d), float(d.mean()), float(d.std(ddof=1))
        half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)
        p = float(stats.ttest_rel(a, b).pvalue) if sd > 0 else math.nan
        return Comparison(mean, mean - half, mean + half, p, "paired t", n)
    a = np.array(list(arm.values()), dtype=float)
    b = np.array(list(reference.values()), dtype=float)
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2 or (a.std() == 0 and b.std() == 0):
        return Comparison(diff, math.nan, math.nan, math.nan, "Welch t", len(a))
    res = stats.ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(CONFIDENCE)
    return Comparison(diff, float(ci.low), float(ci.high), float(res.pvalue), "Welch t", len(a))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the given order: the i-th smallest of m p-values is multiplied by
    (m - i + 1), then made monotone (never below the adjusted p before it) and capped at 1. NaN stays NaN and
    does not count towards m."""
    finite = sorted((p, i) for i, p in enumerate(pvalues) if p == p)
    m, running = len(finite), 0.0
    out = [math.nan] * len(pvalues)
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def compare_arms(values: dict[str, dict[int, float]], references: dict[str, str]) -> list[ArmStats]:
    """One ArmStats per arm (in the order of `references`), each compared with its reference arm; with more than
    one comparison, their p-values are Holm-adjusted together."""
    out = []
    for arm, ref in references.items():
        mine = values.get(arm, {})
        n, mean, std = count_mean_std(list(mine.values()))
        comparison = None if arm == ref else compare(mine, values.get(ref, {}))
        out.append(ArmStats(arm, ref, n, mean, std, dict(mine), comparison))
    comparisons = [a.comparison for a in out if a.comparison is not None]
    if len(comparisons) > 1:
        for c, adjusted in zip(comparisons, holm([c.p for c in comparisons])):
            c.p_holm = adjusted
    return out
