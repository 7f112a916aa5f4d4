"""String -> block class: a YAML `type:` names a registered class."""
from __future__ import annotations

from typing import Callable

from ..errors import did_you_mean

BLOCKS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make the block available as `type: name` in specs."""
    def add(cls: type) -> type:
        if name in BLOCKS:
            raise ValueError(f"block type '{name}' registered twice")
        cls.name = name
        BLOCKS[name] = cls
        return cls
    return add


def block_class(name: str) -> type:
    """The class registered under `name`; KeyError with a 'did you mean' message otherwise."""
    try:
        return BLOCKS[name]
    except KeyError:
        raise KeyError(f"unknown block type '{name}'{did_you_mean(name, BLOCKS)}; "
                       f"registered: {', '.join(sorted(BLOCKS))}") from None
