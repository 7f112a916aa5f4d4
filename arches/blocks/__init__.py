"""The block library. Importing it registers every block type, placement and merge (see arches.registry)."""
from ..registry import BLOCKS, PLACEMENTS, VARIANTS
from .block import Block, register
from . import basic, bottleneck  # noqa: F401  (register the block types)


def block_class(name: str) -> type:
    """The block class registered as `type: name`; KeyError with a 'did you mean' message otherwise."""
    return BLOCKS.lookup(name)


__all__ = ["BLOCKS", "Block", "PLACEMENTS", "VARIANTS", "block_class", "register"]
