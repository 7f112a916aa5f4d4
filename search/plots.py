"""Study figures (PNG, through runs.plots): arms' error curves, the Pareto front, parameter importances."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from runs.plots import TRAIN_STYLE, VAL_STYLE, colours, epoch_axis, new_figure, save_figure


def arm_curves(curves: Mapping[str, Sequence[Mapping[int, Mapping[str, float]]]], path: Path,
               title: str = "") -> Path:
    """He et al. Fig. 4/6 style: per arm the mean over seeds of training error (thin dashed) and validation
    error (bold), in %, against epochs. `curves`: arm -> one {epoch: {metric: value}} per seed."""
    fig, ax = new_figure(7.0, 4.5)
    palette = colours()
    for i, (arm, seeds) in enumerate(curves.items()):
        for metric, style in (("train/error", TRAIN_STYLE), ("val/error", VAL_STYLE)):
            epochs = sorted({e for run in seeds for e, row in run.items() if metric in row})
            if not epochs:
                continue
            means = [100 * np.mean([run[e][metric] for run in seeds if e in run and metric in run[e]])
                     for e in epochs]
            label = arm if metric == "val/error" else f"{arm} (train)"
            ax.plot(epochs, means, color=palette[i % len(palette)], label=label,
                    marker="o" if len(epochs) == 1 else None, **style)
    epoch_axis(ax, title or "error: train (dashed) and validation (bold), mean over seeds")
    return save_figure(fig, path)


def pareto_front(points: Sequence[Sequence[float]], front: Sequence[Sequence[float]], names: Sequence[str],
                 path: Path, title: str = "") -> Path:
    """Every complete trial (grey) and the Pareto-optimal ones (red, joined) on the first two objectives."""
    fig, ax = new_figure(6.0, 4.5)
    if points:
        p = np.asarray(points, dtype=float)
        ax.scatter(p[:, 1], p[:, 0], color="0.6", s=18, label="trials")
    if front:
        f = np.asarray(sorted(front, key=lambda v: v[1]), dtype=float)
        ax.plot(f[:, 1], f[:, 0], "o-", color="tab:red", label="Pareto front")
    ax.set_xlabel(names[1])
    ax.set_ylabel(names[0])
    if names[1] in ("macs", "params"):
        ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Pareto front")
    return save_figure(fig, path)


def importances(values: Mapping[str, float], path: Path, title: str = "") -> Path:
    """Horizontal bars of Optuna parameter importances."""
    fig, ax = new_figure(6.0, 0.5 + 0.4 * max(1, len(values)))
    names = list(values)[::-1]
    ax.barh(names, [values[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance")
    ax.set_title(title or "parameter importances")
    return save_figure(fig, path)
