"""Training curves in the style of He et al.'s figures: error (%) against epochs, training error as a thin
line, validation error bold, one colour per run."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def error_curves(runs: Mapping[str, Sequence[Mapping[str, float]]], path: Union[str, Path],
                 title: Optional[str] = None) -> Path:
    """Plot each run's history rows (`epoch`, `train/error`, `val/error`) into one PNG; returns the path."""
    fig, ax = plt.subplots(figsize=(6.0, 4.2), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, rows) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        for split, width, suffix in (("train", 0.9, " train"), ("val", 2.2, " val")):
            points = [(r["epoch"], 100.0 * r[f"{split}/error"]) for r in rows
                      if f"{split}/error" in r and r[f"{split}/error"] == r[f"{split}/error"]]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, color=color, linewidth=width, label=f"{label}{suffix}",
                        marker="o" if len(xs) == 1 else None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("error (%)")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    if ax.lines:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def save_figure(fig, path: Path | str) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
