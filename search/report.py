"""A study's results: per-arm statistics (or the search's trials), tables (rich, CSV, Markdown), figures, and
the MLflow parent run's artifacts. Reads the Optuna storage; the MLflow store only for curves and run states.

    summary = report_study("shortcuts")          # a dict, JSON-ready (`python cli.py report shortcuts --json`)
    print_report(summary)                        # rich tables
"""
from __future__ import annotations

import csv
import io
import json
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.table import Table

from arches.errors import ReslabError, did_you_mean
from arches.report import human
from runs import tracking

from . import keys, plots, recording
from .space import study_name_of
from .stats import compare_arms, describe
from .storage import default_storage, open_storage, shown, with_driver
from .trials import TrialRecord

MIN_TRIALS_FOR_IMPORTANCE = 4
EVALUATORS = {"ped-anova": ("PED-ANOVA", optuna.importance.PedAnovaImportanceEvaluator),
              "fanova": ("fANOVA", lambda: optuna.importance.FanovaImportanceEvaluator(seed=0))}
TEST_NOTE = ("p: two-sided paired t-test on the per-seed differences (scipy.stats.ttest_rel), 95% CI of the mean "
             "difference from the t distribution; W: Welch's t-test (scipy.stats.ttest_ind, equal_var=False) where "
             "the arms' seeds differ")
HOLM_NOTE = ("p (Holm): Holm's step-down adjustment over this metric's comparisons (family-wise error rate); "
             "judge a difference by it when several arms are compared")


# ---- summarising ----------------------------------------------------------------------------------------
def _num(v: Any) -> Any:
    """JSON-safe number: NaN/inf -> None."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return _num(obj)


def _state_counts(trials: list) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in trials:
        name = keys.DISCARDED if TrialRecord.of(t).outcome == keys.DISCARDED else t.state.name.lower()
        counts[name] = counts.get(name, 0) + 1
    return counts


def summarize(study: optuna.Study) -> dict:
    """Everything a report shows, as plain data (NaN as None)."""
    meta = study.user_attrs.get(keys.META)
    if not meta:
        raise ReslabError(f"study '{study.study_name}' was not made by reslab (no definition stored)")
    trials = study.get_trials(deepcopy=False)
    out: dict[str, Any] = {"study": study.study_name, "kind": meta["kind"], "file": meta.get("file"),
                           "parent_run_id": study.user_attrs.get(keys.PARENT), "metrics": meta["metrics"],
                           "trials": _state_counts(trials)}
    if meta["kind"] == "ablation":
        out.update(_ablation(meta, trials))
        out["importances"] = None          # arm and seed are the design of an ablation, not parameters to rank
    else:
        out.update(_search(study, meta, trials))
        out["importances"] = importances(study, meta, [t for t in trials if t.state == TrialState.COMPLETE])
    return _clean(out)


def _ablation(meta: dict, trials: list) -> dict:
    arms = {a["name"]: a for a in meta["arms"]}
    values: dict[str, dict[str, dict[int, float]]] = {m["name"]: {a: {} for a in arms} for m in meta["metrics"]}
    info = {a: {"name": a, "labels": arms[a]["labels"], "reference": arms[a]["reference"],
                "width_multiplier": arms[a].get("width_multiplier"), "params": None, "macs": None,
                "complete": [], "failed": [], "running": [], "duplicates": 0, "environments": []} for a in arms}
    for t in trials:
        arm, seed = t.params.get("arm"), t.params.get("seed")
        if arm not in info:
            continue
        row, rec = info[arm], TrialRecord.of(t)
        row["params"], row["macs"] = rec.cost.get("params", row["params"]), rec.cost.get("macs", row["macs"])
        if rec.width_multiplier is not None:
            row["width_multiplier"] = rec.width_multiplier
        if t.state == TrialState.COMPLETE:
            if seed in row["complete"]:
                row["duplicates"] += 1
                continue
            row["complete"].append(seed)
            where = environment(rec)
            if where not in row["environments"]:
                row["environments"].append(where)
            for m in values:
                if m in rec.metrics:
                    values[m][arm][seed] = float(rec.metrics[m])
        elif t.state == TrialState.FAIL and rec.outcome in (keys.DIVERGED, keys.INVALID):
            row["failed"].append({"seed": seed, "trial": t.number, "reason": rec.reason or ""})
        elif t.state == TrialState.RUNNING:
            row["running"].append(seed)
    references = {a: arms[a]["reference"] for a in arms}
    results = {m: [s.to_dict() for s in compare_arms(values[m], references)] for m in values}
    mixed = len({w for row in info.values() for w in row["environments"]}) > 1
    out: dict[str, Any] = {"seeds": meta["seeds"], "axes": meta["axes"], "arms": list(info.values()),
                           "results": results, "pivots": [], "mixed_environments": mixed}
    pivot = meta.get("pivot")
    if pivot:
        for m in pivot.get("metrics") or [x["name"] for x in meta["metrics"]]:
            out["pivots"].append(_pivot(meta, values[m], m, pivot["rows"], pivot["columns"]))
    return out


def environment(rec: TrialRecord) -> str:
    """Where a trial ran: '2 threads, cpu' (arithmetic differs between thread counts and devices)."""
    threads = "? threads" if rec.threads is None else f"{rec.threads} thread{'s' if rec.threads != 1 else ''}"
    return f"{threads}, {rec.device or '?'}"


def _pivot(meta: dict, values: dict[str, dict[int, float]], metric: str, rows: str, columns: str) -> dict:
    """metric by the labels of two axes (mean over seeds and over any other axes' arms)."""
    cells: dict[str, dict[str, list[float]]] = {}
    for a in meta["arms"]:
        r, c = a["labels"][rows], a["labels"][columns]
        cells.setdefault(r, {}).setdefault(c, []).extend(values.get(a["name"], {}).values())
    table = {r: {c: dict(zip(("n", "mean", "std"), describe(v))) for c, v in cols.items()}
             for r, cols in cells.items()}
    return {"metric": metric, "rows": rows, "columns": columns, "row_labels": meta["axes"][rows],
            "column_labels": meta["axes"][columns], "cells": table}


def _search(study: optuna.Study, meta: dict, trials: list) -> dict:
    names = [m["name"] for m in meta["metrics"]]
    rows = []
    records = {t.number: TrialRecord.of(t) for t in trials}
    retried = {rec.retry_of for rec in records.values()}
    for t in trials:
        rec = records[t.number]
        rows.append({"number": t.number, "state": t.state.name, "outcome": rec.outcome,
                     "params": t.params, "values": list(t.values) if t.values else None,
                     "reason": rec.reason, "retried": t.number in retried, "metrics": rec.metrics})
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best: list[int] = []
    if complete:
        best = [t.number for t in study.best_trials] if len(names) > 1 else [study.best_trial.number]
    return {"objectives": names, "trials_table": rows, "best": best}


def importances(study: optuna.Study, meta: dict, complete: list) -> Optional[dict]:
    """Optuna's parameter importances for the first objective, with the evaluator the study file chose
    (`importance:`, PED-ANOVA by default): {evaluator, target, values, notes}; None when the file said none or too
    few trials ran. Optuna's warnings are kept as notes (never printed); importances Optuna says are all equal
    (too few trials to tell) are left out."""
    choice = meta.get("importance") or "ped-anova"
    params = {k for t in complete for k in t.params}
    if choice == "none" or len(params) < 2 or len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return None
    label, make = EVALUATORS[choice]
    objective = meta["metrics"][0]
    out: dict[str, Any] = {"evaluator": label, "target": objective["name"], "values": {}, "notes": []}
    # PED-ANOVA ranks parameters by what gives LOW target values: a maximised objective is negated for it
    sign = -1.0 if objective["goal"] == "maximize" and choice == "ped-anova" else 1.0
    target = (lambda t: sign * t.values[0]) if len(study.directions) > 1 or sign < 0 else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            values = optuna.importance.get_param_importances(study, evaluator=make(), target=target)
        except Exception as e:  # noqa: BLE001  (too few distinct values etc.: a note, not a failure)
            out["notes"].append(f"{type(e).__name__}: {e}")
            values = {}
    notes = [str(w.message) for w in caught if "computes the importances of params to achieve low" not in
             str(w.message)]
    out["notes"] += notes
    if not any("will be equal" in n for n in notes):
        out["values"] = {k: float(v) for k, v in values.items()}
    return out


# ---- printing -------------------------------------------------------------------------------------------
def _percent(metric: str) -> bool:
    return metric.endswith("/error") or metric.endswith("/acc")


def fmt(metric: str, v: Optional[float], sign: bool = False) -> str:
    """A metric value for people: errors and accuracies in %, costs with K/M/G."""
    if v is None:
        return "—"
    if _percent(metric):
        return f"{100 * v:+.2f}" if sign else f"{100 * v:.2f}"
    if metric in ("params", "macs"):
        return ("+" if sign and v > 0 else "") + human(int(v))
    return f"{v:+.4g}" if sign else f"{v:.4g}"


def _p(p: Optional[float]) -> str:
    if p is None:
        return "—"
    return f"{p:.2g}" if p >= 0.001 else f"{p:.1e}"


def ablation_table(summary: dict, metric: str) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of one metric: arm, n, mean ± std, Δ vs reference, 95% CI, p, [p (Holm)], [width ×], MACs,
    params.

    p is the paired t-test by seed; 'W' marks Welch's test (seeds did not match); p (Holm) appears with more than
    one comparison."""
    arms = {a["name"]: a for a in summary["arms"]}
    refs = {s["reference"] for s in summary["results"][metric]}
    matched = any(a.get("width_multiplier") not in (None, 1, 1.0) for a in summary["arms"])
    holm = any((s.get("comparison") or {}).get("p_holm") is not None for s in summary["results"][metric])
    columns = ["arm", "n", "mean ± std", "Δ" if len(refs) > 1 else f"Δ vs {next(iter(refs))}", "95% CI", "p"]
    columns += (["p (Holm)"] if holm else []) + (["width ×"] if matched else []) + ["MACs", "params"]
    rows = []
    for s in summary["results"][metric]:
        a = arms[s["arm"]]
        c = s.get("comparison")
        mean = "—" if s["mean"] is None else fmt(metric, s["mean"]) + \
            ("" if s["std"] is None else f" ± {fmt(metric, s['std'])}")
        adjusted = ""
        if s["arm"] == s["reference"]:
            diff, ci, p = "baseline", "", ""
        elif c is None:
            diff, ci, p = "—", "", ""
        else:
            adjusted = _p(c.get("p_holm"))
            diff = fmt(metric, c["diff"], sign=True)
            if len(refs) > 1:
                ref = arms[s["reference"]]["labels"]
                diff += " vs " + ",".join(f"{k.split('.')[-1]}={v}" if len(ref) > 1 else v
                                          for k, v in ref.items() if a["labels"].get(k) != v)
            ci = "—" if c["ci_low"] is None else f"{fmt(metric, c['ci_low'], True)}…{fmt(metric, c['ci_high'], True)}"
            p = _p(c["p"]) + (" W" if c["test"].startswith("Welch") else "")
        failed = len(a["failed"])
        row = [s["arm"], str(s["n"]) + (f" +{failed} failed" if failed else ""), mean, diff, ci, p]
        if holm:
            row.append(adjusted)
        if matched:
            row.append("" if a["width_multiplier"] is None else f"{a['width_multiplier']:.4g}")
        rows.append(row + [fmt("macs", a["macs"]), fmt("params", a["params"])])
    return columns, rows


def print_report(summary: dict, console: Optional[Console] = None) -> None:
    """Rich tables of a study summary (160 columns wide when printing to a file or pipe)."""
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=160)
    counts = ", ".join(f"{v} {k}" for k, v in summary["trials"].items())
    console.print(f"[bold]{summary['kind']} {summary['study']}[/bold]  trials: {counts or 'none'}  "
                  f"parent run {summary.get('parent_run_id')}")
    if summary["kind"] == "ablation":
        for m in summary["metrics"]:
            name = m["name"]
            unit = " (%)" if _percent(name) else ""
            columns, rows = ablation_table(summary, name)
            table = Table(title=f"{name}{unit} ({m['goal']}): mean ± std over seeds; Δ with 95% CI and p of the "
                                f"paired t-test by seed (W: Welch)")
            for col in columns:
                table.add_column(col, justify="left" if col in ("arm", "95% CI") else "right", no_wrap=True)
            for row in rows:
                table.add_row(*row)
            console.print(table)
        for pv in summary["pivots"]:
            unit = " (%)" if _percent(pv["metric"]) else ""
            table = Table(title=f"{pv['metric']}{unit} by {pv['rows']} × {pv['columns']} (mean ± std over seeds)")
            table.add_column(pv["rows"])
            for c in pv["column_labels"]:
                table.add_column(f"{pv['columns']}={c}", justify="right")
            for r in pv["row_labels"]:
                table.add_row(r, *[_cell(pv, r, c) for c in pv["column_labels"]])
            console.print(table)
        for a in summary["arms"]:
            for f in a["failed"]:
                console.print(f"[red]arm {a['name']} seed {f['seed']} failed[/red]: {f['reason']}")
        if summary.get("mixed_environments"):
            console.print("[yellow]note: trials ran with different CPU threads or devices, so results may differ "
                          "by arithmetic too:[/yellow] " + "; ".join(f"{a['name']}: {' / '.join(a['environments'])}"
                                                                      for a in summary["arms"]), soft_wrap=True)
    else:
        print_search(summary, console)
    if summary["kind"] == "ablation":
        console.print(TEST_NOTE + (f"; {HOLM_NOTE}" if _has_holm(summary) else ""), soft_wrap=True)
    line = importance_line(summary.get("importances"))
    if line:
        console.print(line, soft_wrap=True)
    if summary.get("mlflow"):
        m = summary["mlflow"]
        console.print(f"MLflow: experiment '{m['experiment']}' in {m['tracking_uri']} (curves, children, "
                      f"artifacts: python cli.py ui)", soft_wrap=True)


def _has_holm(summary: dict) -> bool:
    return any((s.get("comparison") or {}).get("p_holm") is not None
               for rows in summary["results"].values() for s in rows)


def importance_line(imp: Optional[dict]) -> str:
    """'parameter importances for val/error (Optuna PED-ANOVA): depth 0.71, width 0.29', or why there are none."""
    if not imp:
        return ""
    head = f"parameter importances for {imp['target']} (Optuna {imp['evaluator']})"
    if imp["values"]:
        return head + ": " + ", ".join(f"{k} {v:.2f}" for k, v in imp["values"].items())
    return head + ": none (" + ("; ".join(imp["notes"]) or "no result") + ")"


def per_seed_table(summary: dict, metric: str) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of one metric's value for every arm and seed (— where a seed has no result)."""
    seeds = [str(s) for s in summary["seeds"]]
    rows = []
    for s in summary["results"][metric]:
        rows.append([s["arm"], *[fmt(metric, s["values"].get(seed)) for seed in seeds]])
    return ["arm", *[f"seed {seed}" for seed in seeds]], rows


def _cell(pv: dict, row: str, col: str) -> str:
    cell = pv["cells"].get(row, {}).get(col)
    if not cell or not cell["n"]:
        return "—"
    std = "" if cell["std"] is None else f" ± {fmt(pv['metric'], cell['std'])}"
    return f"{fmt(pv['metric'], cell['mean'])}{std} (n={cell['n']})"


def print_search(summary: dict, console: Console) -> None:
    names = summary["objectives"]
    table = Table(title=f"trials (best: {', '.join(map(str, summary['best'])) or '—'})")
    keys = sorted({k for r in summary["trials_table"] for k in r["params"]})
    for col in ["#", "state", *keys, *names]:
        table.add_column(col, justify="right" if col not in ("state",) else "left")
    for r in summary["trials_table"]:
        values = r["values"] or [None] * len(names)
        mark = "*" if r["number"] in summary["best"] else ""
        table.add_row(f"{r['number']}{mark}", (r["outcome"] or r["state"].lower()) + (" (retried)" if r["retried"]
                                                                                         else ""),
                      *[_param(r["params"].get(k)) for k in keys], *[fmt(n, v) for n, v in zip(names, values)])
    console.print(table)


def _param(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---- files ----------------------------------------------------------------------------------------------
def results_csv(summary: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    if summary["kind"] == "ablation":
        axes = list(summary["axes"])
        w.writerow(["metric", "arm", *axes, "reference", "n", "mean", "std", "diff", "ci_low", "ci_high", "p",
                    "p_holm", "test", "width_multiplier", "params", "macs", "seeds"])
        arms = {a["name"]: a for a in summary["arms"]}
        for metric, rows in summary["results"].items():
            for s in rows:
                a, c = arms[s["arm"]], s.get("comparison") or {}
                w.writerow([metric, s["arm"], *[a["labels"].get(x, "") for x in axes], s["reference"], s["n"],
                            s["mean"], s["std"], c.get("diff"), c.get("ci_low"), c.get("ci_high"), c.get("p"),
                            c.get("p_holm"), c.get("test"), a["width_multiplier"], a["params"], a["macs"],
                            " ".join(f"{k}:{v}" for k, v in s["values"].items())])
    else:
        keys = sorted({k for r in summary["trials_table"] for k in r["params"]})
        w.writerow(["trial", "state", "outcome", *keys, *summary["objectives"], "reason"])
        for r in summary["trials_table"]:
            values = r["values"] or [None] * len(summary["objectives"])
            w.writerow([r["number"], r["state"], r["outcome"], *[r["params"].get(k) for k in keys], *values,
                        r["reason"]])
    return buf.getvalue()


def results_markdown(summary: dict) -> str:
    lines = [f"# {summary['kind']} {summary['study']}", ""]
    if summary["kind"] == "ablation":
        lines += [f"n = seeds per arm; mean ± sample std over seeds. {TEST_NOTE}."]
        if _has_holm(summary):
            lines += ["", HOLM_NOTE + "."]
        lines.append("")
        for m in summary["metrics"]:
            unit = " (%)" if _percent(m["name"]) else ""
            lines += [f"## {m['name']}{unit} ({m['goal']})", ""]
            for columns, rows in (ablation_table(summary, m["name"]), per_seed_table(summary, m["name"])):
                lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                lines += ["| " + " | ".join(r) + " |" for r in rows]
                lines.append("")
        for pv in summary["pivots"]:
            cols = pv["column_labels"]
            lines += [f"## {pv['metric']} by {pv['rows']} × {pv['columns']}", "",
                      f"| {pv['rows']} | " + " | ".join(f"{pv['columns']}={c}" for c in cols) + " |",
                      "|" + "---|" * (len(cols) + 1)]
            lines += [f"| {r} | " + " | ".join(_cell(pv, r, c) for c in cols) + " |" for r in pv["row_labels"]]
            lines.append("")
    else:
        names = summary["objectives"]
        keys = sorted({k for r in summary["trials_table"] for k in r["params"]})
        best = "Pareto-optimal" if len(names) > 1 else "best"
        lines += [f"* = {best} trial. {importance_line(summary.get('importances'))}".rstrip(), ""]
        lines += ["| trial | state | " + " | ".join(keys + names) + " |", "|" + "---|" * (2 + len(keys) + len(names))]
        for r in summary["trials_table"]:
            values = r["values"] or [None] * len(names)
            lines.append(f"| {r['number']}{'*' if r['number'] in summary['best'] else ''} | "
                         f"{r['outcome'] or r['state'].lower()} | " +
                         " | ".join([_param(r["params"].get(k)) for k in keys] +
                                    [fmt(n, v) for n, v in zip(names, values)]) + " |")
    return "\n".join(lines) + "\n"


def write_files(summary: dict, study: optuna.Study, client: Any, folder: Path) -> list[Path]:
    """results.csv, results.md, summary.json and the figures that apply; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name, text in (("results.csv", results_csv(summary)), ("results.md", results_markdown(summary)),
                       ("summary.json", json.dumps(summary, indent=2))):
        (folder / name).write_text(text)
        files.append(folder / name)
    if summary["kind"] == "ablation" and client is not None:
        curves = arm_histories(study, client)
        if any(curves.values()):
            files.append(plots.arm_curves(curves, folder / "curves.png", title=f"{summary['study']}: error, "
                                          f"train (dashed) / val (bold), mean ± std over seeds"))
    if summary["kind"] == "search" and len(summary["objectives"]) >= 2:
        complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
        if complete:
            points = [t.values[:2] for t in complete]
            front = [t.values[:2] for t in study.best_trials]
            goals = [m["goal"] for m in summary["metrics"][:2]]
            files.append(plots.pareto_front(points, front, summary["objectives"][:2], folder / "pareto.png",
                                            title=f"{summary['study']}: Pareto front", goals=goals))
    imp = summary.get("importances") or {}
    if imp.get("values"):
        (folder / "importances.json").write_text(json.dumps(imp, indent=2))
        files += [folder / "importances.json", plots.importances(
            imp["values"], folder / "importances.png",
            title=f"parameter importances for {imp['target']} (Optuna {imp['evaluator']})")]
    return files


def arm_histories(study: optuna.Study, client: Any) -> dict[str, list[dict[int, dict[str, float]]]]:
    """arm -> per seed {epoch: {train/error, val/error}} from the child runs' metric histories."""
    out: dict[str, list] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        run_id = TrialRecord.of(t).run_id
        if not run_id:
            continue
        rows = tracking.read_history(client, run_id, ("train/error", "val/error"))
        out.setdefault(t.params["arm"], []).append({row.pop("epoch"): row for row in rows})
    return out


# ---- after a run, and the `report` command ---------------------------------------------------------------
def close_dead_children(study: optuna.Study, client: Any) -> int:
    """Child runs of trials whose worker died (FAIL, no outcome) still say RUNNING: end them FAILED."""
    parent = study.user_attrs.get(keys.PARENT)
    if not parent or client is None:
        return 0
    experiment_id = client.get_run(parent).info.experiment_id
    runs = recording.trial_runs(client, experiment_id, parent)
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if TrialRecord.of(t).outcome:
            continue
        for run in runs.get(t.number, []):
            if run.info.status == "RUNNING":
                recording.mark_child(client, run.info.run_id, "FAILED", reason="worker died (no heartbeat)",
                                     status="FAILED")
                n += 1
    return n


def is_done(study: optuna.Study) -> bool:
    """No trial is running or waiting (workers stop only when the cells or the budget are used up)."""
    return not study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))


def finalize(storage_url: str, name: str, client: Any, storage: Any = None, interrupted: bool = False,
             folder: Optional[Path] = None) -> dict:
    """After workers stop: summarise, close children of dead workers, log the study's files to the parent run
    and end it (FINISHED, or KILLED when interrupted). Returns the summary."""
    storage = storage or open_storage(storage_url)
    study = optuna.load_study(study_name=name, storage=storage)
    summary = summarize(study)
    close_dead_children(study, client)
    parent = study.user_attrs.get(keys.PARENT)
    with tempfile.TemporaryDirectory(prefix="reslab-report-") as tmp:
        files = write_files(summary, study, client, Path(folder or tmp))
        if parent:
            tracking.log_files(client, parent, files, "results")
    _dashboard_note(study, summary)
    if parent:
        _log_parent_summary(client, parent, summary)
        if interrupted:
            client.set_terminated(parent, status="KILLED")
        elif is_done(study):
            client.set_terminated(parent, status="FINISHED")
    return summary


def arm_rows(summary: dict) -> list[dict]:
    """One row per metric and arm: n, mean, std, the comparison with its reference and the per-seed values."""
    rows = []
    for metric, arms in summary.get("results", {}).items():
        for s in arms:
            c = s.get("comparison") or {}
            rows.append({"metric": metric, "arm": s["arm"], "reference": s["reference"], "n": s["n"],
                         "mean": s["mean"], "std": s["std"], "diff": c.get("diff"), "ci_low": c.get("ci_low"),
                         "ci_high": c.get("ci_high"), "p": c.get("p"), "p_holm": c.get("p_holm"),
                         "test": c.get("test"), **{f"seed {k}": v for k, v in s["values"].items()}})
    return rows


def _log_parent_summary(client: Any, run_id: str, summary: dict) -> None:
    """The per-arm statistics as a table artifact (results/arms.json: the UI shows it as a table; they are not
    metrics, so the trials' curves keep the chart view to themselves) and the trial counts as a tag."""
    tracking.log_table(client, run_id, arm_rows(summary), "results/arms.json")
    counts = ", ".join(f"{n} {state}" for state, n in summary["trials"].items())
    tracking.set_tags(client, run_id, {keys.TRIALS_TAG: counts or "none"})


def _dashboard_note(study: optuna.Study, summary: dict) -> None:
    """The report as the study's note in optuna-dashboard (its Markdown note), when optuna-dashboard is installed:
    an ablation's arms, n, mean ± std, tests and per-seed values next to Optuna's own views."""
    try:
        from optuna_dashboard import save_note
    except ImportError:
        return
    meta = study.user_attrs.get(keys.META) or {}
    head = meta.get("description") or ""
    if summary["kind"] == "ablation":
        head += ("\n\nAn ablation: each trial is one arm x seed (params `arm`, `seed`); arms are compared below, "
                 "Optuna's 'best trial' is not a result of it.")
    save_note(study, (head.strip() + "\n\n" + results_markdown(summary)).strip())


def load_study_by_ref(ref: str, storage_url: str) -> optuna.Study:
    """The study named `ref` (or named by the ablation/search file `ref`); one-line error when missing."""
    name = study_name_of(ref)
    if storage_url.startswith("sqlite:///") and not Path(storage_url[len("sqlite:///"):]).expanduser().exists():
        raise ReslabError(f"no study storage at {storage_url} (run an ablation or search first, or give "
                          f"--storage / --output-dir)", file=ref)
    storage = open_storage(storage_url)
    names = optuna.get_all_study_names(storage)
    if name not in names:
        raise ReslabError(f"no study '{name}' in {shown(storage_url)}{did_you_mean(name, names)}; studies there: "
                          f"{', '.join(names) or 'none'}", file=ref if ref != name else None)
    return optuna.load_study(study_name=name, storage=storage)


def report_study(ref: str, storage: Optional[str] = None, output_dir: str = "outputs",
                 tracking_uri: Optional[str] = None) -> dict:
    """The summary of a stored study (by name or by its ablation/search file), with where its MLflow records are."""
    study = load_study_by_ref(ref, with_driver(storage or default_storage(output_dir)))
    summary = summarize(study)
    if tracking_uri is None:
        tracking_uri = f"sqlite:///{Path(output_dir).expanduser().resolve() / 'mlflow.db'}"
    summary["mlflow"] = {"tracking_uri": tracking_uri,
                         "experiment": recording.experiment_name(summary["kind"], summary["study"])}
    return summary

