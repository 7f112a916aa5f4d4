"""Human-readable views of a spec's complexity (rich tables)."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .complexity import Complexity


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
