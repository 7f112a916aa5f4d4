"""Data layer: real Fashion-MNIST, CIFAR pickles and image folders written here, splits, order, shards, errors."""
from __future__ import annotations

import gzip
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from arches import load_spec, spec_from_dict
from arches.errors import ReslabError
from arches.schema import DataSpec
from runs.batches import TensorBatches, crop_flip, epoch_generator, resized_crop_flip, shard
from runs.data import ReslabData, load_arrays, split_indices
from runs.imagefolder import FolderImages, collate_encoded, crop_resize, open_image, plan_crop, to_tensor

FASHION = ["data.name=fashion-mnist", "input.channels=1", "input.size=28"]


def fashion_spec(root: Path, *extra: str, arch: str = "resnet20"):
    """A CIFAR-style spec switched to Fashion-MNIST from `root`."""
    return load_spec(f"specs/{arch}.yaml", [*FASHION, f"data.root={root}", *extra])


def tiny_spec(data: dict, channels: int = 3, size: int = 16, classes: int = 3, **train):
    """The smallest network spec around a data section."""
    return spec_from_dict({"name": "tiny", "input": {"channels": channels, "size": size}, "classes": classes,
                           "stem": {"type": "cifar", "width": 8}, "stages": [{"depth": 1, "width": 8}],
                           "data": data, "train": {"batch_size": 4, **train}})


def first_batches(data: ReslabData, count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = data.train_dataloader()
    (loader.sampler if isinstance(loader, torch.utils.data.DataLoader) else loader).set_epoch(0)
    return [batch for batch, _ in zip(loader, range(count))]


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


# ---------------------------------------------------------------- Fashion-MNIST

@pytest.fixture(scope="module")
def fashion_arrays():
    return load_arrays(DataSpec(name="fashion-mnist", root="/usr/share/datasets/fashion-mnist"))


def test_fashion_mnist_loads_whole(fashion_mnist, fashion_arrays):
    a = fashion_arrays
    assert a.train_images.shape == (60000, 1, 28, 28) and a.train_images.dtype == torch.uint8
    assert a.test_images.shape == (10000, 1, 28, 28) and a.test_labels.dtype == torch.int64
    assert sorted(a.train_labels.unique().tolist()) == list(range(10))
    assert torch.bincount(a.test_labels).tolist() == [1000] * 10     # the test set is balanced
    assert a.train_images.float().mean() > 40                         # real pictures, not zeros


def test_fashion_split_sizes_and_stats(fashion_mnist, fashion_arrays):
    data = ReslabData(fashion_spec(fashion_mnist, "data.val_size=5000", "train.batch_size=128"))
    data.setup("fit")
    assert (data.num_train, data.num_val, data.num_test) == (55000, 5000, 10000)
    assert data.steps_per_epoch == 55000 // 128 and data.input_shape == (1, 28, 28) and data.num_classes == 10
    split = split_indices(60000, 10000, data.spec.data, data.spec.train.seed)
    keep = torch.ones(60000, dtype=torch.bool)
    keep[split.val] = False
    pixels = fashion_arrays.train_images[keep].numpy().astype(np.float64) / 255
    assert data.mean[0] == pytest.approx(pixels.mean(), rel=1e-6)
    assert data.std[0] == pytest.approx(pixels.std(), rel=1e-6)
    x, y = next(iter(data.val_dataloader()))
    assert x.dtype == torch.float32 and x.shape == (512, 1, 28, 28) and y.dtype == torch.int64

    small = ReslabData(fashion_spec(fashion_mnist, "data.val_size=0.1", "data.train_subset=1000",
                                    "data.test_subset=300", "train.limit_batches=2"))
    small.setup("fit")
    assert (small.num_train, small.num_val, small.num_test) == (1000, 6000, 300)
    assert small.steps_per_epoch == 2 == len(small.train_dataloader())
    assert torch.bincount(small._sets["train"][1], minlength=10).min() > 50   # seeded subset: every class


def test_order_depends_only_on_seed(fashion_mnist):
    a = first_batches(ReslabData(fashion_spec(fashion_mnist, "train.seed=3", "data.train_subset=2000")))
    b = first_batches(ReslabData(fashion_spec(fashion_mnist, "train.seed=3", "data.train_subset=2000",
                                              arch="plain32")))
    c = first_batches(ReslabData(fashion_spec(fashion_mnist, "train.seed=4", "data.train_subset=2000")))
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)     # same images, same crops, other network
    assert not torch.equal(a[0][1], c[0][1])


# ---------------------------------------------------------------- order, augmentation, shards

def numbered(n: int, channels: int = 1, side: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose pixels are distinct per image, labelled with their own index."""
    images = torch.randint(0, 256, (n, channels, side, side), generator=torch.Generator().manual_seed(0))
    return images.to(torch.uint8), torch.arange(n)


def test_epochs_reshuffle_deterministically():
    images, labels = numbered(64)
    loader = TensorBatches(images, labels, batch_size=16, mean=[0.5], std=[0.25], train=True, seed=1)
    orders = []
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        orders.append(torch.cat([y for _, y in loader]))
    assert torch.equal(orders[0], orders[2]) and not torch.equal(orders[0], orders[1])
    assert sorted(orders[0].tolist()) == list(range(64))


def test_crop_flip_is_a_shifted_window_of_the_padded_image():
    images, _ = numbered(32, channels=2)
    out = crop_flip(images, 4, epoch_generator(2, 0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    flips = 0
    for i in range(32):
        windows = {(dy, dx, f): (padded[i, :, dy:dy + 8, dx:dx + 8].flip(2) if f else
                                 padded[i, :, dy:dy + 8, dx:dx + 8]) for dy in range(9) for dx in range(9)
                   for f in (0, 1)}
        hits = [k for k, w in windows.items() if torch.equal(w, out[i])]
        assert hits, f"sample {i} is not a crop of its padded image"
        flips += all(k[2] for k in hits)
    assert 0 < flips < 32                                   # some flipped, some not
    same = crop_flip(images, 0, epoch_generator(2, 0))
    assert all(torch.equal(same[i], images[i]) or torch.equal(same[i], images[i].flip(2)) for i in range(32))


def test_resized_crop_flip_keeps_shape_and_full_crop_is_identity_or_mirror():
    images, _ = numbered(32, channels=3)
    out = resized_crop_flip(images, epoch_generator(2, 0))
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 255
    assert not torch.allclose(out, images.float())
    whole = resized_crop_flip(images, epoch_generator(2, 0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    mirrored = [torch.allclose(whole[i], images[i].flip(2).float(), atol=1e-3) for i in range(32)]
    same = [torch.allclose(whole[i], images[i].float(), atol=1e-3) for i in range(32)]
    assert all(a or b for a, b in zip(mirrored, same)) and 0 < sum(mirrored) < 32


def test_no_augmentation_is_identity_on_normalised_data():
    images, labels = numbered(48, channels=3)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    loader = TensorBatches(images, labels, batch_size=16, mean=mean, std=std, train=True, augment="none")
    m, s = torch.tensor(mean).reshape(1, 3, 1, 1), torch.tensor(std).reshape(1, 3, 1, 1)
    for x, y in loader:
        assert torch.allclose(x, (images[y].float() / 255 - m) / s, atol=1e-5)


def test_normalised_training_data_has_zero_mean_unit_std(fashion_mnist):
    data = ReslabData(fashion_spec(fashion_mnist, "data.augment=none", "data.val_size=0"))
    data.setup("fit")
    images, labels = data._sets["train"]
    loader = TensorBatches(images, labels, batch_size=4096, mean=data.mean, std=data.std, train=False)
    x = torch.cat([b for b, _ in loader]).double()
    assert x.mean().item() == pytest.approx(0, abs=1e-4) and x.std().item() == pytest.approx(1, abs=1e-4)
    assert data.val_dataloader() == []


@pytest.mark.parametrize("n", [101, 100, 3])
def test_shards_for_two_processes(n):
    order = torch.randperm(n)
    train = [shard(order, r, 2, equal=True) for r in range(2)]
    assert len(train[0]) == len(train[1]) == n // 2
    assert not set(train[0].tolist()) & set(train[1].tolist())
    evals = [shard(order, r, 2, equal=False) for r in range(2)]
    assert sorted(evals[0].tolist() + evals[1].tolist()) == list(range(n))


def test_loaders_of_two_ranks_split_every_epoch():
    images, labels = numbered(90)
    def make(rank: int, train: bool) -> TensorBatches:
        return TensorBatches(images, labels, batch_size=8, mean=[0.5], std=[0.5], train=train, seed=5,
                             rank=rank, world_size=2, augment="crop_flip")
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            loader = make(rank, True)
            loader.set_epoch(epoch)
            seen.append(torch.cat([y for _, y in loader]).tolist())
            assert len(loader) == 45 // 8
        assert not set(seen[0]) & set(seen[1])
    val = [torch.cat([y for _, y in make(rank, False)]).tolist() for rank in (0, 1)]
    assert sorted(val[0] + val[1]) == list(range(90))


def test_lightning_runs_the_loader(tmp_path):
    import pytorch_lightning as pl

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net, self.steps_seen, self.labels = torch.nn.Linear(3 * 16 * 16, 3), None, []

        def training_step(self, batch, index):
            x, y = batch
            self.labels.append((self.current_epoch, y.tolist()))
            return torch.nn.functional.cross_entropy(self.net(x.flatten(1)), y)

        def validation_step(self, batch, index):
            pass

        def configure_optimizers(self):
            self.steps_seen = self.trainer.datamodule.steps_per_epoch
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = ReslabData(tiny_spec({"name": "synthetic", "synthetic_size": 64, "val_size": 8}, limit_batches=3))
    probe = Probe()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(probe, datamodule=data)
    assert probe.steps_seen == 3 and len(probe.labels) == 6
    assert [e for e, _ in probe.labels] == [0, 0, 0, 1, 1, 1] and probe.labels[0][1] != probe.labels[3][1]
    assert (data.num_train, data.num_val, data.num_test) == (56, 8, 16)


# ---------------------------------------------------------------- CIFAR pickles, image folders

def write_cifar(folder: Path, files: dict[str, int], label_key: bytes, classes: int) -> dict[str, dict]:
    """Official-format CIFAR python batches with random pixels; returns what was written."""
    folder.mkdir(parents=True)
    rng, written = np.random.default_rng(0), {}
    for name, n in files.items():
        batch = {b"batch_label": name.encode(), label_key: rng.integers(0, classes, n).tolist(),
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"filenames": [f"{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
        written[name] = batch
    return written


@pytest.mark.parametrize("name,folder,files,key,classes", [
    ("cifar10", "cifar-10-batches-py", {**{f"data_batch_{i}": 40 for i in range(1, 6)}, "test_batch": 50},
     b"labels", 10),
    ("cifar100", "cifar-100-python", {"train": 200, "test": 50}, b"fine_labels", 100)])
def test_cifar_batches_load(tmp_path, name, folder, files, key, classes):
    written = write_cifar(tmp_path / folder, files, key, classes)
    arrays = load_arrays(DataSpec(name=name, root=str(tmp_path), download=False))
    assert arrays.train_images.shape == (200, 3, 32, 32) and arrays.test_images.shape == (50, 3, 32, 32)
    assert arrays.num_classes == classes
    test = written["test_batch" if name == "cifar10" else "test"]
    first = test[b"data"][0]
    assert torch.equal(arrays.test_images[0, 1], torch.from_numpy(first[1024:2048].reshape(32, 32)))  # green
    assert arrays.test_labels.tolist() == test[key]
    spec = tiny_spec({"name": name, "root": str(tmp_path / folder), "val_size": 20, "download": False},
                     size=32, classes=classes)
    data = ReslabData(spec)
    data.setup("fit")
    assert (data.num_train, data.num_val, data.num_test) == (180, 20, 50) and len(data.mean) == 3
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and int(y.max()) < classes


def test_cifar_bad_pickles_are_one_line_errors(tmp_path):
    write_cifar(tmp_path / "cifar-100-python", {"train": 10, "test": 10}, b"fine_labels", 100)
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"garbage")
    with pytest.raises(ReslabError) as exc:
        load_arrays(DataSpec(name="cifar100", root=str(tmp_path), download=False))
    assert "test" in one_line(exc)

    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))
    (tmp_path / "victim").mkdir()
    with open(tmp_path / "cifar-100-python" / "test", "wb") as f:
        pickle.dump({b"data": Evil(), b"fine_labels": []}, f)
    with pytest.raises(ReslabError) as exc:
        load_arrays(DataSpec(name="cifar100", root=str(tmp_path), download=False))
    assert "refusing" in one_line(exc) and (tmp_path / "victim").exists()


def write_folder(root: Path, split: str, per_class: int, classes=("ant", "bee", "cat")) -> None:
    rng = np.random.default_rng(len(split))
    for c, name in enumerate(classes):
        (root / split / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = 20 + 3 * i, 30 - 2 * i
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def test_imagefolder_from_generated_pngs(tmp_path):
    write_folder(tmp_path, "train", 6)
    write_folder(tmp_path, "val", 2)
    spec = tiny_spec({"name": "imagefolder", "root": str(tmp_path), "val_size": 3})
    data = ReslabData(spec)
    data.setup("fit")
    assert (data.num_train, data.num_val, data.num_test) == (15, 3, 6) and data.augment == "rrc_flip"
    assert data.steps_per_epoch == 3 and len(data.mean) == 3
    batches = first_batches(data, 3)
    assert all(x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 for x, _ in batches)
    again = first_batches(ReslabData(spec), 3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    test_labels = torch.cat([y for _, y in data.test_dataloader()])
    assert test_labels.tolist() == [0, 0, 1, 1, 2, 2]
    x, _ = next(iter(data.val_dataloader()))
    assert x.shape == (3, 3, 16, 16)


def smooth_jpegs(folder: Path, count: int, size=(150, 110)) -> list[tuple[str, int]]:
    """`count` JPEGs of smooth colour patterns (camera-like content), as (path, label) samples."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    samples = []
    for i in range(count):
        wave = 60 * np.sin(xx / (9 + i))[..., None] + 60 * np.cos(yy / (13 + 2 * i))[..., None]
        pixels = (127 + wave * np.array([1.0, 0.6, -0.8]) + rng.normal(0, 6, (size[1], size[0], 3)))
        path = folder / f"{i}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        samples.append((str(path), i % 3))
    return samples


@pytest.mark.parametrize("augment", ["rrc_flip", "crop_flip", "none"])
def test_tensor_crop_resize_matches_pillow_on_the_same_boxes(tmp_path, augment):
    """The GPU path's crop + antialiased resize (torch) against Pillow's, on the same decoded pixels and the same
    seeded boxes: they sample the same regions (a wrong box or a missed flip differs by tens of grey levels)."""
    samples = smooth_jpegs(tmp_path, 6)
    cpu = FolderImages(samples, size=48, channels=3, augment=augment)
    for index, seed in [(i, 77 + i) for i in range(6)] + [(0, None)]:
        img = open_image(samples[index][0], 3)
        box, mirror = plan_crop(*img.size, augment, seed)
        ours = crop_resize(to_tensor(img), box, 48, mirror)
        theirs = cpu.pixels(index, seed).float()
        assert ours.shape == theirs.shape == (3, 48, 48)
        assert (ours - theirs).abs().mean() < 1.0 and (ours - theirs).abs().max() < 12
        if mirror:
            assert (ours.flip(-1) - theirs).abs().mean() > 5 * (ours - theirs).abs().mean()


def test_encoded_items_carry_jpeg_bytes_and_the_pillow_boxes(tmp_path):
    """encoded=True: a JPEG item is the file's bytes with the box and flag the Pillow path draws for the same key;
    a PNG is cropped in the worker, equal to the Pillow path's pixels; the collated batch keeps it all."""
    samples = smooth_jpegs(tmp_path, 2)
    png = tmp_path / "2.png"
    Image.open(samples[0][0]).save(png)
    samples.append((str(png), 2))
    enc = FolderImages(samples, size=32, channels=3, augment="rrc_flip", encoded=True)
    cpu = FolderImages(samples, size=32, channels=3, augment="rrc_flip")
    items = [enc[(i, 5 + i)] for i in range(3)]
    for i, (data, box, mirror, label) in enumerate(items[:2]):
        assert data.dim() == 1 and bytes(data[:2].tolist()) == b"\xff\xd8" and len(data) == Path(samples[i][0]).stat().st_size
        assert (box, mirror) == plan_crop(*Image.open(samples[i][0]).size, "rrc_flip", 5 + i) and label == i % 3
    assert torch.equal(items[2][0], cpu.pixels(2, 7))
    batch = collate_encoded(items)
    assert len(batch) == 3 and batch.labels.tolist() == [0, 1, 2] and batch.boxes.shape == (3, 4)


def test_gpu_decode_is_refused_in_one_line_without_cuda(tmp_path):
    write_folder(tmp_path, "train", 4)
    write_folder(tmp_path, "val", 1)
    spec = tiny_spec({"name": "imagefolder", "root": str(tmp_path), "val_size": 3, "decode": "gpu"},
                     accelerator="cpu")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ReslabError) as exc:
        pl.Trainer(accelerator="cpu", logger=False, max_epochs=1).fit(_NoModel(), datamodule=ReslabData(spec))
    assert "data.decode" in one_line(exc) and "CUDA" in one_line(exc)


class _NoModel(pl.LightningModule):
    """Never trained: the data module's setup fails first."""

    def training_step(self, batch, batch_idx):  # pragma: no cover
        raise AssertionError

    def configure_optimizers(self):  # pragma: no cover
        raise AssertionError


def test_imagefolder_without_val_is_one_line_error(tmp_path):
    write_folder(tmp_path, "train", 2)
    with pytest.raises(ReslabError) as exc:
        ReslabData(tiny_spec({"name": "imagefolder", "root": str(tmp_path)})).setup("fit")
    assert "val/" in one_line(exc)


# ---------------------------------------------------------------- missing and corrupt files

def test_missing_data_is_one_line_error(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("RESLAB_DATA", str(empty))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(ReslabError) as exc:
        load_arrays(DataSpec(name="fashion-mnist", root=str(tmp_path / "nope"), download=False))
    message = one_line(exc)
    assert "apt-get install dataset-fashion-mnist" in message and str(tmp_path / "nope") in message
    with pytest.raises(ReslabError) as exc:
        load_arrays(DataSpec(name="cifar10", download=False))
    message = one_line(exc)
    assert str(empty) in message and "cifar-10-python.tar.gz" in message and "download disabled" in message


def test_corrupt_idx_is_one_line_error(fashion_mnist, tmp_path):
    for f in fashion_mnist.iterdir():
        shutil.copy(f, tmp_path / f.name)
    spec = DataSpec(name="fashion-mnist", root=str(tmp_path), download=False)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(labels.read_bytes())
    for bad, words in [(gzip.compress(b"\x00\x00\x08\x03" + raw[4:]), "magic"),
                       (gzip.compress(raw[:-7]), "corrupt IDX"), (labels.read_bytes()[:500], "gzip")]:
        labels.write_bytes(bad)
        with pytest.raises(ReslabError) as exc:
            load_arrays(spec)
        message = one_line(exc)
        assert words in message and str(labels) in message
