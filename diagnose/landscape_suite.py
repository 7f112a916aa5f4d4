"""What `reslab diagnose --landscape` measures for every trained checkpoint: the 1-D line and 2-D surface of the
training loss along filter-normalised random directions, and the curvature along each direction.

    opts = LandscapeOptions(line=Axis.parse("-1:1:41"), surface=Axis.parse("-1:1:21"), images=512)
    results = measure_landscapes(resolve_targets(specs, checkpoints, at_init=False), opts)
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch

from arches.errors import ReslabError
from arches.schema import Spec
from runs.data import ReslabData

from .gradients import is_residual, network_depth
from .landscape import IGNORE, Ignore, LossOnData, local_minima, random_direction, second_differences, shifted
from .suite import Target, pick_device

MAX_AXIS_POINTS = 401           # one axis of a grid: at most this many points
MAX_IMAGES = 60_000             # the training images a landscape is measured on


@dataclass(frozen=True)
class Axis:
    """Evenly spaced step sizes along one direction, both ends included."""
    low: float                  # first step (in filter-normalised units: 1 = every filter moved by its own norm)
    high: float                 # last step
    points: int                 # number of steps (2..MAX_AXIS_POINTS)

    @classmethod
    def parse(cls, text: str, flag: str = "--line") -> "Axis":
        """'MIN:MAX:N' (as Li et al.'s --x=-1:1:51) -> Axis; anything else: one-line ReslabError."""
        parts = str(text).split(":")
        try:
            low, high, points = float(parts[0]), float(parts[1]), int(parts[2])
            if len(parts) != 3:
                raise ValueError
        except (ValueError, IndexError):
            raise ReslabError(f"{flag} must be MIN:MAX:N (e.g. -1:1:21), not '{text}'", path=flag) from None
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ReslabError(f"{flag} {text}: MIN must be below MAX, both finite", path=flag)
        if not 2 <= points <= MAX_AXIS_POINTS:
            raise ReslabError(f"{flag} {text}: N must be 2..{MAX_AXIS_POINTS} points, not {points}", path=flag)
        return cls(low, high, points)

    def values(self) -> list[float]:
        """The step sizes, low to high."""
        return torch.linspace(self.low, self.high, self.points, dtype=torch.float64).tolist()

    def __str__(self) -> str:
        return f"{self.low:g}:{self.high:g}:{self.points}"


@dataclass
class LandscapeOptions:
    line: Axis = Axis(-1.0, 1.0, 41)            # the 1-D line along the first direction
    surface: Optional[Axis] = Axis(-1.0, 1.0, 21)  # both axes of the 2-D surface (first two directions); None: none
    directions: int = 3                          # random directions the curvature is measured along (seeds seed..)
    seed: int = 0                                # the first direction's seed: the same seed, the same directions
    images: int = 512                            # training images (the first of the spec's seeded training split)
    ignore: Ignore = "biasbn"                    # biases and BN weights: 'biasbn' = not moved, 'none' = d = theta
    max_minutes: float = 30.0                    # refuse grids whose estimated time is longer than this
    device: str = "auto"

    def check(self) -> None:
        """One-line ReslabError for a request that makes no landscape."""
        if not 1 <= self.directions <= 64:
            raise ReslabError(f"--directions must be 1..64, not {self.directions}", path="--directions")
        if not 1 <= self.images <= MAX_IMAGES:
            raise ReslabError(f"--images must be 1..{MAX_IMAGES}, not {self.images}", path="--images")
        if self.ignore not in IGNORE:
            raise ReslabError(f"--ignore must be one of {', '.join(IGNORE)}, not '{self.ignore}'", path="--ignore")
        if not self.max_minutes > 0:
            raise ReslabError(f"--max-minutes must be > 0, not {self.max_minutes}", path="--max-minutes")

    def evaluations(self) -> int:
        """Loss evaluations over the data per network: the line, the surface and the curvatures (~3 each)."""
        surface = self.surface.points ** 2 if self.surface is not None else 0
        return self.line.points + surface + 3 * self.directions

    def to_dict(self) -> dict:
        return {**asdict(self), "line": str(self.line), "surface": str(self.surface) if self.surface else "none"}


@dataclass
class LandscapeResult:
    """The landscape around one trained checkpoint."""
    label: str
    spec_name: str
    checkpoint: str
    residual: bool
    depth: int
    images: int                                  # training images the loss is averaged over
    loss: float                                  # at the checkpoint (the centre of every grid)
    accuracy: float
    alphas: list[float]                          # the line's steps
    line_loss: list[float]
    line_accuracy: list[float]
    line_curvature: list[Optional[float]]        # second differences of line_loss
    surface_axis: list[float]                    # the surface's steps (both axes)
    surface_loss: list[list[float]]              # [i][j]: a = surface_axis[i] along d1, b = surface_axis[j] along d2
    curvatures: list[float]                      # d^T H d along each direction (seed, seed + 1, ...)
    seconds: float = 0.0                         # time the measurement took

    @property
    def minima(self) -> Optional[int]:
        """Local minima of the surface (None without one)."""
        return local_minima(self.surface_loss) if self.surface_loss else None

    def to_dict(self) -> dict:
        return {**asdict(self), "minima": self.minima}


def training_batches(spec: Spec, images: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `images` of the spec's training split (its seed's), normalised, not augmented, in order."""
    data = spec.data.model_copy(update={"augment": "none",
                                        "train_subset": min(images, spec.data.train_subset or images)})
    spec = spec.model_copy(update={"data": data})
    module = ReslabData(spec)
    module.setup("fit")
    return [(x.float().to(device), y.long().to(device)) for x, y in module.train_eval_dataloader()]


@dataclass
class _Prepared:
    target: Target
    loss: LossOnData
    centre: tuple[float, float]
    seconds: float                               # one evaluation over the data


def _prepare(targets: Sequence[Target], options: LandscapeOptions, device: torch.device) -> list[_Prepared]:
    """Load every target's data and time one evaluation (the centre); refuse what would run over the bound."""
    cache: dict = {}
    prepared = []
    for target in targets:
        spec = target.spec
        key = (spec.data.model_dump_json(), spec.input.model_dump_json(), spec.classes, spec.train.seed)
        if key not in cache:
            cache[key] = training_batches(spec, options.images, device)
        loss = LossOnData(target.model.to(device), cache[key])
        start = time.perf_counter()
        centre = loss(loss.theta)
        prepared.append(_Prepared(target, loss, centre, time.perf_counter() - start))
    minutes = sum(p.seconds for p in prepared) * options.evaluations() / 60
    if minutes > options.max_minutes:
        each = sum(p.seconds for p in prepared) / len(prepared)
        raise ReslabError(
            f"the landscape needs {options.evaluations()} loss evaluations on {prepared[0].loss.images} images for "
            f"each of {len(prepared)} network(s), about {minutes:.1f} min at the measured {each:.2f} s each, over "
            f"--max-minutes {options.max_minutes:g}: use fewer --surface/--line points, fewer --images, or raise "
            f"--max-minutes", path="--surface")
    return prepared


def check_landscape_request(targets: Sequence[Target]) -> None:
    """One-line ReslabError when there is no trained network to map the loss around."""
    if not any(t.model is not None for t in targets):
        raise ReslabError("--landscape maps the loss around a trained network: give --checkpoint PATH_OR_RUN_ID "
                          "(a checkpoint file or the MLflow run id of a training run)")


def measure_landscapes(targets: Sequence[Target], options: Optional[LandscapeOptions] = None,
                       progress=None) -> list[LandscapeResult]:
    """The loss line, surface and curvatures around every trained target (targets at init are skipped)."""
    options = options or LandscapeOptions()
    options.check()
    check_landscape_request(targets)
    trained = [t for t in targets if t.model is not None]
    device = pick_device(options.device)
    results = []
    for p in _prepare(trained, options, device):
        start = time.perf_counter()
        loss, target = p.loss, p.target
        directions = [random_direction(target.model, options.seed + k, options.ignore)
                      for k in range(max(options.directions, 2 if options.surface else 1))]
        alphas = options.line.values()
        line = [loss(shifted(loss.theta, (a, directions[0]))) for a in alphas]
        axis, surface = [], []
        if options.surface is not None:
            axis = options.surface.values()
            surface = [[loss(shifted(loss.theta, (a, directions[0]), (b, directions[1])))[0] for b in axis]
                       for a in axis]
        curvatures = [loss.curvature(d) for d in directions[:options.directions]]
        losses = [v for v, _ in line]
        results.append(LandscapeResult(
            target.label, target.spec.name, str(target.checkpoint), is_residual(target.model),
            network_depth(target.model), loss.images, p.centre[0], p.centre[1], alphas, losses,
            [a for _, a in line], second_differences(alphas, losses), axis, surface, curvatures,
            p.seconds + time.perf_counter() - start))
        if progress:
            progress(results[-1])
    return results
