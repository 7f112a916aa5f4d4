"""Dotted overrides of a spec document: one Setting (key, value, where it was written) applied at a time."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

from arches.errors import SpecError, index_of
from arches.spec import Source, set_path


@dataclass(frozen=True)
class Setting:
    """One dotted override and where it was written (for errors)."""
    key: str
    value: Any
    file: str
    line: Optional[int]


# ---- applying dotted keys ------------------------------------------------------------------------------
def expand_key(data: Any, dotted: str) -> list[str]:
    """'stages.*.depth' -> ['stages.0.depth', 'stages.1.depth', ...] for the lists in `data`."""
    parts = dotted.split(".")
    if "*" not in parts:
        return [dotted]
    i = parts.index("*")
    node: Any = data
    for p in parts[:i]:
        if isinstance(node, list) and index_of(p) is not None and -len(node) <= index_of(p) < len(node):
            node = node[index_of(p)]
        elif isinstance(node, dict) and p in node:
            node = node[p]
        else:
            raise SpecError(f"'*' needs a list or mapping at '{'.'.join(parts[:i]) or '.'}'", path=dotted)
    if isinstance(node, list):
        keys = [str(k) for k in range(len(node))]
    elif isinstance(node, dict):
        keys = [str(k) for k in node]
    else:
        raise SpecError(f"'*' needs a list or mapping at '{'.'.join(parts[:i])}'", path=dotted)
    out = []
    for k in keys:
        out += expand_key(data, ".".join(parts[:i] + [k] + parts[i + 1:]))
    return out


def _keypath(dotted: str) -> tuple:
    return tuple(p if index_of(p) is None else index_of(p) for p in dotted.split("."))


def apply_setting(data: dict, source: Source, s: Setting) -> None:
    """Set one dotted key in a spec document, noting the file and line it came from."""
    try:
        keys = expand_key(data, s.key)
        for key in keys:
            set_path(data, key, copy.deepcopy(s.value))
            source.lines[_keypath(key)] = (s.file, s.line)
            _note_nested(source, _keypath(key), s.value, s.file, s.line)
    except SpecError as e:
        raise SpecError(e.message, file=s.file, line=s.line, path=e.path or s.key) from None


def _note_nested(source: Source, prefix: tuple, value: Any, file: str, line: Optional[int]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            source.lines[prefix + (k,)] = (file, line)
            _note_nested(source, prefix + (k,), v, file, line)
