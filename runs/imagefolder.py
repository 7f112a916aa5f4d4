"""ImageNet-style folders (root/train/<class>/*.jpg, root/val/<class>/...): Pillow decoding, seeded transforms."""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler

from arches.errors import ReslabError

from .batches import AUGMENT, ORDER, epoch_generator, shard

SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
EVAL_CROP = 0.875   # eval: resize the shorter side to size / 0.875, then take the centre size x size


def scan(folder: Path, classes: Optional[Sequence[str]] = None) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) pairs of every image under folder/<class>/, and the class names (sorted subfolders)."""
    names = sorted(p.name for p in folder.iterdir() if p.is_dir()) if classes is None else list(classes)
    label = {name: i for i, name in enumerate(names)}
    samples = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if sub.name not in label:
            raise ReslabError(f"{sub}: class folder not in train/ (classes come from the train/ subfolders)")
        samples += [(str(f), label[sub.name]) for f in sorted(sub.rglob("*")) if f.suffix.lower() in SUFFIXES]
    if not samples:
        raise ReslabError(f"{folder}: no images (.jpg/.png/...) in class subfolders")
    return samples, names


def open_image(path: str, channels: int) -> Image.Image:
    """Decode one image file as RGB (3 channels) or greyscale (1); one-line error when it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB" if channels == 3 else "L")
    except (OSError, ValueError) as exc:
        raise ReslabError(f"{path}: cannot decode image ({exc})") from None


def resized_crop(img: Image.Image, size: int, rng: random.Random, scale=(0.08, 1.0),
                 ratio=(3 / 4, 4 / 3)) -> Image.Image:
    """Random crop of random area fraction and aspect, resized to size x size (Inception-style)."""
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return img.resize((size, size), Image.BILINEAR, box=(x, y, x + cw, y + ch))
    return centre_crop(img, size, 1.0)


def centre_crop(img: Image.Image, size: int, fraction: float = EVAL_CROP) -> Image.Image:
    """The centre square covering `fraction` of the shorter side, resized to size x size."""
    w, h = img.size
    side = min(w, h) * fraction
    x, y = (w - side) / 2, (h - side) / 2
    return img.resize((size, size), Image.BILINEAR, box=(x, y, x + side, y + side))


def random_square(img: Image.Image, size: int, rng: random.Random) -> Image.Image:
    """Shorter side resized to size, then a random size x size window along the longer side."""
    w, h = img.size
    side = min(w, h)
    x, y = rng.randint(0, w - side), rng.randint(0, h - side)
    return img.resize((size, size), Image.BILINEAR, box=(x, y, x + side, y + side))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """A Pillow image as a uint8 CHW tensor."""
    array = np.asarray(img, dtype=np.uint8)
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class FolderImages(Dataset):
    """Images of a class-per-subfolder tree; items are keyed (index, augmentation seed) by ShardSampler."""

    def __init__(self, samples: list[tuple[str, int]], *, size: int, channels: int, augment: str,
                 mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)):
        self.samples, self.size, self.channels, self.augment = samples, size, channels, augment
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1) * 255)

    def __len__(self) -> int:
        return len(self.samples)

    def pixels(self, index: int, aug_seed: Optional[int]) -> torch.Tensor:
        """uint8 CHW image `index`, augmented with a generator seeded by aug_seed (None: eval transform)."""
        path, _ = self.samples[index]
        img = open_image(path, self.channels)
        if aug_seed is None or self.augment == "none":
            img = centre_crop(img, self.size)
        else:
            rng = random.Random(aug_seed)
            img = (resized_crop if self.augment == "rrc_flip" else random_square)(img, self.size, rng)
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(img)

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        index, aug_seed = key if isinstance(key, tuple) else (key, None)
        return (self.pixels(index, aug_seed).float() - self.mean) * self.inv_std, self.samples[index][1]


class ShardSampler(DistributedSampler):
    """This rank's keys (index, augmentation seed or None) for one pass; Lightning calls set_epoch.

    Train: a permutation from (seed, epoch), equal shards, at most `max_items` per pass. Eval: contiguous
    shards in order covering every image once. A DistributedSampler so Lightning leaves it in place under DDP.
    """

    def __init__(self, n: int, *, seed: int, train: bool, rank: int = 0, world_size: int = 1,
                 max_items: Optional[int] = None):
        super().__init__(range(n), num_replicas=world_size, rank=rank, shuffle=train, seed=seed)
        self.n, self.train, self.max_items = n, train, max_items

    def __iter__(self) -> Iterator[tuple[int, Optional[int]]]:
        if not self.train:
            return iter([(int(i), None) for i in shard(torch.arange(self.n), self.rank, self.num_replicas,
                                                        equal=False)])
        order = shard(torch.randperm(self.n, generator=epoch_generator(ORDER, self.seed, self.epoch)),
                      self.rank, self.num_replicas, equal=True)[:len(self)]
        seeds = torch.randint(0, 2**62, (len(order),), generator=epoch_generator(AUGMENT, self.seed, self.epoch,
                                                                                  self.rank))
        return iter(zip(order.tolist(), seeds.tolist()))

    def __len__(self) -> int:
        size = len(shard(torch.arange(self.n), self.rank, self.num_replicas, equal=self.train))
        return min(size, self.max_items) if self.max_items and self.train else size


def channel_stats(data: FolderImages, samples: int, seed: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0..1 units) over up to `samples` training images, eval-transformed."""
    pick = torch.randperm(len(data), generator=epoch_generator(ORDER, seed, -1))[:samples].tolist()
    pixels = torch.stack([data.pixels(i, None) for i in pick]).double() / 255
    return tuple(pixels.mean((0, 2, 3)).tolist()), tuple(pixels.std((0, 2, 3)).tolist())
