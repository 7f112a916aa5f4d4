"""Show and keep loss landscapes: a rich table, the line / contour / sharpness PNGs, MLflow metrics."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from runs.mlflow_write import legal_key
from runs.plots import colours, new_figure, save_figure
from search.stats import Summary

from .landscape_suite import LandscapeResult


def curvature_summary(result: LandscapeResult) -> Summary:
    """n, mean and std of d^T H d over the result's directions."""
    return Summary.of(result.curvatures)


def landscape_table(results: Sequence[LandscapeResult], console: Optional[Console] = None) -> Table:
    """Print one line per checkpoint: loss at the centre, at the line's ends, curvature, minima of the surface."""
    table = Table(title="Loss landscape (Li et al. 2018): training loss along filter-normalised random directions; "
                        "curvature = d^T H d, mean ± std over directions")
    for col in ("network", "kind", "depth", "images", "loss", "accuracy", "loss at ends", "n", "curvature",
                "surface minima"):
        table.add_column(col, justify="left" if col in ("network", "kind") else "right", no_wrap=True)
    for r in results:
        ends = f"{r.line_loss[0]:.3g} / {r.line_loss[-1]:.3g}"
        curv = curvature_summary(r)
        table.add_row(r.label, "residual" if r.residual else "plain", str(r.depth), str(r.images), f"{r.loss:.4f}",
                      f"{r.accuracy:.3f}", ends, str(curv.n), f"{curv.mean:.3g}" +
                      (f" ± {curv.std:.2g}" if curv.std is not None else ""),
                      "-" if r.minima is None else str(r.minima))
    (console or Console()).print(table)
    return table


def plot_landscapes(results: Sequence[LandscapeResult], folder: Path) -> list[Path]:
    """landscape_line.png (loss and accuracy along the first direction), landscape_contour.png (one panel per
    checkpoint, shared log-spaced levels), sharpness.png (d^T H d per direction; second differences on the line)."""
    cs = colours()
    fig, ax = new_figure(6.4, 4)
    twin = ax.twinx()
    for i, r in enumerate(results):
        colour = cs[i % len(cs)]
        ax.plot(r.alphas, r.line_loss, color=colour, linewidth=2, label=f"{r.label} loss")
        twin.plot(r.alphas, [100 * a for a in r.line_accuracy], color=colour, linestyle="--", linewidth=1,
                  label=f"{r.label} accuracy")
    ax.set_yscale("log")
    ax.set_xlabel("step along the filter-normalised direction (α)")
    ax.set_ylabel("training loss (log scale)")
    twin.set_ylabel("training accuracy (%), dashed")
    twin.set_ylim(0, 100)
    ax.set_title(f"1-D loss landscape ({results[0].images} training images)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper center")
    paths = [save_figure(fig, folder / "landscape_line.png")]

    with_surface = [r for r in results if r.surface_loss]
    if with_surface:
        values = np.concatenate([np.asarray(r.surface_loss, dtype=float).ravel() for r in with_surface])
        levels = np.geomspace(max(values.min(), 1e-6), max(values.max(), values.min() * 1.01 + 1e-6), 20)
        cols = min(len(with_surface), 3)
        rows = -(-len(with_surface) // cols)
        fig, axes = new_figure(4.2 * cols, 3.8 * rows, rows=rows, columns=cols, squeeze=False)
        for ax, r in zip(axes.ravel(), with_surface):
            grid = np.asarray(r.surface_loss, dtype=float).T      # rows: b (d2), columns: a (d1)
            drawn = ax.contour(r.surface_axis, r.surface_axis, grid, levels=levels, cmap="viridis",
                               linewidths=0.8)
            ax.clabel(drawn, drawn.levels[::4], fontsize=6, fmt="%.3g")
            ax.plot([0], [0], "r+", markersize=8)
            ax.set_title(f"{r.label} ({'residual' if r.residual else 'plain'}, depth {r.depth}); "
                         f"{r.minima} local min", fontsize=9)
            ax.set_xlabel("α (direction 1)")
            ax.set_ylabel("β (direction 2)")
            ax.set_aspect("equal")
        for ax in axes.ravel()[len(with_surface):]:
            ax.set_visible(False)
        fig.suptitle("2-D loss landscape: training loss, shared log-spaced levels", fontsize=10)
        paths.append(save_figure(fig, folder / "landscape_contour.png"))

    fig, (left, right) = new_figure(10, 4, columns=2)
    for i, r in enumerate(results):
        colour, curv = cs[i % len(cs)], curvature_summary(r)
        left.scatter([i] * len(r.curvatures), r.curvatures, color=colour, alpha=0.5, s=14)
        left.errorbar([i + 0.15], [curv.mean], yerr=[curv.std or 0.0], color=colour, marker="o", capsize=3)
        inner = [(a, c) for a, c in zip(r.alphas, r.line_curvature) if c is not None]
        right.plot([a for a, _ in inner], [c for _, c in inner], color=colour, label=r.label)
    left.set_xticks(range(len(results)), [r.label for r in results], rotation=20, fontsize=7)
    left.set_ylabel("d²L/dα² at the checkpoint (dᵀHd)")
    left.set_title(f"Sharpness along {len(results[0].curvatures)} random directions (dots; mean ± std)",
                   fontsize=9)
    right.set_xlabel("α along direction 1")
    right.set_ylabel("second difference of the loss")
    right.set_title("Curvature along the 1-D line", fontsize=9)
    right.axhline(0, color="black", linewidth=0.6)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    right.legend(fontsize=7)
    paths.append(save_figure(fig, folder / "sharpness.png"))
    return paths


def landscape_metrics(results: Sequence[LandscapeResult]) -> list[tuple[str, float, int]]:
    """(key, value, step): loss and accuracy at the centre, curvature mean/std/n, the line's loss (step = point),
    the surface's local minima, per checkpoint."""
    out = []
    for r in results:
        curv = curvature_summary(r)
        out += [(legal_key("landscape_loss", r.label), r.loss, 0),
                (legal_key("landscape_acc", r.label), r.accuracy, 0),
                (legal_key("curvature", r.label), curv.mean, 0),
                (legal_key("curvature_n", r.label), curv.n, 0)]
        if curv.std is not None:
            out.append((legal_key("curvature_std", r.label), curv.std, 0))
        if r.minima is not None:
            out.append((legal_key("surface_minima", r.label), r.minima, 0))
        out += [(legal_key("line_loss", r.label), v, step) for step, v in enumerate(r.line_loss)]
    return out
