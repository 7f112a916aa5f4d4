"""Human-readable views of a spec's complexity (rich tables)."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .complexity import Complexity
from .init import InitReport


def human(n: int) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}" if n < 100 * size else f"{n / size:.0f}{unit}"
    return str(n)


def complexity_table(cost: Complexity, console: Console | None = None, blocks: bool = False) -> Table:
    """Print (and return) the stage table: stage, blocks, output shape, params, MACs, activations."""
    table = Table(title=f"{cost.name}  input {'x'.join(map(str, cost.input_shape))}")
    for col in ("stage", "blocks", "output", "params", "MACs", "acts"):
        table.add_column(col, justify="left" if col in ("stage", "output") else "right")
    for row in cost.blocks if blocks else cost.stages:
        table.add_row(row.name, str(row.blocks) if row.kind == "stage" else row.kind,
                      "x".join(map(str, row.out_shape)), f"{row.params:,}", human(row.macs), human(row.acts))
    table.add_section()
    table.add_row("total", str(len(cost.blocks)), "", f"{cost.params:,}", human(cost.macs), human(cost.acts))
    (console or Console()).print(table)
    return table


def _names(keys: list, limit: int = 8) -> str:
    shown = ", ".join(map(str, keys[:limit]))
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def init_lines(report: InitReport, total: int) -> list[str]:
    """What `init_from` loads, for `show`: loaded keys grouped by top-level module, then every key left out."""
    groups: dict[str, int] = {}
    for key in report.loaded:
        groups[key.split(".")[0]] = groups.get(key.split(".")[0], 0) + 1
    mode = "strict" if report.strict else "init_strict: false"
    lines = [f"init_from {report.source} ({mode}): {len(report.loaded)} of {total} tensors loaded: "
             + ", ".join(f"{g}.* ({n})" for g, n in groups.items())]
    if report.rules:
        lines.append("  file keys renamed: " + ", ".join(f"{rule} ({n})" for rule, n in report.rules.items()))
    if report.mismatched:
        lines.append("  not loaded, shape differs: " + _names([f"{k} (network {e}, file {f})"
                                                                for k, e, f in report.mismatched], 4))
    if report.missing:
        lines.append(f"  not in the file (keep their seeded init): {_names(report.missing)}")
    if report.unexpected:
        lines.append(f"  in the file only (ignored): {_names(report.unexpected)}")
    return lines
