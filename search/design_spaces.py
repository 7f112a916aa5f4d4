"""Design spaces, not single nets (Radosavovic et al. 2019, "On Network Design Spaces for Visual Recognition").

A search file may declare several design spaces over the same `space:` ranges:

    search:
      space: {stages.*.depth: {low: 1, high: 3}, width_multiplier: {low: 0.25, high: 0.75}}
      design_spaces:                   # name -> overrides that make the space (applied after the sampled values)
        plain: {block.type: plain}
        residual: {block.type: basic}
      trials: 8                        # nets sampled from EACH design space
      sampler_seed: 0                  # the draws: one seeded uniform sample, the same N points in every space

Every design space trains the same N points (draw i of `plain` and of `residual` differ only in the design space),
so their error distributions differ by the design alone. The report draws, per design space, the error EDF
F(e) = share of nets with error < e, normalised by complexity as in the paper: MACs are binned (log-spaced bins
over all nets), and within a design space a net weighs 1 / (bins the space occupies x nets in its bin), so every
occupied complexity bin counts equally and a space is not favoured for holding more small (or large) nets. The
band is a 95% bootstrap interval (nets resampled within each space, 1000 times); D is the largest gap between two
normalised EDFs (the paper's Kolmogorov-Smirnov statistic).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from optuna.trial import TrialState

DESIGN_SPACE = "design_space"            # the Optuna parameter (and groups dimension) naming a trial's space
BINS = 10                                # complexity bins of the normalised EDF
BOOTSTRAP = 1000                         # resamples of the EDF band
CONFIDENCE = 0.95


def draw(dim: Any, rng: np.random.Generator) -> Any:
    """One uniform draw from a search dimension (log-uniform for log ranges), as a plain Python value."""
    if dim.kind in ("categorical", "groups"):
        return dim.choices[int(rng.integers(len(dim.choices)))]
    grid = dim.grid_values()
    if dim.kind == "int" and not dim.log:
        return int(grid[int(rng.integers(len(grid)))])
    if dim.kind == "int":                       # log-uniform over [low, high + 1), floored
        return int(min(math.floor(math.exp(rng.uniform(math.log(dim.low), math.log(dim.high + 1)))), dim.high))
    if grid is not None:
        return float(grid[int(rng.integers(len(grid)))])
    if dim.log:
        return float(math.exp(rng.uniform(math.log(dim.low), math.log(dim.high))))
    return float(rng.uniform(dim.low, dim.high))


def design_space_cells(plan: Any) -> list[dict]:
    """The trials of a design-space study: N seeded draws of the shared dimensions, each in every design space
    (draw 0 in every space, then draw 1, ...: a study stopped half-way stays balanced)."""
    rng = np.random.default_rng(plan.sampler_seed or 0)
    spaces = next(d for d in plan.dimensions if d.key == DESIGN_SPACE)
    shared = [d for d in plan.dimensions if d.key != DESIGN_SPACE]
    draws = [{d.key: draw(d, rng) for d in shared} for _ in range(plan.trials)]
    return [{DESIGN_SPACE: name, **point} for point in draws for name in spaces.choices]


# ---------------------------------------------------------------- the analysis

def complexity_weights(costs: Sequence[float], edges: np.ndarray) -> np.ndarray:
    """Weights of one design space's nets: every occupied complexity bin (edges) weighs the same, shared by its nets."""
    costs = np.asarray(costs, dtype=float)
    bins = np.clip(np.searchsorted(edges, costs, side="right") - 1, 0, len(edges) - 2)
    counts = np.bincount(bins, minlength=len(edges) - 1)
    occupied = int((counts > 0).sum())
    return 1.0 / (occupied * counts[bins])


def edf(errors: Sequence[float], weights: Sequence[float], at: np.ndarray) -> np.ndarray:
    """Weighted empirical distribution: the weight share of nets with error < each value of `at`."""
    errors, weights = np.asarray(errors, dtype=float), np.asarray(weights, dtype=float)
    return np.array([weights[errors < e].sum() for e in at]) / weights.sum()


def bin_edges(costs: Sequence[float], bins: int = BINS) -> np.ndarray:
    """Log-spaced complexity bins over all nets (one bin when every net costs the same)."""
    low, high = float(min(costs)), float(max(costs))
    if high <= low or low <= 0:
        return np.array([low - 0.5, high + 0.5])
    return np.geomspace(low, high * (1 + 1e-9), bins + 1)


def design_space_summary(meta: dict, trials: list) -> dict:
    """Per design space: its nets (error, MACs), the normalised EDF with a bootstrap band on a shared error grid,
    n, min, median, mean ± std; and D for every pair of spaces. Errors of the first objective."""
    metric = meta["metrics"][0]["name"]
    spaces: dict[str, dict] = {name: {"name": name, "errors": [], "macs": [], "trials": []}
                               for name in meta["design_spaces"]}
    for t in trials:
        name = t.params.get(DESIGN_SPACE)
        if t.state != TrialState.COMPLETE or name not in spaces or not t.values:
            continue
        macs = (t.user_attrs.get("reslab.cost") or {}).get("macs")
        if macs is None:
            continue
        spaces[name]["errors"].append(float(t.values[0]))
        spaces[name]["macs"].append(float(macs))
        spaces[name]["trials"].append(t.number)
    filled = [s for s in spaces.values() if s["errors"]]
    out: dict[str, Any] = {"metric": metric, "spaces": list(spaces.values()), "pairs": [], "grid": [],
                           "bins": BINS, "bootstrap": BOOTSTRAP}
    if not filled:
        return out
    all_errors = [e for s in filled for e in s["errors"]]
    edges = bin_edges([m for s in filled for m in s["macs"]])
    lo, hi = min(all_errors), max(all_errors)
    grid = np.linspace(lo - 1e-9, hi + (hi - lo) * 0.02 + 1e-9, 101)
    out["grid"] = grid.tolist()
    rng = np.random.default_rng(0)
    for s in filled:
        errors, macs = np.array(s["errors"]), np.array(s["macs"])
        s["weights"] = complexity_weights(macs, edges).tolist()
        s["edf"] = edf(errors, s["weights"], grid).tolist()
        samples = []
        for _ in range(BOOTSTRAP):
            pick = rng.integers(len(errors), size=len(errors))
            samples.append(edf(errors[pick], complexity_weights(macs[pick], edges), grid))
        tail = (1 - CONFIDENCE) / 2 * 100
        s["edf_low"], s["edf_high"] = (np.percentile(samples, [tail, 100 - tail], axis=0)).tolist()
        s.update(n=len(errors), min=float(errors.min()), median=float(np.median(errors)),
                 mean=float(errors.mean()), std=float(errors.std(ddof=1)) if len(errors) > 1 else None)
    for i, a in enumerate(filled):
        for b in filled[i + 1:]:
            gap = float(np.max(np.abs(np.array(a["edf"]) - np.array(b["edf"]))))
            out["pairs"].append({"a": a["name"], "b": b["name"], "D": gap})
    return out


def design_space_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the design-space table (errors in % for error metrics)."""
    factor = 100.0 if summary["metric"].endswith("/error") or summary["metric"].endswith("/acc") else 1.0
    cell = lambda v: "—" if v is None else f"{factor * v:.2f}"  # noqa: E731
    columns = ["design space", "n", "min", "median", "mean ± std", "MACs (median)"]
    rows = []
    for s in summary["spaces"]:
        if not s["errors"]:
            rows.append([s["name"], "0", "—", "—", "—", "—"])
            continue
        spread = f"{cell(s['mean'])}" + ("" if s["std"] is None else f" ± {cell(s['std'])}")
        rows.append([s["name"], str(s["n"]), cell(s["min"]), cell(s["median"]), spread,
                     f"{np.median(s['macs']) / 1e6:.3g}M"])
    return columns, rows


def design_space_note(summary: dict) -> str:
    """One line: how the EDFs are normalised and their largest gaps."""
    gaps = "; ".join(f"D({p['a']}, {p['b']}) = {p['D']:.2f}" for p in summary["pairs"])
    return (f"EDFs of {summary['metric']} normalised by complexity ({summary['bins']} log-spaced MACs bins weigh "
            f"equally), 95% bootstrap band ({summary['bootstrap']} resamples)" + (f"; {gaps}" if gaps else ""))


def plot_design_spaces(summary: dict, folder: Any) -> list:
    """edf.png (normalised error EDF per design space with its bootstrap band) and error_vs_macs.png."""
    from matplotlib.ticker import ScalarFormatter

    from runs.plots import colours, metric_axis, new_figure, save_figure

    label, factor = metric_axis(summary["metric"])
    filled = [s for s in summary["spaces"] if s["errors"]]
    if not filled:
        return []
    cs = colours()
    grid = np.array(summary["grid"]) * factor
    fig, ax = new_figure(6, 4)
    for i, s in enumerate(filled):
        colour = cs[i % len(cs)]
        ax.plot(grid, s["edf"], color=colour, linewidth=2,
                label=f"{s['name']} (n={s['n']}, min {factor * s['min']:.1f}, mean {factor * s['mean']:.1f})")
        ax.fill_between(grid, s["edf_low"], s["edf_high"], color=colour, alpha=0.15, linewidth=0)
    ax.set_xlabel(label)
    ax.set_ylabel("cumulative share of nets (complexity-normalised)")
    ax.set_ylim(0, 1.02)
    ax.set_title("Error EDF per design space (band: 95% bootstrap)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    paths = [save_figure(fig, folder / "edf.png")]

    fig, ax = new_figure(6, 4)
    for i, s in enumerate(filled):
        ax.scatter(np.array(s["macs"]) / 1e6, np.array(s["errors"]) * factor, color=cs[i % len(cs)], alpha=0.8,
                   label=s["name"], s=18)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("multiply-accumulates (M, log scale)")
    ax.set_ylabel(label)
    ax.set_title("Error against complexity, every sampled net", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    paths.append(save_figure(fig, folder / "error_vs_macs.png"))
    return paths


def check_design_spaces(spec: Any, space_keys: Sequence[str], where: Any) -> None:
    """One-line errors (`where`: the file's arches.errors.Locator): no design space, an empty one, a sampler other
    than the seeded uniform draws, a space key named like the design-space parameter."""
    if not spec.design_spaces:
        raise where.error("needs at least one design space {name: {dotted.key: value}}", "search", "design_spaces")
    for name, overrides in spec.design_spaces.items():
        if not overrides:
            raise where.error(f"design space '{name}' is empty: give the overrides that make it (e.g. "
                              f"{{block.type: plain}})", "search", "design_spaces", name)
    if "sampler" in spec.model_fields_set and spec.sampler != "random":
        raise where.error(f"design spaces are sampled uniformly (the same seeded draws in each): use sampler: "
                          f"random, not {spec.sampler}", "search", "sampler")
    if DESIGN_SPACE in space_keys:
        raise where.error(f"'{DESIGN_SPACE}' names the design spaces; call this key something else",
                          "search", "space", DESIGN_SPACE)
