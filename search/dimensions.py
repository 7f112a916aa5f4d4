"""The searched keys of a search file, one class per kind: what Optuna suggests, what a grid tries, what it sets."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from .settings import Setting


@dataclass(kw_only=True)
class Dimension:
    """One searched key: its Optuna suggestion, its grid values and the settings a sampled value makes."""
    key: str                                             # the dotted spec key (or a group's name)
    line: Optional[int] = None                           # where the search file gives it
    kind: ClassVar[str] = ""                             # categorical | groups | int | float (the stored name)

    def suggest(self, trial: Any) -> Any:
        """Draw this key's value for an Optuna trial."""
        raise NotImplementedError

    def grid_values(self) -> Optional[list]:
        """Every value a grid sampler would try, or None for an unbounded float range."""
        raise NotImplementedError

    def ends(self) -> list:
        """The values a load builds to catch bad keys early: first the default, then each other end or choice."""
        raise NotImplementedError

    def settings(self, value: Any, file: str) -> list[Setting]:
        """The overrides a trial with this value applies (`file`: the search file, for errors)."""
        return [Setting(self.key, value, file, self.line)]

    def fields(self) -> dict:
        """The kind's own fields, for as_json."""
        return {}

    def as_json(self) -> dict:
        """The dimension as the study's fingerprint hashes it."""
        return {"key": self.key, "kind": self.kind, "choices": [], "low": 0.0, "high": 0.0, "log": False,
                "step": None, "groups": {}, **self.fields()}


@dataclass(kw_only=True)
class Categorical(Dimension):
    """A list of plain values (strings, numbers, booleans, null)."""
    choices: list = field(default_factory=list)          # the values, in file order
    kind: ClassVar[str] = "categorical"

    def suggest(self, trial: Any) -> Any:
        return trial.suggest_categorical(self.key, self.choices)

    def grid_values(self) -> Optional[list]:
        return list(self.choices)

    def ends(self) -> list:
        return list(self.choices)

    def fields(self) -> dict:
        return {"choices": self.choices}


@dataclass(kw_only=True)
class Groups(Categorical):
    """Labelled groups of overrides: the trial picks a label, the label sets several keys."""
    groups: dict[str, list[Setting]] = field(default_factory=dict)   # label -> its settings
    kind: ClassVar[str] = "groups"

    def settings(self, value: Any, file: str) -> list[Setting]:
        return self.groups[str(value)]

    def fields(self) -> dict:
        return {"choices": self.choices, "groups": {k: [(s.key, s.value) for s in v] for k, v in self.groups.items()}}


@dataclass(kw_only=True)
class Range(Dimension):
    """A numeric range {low, high, log, step}."""
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: Optional[float] = None                         # null: continuous (float) or 1 (int)

    def fields(self) -> dict:
        return {"low": self.low, "high": self.high, "log": self.log, "step": self.step}


@dataclass(kw_only=True)
class IntRange(Range):
    """An integer range (ends included)."""
    kind: ClassVar[str] = "int"

    def suggest(self, trial: Any) -> Any:
        return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)

    def grid_values(self) -> Optional[list]:
        return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))

    def ends(self) -> list:
        return [int(self.low), int(self.high)]


@dataclass(kw_only=True)
class FloatRange(Range):
    """A float range, continuous or with a step."""
    kind: ClassVar[str] = "float"

    def suggest(self, trial: Any) -> Any:
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def grid_values(self) -> Optional[list]:
        if not self.step:
            return None
        n = int(round((self.high - self.low) / self.step))
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]

    def ends(self) -> list:
        return [self.low, self.high]
