"""The named data sets: where their files are looked for, how they are downloaded and read, their standard
augmentation. One small class per data set in arches' registry DATA_SETS, keyed by `data.name` (the schema checks
the names against it, arches.spec the shapes):

    source = data_source(spec.data.name)
    folder = source.find(spec.data)          # the folder with its files (one-line ReslabError when none)
    arrays = source.load(folder)             # uint8 NCHW images and labels (sets held in memory)
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
from typing import ClassVar, Optional

import numpy as np
import torch

from arches.errors import ReslabError, first_line
from arches.registry import DATA_SETS
from arches.schema import DataSpec

from .batches import SYNTHETIC, epoch_generator

DOWNLOAD_TIMEOUT_S = 5.0


@dataclass
class Arrays:
    """A whole small data set: uint8 NCHW images and int64 labels, train and test."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int


def cache_dir() -> Path:
    """reslab's download cache: $XDG_CACHE_HOME/reslab (default ~/.cache/reslab)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reslab"


def fetch(url: str, target: Path) -> None:
    """Download url to target atomically (a .part file renamed at the end), with a short timeout."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(part, "wb") as out:
        while chunk := response.read(1 << 20):
            out.write(chunk)
    part.replace(target)


class DataSource:
    """A data set reslab knows by name. Subclasses say where its files are and how to read them."""
    name: ClassVar[str] = ""
    augment: ClassVar[str] = "crop_flip"       # the data set's standard augmentation (data.augment: null)
    in_memory: ClassVar[bool] = True           # held whole as uint8 tensors (not decoded batch by batch)
    folder: ClassVar[str] = ""                 # its subfolder name under data.root, $RESLAB_DATA and the cache
    system_folder: ClassVar[Optional[Path]] = None   # where a system package installs the files
    max_val_fraction: ClassVar[Optional[float]] = None   # a cap on data.val_size (small generated sets)
    shape: ClassVar[Optional[tuple[int, int, int]]] = None   # channels, side, classes (None: any; checked by arches)

    def read(self, data: DataSpec, shape: tuple[int, int, int], classes: int, seed: int) -> Arrays:
        """The whole data set as arrays (shape, classes, seed: for generated sets)."""
        return self.load(self.find(data))

    def has_files(self, folder: Path) -> bool:
        raise NotImplementedError

    def load(self, folder: Path) -> Arrays:
        raise NotImplementedError

    def download(self) -> Path:
        raise NotImplementedError

    def hint(self) -> str:
        """How to get the files, for the not-found message."""
        raise NotImplementedError

    def root_hint(self) -> str:
        """What to add when data.root does not exist."""
        raise NotImplementedError

    def places(self, data: DataSpec) -> list[Path]:
        """Folders looked in, in order: data.root, $RESLAB_DATA, the system package's folder, the cache."""
        places = []
        for base in (data.root, os.environ.get("RESLAB_DATA")):
            if base:
                root = Path(base).expanduser()
                places += [root, root / self.folder]
        if self.system_folder is not None:
            places.append(self.system_folder)
        return places + [cache_dir() / self.folder]

    def find(self, data: DataSpec) -> Optional[Path]:
        """The folder holding the files (downloading when allowed); one-line ReslabError when none does."""
        places = self.places(data)
        if data.root and not Path(data.root).expanduser().exists():
            raise ReslabError(f"{data.root} does not exist: give the folder holding the {self.name} files, "
                              f"or null to look in $RESLAB_DATA, system folders and {cache_dir()}{self.root_hint()}",
                              path="data.root")
        for place in places:
            if place.is_dir() and self.has_files(place):
                return place
        why = "download disabled (data.download: false)"
        if data.download:
            try:
                return self.download()
            except (OSError, tarfile.TarError, ValueError) as exc:   # URLError is an OSError
                why = f"download failed ({type(exc).__name__}: {first_line(exc)})"
        looked = ", ".join(dict.fromkeys(str(p) for p in places))
        raise ReslabError(f"{self.name} not found: looked in {looked}; {why}; {self.hint()}", path="data.name")


# ---------------------------------------------------------------- Fashion-MNIST

def read_idx(path: Path, ndim: int) -> np.ndarray:
    """A uint8 array from an IDX file (optionally gzipped); one-line ReslabError when it is not one."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise ReslabError(f"{path}: corrupt gzip file ({exc}); delete it and reinstall {FashionMNIST.APT_PACKAGE} "
                          f"or download it again") from None
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise ReslabError(f"{path}: not an IDX file of {ndim}-d uint8 data (magic number "
                          f"{raw[:4].hex() or 'missing'}, expected 000008{ndim:02x})")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4)) if len(raw) >= 4 + 4 * ndim else ()
    body = len(raw) - 4 - 4 * ndim
    if len(dims) != ndim or body != int(np.prod(dims)):
        raise ReslabError(f"{path}: corrupt IDX file ({max(body, 0)} data bytes for dimensions {dims})")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


@DATA_SETS.register("fashion-mnist")
class FashionMNIST(DataSource):
    """Fashion-MNIST: four IDX files (.gz or not), 60k train and 10k test images, 1x28x28, 10 classes."""
    folder, shape = "fashion-mnist", (1, 28, 10)
    APT_PACKAGE = "dataset-fashion-mnist"
    system_folder = Path("/usr/share/datasets/fashion-mnist")
    FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
    URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

    def has_files(self, folder: Path) -> bool:
        return all((folder / f).exists() or (folder / f"{f}.gz").exists() for f in self.FILES.values())

    def hint(self) -> str:
        return f"apt-get install {self.APT_PACKAGE}, or put the 4 IDX files (.gz or not) in one of those folders"

    def root_hint(self) -> str:
        return f"; apt-get install {self.APT_PACKAGE} puts the files in {self.system_folder}"

    def download(self) -> Path:
        folder = cache_dir() / self.folder
        for f in self.FILES.values():
            if not (folder / f"{f}.gz").exists():
                fetch(self.URL + f"{f}.gz", folder / f"{f}.gz")
        return folder

    def load(self, folder: Path) -> Arrays:
        def read(key: str, ndim: int) -> np.ndarray:
            name = self.FILES[key]
            return read_idx(folder / name if (folder / name).exists() else folder / f"{name}.gz", ndim)

        parts = {}
        for split in ("train", "test"):
            images, labels = read(f"{split}_images", 3), read(f"{split}_labels", 1)
            if len(images) != len(labels) or (len(labels) and labels.max() > 9):
                raise ReslabError(f"{folder}: {split} files disagree ({len(images)} images, {len(labels)} labels "
                                  f"with values up to {labels.max() if len(labels) else '-'})")
            parts[split] = (torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
        return Arrays(*parts["train"], *parts["test"], num_classes=10)


# ---------------------------------------------------------------- CIFAR

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


class Cifar(DataSource):
    """CIFAR-10 / CIFAR-100 from the official python batches: 50k train and 10k test images, 3x32x32."""
    train: ClassVar[list[str]] = []            # the training batches' file names
    test: ClassVar[list[str]] = []             # the test batches'
    label_key: ClassVar[bytes] = b""           # the labels' key in a batch
    classes: ClassVar[int] = 0
    url: ClassVar[str] = ""                    # the official tarball

    def has_files(self, folder: Path) -> bool:
        return all((folder / f).exists() for f in self.train + self.test)

    def hint(self) -> str:
        return f"unpack {self.url} into one of those folders (or into $RESLAB_DATA)"

    def root_hint(self) -> str:
        return f"; the files are in {self.url}"

    def download(self) -> Path:
        tarball = cache_dir() / self.url.rsplit("/", 1)[1]
        if not tarball.exists():
            fetch(self.url, tarball)
        with tarfile.open(tarball) as tar:
            tar.extractall(cache_dir(), filter="data")
        return cache_dir() / self.folder

    def load(self, folder: Path) -> Arrays:
        def read(files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            parts = [read_cifar_batch(folder / f, self.label_key) for f in files]
            labels = np.concatenate([p[1] for p in parts])
            if len(labels) and (labels.min() < 0 or labels.max() >= self.classes):
                raise ReslabError(f"{folder}: labels outside 0..{self.classes - 1} in {', '.join(files)}")
            return torch.from_numpy(np.concatenate([p[0] for p in parts])), torch.from_numpy(labels)

        return Arrays(*read(self.train), *read(self.test), num_classes=self.classes)


# ---------------------------------------------------------------- image folders and synthetic images

@DATA_SETS.register("cifar10")
class Cifar10(Cifar):
    folder, shape = "cifar-10-batches-py", (3, 32, 10)
    train, test = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
    label_key, classes, url = b"labels", 10, "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


@DATA_SETS.register("cifar100")
class Cifar100(Cifar):
    folder, shape, train, test = "cifar-100-python", (3, 32, 100), ["train"], ["test"]
    label_key, classes, url = b"fine_labels", 100, "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


@DATA_SETS.register("imagefolder")
class ImageFolder(DataSource):
    """root/train/<class>/*.jpg|png and root/val/<class>/...: decoded batch by batch (runs.imagefolder)."""
    augment, in_memory = "rrc_flip", False

    def find(self, data: DataSpec) -> Path:
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

    def load(self, folder: Path) -> Arrays:
        raise ReslabError("imagefolder images are decoded batch by batch, not held as arrays: use ReslabData",
                          path="data.name")


@DATA_SETS.register("synthetic")
class Synthetic(DataSource):
    """Random images from the seed, each a class template plus noise: learnable, nothing to read."""
    augment, max_val_fraction = "none", 0.25

    def find(self, data: DataSpec) -> None:
        return None

    def read(self, data: DataSpec, shape: tuple[int, int, int], classes: int, seed: int) -> Arrays:
        """data.synthetic_size train images and a quarter as many test images."""
        size = data.synthetic_size
        gen = epoch_generator(SYNTHETIC, seed)
        templates = torch.rand(classes, *shape, generator=gen) * 255

        def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            labels = torch.randint(0, classes, (n,), generator=gen)
            noise = torch.rand(n, *shape, generator=gen) * 255
            return (0.5 * templates[labels] + 0.5 * noise).round().to(torch.uint8), labels

        return Arrays(*make(size), *make(max(1, size // 4)), num_classes=classes)



def data_source(name: str) -> DataSource:
    """The registered data set `name` (data.name, checked by the schema)."""
    return DATA_SETS.lookup(name)()
