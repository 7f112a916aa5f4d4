"""Name -> class registries: every piece a spec chooses by name (block type, placement, variant, shortcut, stem).

A registry is filled by class decorators (`@BLOCKS.register("basic")`) when `arches` is imported; the schema
checks spec values against it, so a new piece is one class with one registry line. The recipe's and the data's
pieces (schedules, optimizers, data sets) are runs/ classes: their registries name the module that fills them, read
on first use. No torch here.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

from .errors import did_you_mean


class Registry(dict):
    """An ordered name -> class mapping with a 'did you mean' for unknown names."""

    def __init__(self, kind: str, filled_by: Optional[str] = None):
        super().__init__()
        self.kind = kind                 # what the names name, for messages: 'block type', 'placement', ...
        self.filled_by = filled_by       # the module whose classes register here, imported on first read (None:
        # ^ filled when its own package is imported)

    def filled(self) -> "Registry":
        """This registry, its module imported first."""
        if self.filled_by is not None:
            importlib.import_module(self.filled_by)
        return self

    def register(self, name: str) -> Callable[[type], type]:
        """Class decorator: make the class available under `name` (sets `cls.name`)."""
        def add(cls: type) -> type:
            if name in self:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            cls.name = name
            self[name] = cls
            return cls
        return add

    def lookup(self, name: str) -> type:
        """The class registered under `name`; KeyError with a one-line message otherwise."""
        try:
            return self.filled()[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} '{name}'{did_you_mean(name, self)}; "
                           f"registered: {', '.join(sorted(self))}") from None

    def choices(self) -> str:
        """"'A', 'B', 'C' or 'D'": the registered names as pydantic words a choice."""
        names = [repr(n) for n in self.filled()]
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"

    def check(self, value: str) -> str:
        """`value` if registered, else ValueError('got ...; expected ...'), for the schema's validators."""
        if not isinstance(value, str) or value not in self.filled():
            raise ValueError(f"got {value!r}; expected {self.choices()}{did_you_mean(value, self)}")
        return value


BLOCKS = Registry("block type")      # block.type: the branch's layers (arches/blocks/)
PLACEMENTS = Registry("placement")   # block.placement: where BN and ReLU sit (arches/blocks/placements.py)
VARIANTS = Registry("variant")       # block.variant: how branch and shortcut merge (arches/blocks/merges.py)
SHORTCUTS = Registry("shortcut")     # block.shortcut: the shortcut where the shape changes (arches/shortcuts.py)
STEMS = Registry("stem")             # stem.type (arches/stems.py)
SCHEDULES = Registry("schedule", "runs.recipe")    # train.schedule.type: the lr factor per step
OPTIMIZERS = Registry("optimizer", "runs.recipe")  # train.optimizer
DATA_SETS = Registry("data set", "runs.datasets")  # data.name: where the files are, how they are read, their shape
