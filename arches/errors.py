"""One error type for every bad input reslab can meet: printed as one line, exit code 2."""
from __future__ import annotations

import difflib
from typing import Iterable


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
        return f"{where}{key}{self.message}"


class SpecError(ReslabError):
    """A spec (or search/ablation file) that does not describe a valid network or study."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ('' when it has none), for one-line errors and reasons."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
