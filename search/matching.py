"""Compute-matched ablations: scale each arm's widths until its MACs (or params) match its baseline's.

Cost grows with `width_multiplier` (about quadratically, in steps because widths round to whole channels), so a
bisection over the multiplier on arches.complexity (meta device: no memory, no compute) finds one within the
tolerance, or says how close it can get.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

from arches import Spec, complexity
from arches.errors import SpecError

MAX_STEPS = 60
SEARCH_RANGE = (1 / 16, 16.0)


def cost_of(spec: Spec, by: str) -> int:
    """MACs or params of a spec (one image at its input size)."""
    c = complexity(spec)
    return c.macs if by == "macs" else c.params


def match_multiplier(make_spec: Callable[[float], Spec], target: float, by: str, tolerance: float,
                     start: float = 1.0) -> tuple[float, int]:
    """The width multiplier m (and its cost) with |cost(m) / target - 1| <= tolerance, by bisection on log m.

    Raises SpecError when no multiplier gets within the tolerance (whole channels move cost in steps)."""
    def cost(m: float) -> int:
        return cost_of(make_spec(m), by)

    def error(c: int) -> float:
        return abs(c / target - 1.0)

    best = (start, cost(start))
    if error(best[1]) <= tolerance:
        return best
    lo, hi = math.log(SEARCH_RANGE[0]), math.log(SEARCH_RANGE[1])
    x = math.log(start)
    if best[1] < target:
        lo = x
    else:
        hi = x
    for _ in range(MAX_STEPS):
        mid = (lo + hi) / 2
        m = round(math.exp(mid), 6)
        c = cost(m)
        if error(c) < error(best[1]):
            best = (m, c)
        if error(c) <= tolerance:
            return m, c
        if c < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-6:
            break
    m, c = best
    raise SpecError(f"cannot match {by}: the closest width multiplier {m:g} gives {c:,} vs the baseline's "
                    f"{int(target):,} ({error(c):.1%} off, tolerance {tolerance:.1%}); raise match.tolerance")


def match_arms(plan, known: Optional[dict[str, float]] = None) -> dict[str, float]:
    """Choose every arm's width_multiplier so its cost is within tolerance of its reference arm's.

    Reference arms keep the base spec's multiplier. `known` (chosen earlier, stored in the study) is reused
    as is. Sets `arm.width_multiplier` and returns {arm: multiplier}."""
    match = plan.match
    chosen: dict[str, float] = {}
    for arm in plan.arms:
        if known and arm.name in known:
            arm.width_multiplier = known[arm.name]
            chosen[arm.name] = known[arm.name]
            continue
        if arm.reference == arm.name:
            arm.width_multiplier = None
            chosen[arm.name] = float(plan.build(arm.settings).width_multiplier)
            continue
        ref = plan.arm(arm.reference)
        target = cost_of(plan.build(ref.settings), match.by)
        base = plan.build(arm.settings)

        def make(m: float, _arm=arm) -> Spec:
            return plan.build(_arm.settings, width_multiplier=m)

        try:
            m, _ = match_multiplier(make, target, match.by, match.tolerance, start=base.width_multiplier)
        except SpecError as e:
            raise SpecError(f"arm {arm.name}: {e.message}", file=str(plan.file), path="ablation.match") from None
        arm.width_multiplier = m
        chosen[arm.name] = m
    return chosen

