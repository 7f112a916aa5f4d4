"""One error type for every bad input reslab can meet: printed as one line, exit code 2."""
from __future__ import annotations

import difflib
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from pydantic import BaseModel


class ReslabError(Exception):
    """A user-facing error: `file:line: key.path: message`, never a traceback."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 path: str | None = None):
        super().__init__(message)
        self.message, self.file, self.line, self.path = message, file, line, path

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        key = f"{self.path}: " if self.path else ""
        return printable(f"{where}{key}{self.message}")


class SpecError(ReslabError):
    """A spec (or search/ablation file) that does not describe a valid network or study."""


def printable(text: str) -> str:
    """text with its control characters (a newline in a key someone wrote, say) escaped: one line, always."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ('' when it has none), for one-line errors and reasons."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


KeyPath = tuple  # ('stages', 2, 'depth')


def index_of(text: Any) -> Optional[int]:
    """The integer a key path part spells in ASCII digits ('2', '-1'), else None ('²' or '٣' are digits to
    str.isdigit, but no index)."""
    return int(text) if isinstance(text, str) and re.fullmatch(r"-?[0-9]+", text) else None


@dataclass
class Locator:
    """Where each key of a YAML document was written, key path -> (file, line), and one-line errors at a key.
    Specs (arches.spec.Source), plans and study files all locate their errors through one of these."""
    file: str                                   # the file (display form) the document was read from
    lines: dict[KeyPath, tuple[str, Optional[int]]] = field(default_factory=dict)

    def where(self, path: Sequence) -> tuple[str, Optional[int]]:
        """File and line of the longest prefix of `path` that a document defined."""
        path = tuple(path)
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                return self.lines[path[:n]]
        return self.file, None

    def line(self, *path: Any) -> Optional[int]:
        """The line of key `path` (or of its longest prefix that was written), or None."""
        return self.where(path)[1]

    def error(self, message: str, *path: Any) -> SpecError:
        """A SpecError at key `path` (file, line and dotted path filled in)."""
        file, line = self.where(path)
        return SpecError(message, file=None if file == "<dict>" else file, line=line,
                         path=".".join(map(str, path)) or None)


def data_path(loc: Sequence, data: Any) -> tuple:
    """The part of a pydantic error location that indexes into the document: union member tags such as
    'constrained-int', 'list[int]' or 'MatchSpec' are left out."""
    out, node = [], data
    for part in loc:
        key = index_of(part) if index_of(part) is not None else part
        if isinstance(node, dict) and (part in node or key in node):
            node, _ = node[part if part in node else key], out.append(part if part in node else key)
        elif isinstance(node, list) and isinstance(key, int) and -len(node) <= key < len(node):
            node, _ = node[key], out.append(key)
        elif not (isinstance(part, str) and (part[:1].islower() and ("[" in part or "-" in part) or part[:1].isupper()
                                              or part in ("str", "int", "float", "bool", "list", "dict"))):
            out.append(part)                    # a key the document lacks (a missing required key)
    return tuple(out)


def located(e: Any, model: type, locator: Locator, data: Any, prefix: tuple = ()) -> SpecError:
    """A pydantic ValidationError as one located SpecError: of its errors, the one that reaches deepest into the
    document (for a union, the member that matched the input's shape), its message with 'did you mean'."""
    errors = [(data_path(err["loc"], data), err) for err in e.errors()]
    loc, err = max(errors, key=lambda item: len(item[0]))
    message = validation_message(err, model, loc)
    if err["type"] == "missing":            # point at the mapping that lacks the key (the file's top: line 1)
        file, line = locator.where(prefix + loc[:-1]) if prefix + loc[:-1] else (locator.file, 1)
        return SpecError(message, file=None if file == "<dict>" else file, line=line,
                         path=".".join(map(str, prefix + loc)))
    return locator.error(message, *prefix, *loc)


def validation_message(err: dict, model: type, loc: tuple) -> str:
    """pydantic's message for one error, with 'did you mean' for unknown keys and literals."""
    if err["type"] == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        fields = list(parent.model_fields) if parent else []
        return f"unknown key '{loc[-1]}'{did_you_mean(loc[-1], fields)}; expected one of: {', '.join(fields)}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "literal_error":
        got = err.get("input")
        expected = err.get("ctx", {}).get("expected", "")
        choices = [c.strip().strip("'") for c in expected.replace(" or ", ",").split(",") if c.strip()]
        msg = f"got {got!r}; expected {expected}{did_you_mean(got, choices)}"
    elif err["type"] == "missing":
        msg = "required key is missing"
    elif "input" in err and not isinstance(err["input"], (dict, list)) and not msg.startswith("got "):
        msg = f"{msg} (got {err['input']!r})"
    return msg


def _model_at(model: type, loc: tuple) -> Optional[type]:
    """The pydantic model class that describes the mapping at `loc`, if any."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        ann = current.model_fields[part].annotation
        for arg in (ann, *typing.get_args(ann)):
            inner = typing.get_args(arg) or (arg,)
            cls = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
            if cls:
                current = cls
                break
        else:
            current = ann
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None
