"""A study's results: per-arm statistics (or the search's trials), tables (rich, CSV, Markdown), figures, and
the MLflow parent run's artifacts. Reads the Optuna storage; the MLflow store only for curves and run states.

    report = study_report("shortcuts")           # an AblationReport or a SearchReport (typed records)
    print_report(report)                         # rich tables; report.to_json(): `cli.py report shortcuts --json`
"""
from __future__ import annotations

import csv
import io
import json
import math
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.table import Table

from arches.errors import ReslabError, did_you_mean
from arches.report import human
from runs.hints import ui_hint
from runs.mlflow_read import read_history
from runs.mlflow_write import log_files, log_table, set_tags

from . import keys, plots, recording, views
from .design_spaces import design_space_note, design_space_rows, design_space_summary, plot_design_spaces
from .seeding import seeding_lines, summary_decision
from .space import study_name_of
from .stats import ArmStats, Comparison, compare_arms, count_mean_std
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


# ---- records ------------------------------------------------------------------------------------------
# What a report shows, as typed records; JSON (summary.json, --json), CSV and Markdown are made from them at the
# edge. Numbers a record holds are JSON-clean: an undefined one (NaN, inf) is None.
def _num(v: Any) -> Any:
    """JSON-safe number: NaN/inf -> None."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return _num(obj)


@dataclass
class FailedSeed:
    """A seed of an arm whose trial gave no result (diverged, invalid)."""
    seed: Any
    trial: int
    reason: str


@dataclass
class ArmRow:
    """One arm of an ablation: its labels, reference, cost and the state of its seeds."""
    name: str
    labels: dict[str, str]                               # axis -> label
    reference: str                                       # the arm it is compared with
    width_multiplier: Optional[float]                    # chosen by compute matching (None: the spec's)
    params: Optional[float] = None
    macs: Optional[float] = None
    complete: list = field(default_factory=list)         # seeds with a result
    failed: list[FailedSeed] = field(default_factory=list)
    running: list = field(default_factory=list)          # seeds still running
    duplicates: int = 0                                  # results of a seed beyond its first (not counted)
    environments: list[str] = field(default_factory=list)  # where its trials ran ('1 thread, cpu')


@dataclass
class ArmResult:
    """One arm's figures on one metric (search.stats.ArmStats as the report shows it; seeds as strings)."""
    arm: str
    reference: str
    n: int
    mean: Optional[float]
    std: Optional[float]
    values: dict[str, Optional[float]]                   # seed -> value
    comparison: Optional[Comparison]                     # with the reference (None: the reference itself)

    @classmethod
    def of(cls, stats: ArmStats) -> "ArmResult":
        d = _clean(stats.to_dict())
        c = d.pop("comparison")
        return cls(**d, comparison=None if c is None else Comparison(**c))


@dataclass
class PivotCell:
    n: int
    mean: Optional[float]
    std: Optional[float]


@dataclass
class Pivot:
    """A metric by the labels of two axes (mean over seeds and over any other axes' arms)."""
    metric: str
    rows: str                                            # the axis of the rows
    columns: str                                         # the axis of the columns
    row_labels: list[str]
    column_labels: list[str]
    cells: dict[str, dict[str, PivotCell]]               # row label -> column label -> cell

    def cell(self, row: str, col: str) -> str:
        """'12.30 ± 0.40 (n=3)', or — for an empty cell."""
        cell = self.cells.get(row, {}).get(col)
        if not cell or not cell.n:
            return "—"
        std = "" if cell.std is None else f" ± {fmt(self.metric, cell.std)}"
        return f"{fmt(self.metric, cell.mean)}{std} (n={cell.n})"


@dataclass
class TrialRow:
    """One trial of a search."""
    number: int
    state: str                                           # Optuna's state name
    outcome: Optional[str]                               # reslab's outcome (keys.OUTCOMES)
    params: dict[str, Any]
    values: Optional[list[Optional[float]]]              # the objectives' values
    reason: Optional[str]
    retried: bool                                        # a later trial retries it
    metrics: dict[str, Any]                              # the run's final metrics and costs


@dataclass
class Importances:
    """Optuna's parameter importances for the first objective."""
    evaluator: str                                       # PED-ANOVA | fANOVA
    target: str                                          # the objective
    values: dict[str, float]                             # parameter -> importance (empty: none could be given)
    notes: list[str]                                     # Optuna's warnings and errors

    def line(self) -> str:
        """'parameter importances for val/error (Optuna PED-ANOVA): depth 0.71, width 0.29', or why none."""
        head = f"parameter importances for {self.target} (Optuna {self.evaluator})"
        if self.values:
            return head + ": " + ", ".join(f"{k} {v:.2f}" for k, v in self.values.items())
        return head + ": none (" + ("; ".join(self.notes) or "no result") + ")"


@dataclass
class PackRow:
    """A pack some of the study's trials trained in together (one vmapped model, search.packing)."""
    pack: str                                            # its id (MLflow tag reslab.pack of each member's run)
    size: int                                            # members when it started
    trials: list[int]
    cells: list[str]                                     # what each member stood for ('A seed 0', 'trial 4')

    def line(self) -> str:
        return f"pack {self.pack} ({self.size} trained together): " + ", ".join(
            c if c == f"trial {n}" else f"{c} (trial {n})" for c, n in zip(self.cells, self.trials))


def pack_rows(trials: list) -> list[PackRow]:
    """The packs of a study's trials, in the order they started; a trial alone is in none."""
    packs: dict[str, PackRow] = {}
    for t in trials:
        rec = TrialRecord.of(t)
        if not rec.pack:
            continue
        row = packs.setdefault(rec.pack, PackRow(rec.pack, int(rec.pack_size or 0), [], []))
        params = t.params or {}
        row.trials.append(t.number)
        row.cells.append(f"{params['arm']} seed {params.get('seed')}" if "arm" in params else f"trial {t.number}")
    return list(packs.values())


@dataclass
class MlflowPlace:
    """Where a study's MLflow records are."""
    tracking_uri: str
    experiment: str
    output_dir: Optional[str] = None                     # the --output-dir it was given (for the UI's hint)


@dataclass(kw_only=True)
class StudyReport:
    """What every study's report holds; each kind adds its tables and says how to print and write them."""
    study: str
    file: Optional[str]
    parent_run_id: Optional[str]
    metrics: list[dict]                                  # [{name, goal}]: the file's metrics (or objectives)
    trials: dict[str, int]                               # Optuna state (or 'discarded') -> count
    importances: Optional[Importances] = None
    mlflow: Optional[MlflowPlace] = None                 # set by report_study
    packs: list[PackRow] = field(default_factory=list)   # the packs its trials trained in (search.packing)
    kind: ClassVar[str] = ""

    def body_json(self) -> dict:
        """The kind's own fields, in summary.json's order."""
        raise NotImplementedError

    def to_json(self) -> dict:
        """The report as summary.json and --json print it."""
        out = {"study": self.study, "kind": self.kind, "file": self.file, "parent_run_id": self.parent_run_id,
               "metrics": self.metrics, "trials": self.trials, **self.body_json(),
               "importances": None if self.importances is None else asdict(self.importances),
               "packs": [asdict(p) for p in self.packs]}
        if self.mlflow is not None:
            out["mlflow"] = asdict(self.mlflow)
        return _clean(out)

    def print_body(self, console: Console) -> None:
        raise NotImplementedError

    def notes(self) -> list[str]:
        """Lines printed after the tables."""
        line = self.importances.line() if self.importances else ""
        return ([line] if line else []) + [p.line() for p in self.packs]

    def csv_rows(self) -> list[list]:
        raise NotImplementedError

    def markdown_body(self) -> list[str]:
        raise NotImplementedError

    def figures(self, study: optuna.Study, client: Any, folder: Path) -> list[Path]:
        """The kind's figures, written to `folder`."""
        return []

    def dashboard_head(self) -> str:
        """What optuna-dashboard's note says before the report."""
        return ""

    def table_rows(self) -> list[dict]:
        """The parent run's results/arms.json rows."""
        return []


def _state_counts(trials: list) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in trials:
        name = keys.DISCARDED if TrialRecord.of(t).outcome == keys.DISCARDED else t.state.name.lower()
        counts[name] = counts.get(name, 0) + 1
    return counts


def summarize(study: optuna.Study) -> StudyReport:
    """Everything a report shows, as a typed record of the study's kind."""
    meta = study.user_attrs.get(keys.META)
    if not meta:
        raise ReslabError(f"study '{study.study_name}' was not made by reslab (no definition stored)")
    trials = study.get_trials(deepcopy=False)
    head = dict(study=study.study_name, file=meta.get("file"), parent_run_id=study.user_attrs.get(keys.PARENT),
                metrics=_clean(meta["metrics"]), trials=_state_counts(trials), packs=pack_rows(trials))
    return REPORTS[meta["kind"]].of(study, meta, trials, head)


def threads_and_device(rec: TrialRecord) -> str:
    """Where a trial ran: '2 threads, cpu' (arithmetic differs between thread counts and devices)."""
    threads = "? threads" if rec.threads is None else f"{rec.threads} thread{'s' if rec.threads != 1 else ''}"
    return f"{threads}, {rec.device or '?'}"


def _table(console: Console, title: str, columns: list[str], rows: list[list[str]], left: tuple = ()) -> None:
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col in left else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _markdown_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + ["| " + " | ".join(r) + " |"
                                                                               for r in rows]


@dataclass(kw_only=True)
class AblationReport(StudyReport):
    """An ablation's report: per arm and metric n, mean ± std and the comparison with its reference arm."""
    seeds: list
    axes: dict[str, list[str]]                           # axis -> its labels
    arms: list[ArmRow]
    results: dict[str, list[ArmResult]]                  # metric -> one result per arm
    pivots: list[Pivot]
    mixed_environments: bool                             # trials ran with different threads or devices
    seeding: Optional[dict] = None                       # adaptive seeds: search.seeding.SeedDecision.to_dict()
    kind: ClassVar[str] = "ablation"

    @classmethod
    def of(cls, study: optuna.Study, meta: dict, trials: list, head: dict) -> "AblationReport":
        arms = {a["name"]: a for a in meta["arms"]}
        values: dict[str, dict[str, dict[int, float]]] = {m["name"]: {a: {} for a in arms} for m in meta["metrics"]}
        info = {a: ArmRow(a, arms[a]["labels"], arms[a]["reference"], arms[a].get("width_multiplier")) for a in arms}
        for t in trials:
            arm, seed = t.params.get("arm"), t.params.get("seed")
            if arm not in info:
                continue
            row, rec = info[arm], TrialRecord.of(t)
            row.params, row.macs = rec.cost.get("params", row.params), rec.cost.get("macs", row.macs)
            if rec.width_multiplier is not None:
                row.width_multiplier = rec.width_multiplier
            if t.state == TrialState.COMPLETE:
                if seed in row.complete:
                    row.duplicates += 1
                    continue
                row.complete.append(seed)
                where = threads_and_device(rec)
                if where not in row.environments:
                    row.environments.append(where)
                for m in values:
                    if m in rec.metrics:
                        values[m][arm][seed] = float(rec.metrics[m])
            elif t.state == TrialState.FAIL and rec.outcome in (keys.DIVERGED, keys.INVALID):
                row.failed.append(FailedSeed(seed, t.number, rec.reason or ""))
            elif t.state == TrialState.RUNNING:
                row.running.append(seed)
        references = {a: arms[a]["reference"] for a in arms}
        results = {m: [ArmResult.of(s) for s in compare_arms(values[m], references)] for m in values}
        mixed = len({w for row in info.values() for w in row.environments}) > 1
        pivots = []
        pivot = meta.get("pivot")
        if pivot:
            for m in pivot.get("metrics") or [x["name"] for x in meta["metrics"]]:
                pivots.append(_pivot(meta, values[m], m, pivot["rows"], pivot["columns"]))
        seeding = summary_decision(meta, values[meta["metrics"][0]["name"]], info) if meta.get("seed_rule") else None
        seeds = meta["seeds"][:seeding["n"]] if seeding else meta["seeds"]
        return cls(**head, seeds=seeds, axes=meta["axes"], arms=list(info.values()), results=results,
                   pivots=pivots, mixed_environments=mixed, seeding=seeding)

    def body_json(self) -> dict:
        return {"seeds": self.seeds, "axes": self.axes, "arms": [asdict(a) for a in self.arms],
                "results": {m: [asdict(r) for r in rows] for m, rows in self.results.items()},
                "pivots": [asdict(p) for p in self.pivots], "mixed_environments": self.mixed_environments,
                **({"seeding": self.seeding} if self.seeding else {})}

    def has_holm(self) -> bool:
        return any(r.comparison is not None and r.comparison.p_holm is not None
                   for rows in self.results.values() for r in rows)

    def table(self, metric: str) -> tuple[list[str], list[list[str]]]:
        """Columns and rows of one metric: arm, n, mean ± std, Δ vs reference, 95% CI, p, [p (Holm)], [width ×],
        MACs, params.

        p is the paired t-test by seed; 'W' marks Welch's test (seeds did not match); p (Holm) appears with more
        than one comparison."""
        arms = {a.name: a for a in self.arms}
        refs = {r.reference for r in self.results[metric]}
        matched = any(a.width_multiplier not in (None, 1, 1.0) for a in self.arms)
        holm = any(r.comparison is not None and r.comparison.p_holm is not None for r in self.results[metric])
        columns = ["arm", "n", "mean ± std", "Δ" if len(refs) > 1 else f"Δ vs {next(iter(refs))}", "95% CI", "p"]
        columns += (["p (Holm)"] if holm else []) + (["width ×"] if matched else []) + ["MACs", "params"]
        rows = []
        for r in self.results[metric]:
            a, c = arms[r.arm], r.comparison
            mean = "—" if r.mean is None else fmt(metric, r.mean) + ("" if r.std is None else
                                                                      f" ± {fmt(metric, r.std)}")
            adjusted = ""
            if r.arm == r.reference:
                diff, ci, p = "baseline", "", ""
            elif c is None:
                diff, ci, p = "—", "", ""
            else:
                adjusted = _p(c.p_holm)
                diff = fmt(metric, c.diff, sign=True)
                if len(refs) > 1:
                    ref = arms[r.reference].labels
                    diff += " vs " + ",".join(f"{k.split('.')[-1]}={v}" if len(ref) > 1 else v
                                              for k, v in ref.items() if a.labels.get(k) != v)
                ci = "—" if c.ci_low is None else f"{fmt(metric, c.ci_low, True)}…{fmt(metric, c.ci_high, True)}"
                p = _p(c.p) + (" W" if c.test.startswith("Welch") else "")
            failed = len(a.failed)
            row = [r.arm, str(r.n) + (f" +{failed} failed" if failed else ""), mean, diff, ci, p]
            if holm:
                row.append(adjusted)
            if matched:
                row.append("" if a.width_multiplier is None else f"{a.width_multiplier:.4g}")
            rows.append(row + [fmt("macs", a.macs), fmt("params", a.params)])
        return columns, rows

    def per_seed(self, metric: str) -> tuple[list[str], list[list[str]]]:
        """Columns and rows of one metric's value for every arm and seed (— where a seed has no result)."""
        seeds = [str(s) for s in self.seeds]
        rows = [[r.arm, *[fmt(metric, r.values.get(seed)) for seed in seeds]] for r in self.results[metric]]
        return ["arm", *[f"seed {seed}" for seed in seeds]], rows

    def print_body(self, console: Console) -> None:
        for m in self.metrics:
            name = m["name"]
            unit = " (%)" if _percent(name) else ""
            columns, rows = self.table(name)
            _table(console, f"{name}{unit} ({m['goal']}): mean ± std over seeds; Δ with 95% CI and p of the paired "
                            f"t-test by seed (W: Welch)", columns, rows, left=("arm", "95% CI"))
        for pv in self.pivots:
            unit = " (%)" if _percent(pv.metric) else ""
            table = Table(title=f"{pv.metric}{unit} by {pv.rows} × {pv.columns} (mean ± std over seeds)")
            table.add_column(pv.rows)
            for c in pv.column_labels:
                table.add_column(f"{pv.columns}={c}", justify="right")
            for r in pv.row_labels:
                table.add_row(r, *[pv.cell(r, c) for c in pv.column_labels])
            console.print(table)
        for a in self.arms:
            for f in a.failed:
                console.print(f"[red]arm {a.name} seed {f.seed} failed[/red]: {f.reason}")
        for line in seeding_lines(self.seeding) if self.seeding else []:
            console.print(line, soft_wrap=True)
        if self.mixed_environments:
            console.print("[yellow]note: trials ran with different CPU threads or devices, so results may differ "
                          "by arithmetic too:[/yellow] " + "; ".join(f"{a.name}: {' / '.join(a.environments)}"
                                                                      for a in self.arms), soft_wrap=True)

    def notes(self) -> list[str]:
        return [TEST_NOTE + (f"; {HOLM_NOTE}" if self.has_holm() else ""), *super().notes()]

    def csv_rows(self) -> list[list]:
        axes = list(self.axes)
        out: list[list] = [["metric", "arm", *axes, "reference", "n", "mean", "std", "diff", "ci_low", "ci_high",
                            "p", "p_holm", "test", "width_multiplier", "params", "macs", "seeds"]]
        arms = {a.name: a for a in self.arms}
        for metric, rows in self.results.items():
            for r in rows:
                a, c = arms[r.arm], r.comparison or Comparison(*[None] * 6)
                out.append([metric, r.arm, *[a.labels.get(x, "") for x in axes], r.reference, r.n, r.mean, r.std,
                            c.diff, c.ci_low, c.ci_high, c.p, c.p_holm, c.test, _num(a.width_multiplier),
                            _num(a.params), _num(a.macs), " ".join(f"{k}:{v}" for k, v in r.values.items())])
        return out

    def markdown_body(self) -> list[str]:
        lines = [f"n = seeds per arm; mean ± sample std over seeds. {TEST_NOTE}."]
        if self.has_holm():
            lines += ["", HOLM_NOTE + "."]
        if self.seeding:
            lines += [""] + [f"- {x.strip()}" if i else x for i, x in enumerate(seeding_lines(self.seeding))]
        lines.append("")
        for m in self.metrics:
            unit = " (%)" if _percent(m["name"]) else ""
            lines += [f"## {m['name']}{unit} ({m['goal']})", ""]
            for columns, rows in (self.table(m["name"]), self.per_seed(m["name"])):
                lines += _markdown_table(columns, rows) + [""]
        for pv in self.pivots:
            cols = pv.column_labels
            lines += [f"## {pv.metric} by {pv.rows} × {pv.columns}", ""]
            lines += _markdown_table([pv.rows, *[f"{pv.columns}={c}" for c in cols]],
                                     [[r, *[pv.cell(r, c) for c in cols]] for r in pv.row_labels]) + [""]
        return lines

    def figures(self, study: optuna.Study, client: Any, folder: Path) -> list[Path]:
        if client is None:
            return []
        curves = arm_histories(study, client)
        if not any(curves.values()):
            return []
        return [plots.arm_curves(curves, folder / "curves.png", title=f"{self.study}: error, train (dashed) / val "
                                                                      f"(bold), mean ± std over seeds")]

    def dashboard_head(self) -> str:
        return ("\n\nAn ablation: each trial is one arm x seed (params `arm`, `seed`); arms are compared below, "
                "Optuna's 'best trial' is not a result of it.")

    def table_rows(self) -> list[dict]:
        """One row per metric and arm: n, mean, std, the comparison with its reference and the per-seed values."""
        rows = []
        for metric, results in self.results.items():
            for r in results:
                c = r.comparison or Comparison(*[None] * 6)
                rows.append({"metric": metric, "arm": r.arm, "reference": r.reference, "n": r.n, "mean": r.mean,
                             "std": r.std, "diff": c.diff, "ci_low": c.ci_low, "ci_high": c.ci_high, "p": c.p,
                             "p_holm": c.p_holm, "test": c.test, **{f"seed {k}": v for k, v in r.values.items()}})
        return rows


def _pivot(meta: dict, values: dict[str, dict[int, float]], metric: str, rows: str, columns: str) -> Pivot:
    """metric by the labels of two axes (mean over seeds and over any other axes' arms)."""
    cells: dict[str, dict[str, list[float]]] = {}
    for a in meta["arms"]:
        r, c = a["labels"][rows], a["labels"][columns]
        cells.setdefault(r, {}).setdefault(c, []).extend(values.get(a["name"], {}).values())
    table = {r: {c: PivotCell(*map(_num, count_mean_std(v))) for c, v in cols.items()}
             for r, cols in cells.items()}
    return Pivot(metric, rows, columns, meta["axes"][rows], meta["axes"][columns], table)


@dataclass(kw_only=True)
class SearchReport(StudyReport):
    """A search's report: its trials and the best (or Pareto-optimal) ones."""
    objectives: list[str]
    trials_table: list[TrialRow]
    best: list[int]                                      # trial numbers
    design_spaces: Optional[dict] = None                 # search.design_spaces.design_space_summary
    kind: ClassVar[str] = "search"

    @classmethod
    def of(cls, study: optuna.Study, meta: dict, trials: list, head: dict) -> "SearchReport":
        names = [m["name"] for m in meta["metrics"]]
        rows = []
        records = {t.number: TrialRecord.of(t) for t in trials}
        retried = {rec.retry_of for rec in records.values()}
        for t in trials:
            rec = records[t.number]
            rows.append(TrialRow(t.number, t.state.name, rec.outcome, _clean(t.params),
                                 _clean(list(t.values)) if t.values else None, rec.reason, t.number in retried,
                                 _clean(rec.metrics)))
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        best: list[int] = []
        if complete:
            best = [t.number for t in study.best_trials] if len(names) > 1 else [study.best_trial.number]
        spaces = design_space_summary(meta, trials) if meta.get("design_spaces") else None
        return cls(**head, objectives=names, trials_table=rows, best=best,
                   importances=importances(study, meta, complete), design_spaces=spaces)

    def body_json(self) -> dict:
        return {"objectives": self.objectives, "trials_table": [asdict(r) for r in self.trials_table],
                "best": self.best, **({"design_spaces": self.design_spaces} if self.design_spaces else {})}

    def _columns(self) -> list[str]:
        return sorted({k for r in self.trials_table for k in r.params})

    def _cells(self, r: TrialRow, keys_: list[str]) -> list[str]:
        values = r.values or [None] * len(self.objectives)
        return [_param(r.params.get(k)) for k in keys_] + [fmt(n, v) for n, v in zip(self.objectives, values)]

    def print_body(self, console: Console) -> None:
        table = Table(title=f"trials (best: {', '.join(map(str, self.best)) or '—'})")
        params = self._columns()
        for col in ["#", "state", *params, *self.objectives]:
            table.add_column(col, justify="right" if col not in ("state",) else "left")
        for r in self.trials_table:
            mark = "*" if r.number in self.best else ""
            table.add_row(f"{r.number}{mark}", (r.outcome or r.state.lower()) + (" (retried)" if r.retried else ""),
                          *self._cells(r, params))
        console.print(table)
        if self.design_spaces:
            columns, rows = design_space_rows(self.design_spaces)
            _table(console, f"{self.design_spaces['metric']} by design space (the same sampled points in each)",
                   columns, rows, left=("design space",))
            console.print(design_space_note(self.design_spaces), soft_wrap=True)

    def csv_rows(self) -> list[list]:
        params = self._columns()
        out: list[list] = [["trial", "state", "outcome", *params, *self.objectives, "reason"]]
        for r in self.trials_table:
            values = r.values or [None] * len(self.objectives)
            out.append([r.number, r.state, r.outcome, *[r.params.get(k) for k in params], *values, r.reason])
        return out

    def markdown_body(self) -> list[str]:
        params = self._columns()
        best = "Pareto-optimal" if len(self.objectives) > 1 else "best"
        line = self.importances.line() if self.importances else ""
        lines = [f"* = {best} trial. {line}".rstrip(), ""]
        lines += ["| trial | state | " + " | ".join(params + self.objectives) + " |",
                  "|" + "---|" * (2 + len(params) + len(self.objectives))]
        for r in self.trials_table:
            lines.append(f"| {r.number}{'*' if r.number in self.best else ''} | {r.outcome or r.state.lower()} | "
                         + " | ".join(self._cells(r, params)) + " |")
        if self.design_spaces:
            lines += ["", "## Design spaces", "", *_markdown_table(*design_space_rows(self.design_spaces)), "",
                      design_space_note(self.design_spaces)]
        return lines

    def figures(self, study: optuna.Study, client: Any, folder: Path) -> list[Path]:
        if self.design_spaces:
            return plot_design_spaces(self.design_spaces, folder)
        if len(self.objectives) < 2:
            return []
        complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
        if not complete:
            return []
        points = [t.values[:2] for t in complete]
        front = [t.values[:2] for t in study.best_trials]
        goals = [m["goal"] for m in self.metrics[:2]]
        return [plots.pareto_front(points, front, self.objectives[:2], folder / "pareto.png",
                                   title=f"{self.study}: Pareto front", goals=goals)]


REPORTS: dict[str, type[StudyReport]] = {r.kind: r for r in (AblationReport, SearchReport)}  # reslab.kind -> report


def importances(study: optuna.Study, meta: dict, complete: list) -> Optional[Importances]:
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
    out = Importances(label, objective["name"], {}, [])
    # PED-ANOVA ranks parameters by what gives LOW target values: a maximised objective is negated for it
    sign = -1.0 if objective["goal"] == "maximize" and choice == "ped-anova" else 1.0
    target = (lambda t: sign * t.values[0]) if len(study.directions) > 1 or sign < 0 else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            values = optuna.importance.get_param_importances(study, evaluator=make(), target=target)
        except Exception as e:  # noqa: BLE001  (too few distinct values etc.: a note, not a failure)
            out.notes.append(f"{type(e).__name__}: {e}")
            values = {}
    notes = [str(w.message) for w in caught if "computes the importances of params to achieve low" not in
             str(w.message)]
    out.notes += notes
    if not any("will be equal" in n for n in notes):
        out.values = _clean({k: float(v) for k, v in values.items()})
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


def _param(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def print_report(report: StudyReport, console: Optional[Console] = None) -> None:
    """Rich tables of a study's report (160 columns wide when printing to a file or pipe)."""
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=160)
    counts = ", ".join(f"{v} {k}" for k, v in report.trials.items())
    console.print(f"[bold]{report.kind} {report.study}[/bold]  trials: {counts or 'none'}  "
                  f"parent run {report.parent_run_id}")
    report.print_body(console)
    for line in report.notes():
        console.print(line, soft_wrap=True)
    if report.mlflow:
        m = report.mlflow
        console.print(f"MLflow: experiment '{m.experiment}' in {m.tracking_uri} (curves, children, "
                      f"artifacts); {ui_hint(m.tracking_uri, m.output_dir)}", soft_wrap=True)


# ---- files ----------------------------------------------------------------------------------------------
def results_csv(report: StudyReport) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(report.csv_rows())
    return buf.getvalue()


def results_markdown(report: StudyReport) -> str:
    packs = ["", "## Packs", "", *[f"- {p.line()}" for p in report.packs]] if report.packs else []
    return "\n".join([f"# {report.kind} {report.study}", "", *report.markdown_body(), *packs]) + "\n"


def write_files(report: StudyReport, study: optuna.Study, client: Any, folder: Path) -> list[Path]:
    """results.csv, results.md, summary.json and the figures that apply; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name, text in (("results.csv", results_csv(report)), ("results.md", results_markdown(report)),
                       ("summary.json", json.dumps(report.to_json(), indent=2))):
        (folder / name).write_text(text)
        files.append(folder / name)
    files += report.figures(study, client, folder)
    imp = report.importances
    if imp is not None and imp.values:
        (folder / "importances.json").write_text(json.dumps(asdict(imp), indent=2))
        files += [folder / "importances.json", plots.importances(
            imp.values, folder / "importances.png",
            title=f"parameter importances for {imp.target} (Optuna {imp.evaluator})")]
    return files


def arm_histories(study: optuna.Study, client: Any) -> dict[str, list[dict[int, dict[str, float]]]]:
    """arm -> per seed {epoch: {train/error, val/error}} from the child runs' metric histories."""
    out: dict[str, list] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        run_id = TrialRecord.of(t).run_id
        if not run_id:
            continue
        rows = read_history(client, run_id, ("train/error", "val/error"))
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
             folder: Optional[Path] = None) -> StudyReport:
    """After workers stop: summarise, close children of dead workers, log the study's files to the parent run
    and end it (FINISHED, or KILLED when interrupted). Returns the report."""
    storage = storage or open_storage(storage_url)
    study = optuna.load_study(study_name=name, storage=storage)
    report = summarize(study)
    close_dead_children(study, client)
    parent = study.user_attrs.get(keys.PARENT)
    with tempfile.TemporaryDirectory(prefix="reslab-report-") as tmp:
        files = write_files(report, study, client, Path(folder or tmp))
        if parent:
            log_files(client, parent, files, "results")
    _dashboard_note(study, report)
    if parent:
        _log_parent_summary(client, parent, report)
        views.publish(client, parent, report, (study.user_attrs.get(keys.META) or {}).get("description") or "")
        if interrupted:
            client.set_terminated(parent, status="KILLED")
        elif is_done(study):
            client.set_terminated(parent, status="FINISHED")
    return report


def _log_parent_summary(client: Any, run_id: str, report: StudyReport) -> None:
    """The per-arm statistics as a table artifact (results/arms.json: the UI shows it as a table; they are not
    metrics, so the trials' curves keep the chart view to themselves) and the trial counts as a tag."""
    log_table(client, run_id, report.table_rows(), "results/arms.json")
    counts = ", ".join(f"{n} {state}" for state, n in report.trials.items())
    set_tags(client, run_id, {keys.TRIALS_TAG: counts or "none"})


def _dashboard_note(study: optuna.Study, report: StudyReport) -> None:
    """The report as the study's note in optuna-dashboard (its Markdown note), when optuna-dashboard is installed:
    an ablation's arms, n, mean ± std, tests and per-seed values next to Optuna's own views."""
    try:
        from optuna_dashboard import save_note
    except ImportError:
        return
    meta = study.user_attrs.get(keys.META) or {}
    head = (meta.get("description") or "") + report.dashboard_head()
    save_note(study, (head.strip() + "\n\n" + results_markdown(report)).strip())


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


def study_report(ref: str, storage: Optional[str] = None, output_dir: str = "outputs",
                 tracking_uri: Optional[str] = None) -> StudyReport:
    """The report of a stored study (by name or by its ablation/search file), with where its MLflow records are."""
    study = load_study_by_ref(ref, with_driver(storage or default_storage(output_dir)))
    report = summarize(study)
    if tracking_uri is None:
        tracking_uri = f"sqlite:///{Path(output_dir).expanduser().resolve() / 'mlflow.db'}"
    report.mlflow = MlflowPlace(tracking_uri, recording.experiment_name(report.kind, report.study), str(output_dir))
    return report


def report_study(ref: str, storage: Optional[str] = None, output_dir: str = "outputs",
                 tracking_uri: Optional[str] = None) -> dict:
    """study_report as JSON (what `python cli.py report --json` prints)."""
    return study_report(ref, storage, output_dir, tracking_uri).to_json()
