"""Show and keep diagnostics: rich tables on the terminal, matplotlib PNGs, one MLflow run per diagnostic.

Each diagnostic (gradients, lesion) becomes its own MLflow run, created after the measurement succeeded (an
interrupted measurement records nothing): in the experiment `diagnostics` by default, or, with
`parent_run_id`, as a nested child of that run (e.g. the training run of the checkpoint) in its experiment.
"""
from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import matplotlib
from matplotlib.patches import Patch
from mlflow.exceptions import MlflowException
from rich.console import Console
from rich.table import Table

from arches.errors import ReslabError
from runs.mlflow_client import client_for
from runs.mlflow_write import (FAILURE_TAG, create_run, end_run, ensure_experiment, legal_key, log_metric_rows,
                                log_params)
from runs.plots import new_figure, save_figure
from search.stats import Summary

from .suite import GradientRow, LesionResult, summarise_gradients

DEFAULT_EXPERIMENT = "diagnostics"


# ---------------------------------------------------------------- tables

def gradient_table(rows: Sequence[GradientRow], console: Optional[Console] = None) -> Table:
    """Print one line per network: family, depth, n seeds, gradient correlation (mean ± std) at lag 1 and 8,
    and the ratio of the gradient norm at the first block to that at the last (> 1: grows toward the input)."""
    table = Table(title="Gradients at each state: correlation of neighbouring input gradients (Balduzzi et al. "
                        "2017); norm ratio = ||dL/dh|| first block / last block")
    for col in ("network", "family", "state", "depth", "n", "grad corr", "at lag 8", "norm ratio"):
        table.add_column(col, justify="left" if col in ("network", "family", "state") else "right", no_wrap=True)
    items = sorted(summarise_gradients(rows), key=lambda d: (d["family"], d["state"], d["depth"]))
    family = None
    for item in items:
        if family is not None and item["family"] != family:
            table.add_section()
        family = item["family"]
        norms = list(item["block_norms"].values())
        lag8 = str(item["lag"][7]) if len(item["lag"]) >= 8 else "-"
        table.add_row(item["label"], item["family"], item["state"],
                      str(item["depth"]), str(item["correlation"].n), str(item["correlation"]), lag8,
                      f"{norms[0].mean / norms[-1].mean:.3g}")
    (console or Console()).print(table)
    return table


def lesion_table(results: Sequence[LesionResult], console: Optional[Console] = None) -> Table:
    """Print test accuracy with each block deleted; checkpoints of one spec pooled (mean ± std, n)."""
    table = Table(title="Lesions: test accuracy with one block deleted (Veit et al. 2016)")
    for col in ("network", "block", "kind", "n", "accuracy", "drop"):
        table.add_column(col, justify="left" if col in ("network", "block", "kind") else "right", no_wrap=True)
    for name, group in _by_spec(results).items():
        intact = Summary.of([r.intact for r in group])
        table.add_row(name, "(none)", "intact", str(intact.n), str(intact), "")
        for i, row in enumerate(group[0].rows):
            acc = Summary.of([r.rows[i].accuracy for r in group])
            drop = Summary.of([r.rows[i].drop for r in group])
            kind = ("residual" if row.residual else "plain") + (", downsampling" if row.downsampling else "")
            table.add_row("", row.block, kind, str(acc.n), str(acc), str(drop))
        table.add_section()
    (console or Console()).print(table)
    return table


def _by_spec(results: Sequence[LesionResult]) -> dict[str, list[LesionResult]]:
    groups: dict[str, list[LesionResult]] = defaultdict(list)
    for r in results:
        groups[r.spec_name].append(r)
    for name, group in groups.items():
        if len({tuple(row.block for row in r.rows) for r in group}) > 1:
            raise ReslabError(f"checkpoints of {name} were lesioned on different blocks")
    return groups


# ---------------------------------------------------------------- plots

def plot_gradients(rows: Sequence[GradientRow], folder: Path) -> list[Path]:
    """gradient_correlation.png (correlation vs depth, one line per family and state, error bars = std) and
    gradient_norms.png (||dL/d block output|| vs relative block position, log scale, one line per network)."""
    items = summarise_gradients(rows)
    fig, ax = new_figure(6, 4)
    groups: dict[str, list[dict]] = defaultdict(list)
    for item in items:
        groups[item["family"] + ("" if item["state"] == "init" else f" ({item['state']})")].append(item)
    for name, group in sorted(groups.items()):
        group.sort(key=lambda d: d["depth"])
        ax.errorbar([d["depth"] for d in group], [d["correlation"].mean for d in group],
                    yerr=[d["correlation"].std or 0.0 for d in group], marker="o", capsize=3, label=name)
    ax.set_xlabel("depth (weighted layers)")
    ax.set_ylabel("correlation of neighbouring gradients")
    ax.set_ylim(min(-0.05, ax.get_ylim()[0]), 1.05)
    n = max(d["correlation"].n for d in items)
    ax.set_title(f"Shattered gradients (mean ± std over {n} seed{'s' if n > 1 else ''})")
    ax.grid(alpha=0.3)
    ax.legend()
    paths = [save_figure(fig, folder / "gradient_correlation.png")]

    fig, ax = new_figure(6, 4)
    tab10 = matplotlib.colormaps["tab10"]
    colours = {f: tab10(i % 10) for i, f in enumerate(sorted({d["family"] for d in items}))}
    for item in sorted(items, key=lambda d: (d["family"], d["depth"])):
        norms = [s.mean for s in item["block_norms"].values()]
        xs = [(i + 1) / len(norms) for i in range(len(norms))]
        style = "-" if item["state"] == "init" else "--"
        ax.plot(xs, norms, style, color=colours[item["family"]], alpha=0.4 + 0.6 * item["depth"] /
                max(d["depth"] for d in items), label=item["label"])
    ax.set_yscale("log")
    ax.set_xlabel("block position (fraction of depth, input -> output)")
    ax.set_ylabel("||dL / d block output||")
    ax.set_title("Gradient norm reaching each block")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    paths.append(save_figure(fig, folder / "gradient_norms.png"))
    return paths


def plot_lesions(results: Sequence[LesionResult], folder: Path) -> list[Path]:
    """lesion.png: a bar per deleted block (downsampling blocks in red), intact accuracy as a line; one panel
    per spec, checkpoints pooled (error bars = std)."""
    groups = _by_spec(results)
    width = max(7.0, 0.4 * max(len(g[0].rows) for g in groups.values()))
    fig, axes = new_figure(width, 3.2 * len(groups), rows=len(groups), squeeze=False)
    for ax, (name, group) in zip(axes[:, 0], groups.items()):
        blocks = [row.block for row in group[0].rows]
        accs = [Summary.of([r.rows[i].accuracy for r in group]) for i in range(len(blocks))]
        colours = ["tab:red" if row.downsampling else "tab:blue" for row in group[0].rows]
        errors = [a.std for a in accs] if len(group) > 1 else None
        ax.bar(range(len(blocks)), [a.mean for a in accs], yerr=errors, color=colours, capsize=2)
        intact = Summary.of([r.intact for r in group])
        line = ax.axhline(intact.mean, color="black", linestyle="--")
        ax.set_xticks(range(len(blocks)), blocks, rotation=90, fontsize=7)
        ax.set_ylim(0, 1.15)
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{name}: one block deleted at a time (n={intact.n}, {group[0].images} test images)",
                     fontsize=10)
        ax.legend([line, Patch(color="tab:blue"), Patch(color="tab:red")],
                  [f"intact {intact}", "block deleted", "downsampling block deleted"], fontsize=7,
                  loc="upper center", ncol=3, frameon=False)
    return [save_figure(fig, folder / "lesion.png")]


# ---------------------------------------------------------------- MLflow

def gradient_metrics(rows: Sequence[GradientRow]) -> list[tuple[str, float, int]]:
    """(key, value, step) for MLflow: correlation mean/std/n and depth per network, norm per block (step =
    block index), correlation per lag (step = lag)."""
    out = []
    for item in summarise_gradients(rows):
        label, corr = item["label"], item["correlation"]
        out += [(legal_key("grad_corr", label), corr.mean, 0), (legal_key("grad_corr_n", label), corr.n, 0),
                (legal_key("depth", label), item["depth"], 0)]
        if corr.std is not None:
            out.append((legal_key("grad_corr_std", label), corr.std, 0))
        for step, norm in enumerate(item["block_norms"].values()):
            out.append((legal_key("grad_norm", label), norm.mean, step))
        for lag, value in enumerate(item["lag"], 1):
            out.append((legal_key("grad_corr_lag", label), value.mean, lag))
    return out


def lesion_metrics(results: Sequence[LesionResult]) -> list[tuple[str, float, int]]:
    """(key, value, step): intact accuracy and accuracy with each block deleted, per checkpoint."""
    out = []
    for r in results:
        out.append((legal_key("intact_acc", r.label), r.intact, 0))
        for step, row in enumerate(r.rows):
            out.append((legal_key("lesion_acc", r.label, row.block), row.accuracy, 0))
            out.append((legal_key("lesion_acc", r.label), row.accuracy, step))
    return out


def parent_experiment(tracking_uri: str, run_id: str, output_dir: str = "outputs") -> str:
    """The experiment id of the run diagnostics will be nested under; one-line ReslabError if there is none."""
    try:
        return client_for(tracking_uri, output_dir).get_run(run_id).info.experiment_id
    except MlflowException:
        raise ReslabError(f"no MLflow run '{run_id}' in {tracking_uri} to attach diagnostics to",
                          path="--run") from None


def log_diagnostic(kind: str, params: dict, metrics: Sequence[tuple[str, float, int]], payload: dict, plots, *,
                   tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT, parent_run_id: Optional[str] = None,
                   output_dir: str = "outputs", run_name: Optional[str] = None) -> str:
    """Log one diagnostic as its own MLflow run (nested under parent_run_id if given); returns the run id.

    `plots(folder) -> [paths]` draws the PNGs; `payload` is stored as <kind>.json."""
    client = client_for(tracking_uri, output_dir)
    if parent_run_id:
        experiment_id = parent_experiment(tracking_uri, parent_run_id, output_dir)
    else:
        experiment_id = ensure_experiment(client, experiment, output_dir)
    run_id = create_run(client, experiment_id, run_name or kind, {"reslab.diagnostic": kind},
                        parent_run_id=parent_run_id)
    try:
        log_params(client, run_id, params)
        log_metric_rows(client, run_id, metrics)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / f"{kind}.json").write_text(json.dumps(payload, indent=1, default=str))
            plots(folder)
            client.log_artifacts(run_id, tmp)
    except BaseException as e:
        end_run(client, run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED",
                {FAILURE_TAG: f"{type(e).__name__}: {e}"})
        raise
    end_run(client, run_id, "FINISHED")
    return run_id
