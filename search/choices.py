"""What a search file chooses by name: Optuna's sampler (search.sampler) and pruner (search.pruner.type).

One registered class per name (arches' Registry, with its "did you mean"): the schema checks the names against
these registries and the plan makes Optuna's objects through them. Optuna loads when an object is made.
"""
from __future__ import annotations

import warnings
from typing import Any, ClassVar, Optional

from arches.registry import Registry

SAMPLERS = Registry("sampler")       # search.sampler
PRUNERS = Registry("pruner")         # search.pruner (or search.pruner.type)


# ---- samplers ----
class Sampler:
    """One search.sampler: an Optuna sampler class and its options."""
    optuna_class: ClassVar[str] = "RandomSampler"   # its class in optuna.samplers
    walks_grid: ClassVar[bool] = False       # every point of the space is enqueued up front (ranges need a step)

    @classmethod
    def options(cls, workers: int) -> dict:
        """Keyword arguments besides the seed, for `workers` workers asking at once."""
        return {}

    @classmethod
    def make(cls, seed: Optional[int], workers: int) -> Any:
        """Optuna's sampler for one worker."""
        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # (experimental options)
            return getattr(optuna.samplers, cls.optuna_class)(seed=seed, **cls.options(workers))


@SAMPLERS.register("tpe")
class TPE(Sampler):
    """Optuna's TPESampler, a constant liar when several workers ask at once."""
    optuna_class = "TPESampler"

    @classmethod
    def options(cls, workers: int) -> dict:
        return {"constant_liar": workers > 1}


@SAMPLERS.register("random")
class Random(Sampler):
    """Optuna's RandomSampler."""


@SAMPLERS.register("grid")
class Grid(Sampler):
    """Every point of the space, enqueued (so no point runs twice across workers); nothing is sampled."""
    walks_grid = True


@SAMPLERS.register("nsga2")
class NSGA2(Sampler):
    """Optuna's NSGAIISampler (multi-objective)."""
    optuna_class = "NSGAIISampler"


# ---- pruners ----
@PRUNERS.register("median")
class Median:
    prunes: ClassVar[bool] = True            # whether trials are ever pruned (a pruning callback is needed)

    @staticmethod
    def make(warmup_epochs: int) -> Any:
        """Optuna's MedianPruner after 2 trials and `warmup_epochs` epochs."""
        import optuna

        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=warmup_epochs)


@PRUNERS.register("hyperband")
class Hyperband:
    prunes: ClassVar[bool] = True

    @staticmethod
    def make(warmup_epochs: int) -> Any:
        """Optuna's HyperbandPruner, at least max(1, warmup_epochs) epochs a trial."""
        import optuna

        return optuna.pruners.HyperbandPruner(min_resource=max(1, warmup_epochs))


@PRUNERS.register("none")
class NoPruning:
    prunes: ClassVar[bool] = False

    @staticmethod
    def make(warmup_epochs: int) -> Any:
        """Optuna's NopPruner."""
        import optuna

        return optuna.pruners.NopPruner()
