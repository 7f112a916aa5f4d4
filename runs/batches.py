"""Batches of data sets held whole in memory: seeded order, DDP shards, augmentation with batched tensor ops."""
from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F


# Random streams: every generator is keyed by (stream, seed, epoch, rank), so streams never collide.
ORDER, AUGMENT, SPLIT, TEST_SUBSET, SYNTHETIC = 1, 2, 3, 4, 5


def epoch_generator(stream: int, seed: int, epoch: int = 0, rank: int = 0) -> torch.Generator:
    """A CPU generator seeded from (stream, seed, epoch, rank): the same key gives the same numbers anywhere."""
    key = [int(k) % 2**64 for k in (stream, seed, epoch, rank)]
    state = np.random.SeedSequence(key).generate_state(2, dtype=np.uint32)
    gen = torch.Generator()
    gen.manual_seed(int(state[0]) << 31 ^ int(state[1]))
    return gen


def shard(indices: torch.Tensor, rank: int, world_size: int, *, equal: bool) -> torch.Tensor:
    """This process's part of `indices`: equal strided shards with the remainder dropped (train), or
    contiguous shards of unequal length whose union is every index exactly once (val/test)."""
    if world_size <= 1:
        return indices
    if equal:
        per = len(indices) // world_size
        return indices[rank:per * world_size:world_size]
    start, stop = (len(indices) * rank) // world_size, (len(indices) * (rank + 1)) // world_size
    return indices[start:stop]


def crop_flip_offsets(n: int, pad: int, gen: torch.Generator, flip: bool = True) -> torch.Tensor:
    """Random (dy, dx, mirror) per sample for crop_flip: offsets in 0..2*pad, mirror 0/1 (n x 3, int64)."""
    shifts = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
    mirror = (torch.rand(n, 1, generator=gen) < 0.5) if flip else torch.zeros(n, 1, dtype=torch.bool)
    return torch.cat([shifts, mirror.long()], 1)


def apply_crop_flip(images: torch.Tensor, pad: int, offsets: torch.Tensor) -> torch.Tensor:
    """Crop each zero-padded image at its (dy, dx) back to the original size, mirrored where asked: one gather."""
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images
    dy, dx, mirror = offsets[:, 0:1], offsets[:, 1:2], offsets[:, 2:3].bool()
    cols = torch.arange(w, device=images.device)
    cols = torch.where(mirror, w - 1 - cols, cols) + dx                  # (n, w): the flip folded into the index
    rows = torch.arange(h, device=images.device) + dy                     # (n, h)
    flat = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    return padded.reshape(n, c, -1).gather(2, flat).reshape(n, c, h, w)


def crop_flip(images: torch.Tensor, pad: int, gen: torch.Generator, flip: bool = True) -> torch.Tensor:
    """Pad by `pad` zeros, take a random crop of the original size per sample, flip half of them left-right."""
    offsets = crop_flip_offsets(len(images), pad, gen, flip).to(images.device, non_blocking=True)
    return apply_crop_flip(images, pad, offsets)


def resized_crop_boxes(sizes: torch.Tensor, gen: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Random-resized-crop boxes (Inception style) for images of `sizes` (n x 2: width, height): area a fraction
    in `scale` of the image's, aspect (width / height) log-uniform in `ratio`, cut to the image, at a uniform
    position. Returns (n, 4) float boxes: left, top, right, bottom in pixels."""
    sizes = sizes.to(torch.float64)
    n, (w, h) = len(sizes), sizes.unbind(1)
    area = torch.empty(n, dtype=torch.float64).uniform_(*scale, generator=gen) * w * h
    aspect = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                                     generator=gen))
    cw, ch = torch.minimum(torch.sqrt(area * aspect), w), torch.minimum(torch.sqrt(area / aspect), h)
    where = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    left, top = where[:, 0] * (w - cw), where[:, 1] * (h - ch)
    return torch.stack([left, top, left + cw, top + ch], 1)


def resized_crop_thetas(n: int, h: int, w: int, gen: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Affine maps (n x 2 x 3, for affine_grid) of n random-resized crops (resized_crop_boxes) of h x w images,
    half of them mirrored."""
    boxes = resized_crop_boxes(torch.tensor([[w, h]]).expand(n, 2), gen, scale, ratio)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)            # output grid -> input coordinates, -1..1 across the image
    theta[:, 0, 0] = ((boxes[:, 2] - boxes[:, 0]) / w).float() * sign
    theta[:, 1, 1] = ((boxes[:, 3] - boxes[:, 1]) / h).float()
    theta[:, 0, 2] = ((boxes[:, 0] + boxes[:, 2]) / w - 1).float()
    theta[:, 1, 2] = ((boxes[:, 1] + boxes[:, 3]) / h - 1).float()
    return theta


def apply_resized_crop(images: torch.Tensor, thetas: torch.Tensor) -> torch.Tensor:
    """Each image resampled (bilinear) through its affine map back to full size; float, input's 0..255 range."""
    grid = F.affine_grid(thetas.to(images.device, non_blocking=True), list(images.shape), align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def resized_crop_flip(images: torch.Tensor, gen: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
                      ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Random-resized crop (resized_crop_boxes) back to full size, plus random flip; bilinear, batched with
    affine_grid/grid_sample. Returns float images in the input's 0..255 range."""
    n, _, h, w = images.shape
    return apply_resized_crop(images, resized_crop_thetas(n, h, w, gen, scale, ratio))


def channel_mean_std(images: torch.Tensor, chunk: int = 8192) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 NCHW images, in 0..1 units."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].to(torch.float64)
        total += x.sum((0, 2, 3))
        squares += (x * x).sum((0, 2, 3))
    count = images.numel() // images.shape[1]
    mean = total / count
    std = (squares / count - mean * mean).clamp(min=0).sqrt()
    return tuple((mean / 255).tolist()), tuple((std / 255).clamp(min=1e-6).tolist())


class TensorBatches:
    """An iterable of (normalised float images, int64 labels) batches over uint8 NCHW tensors in memory.

    Train mode: each epoch a permutation from (seed, epoch), this rank's equal shard of it, full batches only
    (one short batch when the shard is smaller than a batch), augmented per `augment`. Eval mode: the rank's
    contiguous shard in order, no augmentation. Works on whatever device the tensors live on.

    Resumable mid-epoch (Lightning's stateful-loader protocol): `state_dict()` says which epoch is being served
    and how many of its batches were handed out; after `load_state_dict()` the next pass of that epoch starts at
    the following batch, with the same order and augmentation as an uninterrupted pass.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int,
                 mean: Sequence[float], std: Sequence[float], train: bool, augment: str = "none",
                 seed: int = 0, rank: int = 0, world_size: int = 1, limit: Optional[int] = None,
                 epoch_fn: Optional[Callable[[], Optional[int]]] = None, pad: int = 4):
        self.images, self.labels = images, labels
        self.batch_size, self.train, self.augment, self.pad = batch_size, train, augment, pad
        self.seed, self.rank, self.world_size, self.limit = seed, rank, world_size, limit
        self.epoch_fn, self._count, self._epoch = epoch_fn, 0, None
        self._served: tuple[int, int] = (0, 0)            # (epoch, batches handed out) of the current pass
        self._resume: Optional[tuple[int, int]] = None    # from load_state_dict: start that epoch's pass there
        shape = (1, images.shape[1], 1, 1)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=images.device).reshape(shape) * 255
        self.inv_std = 1.0 / (torch.tensor(std, dtype=torch.float32, device=images.device).reshape(shape) * 255)

    def set_epoch(self, epoch: int) -> None:
        """Fix the epoch used for the next pass (otherwise: the trainer's epoch, or a pass counter)."""
        self._epoch = epoch

    def shard_size(self) -> int:
        """How many images this rank sees per pass."""
        n = len(self.labels)
        if self.world_size <= 1:
            return n
        if self.train:
            return n // self.world_size
        return (n * (self.rank + 1)) // self.world_size - (n * self.rank) // self.world_size

    def __len__(self) -> int:
        size = self.shard_size()
        if self.train:
            steps = size // self.batch_size or (1 if size else 0)
            return min(steps, self.limit) if self.limit else steps
        return math.ceil(size / self.batch_size)

    def _current_epoch(self) -> int:
        if self._epoch is not None:
            return self._epoch
        epoch = self.epoch_fn() if self.epoch_fn else None
        return self._count if epoch is None else epoch

    def state_dict(self) -> dict[str, int]:
        """Where the current pass is: its epoch and the batches handed out so far."""
        return {"epoch": self._served[0], "batches": self._served[1]}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Start the next pass of state['epoch'] after its first state['batches'] batches."""
        self._resume = (int(state["epoch"]), int(state["batches"]))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, device = len(self.labels), self.labels.device
        epoch = self._current_epoch()
        if self.train:
            order = shard(torch.randperm(n, generator=epoch_generator(ORDER, self.seed, epoch)), self.rank,
                          self.world_size, equal=True)
            gen = epoch_generator(AUGMENT, self.seed, epoch, self.rank)
        else:
            order, gen = shard(torch.arange(n), self.rank, self.world_size, equal=False), None
        self._count += 1
        start = self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0
        self._resume = None
        # the whole pass's augmentation drawn at once (one host-to-device copy per epoch; a resumed pass draws the
        # same numbers and skips the batches it served before)
        offsets = thetas = None
        if gen is not None and self.augment == "crop_flip":
            offsets = crop_flip_offsets(len(order), self.pad, gen).to(device)
        elif gen is not None and self.augment == "rrc_flip":
            thetas = resized_crop_thetas(len(order), self.images.shape[2], self.images.shape[3], gen)
        order = order.to(device)
        for step in range(start, len(self)):
            self._served = (epoch, step + 1)
            part = slice(step * self.batch_size, (step + 1) * self.batch_size)
            images, labels = self.images[order[part]], self.labels[order[part]]
            if offsets is not None:
                images = apply_crop_flip(images, self.pad, offsets[part])
            elif thetas is not None:
                images = apply_resized_crop(images, thetas[part])
            yield images.float().sub_(self.mean).mul_(self.inv_std), labels
