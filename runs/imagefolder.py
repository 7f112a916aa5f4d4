"""ImageNet-style folders (root/train/<class>/*.jpg, root/val/<class>/...): seeded crops, decoded on the CPU
(Pillow, in DataLoader workers) or on the GPU (nvJPEG through torchvision.io, batched).

Every transform is a crop box in source pixels plus a mirror flag, drawn from the item's seed and the image's
size (read from the file header, no decoding); the box is then resized to size x size. Both decode paths draw
the same boxes, so they crop the same regions; their pixels differ only by decoder and resampler rounding.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from arches.errors import ReslabError

from .batches import AUGMENT, ORDER, channel_mean_std, epoch_generator, resized_crop_boxes, shard

SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
EVAL_CROP = 0.875   # eval: resize the shorter side to size / 0.875, then take the centre size x size
JPEG_MAGIC = b"\xff\xd8"
Box = tuple[float, float, float, float]   # left, top, right, bottom in source pixels


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


# ---- crop boxes (no pixels) -----------------------------------------------------------------------------
def centre_box(w: int, h: int, fraction: float = EVAL_CROP) -> Box:
    """The centre square covering `fraction` of the shorter side."""
    side = min(w, h) * fraction
    x, y = (w - side) / 2, (h - side) / 2
    return (x, y, x + side, y + side)


def random_square_box(w: int, h: int, gen: torch.Generator) -> Box:
    """A square of the shorter side at a random whole-pixel place along the longer side."""
    side = min(w, h)
    x, y = (int(torch.randint(0, span + 1, (), generator=gen)) for span in (w - side, h - side))
    return (x, y, x + side, y + side)


def plan_crop(w: int, h: int, augment: str, aug_seed: Optional[int]) -> tuple[Box, bool]:
    """(box, mirror) for one item: the eval centre crop when aug_seed is None or augment is none; else a
    random-resized crop (runs.batches.resized_crop_boxes, as in-memory sets get) or a random square, from a
    generator seeded by aug_seed."""
    if aug_seed is None or augment == "none":
        return centre_box(w, h), False
    gen = torch.Generator().manual_seed(aug_seed)
    if augment == "rrc_flip":               # in whole pixels, as torchvision's RandomResizedCrop
        left, top, right, bottom = resized_crop_boxes(torch.tensor([[w, h]]), gen)[0].tolist()
        cw, ch = max(1, round(right - left)), max(1, round(bottom - top))
        x, y = min(round(left), w - cw), min(round(top), h - ch)
        box = (x, y, x + cw, y + ch)
    else:
        box = random_square_box(w, h, gen)
    return box, bool(torch.rand((), generator=gen) < 0.5)


# ---- the CPU path: Pillow -------------------------------------------------------------------------------
def open_image(source, channels: int, name: str = "") -> Image.Image:
    """Decode one image (a path or bytes) as RGB (3 channels) or greyscale (1); one-line error when it can't."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            return img.convert("RGB" if channels == 3 else "L")
    except (OSError, ValueError) as exc:
        raise ReslabError(f"{name or source}: cannot decode image ({exc})") from None


def image_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) from the file header alone."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except (OSError, ValueError) as exc:
        raise ReslabError(f"{name}: cannot decode image ({exc})") from None


def to_tensor(img: Image.Image) -> torch.Tensor:
    """A Pillow image as a uint8 CHW tensor."""
    array = np.asarray(img, dtype=np.uint8)
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def pillow_crop(img: Image.Image, size: int, box: Box, mirror: bool) -> torch.Tensor:
    """The box resized to size x size (Pillow bilinear, antialiased), mirrored when asked; uint8 CHW."""
    img = img.resize((size, size), Image.BILINEAR, box=box)
    return to_tensor(img.transpose(Image.FLIP_LEFT_RIGHT) if mirror else img)


# ---- the GPU path: whole files to the device, decoded there --------------------------------------------
@dataclass
class EncodedBatch:
    """A batch before decoding: JPEG files as bytes (1-d uint8) or, for other formats, pixels already cropped
    by Pillow in the worker (3-d uint8), with each item's crop box and mirror flag, and the labels."""
    data: list[torch.Tensor]
    boxes: torch.Tensor    # (n, 4) float64: left, top, right, bottom
    mirror: torch.Tensor   # (n,) bool
    labels: torch.Tensor   # (n,) int64

    def __len__(self) -> int:
        return len(self.labels)


def collate_encoded(items: list[tuple]) -> EncodedBatch:
    """DataLoader collate_fn of FolderImages(encoded=True)."""
    data, boxes, mirror, labels = zip(*items)
    return EncodedBatch(list(data), torch.tensor(boxes, dtype=torch.float64), torch.tensor(mirror),
                        torch.tensor(labels, dtype=torch.int64))


def crop_resize(image: torch.Tensor, box: Sequence[float], size: int, mirror: bool) -> torch.Tensor:
    """One decoded uint8 CHW image: the box (rounded to whole pixels) resized to size x size with antialiased
    bilinear interpolation (as Pillow's resize), mirrored when asked; float CHW in 0..255 on image's device."""
    _, h, w = image.shape
    left, top = min(max(int(round(box[0])), 0), w - 1), min(max(int(round(box[1])), 0), h - 1)
    right, bottom = max(min(int(round(box[2])), w), left + 1), max(min(int(round(box[3])), h), top + 1)
    crop = image[None, :, top:bottom, left:right].float()
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return out.flip(-1) if mirror else out


def torchvision_io():
    """torchvision.io when torchvision imports and can decode JPEGs, else None (CPU machines have none)."""
    try:
        from torchvision import io as tvio
        from torchvision.io import ImageReadMode  # noqa: F401
    except Exception:  # noqa: BLE001  (a torchvision built for another torch raises RuntimeError on import)
        return None
    return tvio


class GpuDecoder:
    """Turns an EncodedBatch into normalised float NCHW images on a device: nvJPEG decodes the whole batch in one
    call (torchvision.io.decode_jpeg), then each image is cropped, resized, mirrored; a file nvJPEG refuses is
    decoded on the CPU instead."""

    def __init__(self, size: int, channels: int, mean: Sequence[float], std: Sequence[float], tvio=None):
        self.size, self.channels, self.tvio = size, channels, tvio or torchvision_io()
        if self.tvio is None:
            raise ReslabError("data.decode: gpu needs torchvision (torchvision.io.decode_jpeg); install it or "
                              "set data.decode: cpu", path="data.decode")
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1) * 255)

    def _mode(self):
        modes = self.tvio.ImageReadMode
        return modes.RGB if self.channels == 3 else modes.GRAY

    def decode(self, files: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """uint8 CHW images on `device` from JPEG bytes (batched; one by one, on the CPU, where that fails)."""
        if not files:
            return []
        try:
            return list(self.tvio.decode_jpeg(files, mode=self._mode(), device=device))
        except RuntimeError:
            out = []
            for f in files:
                try:
                    out.append(self.tvio.decode_jpeg(f, mode=self._mode(), device=device))
                except RuntimeError:
                    out.append(self.tvio.decode_image(f, mode=self._mode()).to(device))
            return out

    def __call__(self, batch: EncodedBatch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        jpeg = [i for i, d in enumerate(batch.data) if d.dim() == 1]
        decoded = dict(zip(jpeg, self.decode([batch.data[i] for i in jpeg], device)))
        boxes, mirror = batch.boxes.tolist(), batch.mirror.tolist()
        images = [crop_resize(decoded[i], boxes[i], self.size, mirror[i]) if i in decoded
                  else batch.data[i].to(device, non_blocking=True).float() for i in range(len(batch))]
        x = torch.stack(images)
        x = (x - self.mean.to(device)) * self.inv_std.to(device)
        return x, batch.labels.to(device, non_blocking=True)


class FolderImages(Dataset):
    """Images of a class-per-subfolder tree; items are keyed (index, augmentation seed) by ShardSampler.

    encoded=False: items are normalised float CHW tensors decoded and cropped by Pillow. encoded=True: items are
    (file bytes, box, mirror, label) for GpuDecoder (non-JPEG files come back as Pillow-cropped pixels).
    """

    def __init__(self, samples: list[tuple[str, int]], *, size: int, channels: int, augment: str,
                 mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,), encoded: bool = False):
        self.samples, self.size, self.channels, self.augment = samples, size, channels, augment
        self.encoded = encoded
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1) * 255)

    def __len__(self) -> int:
        return len(self.samples)

    def pixels(self, index: int, aug_seed: Optional[int]) -> torch.Tensor:
        """uint8 CHW image `index`, augmented with a generator seeded by aug_seed (None: eval transform)."""
        path, _ = self.samples[index]
        img = open_image(path, self.channels)
        box, mirror = plan_crop(*img.size, self.augment, aug_seed)
        return pillow_crop(img, self.size, box, mirror)

    def encoded_item(self, index: int, aug_seed: Optional[int]) -> tuple[torch.Tensor, Box, bool, int]:
        """(JPEG bytes as 1-d uint8, box, mirror, label); for other formats the cropped pixels instead."""
        path, label = self.samples[index]
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ReslabError(f"{path}: cannot read image ({exc})") from None
        box, mirror = plan_crop(*image_size(raw, path), self.augment, aug_seed)
        if raw[:2] == JPEG_MAGIC:
            return torch.frombuffer(bytearray(raw), dtype=torch.uint8), box, mirror, label
        pixels = pillow_crop(open_image(raw, self.channels, path), self.size, box, mirror)
        return pixels, (0.0, 0.0, float(self.size), float(self.size)), False, label

    def __getitem__(self, key):
        index, aug_seed = key if isinstance(key, tuple) else (key, None)
        if self.encoded:
            return self.encoded_item(index, aug_seed)
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
        self.skip = 0                    # keys of this pass to leave out at its start (a resumed epoch)

    def __iter__(self) -> Iterator[tuple[int, Optional[int]]]:
        if not self.train:
            return iter([(int(i), None) for i in shard(torch.arange(self.n), self.rank, self.num_replicas,
                                                        equal=False)])
        order = shard(torch.randperm(self.n, generator=epoch_generator(ORDER, self.seed, self.epoch)),
                      self.rank, self.num_replicas, equal=True)[:len(self)]
        seeds = torch.randint(0, 2**62, (len(order),), generator=epoch_generator(AUGMENT, self.seed, self.epoch,
                                                                                  self.rank))
        skip, self.skip = self.skip, 0
        return iter(list(zip(order.tolist(), seeds.tolist()))[skip:])

    def __len__(self) -> int:
        size = len(shard(torch.arange(self.n), self.rank, self.num_replicas, equal=self.train))
        return min(size, self.max_items) if self.max_items and self.train else size


class ResumableLoader:
    """A training DataLoader over a ShardSampler that can start an epoch part-way: Lightning's stateful-loader
    protocol (state_dict / load_state_dict), as runs.batches.TensorBatches has. `sampler` is the loader's, so
    Lightning sets its epoch."""

    def __init__(self, loader: DataLoader):
        self.loader, self.sampler = loader, loader.sampler
        self._served: tuple[int, int] = (0, 0)
        self._resume: Optional[tuple[int, int]] = None

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._served[0], "batches": self._served[1]}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))

    def __iter__(self) -> Iterator:
        epoch = self.sampler.epoch
        start = self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0
        self._resume = None
        self.sampler.skip = start * self.loader.batch_size
        for step, batch in enumerate(self.loader, start):
            self._served = (epoch, step + 1)
            yield batch



def channel_stats(data: FolderImages, samples: int, seed: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (0..1 units) over up to `samples` training images, eval-transformed."""
    pick = torch.randperm(len(data), generator=epoch_generator(ORDER, seed, -1))[:samples].tolist()
    return channel_mean_std(torch.stack([data.pixels(i, None) for i in pick]))
