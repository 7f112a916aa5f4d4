"""The spec's data for Lightning: split by seed, normalised by the training split's statistics, sharded across
DDP ranks, served as in-memory batches (runs.batches) or decoded image folders (runs.imagefolder).

    data = ReslabData(spec)                  # a LightningDataModule
    trainer.fit(module, datamodule=data)     # module can read trainer.datamodule.steps_per_epoch etc.
    arrays = load_arrays(spec)               # raw uint8 NCHW images and int64 labels of the small sets

Where each named data set's files are and how they are read: runs.datasets (a registry keyed by data.name).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from arches.errors import ReslabError
from arches.schema import DataSpec, Spec

from .batches import SPLIT, TEST_SUBSET, TensorBatches, channel_mean_std, epoch_generator
from .datasets import Arrays, data_source
from .imagefolder import (EncodedBatch, FolderImages, GpuDecoder, ResumableLoader, ShardSampler, channel_stats,
                          collate_encoded, scan, torchvision_io)

EVAL_BATCH = 512
SYNTHETIC_SHAPE = (3, 32, 32)
DIGEST_CHARS = 12
CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}   # MLflow's dataset contexts


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' bytes (what a split holds, exactly), cut to DIGEST_CHARS hex digits."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:DIGEST_CHARS]


def files_digest(samples: list[tuple[str, int]], root: Path) -> str:
    """sha256 of an image-folder split: each file's path below root, size and label."""
    h = hashlib.sha256()
    for path, label in samples:
        p = Path(path)
        h.update(f"{p.relative_to(root) if p.is_relative_to(root) else p}\t{p.stat().st_size}\t{label}\n".encode())
    return h.hexdigest()[:DIGEST_CHARS]


@dataclass
class Split:
    """Indices of one seed's split: train and val index the training arrays, test the test arrays."""
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


def find_data_root(data: DataSpec) -> Optional[Path]:
    """The folder holding data.name's files (see runs.datasets); None for synthetic data."""
    return data_source(data.name).find(data)


def load_arrays(data: Union[DataSpec, Spec], seed: Optional[int] = None, *,
                shape: tuple[int, int, int] = SYNTHETIC_SHAPE, classes: int = 10) -> Arrays:
    """The whole train and test set of an in-memory data set (not imagefolder), before any split.

    Given a Spec, the seed, shape and classes (used by synthetic) come from it.
    """
    if isinstance(data, Spec):
        spec = data
        data, shape, classes = spec.data, (spec.input.channels, spec.input.size, spec.input.size), spec.classes
        seed = spec.train.seed if seed is None else seed
    return data_source(data.name).read(data, shape, classes, seed or 0)


# ---------------------------------------------------------------- splits and statistics

def val_count(data: DataSpec, n_train: int) -> int:
    """Number of training images held out for validation: data.val_size as a count, or a fraction if < 1."""
    size = data.val_size
    count = round(size * n_train) if 0 < size < 1 else int(size)
    cap = data_source(data.name).max_val_fraction       # small generated sets: at most this share goes to validation
    if cap is not None:
        count = min(count, int(n_train * cap))
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


def standard_augment(data: DataSpec) -> str:
    """data.augment, or the data set's standard: crop_flip for the 32x32/28x28 sets, rrc_flip for folders."""
    return data.augment or data_source(data.name).augment


# ---------------------------------------------------------------- the Lightning data module

class ReslabData(pl.LightningDataModule):
    """The spec's data set for Lightning: split by spec.train.seed, sharded across DDP ranks.

    After setup(): num_train, num_val, num_test (whole split, all ranks), steps_per_epoch (per process, after
    train.limit_batches), mean, std (per channel, 0..1 units, from the training split), num_classes,
    input_shape, augment, device (where in-memory sets live), decoder (imagefolder on the GPU: a GpuDecoder that
    transfer_batch_to_device applies, else None), digests (split -> content hash).
    dataset_inputs() describes the splits for MLflow (name, digest, sizes); example_input() gives test images.
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
        self._arrays: Optional[Arrays] = None         # read by check(), used once by setup()
        self._ready_for: Optional[tuple] = None
        self.decoder: Optional[GpuDecoder] = None
        self.digests: dict[str, str] = {}
        self.root: Optional[Path] = None

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

    def check(self) -> None:
        """Read the data now, before anything is recorded: a missing or corrupt file fails here, in one line. The
        arrays read are kept for setup()."""
        if data_source(self.spec.data.name).in_memory:
            self._arrays = load_arrays(self.spec)
        else:
            root = find_data_root(self.spec.data)
            scan(root / "val", scan(root / "train")[1])

    def setup(self, stage: Optional[str] = None) -> None:
        """Read the data, split it by seed, compute mean/std, place it on its device, count steps."""
        rank, world = self._rank_world()
        device = self._data_device()
        if self._ready_for != (rank, world, device):
            if data_source(self.spec.data.name).in_memory:
                self._setup_arrays(device)
            else:
                self._setup_folder()
            self.device, self._ready_for = device, (rank, world, device)
        self.steps_per_epoch = len(self.train_dataloader())

    def _setup_arrays(self, device: torch.device) -> None:
        arrays, self._arrays = self._arrays or load_arrays(self.spec), None
        split = split_indices(len(arrays.train_labels), len(arrays.test_labels), self.spec.data,
                              self.spec.train.seed)
        train_split = torch.ones(len(arrays.train_labels), dtype=torch.bool)
        train_split[split.val] = False
        self.mean, self.std = channel_mean_std(arrays.train_images[train_split])
        self.root = find_data_root(self.spec.data)
        self.digests = {name: tensor_digest(images[idx], labels[idx]) for name, images, labels, idx in (
            ("train", arrays.train_images, arrays.train_labels, split.train),
            ("val", arrays.train_images, arrays.train_labels, split.val),
            ("test", arrays.test_images, arrays.test_labels, split.test))}
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
        self.root = root
        self.digests = {name: files_digest(pick(samples, idx), root) for name, samples, idx in (
            ("train", train, split.train), ("val", train, split.val), ("test", test, split.test))}
        self._sets = {"train": make(pick(train, split.train), self.augment),
                      "val": make(pick(train, split.val), "none"), "test": make(pick(test, split.test), "none")}
        self.num_train, self.num_val, self.num_test = len(split.train), len(split.val), len(split.test)
        self.classes = classes

    # -- what it is, for records
    def dataset_inputs(self) -> list[dict[str, Any]]:
        """Each non-empty split as an MLflow dataset input: name (data.name), digest of its content, source, context
        (training / validation / testing) and profile (its size, every split's size, input shape, classes)."""
        if not self._sets:
            self.setup()
        sizes = {"train": self.num_train, "val": self.num_val, "test": self.num_test}
        source = self.root.resolve().as_uri() if self.root is not None else f"reslab:{self.spec.data.name}"
        common = {"splits": sizes, "input_shape": list(self.input_shape), "classes": self.num_classes,
                  "seed": self.spec.train.seed}
        return [{"name": self.spec.data.name, "digest": self.digests.get(split, ""), "source": source,
                 "context": CONTEXTS[split], "profile": {"num_rows": n, "split": split, **common}}
                for split, n in sizes.items() if n]

    def example_input(self, n: int = 2) -> torch.Tensor:
        """The first n test images as the network sees them (normalised, float32, on the CPU)."""
        batch = next(iter(self.test_dataloader()))
        if isinstance(batch, EncodedBatch):
            batch = self.decoder(batch, self.device)
        return batch[0][:n].float().cpu().contiguous()

    # -- loaders
    def _loader(self, which: str, train: Optional[bool] = None):
        if not self._sets:
            self.setup()
        rank, world = self._rank_world()
        train, spec = which == "train" if train is None else train, self.spec
        batch = self.batch_size if train else self.eval_batch_size
        limit = spec.train.limit_batches if train else None
        if data_source(spec.data.name).in_memory:
            images, labels = self._sets[which]
            epoch_fn = lambda: self.trainer.current_epoch if self.trainer is not None else None  # noqa: E731
            return TensorBatches(images, labels, batch_size=batch, mean=self.mean, std=self.std, train=train,
                                 augment=self.augment if train else "none", seed=spec.train.seed, rank=rank,
                                 world_size=world, limit=limit, epoch_fn=epoch_fn)
        dataset = self._sets[which]
        sampler = ShardSampler(len(dataset), seed=spec.train.seed, train=train, rank=rank, world_size=world,
                               max_items=limit * batch if limit else None)
        workers, encoded = spec.data.num_workers, self.decoder is not None
        loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                            drop_last=train and len(sampler) >= batch, persistent_workers=workers > 0,
                            pin_memory=torch.cuda.is_available() and not encoded,
                            collate_fn=collate_encoded if encoded else None)
        return ResumableLoader(loader) if train else loader

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """Encoded imagefolder batches are decoded on the device here; everything else is moved as usual."""
        if isinstance(batch, EncodedBatch):
            return self.decoder(batch, device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train_dataloader(self):
        """Shuffled, augmented training batches of spec.train.batch_size (this rank's shard)."""
        return self._loader("train")

    def train_eval_dataloader(self):
        """The training split in order, in eval batches, never augmented (what a measure of the training loss reads)."""
        return self._loader("train", train=False)

    def val_dataloader(self):
        """Held-out validation batches in order, no augmentation ([] when data.val_size is 0)."""
        if not self._sets:
            self.setup()
        return self._loader("val") if self.num_val else []

    def test_dataloader(self):
        """Test batches in order, no augmentation."""
        return self._loader("test")
