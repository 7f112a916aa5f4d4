"""`--set` on `ablate` / `search`: a key of the study file itself (`search.trials=4`, `ablation.seeds=5`,
`ablation.axes.block.shortcut=[A, C]`, `devices_per_trial=2`, or any key after `study.`: `study.name=x`) changes
that file's value before it is checked; any other key overrides the base spec for every trial, as before
(`set.train.epochs=3` is `train.epochs=3`).

Keys inside the mappings whose own keys are dotted spec keys (`set:`, `ablation.axes`, `ablation.baseline`, an
arm of `ablation.arms`, `search.space`) are matched whole: `search.space.stages.0.width.high=32` finds the
dimension `stages.0.width` and sets its `high`. An error about an overridden value names `--set` (Locator lines).
"""
from __future__ import annotations

from typing import Any, Iterable

from arches.errors import Locator, SpecError, index_of
from arches.spec import Override, parse_override

STUDY_ONLY = ("base", "set", "devices_per_trial", "pack", "ablation", "search")  # top-level keys no spec has
PREFIX = "study"                       # `study.name=x`: a study key that is also a spec key (name, description)
DOTTED = {("set",), ("ablation", "axes"), ("ablation", "baseline"), ("search", "space")}  # keys are spec keys
FLAG = ("--set", None)                 # (file, line) of an overridden key, as Locator stores them


def split_overrides(overrides: Iterable[Override]) -> tuple[list[tuple[str, Any]], list[Override]]:
    """(study-file keys with their values, spec overrides for every trial), in the order given."""
    study, spec = [], []
    for item in overrides:
        key, value = parse_override(item)
        head, _, rest = key.partition(".")
        if head == PREFIX and rest:
            study.append((rest, value))
        elif head == "set" and rest:
            spec.append((rest, value))
        elif head in STUDY_ONLY:
            study.append((key, value))
        else:
            spec.append(item)
    return study, spec


def _dotted(path: tuple) -> bool:
    return path in DOTTED or (len(path) == 3 and path[:2] == ("ablation", "arms"))


def set_study_key(raw: dict, where: Locator, key: str, value: Any) -> None:
    """Set `key` (dotted) in the study document `raw`, noting it came from --set."""
    parts, node, path = key.split("."), raw, ()
    while parts:
        if isinstance(node, list):
            i = index_of(parts[0])
            if i is None or not -len(node) <= i < len(node):
                raise SpecError(f"index '{parts[0]}' out of range: the list has {len(node)} items", file="--set",
                                path=key)
            step, parts = i, parts[1:]
        elif isinstance(node, dict):
            known = [n for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in node]
            n = known[0] if known else (len(parts) if _dotted(path) else 1)
            step, parts = ".".join(parts[:n]), parts[n:]
        else:
            raise SpecError(f"cannot set a key inside a {type(node).__name__}", file="--set", path=key)
        path += (step,)
        if not parts:
            node[step] = value
        else:
            if isinstance(node, dict) and not isinstance(node.get(step), (dict, list)):
                node[step] = {}
                where.lines[path] = FLAG          # (a mapping --set made: its errors are --set's)
            node = node[step]
    where.lines[path] = FLAG
    _note(where, path, value)


def _note(where: Locator, path: tuple, value: Any) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            where.lines[path + (k,)] = FLAG
            _note(where, path + (k,), v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            where.lines[path + (i,)] = FLAG
            _note(where, path + (i,), v)
