"""reslab's network side: spec schema, block library, compiler and complexity.

    spec = load_spec("specs/resnet34.yaml", overrides=["block.shortcut=A"])
    model = build_model(spec)
    cost = complexity(spec)          # params, MACs, activations; total and per stage/block
"""
from .blocks import BLOCKS, Block, register
from .registry import PLACEMENTS, SHORTCUTS, STEMS, VARIANTS
from .compile import Network, build_model
from .complexity import Complexity, complexity
from .errors import ReslabError, SpecError
from .plan import plan_network
from .schema import BlockSpec, DataSpec, Spec, TrainSpec
from .spec import diff_from_base, load_spec, spec_from_dict, spec_hash, to_yaml

__all__ = ["BLOCKS", "PLACEMENTS", "SHORTCUTS", "STEMS", "VARIANTS",
           "Block", "BlockSpec", "Complexity", "DataSpec", "Network", "ReslabError", "Spec",
           "SpecError", "TrainSpec", "build_model", "complexity", "diff_from_base", "load_spec",
           "plan_network", "register", "spec_from_dict", "spec_hash", "to_yaml"]
