"""Figures as PNG files with matplotlib's object API (Figure, no pyplot: no backend or other global state is
touched), and the training curves of one run in the style of He et al.'s figures: error (%) against epochs,
training error thin and dashed, validation error bold, one colour per run. Every reslab figure draws training
and validation curves with TRAIN_STYLE and VAL_STYLE, and names metrics with metric_axis (readable name, unit)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import math

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

TRAIN_STYLE = {"linestyle": "--", "linewidth": 1.0}      # every figure draws training error this way ...
VAL_STYLE = {"linestyle": "-", "linewidth": 2.2}         # ... and validation error this way
SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test"}
COST_NAMES = {"macs": "multiply-accumulates", "params": "parameters"}


def metric_axis(name: str, values: Sequence[float] = ()) -> tuple[str, float]:
    """(axis label with unit, factor to multiply values by) for a metric: 'val/error' -> ('validation error (%)',
    100); 'macs' -> ('multiply-accumulates (M)', 1e-6) by the values' size; 'latency_ms' -> ('latency (ms)', 1)."""
    split, _, what = name.partition("/")
    if what in ("error", "acc"):
        return f"{SPLIT_NAMES.get(split, split)} {'accuracy' if what == 'acc' else 'error'} (%)", 100.0
    if what == "loss":
        return f"{SPLIT_NAMES.get(split, split)} loss", 1.0
    if name in COST_NAMES:
        top = max((abs(v) for v in values if v == v), default=0.0)
        for factor, unit in ((1e-9, "G"), (1e-6, "M"), (1e-3, "K")):
            if top * factor >= 1:
                return f"{COST_NAMES[name]} ({unit})", factor
        return COST_NAMES[name], 1.0
    if name == "latency_ms":
        return "latency (ms)", 1.0
    if name == "images_per_s":
        return "images / s", 1.0
    return name, 1.0


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


def error_curves_figure(runs: Mapping[str, Sequence[Mapping[str, float]]], title: Optional[str] = None) -> Figure:
    """Each run's history rows (`epoch`, `train/error`, `val/error`): training dashed, validation bold."""
    fig, ax = new_figure(6.0, 4.2)
    palette = colours()
    for i, (label, rows) in enumerate(runs.items()):
        for split, style, suffix in (("train", TRAIN_STYLE, " train"), ("val", VAL_STYLE, " val")):
            points = [(r["epoch"], 100.0 * r[f"{split}/error"]) for r in rows
                      if f"{split}/error" in r and not math.isnan(r[f"{split}/error"])]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, color=palette[i % len(palette)], label=f"{label}{suffix}",
                        marker="o" if len(xs) == 1 else None, **style)
    epoch_axis(ax, title)
    return fig


def error_curves(runs: Mapping[str, Sequence[Mapping[str, float]]], path: Union[str, Path],
                 title: Optional[str] = None) -> Path:
    """error_curves_figure as a PNG; returns the path."""
    return save_figure(error_curves_figure(runs, title), path)
