"""Figures as PNG files with matplotlib's object API (Figure, no pyplot: no backend or other global state is
touched), and the training curves of one run in the style of He et al.'s figures: error (%) against epochs,
training error thin and dashed, validation error bold, one colour per run."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

TRAIN_STYLE = {"linestyle": "--", "linewidth": 1.0}      # every figure draws training error this way ...
VAL_STYLE = {"linestyle": "-", "linewidth": 2.2}         # ... and validation error this way


def new_figure(width: float, height: float, rows: int = 1, columns: int = 1, squeeze: bool = True,
               dpi: int = 120) -> tuple[Figure, Any]:
    """A figure and its axes: one Axes, or (squeeze False, or several) an array of rows x columns."""
    fig = Figure(figsize=(width, height), dpi=dpi)
    return fig, fig.subplots(rows, columns, squeeze=squeeze)


def colours() -> list[str]:
    """The colour cycle of matplotlib's current style."""
    return matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]


def save_figure(fig: Figure, path: Union[str, Path]) -> Path:
    """Lay out and write a figure as PNG (creating the folder); returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def epoch_axis(ax: Any, title: Optional[str] = None) -> None:
    """Integer epochs on x, error (%) on y, a light grid, the title and (when lines were drawn) a legend."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("error (%)")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    if ax.lines:
        ax.legend(fontsize=8)


def error_curves(runs: Mapping[str, Sequence[Mapping[str, float]]], path: Union[str, Path],
                 title: Optional[str] = None) -> Path:
    """Plot each run's history rows (`epoch`, `train/error`, `val/error`) into one PNG; returns the path."""
    fig, ax = new_figure(6.0, 4.2)
    palette = colours()
    for i, (label, rows) in enumerate(runs.items()):
        for split, style, suffix in (("train", TRAIN_STYLE, " train"), ("val", VAL_STYLE, " val")):
            points = [(r["epoch"], 100.0 * r[f"{split}/error"]) for r in rows
                      if f"{split}/error" in r and r[f"{split}/error"] == r[f"{split}/error"]]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, color=palette[i % len(palette)], label=f"{label}{suffix}",
                        marker="o" if len(xs) == 1 else None, **style)
    epoch_axis(ax, title)
    return save_figure(fig, path)
