"""Study figures (PNG, through runs.plots): arms' error curves with their spread over seeds, the Pareto front as a
staircase, parameter importances. Each has a *_figure builder (a matplotlib Figure) and a writer (a PNG path)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from runs.plots import TRAIN_STYLE, VAL_STYLE, colours, epoch_axis, metric_axis, new_figure, save_figure

BAND_ALPHA = {"train/error": 0.08, "val/error": 0.18}


def arm_curves_figure(curves: Mapping[str, Sequence[Mapping[int, Mapping[str, float]]]], title: str = "") -> Figure:
    """He et al. Fig. 4/6 style: per arm the mean over seeds of training error (thin dashed) and validation error
    (bold), in %, against epochs, each with a band of ± 1 sample std over the seeds (where n >= 2).
    `curves`: arm -> one {epoch: {metric: value}} per seed."""
    fig, ax = new_figure(7.0, 4.5)
    palette = colours()
    for i, (arm, seeds) in enumerate(curves.items()):
        colour = palette[i % len(palette)]
        for metric, style in (("train/error", TRAIN_STYLE), ("val/error", VAL_STYLE)):
            epochs = sorted({e for run in seeds for e, row in run.items() if metric in row})
            if not epochs:
                continue
            values = [100 * np.array([run[e][metric] for run in seeds if e in run and metric in run[e]])
                      for e in epochs]
            means = np.array([v.mean() for v in values])
            label = f"{arm} val (n={max(len(v) for v in values)})" if metric == "val/error" else f"{arm} train"
            ax.plot(epochs, means, color=colour, label=label, marker="o" if len(epochs) == 1 else None, **style)
            spread = [(e, m, v.std(ddof=1)) for e, m, v in zip(epochs, means, values) if len(v) >= 2]
            if spread:
                xs, ms, sd = (np.array(c) for c in zip(*spread))
                ax.fill_between(xs, ms - sd, ms + sd, color=colour, alpha=BAND_ALPHA[metric], linewidth=0)
    epoch_axis(ax, title or "error: train (dashed) and validation (bold), mean ± std over seeds")
    return fig


def arm_curves(curves: Mapping[str, Sequence[Mapping[int, Mapping[str, float]]]], path: Path,
               title: str = "") -> Path:
    """arm_curves_figure as a PNG; returns the path."""
    return save_figure(arm_curves_figure(curves, title), path)


def pareto_figure(points: Sequence[Sequence[float]], front: Sequence[Sequence[float]], names: Sequence[str],
                  goals: Sequence[str], title: str = "") -> Figure:
    """Every complete trial (grey) and the Pareto-optimal ones (red), the front drawn as the staircase it is
    (the best first objective reachable at each value of the second), both axes in the metrics' units."""
    fig, ax = new_figure(6.0, 4.5)
    all_values = [*points, *front]
    ylabel, yf = metric_axis(names[0], [v[0] for v in all_values])
    xlabel, xf = metric_axis(names[1], [v[1] for v in all_values])
    if points:
        p = np.asarray(points, dtype=float)
        ax.scatter(p[:, 1] * xf, p[:, 0] * yf, color="0.6", s=18, label="trials", zorder=2)
    if front:
        # from the cheapest (best second objective) on: a step at each front point, level until the next one
        f = np.asarray(sorted(front, key=lambda v: v[1], reverse=goals[1] == "maximize"), dtype=float)
        ax.step(f[:, 1] * xf, f[:, 0] * yf, where="post", color="tab:red", linewidth=1.8, zorder=3,
                label="Pareto front")
        ax.scatter(f[:, 1] * xf, f[:, 0] * yf, color="tab:red", s=28, zorder=4)
    ax.set_xlabel(f"{xlabel} ({goals[1]})")
    ax.set_ylabel(f"{ylabel} ({goals[0]})")
    if names[1] in ("macs", "params"):
        ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Pareto front")
    return fig


def pareto_front(points: Sequence[Sequence[float]], front: Sequence[Sequence[float]], names: Sequence[str],
                 path: Path, title: str = "", goals: Sequence[str] = ("minimize", "minimize")) -> Path:
    """pareto_figure as a PNG; returns the path."""
    return save_figure(pareto_figure(points, front, names, goals, title), path)


def importances(values: Mapping[str, float], path: Path, title: str = "") -> Path:
    """Horizontal bars of Optuna parameter importances."""
    fig, ax = new_figure(6.0, 0.5 + 0.4 * max(1, len(values)))
    names = list(values)[::-1]
    ax.barh(names, [values[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance")
    ax.set_title(title or "parameter importances")
    return save_figure(fig, path)
