"""Name -> class registries: every piece a spec chooses by name (block type, placement, variant, shortcut, stem).

A registry is filled by class decorators (`@BLOCKS.register("basic")`) when `arches` is imported; the schema
checks spec values against it, so a new piece is one class with one registry line. No torch here.
"""
from __future__ import annotations

from typing import Callable

from .errors import did_you_mean


class Registry(dict):
    """An ordered name -> class mapping with a 'did you mean' for unknown names."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind                 # what the names name, for messages: 'block type', 'placement', ...

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
            return self[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} '{name}'{did_you_mean(name, self)}; "
                           f"registered: {', '.join(sorted(self))}") from None

    def choices(self) -> str:
        """"'A', 'B', 'C' or 'D'": the registered names as pydantic words a choice."""
        names = [repr(n) for n in self]
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"

    def check(self, value: str) -> str:
        """`value` if registered, else ValueError('got ...; expected ...'), for the schema's validators."""
        if value not in self:
            raise ValueError(f"got {value!r}; expected {self.choices()}{did_you_mean(value, self)}")
        return value


BLOCKS = Registry("block type")      # block.type: the branch's layers (arches/blocks/)
PLACEMENTS = Registry("placement")   # block.placement: where BN and ReLU sit (arches/blocks/placements.py)
VARIANTS = Registry("variant")       # block.variant: how branch and shortcut merge (arches/blocks/merges.py)
SHORTCUTS = Registry("shortcut")     # block.shortcut: the shortcut where the shape changes (arches/shortcuts.py)
STEMS = Registry("stem")             # stem.type (arches/stems.py)
