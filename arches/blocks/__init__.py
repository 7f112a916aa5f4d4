"""The block library. Importing it registers every block type (see `BLOCKS`)."""
from .base import Block
from .registry import BLOCKS, block_class, register
from . import residual  # noqa: F401  (registers the blocks)

__all__ = ["BLOCKS", "Block", "block_class", "register"]
