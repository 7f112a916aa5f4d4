"""Data sets for training: find or download the files, read them, split by seed, serve batches to Lightning.

    data = ReslabData(spec)                  # a LightningDataModule
    trainer.fit(module, datamodule=data)     # module can read trainer.datamodule.steps_per_epoch etc.
    arrays = load_arrays(spec)               # raw uint8 NCHW images and int64 labels of the small sets
"""
from __future__ import annotations

import gzip
import os
import pickle
import tarfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from arches.errors import ReslabError, first_line
from arches.schema import DataSpec, Spec

from .batches import SPLIT, SYNTHETIC, TEST_SUBSET, TensorBatches, epoch_generator
from .imagefolder import (EncodedBatch, FolderImages, GpuDecoder, ShardSampler, channel_stats, collate_encoded, scan,
                          torchvision_io)

APT_PACKAGE = "dataset-fashion-mnist"
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
                 "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CIFAR = {  # name: (folder inside the tarball, train files, test files, label key, tarball URL)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels",
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels",
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}
DOWNLOAD_TIMEOUT_S = 5.0
EVAL_BATCH = 512
SYNTHETIC_SHAPE = (3, 32, 32)


@dataclass
class Arrays:
    """A whole small data set: uint8 NCHW images and int64 labels, train and test."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int


@dataclass
class Split:
    """Indices of one seed's split: train and val index the training arrays, test the test arrays."""
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


# ---------------------------------------------------------------- where the files are

def cache_dir() -> Path:
    """reslab's download cache: $XDG_CACHE_HOME/reslab (default ~/.cache/reslab)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reslab"


def _folder_name(name: str) -> str:
    return CIFAR[name][0] if name in CIFAR else name


def _has_files(folder: Path, name: str) -> bool:
    if name == "fashion-mnist":
        return all((folder / f).exists() or (folder / f"{f}.gz").exists() for f in FASHION_FILES.values())
    _, train, test, _, _ = CIFAR[name]
    return all((folder / f).exists() for f in train + test)


def data_places(data: DataSpec) -> list[Path]:
    """Folders looked in, in order: data.root, $RESLAB_DATA, the Debian package's folder, the download cache."""
    sub, places = _folder_name(data.name), []
    if data.root:
        root = Path(data.root).expanduser()
        places += [root, root / sub]
    if os.environ.get("RESLAB_DATA"):
        env = Path(os.environ["RESLAB_DATA"]).expanduser()
        places += [env, env / sub]
    if data.name == "fashion-mnist":
        places.append(SYSTEM_FASHION_MNIST)
    return places + [cache_dir() / sub]


def _fetch(url: str, target: Path) -> None:
    """Download url to target atomically (a .part file renamed at the end), with a short timeout."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(part, "wb") as out:
        while chunk := response.read(1 << 20):
            out.write(chunk)
    part.replace(target)


def download(name: str) -> Path:
    """Fetch the official files of fashion-mnist, cifar10 or cifar100 into the cache; returns their folder."""
    folder = cache_dir() / _folder_name(name)
    if name == "fashion-mnist":
        for f in FASHION_FILES.values():
            if not (folder / f"{f}.gz").exists():
                _fetch(FASHION_URL + f"{f}.gz", folder / f"{f}.gz")
        return folder
    url = CIFAR[name][4]
    tarball = cache_dir() / url.rsplit("/", 1)[1]
    if not tarball.exists():
        _fetch(url, tarball)
    with tarfile.open(tarball) as tar:
        tar.extractall(cache_dir(), filter="data")
    return folder


def find_data_root(data: DataSpec) -> Optional[Path]:
    """The folder holding data.name's files (downloading when allowed); one-line ReslabError when none does.

    imagefolder: data.root (or $RESLAB_DATA) with train/ and val/ inside; synthetic: None (nothing to read).
    """
    if data.name == "synthetic":
        return None
    if data.name == "imagefolder":
        return _image_root(data)
    places = data_places(data)
    if data.root and not Path(data.root).expanduser().exists():
        hint = (f"; apt-get install {APT_PACKAGE} puts the files in {SYSTEM_FASHION_MNIST}"
                if data.name == "fashion-mnist" else f"; the files are in {CIFAR[data.name][4]}")
        raise ReslabError(f"{data.root} does not exist: give the folder holding the {data.name} files, "
                          f"or null to look in $RESLAB_DATA, system folders and {cache_dir()}{hint}",
                          path="data.root")
    for place in places:
        if place.is_dir() and _has_files(place, data.name):
            return place
    why = "download disabled (data.download: false)"
    if data.download:
        try:
            return download(data.name)
        except (OSError, tarfile.TarError, ValueError) as exc:   # URLError is an OSError
            why = f"download failed ({type(exc).__name__}: {first_line(exc)})"
    looked = ", ".join(dict.fromkeys(str(p) for p in places))
    if data.name == "fashion-mnist":
        hint = f"apt-get install {APT_PACKAGE}, or put the 4 IDX files (.gz or not) in one of those folders"
    else:
        hint = f"unpack {CIFAR[data.name][4]} into one of those folders (or into $RESLAB_DATA)"
    raise ReslabError(f"{data.name} not found: looked in {looked}; {why}; {hint}", path="data.name")


def _image_root(data: DataSpec) -> Path:
    root = data.root or os.environ.get("RESLAB_DATA")
    if not root:
        raise ReslabError("imagefolder needs data.root (or $RESLAB_DATA): a folder with train/<class>/ and "
                          "val/<class>/ image folders", path="data.root")
    root = Path(root).expanduser()
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise ReslabError(f"{root}: no {' or '.join(s + '/' for s in missing)} folder (imagefolder wants "
                          f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg)", path="data.root")
    return root


# ---------------------------------------------------------------- reading the files

def read_idx(path: Path, ndim: int) -> np.ndarray:
    """A uint8 array from an IDX file (optionally gzipped); one-line ReslabError when it is not one."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise ReslabError(f"{path}: corrupt gzip file ({exc}); delete it and reinstall {APT_PACKAGE} "
                          f"or download it again") from None
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise ReslabError(f"{path}: not an IDX file of {ndim}-d uint8 data (magic number "
                          f"{raw[:4].hex() or 'missing'}, expected 000008{ndim:02x})")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4)) if len(raw) >= 4 + 4 * ndim else ()
    body = len(raw) - 4 - 4 * ndim
    if len(dims) != ndim or body != int(np.prod(dims)):
        raise ReslabError(f"{path}: corrupt IDX file ({max(body, 0)} data bytes for dimensions {dims})")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(folder: Path) -> Arrays:
    """Fashion-MNIST from its four IDX files: 60k train, 10k test, 1x28x28, 10 classes."""
    def read(key: str, ndim: int) -> np.ndarray:
        name = FASHION_FILES[key]
        path = folder / name if (folder / name).exists() else folder / f"{name}.gz"
        return read_idx(path, ndim)

    parts = {}
    for split in ("train", "test"):
        images, labels = read(f"{split}_images", 3), read(f"{split}_labels", 1)
        if len(images) != len(labels) or (len(labels) and labels.max() > 9):
            raise ReslabError(f"{folder}: {split} files disagree ({len(images)} images, {len(labels)} labels "
                              f"with values up to {labels.max() if len(labels) else '-'})")
        parts[split] = (torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    return Arrays(*parts["train"], *parts["test"], num_classes=10)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays, dicts, lists and strings only: nothing in a data file can run code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 N x 3 x 32 x 32 images, int64 labels) from one official CIFAR python pickle batch."""
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnly(f, encoding="bytes").load()
        data, labels = np.asarray(batch[b"data"], dtype=np.uint8), np.asarray(batch[label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise ValueError(f"data {data.shape}, {len(labels)} labels")
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError, IndexError,
            AttributeError) as exc:
        raise ReslabError(f"{path}: not a CIFAR python batch with {label_key.decode()} ({type(exc).__name__}: "
                          f"{first_line(exc)})") from None
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(folder: Path, name: str) -> Arrays:
    """CIFAR-10 (data_batch_1..5, test_batch) or CIFAR-100 (train, test) from the official python batches."""
    _, train, test, key, _ = CIFAR[name]
    classes = 10 if name == "cifar10" else 100

    def read(files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [read_cifar_batch(folder / f, key) for f in files]
        labels = np.concatenate([p[1] for p in parts])
        if len(labels) and (labels.min() < 0 or labels.max() >= classes):
            raise ReslabError(f"{folder}: labels outside 0..{classes - 1} in {', '.join(files)}")
        return torch.from_numpy(np.concatenate([p[0] for p in parts])), torch.from_numpy(labels)

    return Arrays(*read(train), *read(test), num_classes=classes)


def synthetic_arrays(shape: tuple[int, int, int], classes: int, size: int, seed: int) -> Arrays:
    """Random images from the seed (size train, size // 4 test), each a class template plus noise: learnable."""
    gen = epoch_generator(SYNTHETIC, seed)
    templates = torch.rand(classes, *shape, generator=gen) * 255

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, classes, (n,), generator=gen)
        noise = torch.rand(n, *shape, generator=gen) * 255
        return (0.5 * templates[labels] + 0.5 * noise).round().to(torch.uint8), labels

    return Arrays(*make(size), *make(max(1, size // 4)), num_classes=classes)


def load_arrays(data: Union[DataSpec, Spec], seed: Optional[int] = None, *,
                shape: tuple[int, int, int] = SYNTHETIC_SHAPE, classes: int = 10) -> Arrays:
    """The whole train and test set of an in-memory data set (not imagefolder), before any split.

    Given a Spec, the seed, shape and classes (used by synthetic) come from it.
    """
    if isinstance(data, Spec):
        spec = data
        data, shape, classes = spec.data, (spec.input.channels, spec.input.size, spec.input.size), spec.classes
        seed = spec.train.seed if seed is None else seed
    if data.name == "imagefolder":
        raise ReslabError("imagefolder images are decoded batch by batch, not held as arrays: use ReslabData",
                          path="data.name")
    if data.name == "synthetic":
        return synthetic_arrays(shape, classes, data.synthetic_size, seed or 0)
    folder = find_data_root(data)
    return load_fashion_mnist(folder) if data.name == "fashion-mnist" else load_cifar(folder, data.name)


# ---------------------------------------------------------------- splits and statistics

def val_count(data: DataSpec, n_train: int) -> int:
    """Number of training images held out for validation: data.val_size as a count, or a fraction if < 1."""
    size = data.val_size
    count = round(size * n_train) if 0 < size < 1 else int(size)
    if data.name == "synthetic":
        count = min(count, n_train // 4)      # synthetic sets are small: at most a quarter goes to validation
    if count < 0 or count >= n_train:
        raise ReslabError(f"data.val_size {size} leaves no training images of {n_train}", path="data.val_size")
    return count


def split_indices(n_train: int, n_test: int, data: DataSpec, seed: int) -> Split:
    """The seed's split: val = first val_size of a seeded permutation of train, train = the rest (first
    train_subset of them), test = first test_subset of a seeded permutation of test. Sorted indices."""
    order = torch.randperm(n_train, generator=epoch_generator(SPLIT, seed))
    n_val = val_count(data, n_train)
    train = order[n_val:][:data.train_subset] if data.train_subset else order[n_val:]
    test = torch.arange(n_test)
    if data.test_subset:
        test = torch.randperm(n_test, generator=epoch_generator(TEST_SUBSET, seed))[:data.test_subset]
    return Split(train.sort().values, order[:n_val].sort().values, test.sort().values)


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


def standard_augment(data: DataSpec) -> str:
    """data.augment, or the data set's standard: crop_flip for the 32x32/28x28 sets, rrc_flip for folders."""
    if data.augment:
        return data.augment
    return {"imagefolder": "rrc_flip", "synthetic": "none"}.get(data.name, "crop_flip")


# ---------------------------------------------------------------- the Lightning data module

class ReslabData(pl.LightningDataModule):
    """The spec's data set for Lightning: split by spec.train.seed, sharded across DDP ranks.

    After setup(): num_train, num_val, num_test (whole split, all ranks), steps_per_epoch (per process, after
    train.limit_batches), mean, std (per channel, 0..1 units, from the training split), num_classes,
    input_shape, augment, device (where in-memory sets live), decoder (imagefolder on the GPU: a GpuDecoder that
    transfer_batch_to_device applies, else None).
    """

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        self.num_classes = spec.classes
        self.input_shape = (spec.input.channels, spec.input.size, spec.input.size)
        self.augment = standard_augment(spec.data)
        self.batch_size = spec.train.batch_size
        self.eval_batch_size = max(self.batch_size, EVAL_BATCH)
        self.num_train = self.num_val = self.num_test = self.steps_per_epoch = 0
        self.mean: tuple[float, ...] = ()
        self.std: tuple[float, ...] = ()
        self.device = torch.device("cpu")
        self._sets: dict[str, object] = {}
        self._ready_for: Optional[tuple] = None
        self.decoder: Optional[GpuDecoder] = None

    # -- where we run
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _data_device(self) -> torch.device:
        mode, trainer = self.spec.data.on_device, self.trainer
        target = trainer.strategy.root_device if trainer is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        if mode == "never" or (mode == "auto" and (trainer is None or target.type != "cuda")):
            return torch.device("cpu")
        return target

    def _decode_on_gpu(self) -> bool:
        """Whether imagefolder JPEGs are decoded on the GPU (data.decode; auto = on CUDA runs with torchvision)."""
        mode, trainer = self.spec.data.decode, self.trainer
        cuda = trainer is not None and trainer.strategy.root_device.type == "cuda"
        if mode == "cpu" or (mode == "auto" and not cuda):
            return False
        if mode == "gpu" and not cuda:
            raise ReslabError("data.decode: gpu needs a run on a CUDA device; set data.decode: cpu or auto",
                              path="data.decode")
        if torchvision_io() is None:
            if mode == "auto":
                return False
            raise ReslabError("data.decode: gpu needs torchvision (torchvision.io.decode_jpeg), which does not "
                              "import here; install it or set data.decode: cpu", path="data.decode")
        return True

    # -- Lightning hooks
    def prepare_data(self) -> None:
        """Find (or download, once per node) the files."""
        find_data_root(self.spec.data)

    def setup(self, stage: Optional[str] = None) -> None:
        """Read the data, split it by seed, compute mean/std, place it on its device, count steps."""
        rank, world = self._rank_world()
        device = self._data_device()
        if self._ready_for != (rank, world, device):
            if self.spec.data.name == "imagefolder":
                self._setup_folder()
            else:
                self._setup_arrays(device)
            self.device, self._ready_for = device, (rank, world, device)
        self.steps_per_epoch = len(self.train_dataloader())

    def _setup_arrays(self, device: torch.device) -> None:
        arrays = load_arrays(self.spec)
        split = split_indices(len(arrays.train_labels), len(arrays.test_labels), self.spec.data,
                              self.spec.train.seed)
        train_split = torch.ones(len(arrays.train_labels), dtype=torch.bool)
        train_split[split.val] = False
        self.mean, self.std = channel_mean_std(arrays.train_images[train_split])
        self._sets = {
            "train": (arrays.train_images[split.train].to(device), arrays.train_labels[split.train].to(device)),
            "val": (arrays.train_images[split.val].to(device), arrays.train_labels[split.val].to(device)),
            "test": (arrays.test_images[split.test].to(device), arrays.test_labels[split.test].to(device)),
        }
        self.num_train, self.num_val, self.num_test = len(split.train), len(split.val), len(split.test)

    def _setup_folder(self) -> None:
        data, (channels, size, _) = self.spec.data, self.input_shape
        root = find_data_root(data)
        train, classes = scan(root / "train")
        test, _ = scan(root / "val", classes)
        if len(classes) != self.num_classes:
            raise ReslabError(f"{root}/train has {len(classes)} class folders but the spec says classes: "
                              f"{self.num_classes}", path="classes")
        split = split_indices(len(train), len(test), data, self.spec.train.seed)
        pick = lambda samples, idx: [samples[i] for i in idx.tolist()]  # noqa: E731
        train_split = pick(train, torch.tensor(sorted(set(range(len(train))) - set(split.val.tolist()))))
        probe = FolderImages(train_split, size=size, channels=channels, augment="none")
        self.mean, self.std = channel_stats(probe, 256, self.spec.train.seed)
        encoded = self._decode_on_gpu()
        self.decoder = GpuDecoder(size, channels, self.mean, self.std) if encoded else None
        make = lambda samples, aug: FolderImages(samples, size=size, channels=channels, augment=aug,  # noqa: E731
                                                 mean=self.mean, std=self.std, encoded=encoded)
        self._sets = {"train": make(pick(train, split.train), self.augment),
                      "val": make(pick(train, split.val), "none"), "test": make(pick(test, split.test), "none")}
        self.num_train, self.num_val, self.num_test = len(split.train), len(split.val), len(split.test)
        self.classes = classes

    # -- loaders
    def _loader(self, which: str):
        if not self._sets:
            self.setup()
        rank, world = self._rank_world()
        train, spec = which == "train", self.spec
        batch = self.batch_size if train else self.eval_batch_size
        limit = spec.train.limit_batches if train else None
        if spec.data.name != "imagefolder":
            images, labels = self._sets[which]
            epoch_fn = lambda: self.trainer.current_epoch if self.trainer is not None else None  # noqa: E731
            return TensorBatches(images, labels, batch_size=batch, mean=self.mean, std=self.std, train=train,
                                 augment=self.augment if train else "none", seed=spec.train.seed, rank=rank,
                                 world_size=world, limit=limit, epoch_fn=epoch_fn)
        dataset = self._sets[which]
        sampler = ShardSampler(len(dataset), seed=spec.train.seed, train=train, rank=rank, world_size=world,
                               max_items=limit * batch if limit else None)
        workers, encoded = spec.data.num_workers, self.decoder is not None
        return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                          drop_last=train and len(sampler) >= batch, persistent_workers=workers > 0,
                          pin_memory=torch.cuda.is_available() and not encoded,
                          collate_fn=collate_encoded if encoded else None)

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """Encoded imagefolder batches are decoded on the device here; everything else is moved as usual."""
        if isinstance(batch, EncodedBatch):
            return self.decoder(batch, device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train_dataloader(self):
        """Shuffled, augmented training batches of spec.train.batch_size (this rank's shard)."""
        return self._loader("train")

    def val_dataloader(self):
        """Held-out validation batches in order, no augmentation ([] when data.val_size is 0)."""
        if not self._sets:
            self.setup()
        return self._loader("val") if self.num_val else []

    def test_dataloader(self):
        """Test batches in order, no augmentation."""
        return self._loader("test")
