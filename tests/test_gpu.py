"""The GPU path, on a CUDA device (every test here skips cleanly without one): bf16 autocast and channels_last
are really used, an epoch does not wait on the GPU every step, batches held on the device equal the CPU's bit for
bit, a compiled run reloads into an eager model that scores the same, and JPEGs decoded by nvJPEG crop the same
regions as Pillow."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from arches import load_spec
from conftest import measure_test_accuracy
from runs.batches import TensorBatches
from runs.checkpoint import load_model
from runs.fit import RunOptions, resolved_precision, train
from runs.module import NONFINITE_CHECK_EVERY_CUDA

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SMALL = ["stages.0.depth=1", "stages.1.depth=1", "stages.2.depth=1", "data.val_size=1000", "data.test_subset=2000"]


def small_spec(root: Path, *extra: str):
    return load_spec("specs/fmnist_resnet20.yaml", [*SMALL, f"data.root={root}", *extra])


class ConvProbe(pl.Callback):
    """Records what the first conv sees and returns during training steps: dtype and memory format."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def on_train_start(self, trainer, pl_module) -> None:
        conv = pl_module.model.layer1[0].conv1   # a conv with 16 input channels: channels_last is observable

        def hook(module, inputs, output):
            if module.training:
                x = inputs[0]
                self.seen.append((x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(),
                                  output.dtype, module.weight.is_contiguous(memory_format=torch.channels_last)))
        self._handle = conv.register_forward_hook(hook)

    def on_train_end(self, trainer, pl_module) -> None:
        self._handle.remove()


def test_gpu_run_uses_bf16_and_channels_last(fashion_mnist, tmp_path):
    spec = small_spec(fashion_mnist, "data.train_subset=2048", "train.epochs=1", "data.test_subset=512")
    assert resolved_precision(spec) == "bf16-mixed"
    probe = ConvProbe()
    result = train(spec, RunOptions(output_dir=tmp_path / "outputs", progress=False, callbacks=[probe]))
    assert result.status == "FINISHED" and result.metrics["test/acc"] > 0.3
    assert len(probe.seen) == 2048 // 128
    assert all(seen == (True, torch.bfloat16, True) for seen in probe.seen), probe.seen[:3]


class SyncCounter(pl.Callback):
    """Counts host-device synchronisations inside each training batch (torch's sync debug mode, as warnings)."""

    def __init__(self) -> None:
        self.per_batch: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._catch = warnings.catch_warnings(record=True)
        self._records = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self.per_batch.append(sum("synchroniz" in str(w.message) for w in self._records))
        self._catch.__exit__(None, None, None)


def test_a_cuda_epoch_does_not_wait_on_the_gpu_every_step(fashion_mnist, tmp_path):
    """After the first batch (cuDNN's algorithm search, first allocations) only the non-finite-loss check reads
    from the GPU, every NONFINITE_CHECK_EVERY_CUDA steps and at the epoch's last: metrics, the schedule and the data
    stay on the device (a sync per step costs small nets much of their speed; one found here was torchmetrics
    copying a Python loss weight to the GPU every step)."""
    spec = small_spec(fashion_mnist, "data.train_subset=5120", "train.epochs=1", "data.test_subset=512",
                      "data.augment=crop_flip")
    counter = SyncCounter()
    result = train(spec, RunOptions(output_dir=tmp_path / "outputs", progress=False, callbacks=[counter]))
    assert result.status == "FINISHED" and len(counter.per_batch) == 40
    checks = {i for i in range(40) if (i + 1) % NONFINITE_CHECK_EVERY_CUDA == 0 or i == 39}
    syncing = {i for i, n in enumerate(counter.per_batch) if n and i > 0}
    assert syncing <= checks, counter.per_batch


@pytest.mark.parametrize("augment", ["crop_flip", "none"])
def test_batches_held_on_the_gpu_equal_the_cpu_batches(augment):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (300, 3, 12, 12), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (300,), generator=gen)
    kw = dict(batch_size=64, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), train=True, augment=augment, seed=3)
    on_cpu = TensorBatches(images, labels, **kw)
    on_gpu = TensorBatches(images.cuda(), labels.cuda(), **kw)
    for epoch in (0, 1):
        on_cpu.set_epoch(epoch)
        on_gpu.set_epoch(epoch)
        for (x, y), (gx, gy) in zip(on_cpu, on_gpu):
            assert gx.is_cuda and torch.equal(x, gx.cpu()) and torch.equal(y, gy.cpu())


def test_compiled_gpu_run_reloads_into_an_eager_model_that_scores_the_same(fashion_mnist, tmp_path):
    spec = small_spec(fashion_mnist, "data.train_subset=2048", "train.epochs=2", "data.test_subset=1000",
                      "train.compile=true")
    result = train(spec, RunOptions(output_dir=tmp_path / "outputs", progress=False))
    assert result.status == "FINISHED" and result.metrics["test/acc"] > 0.5
    _, model = load_model(result.checkpoint)
    correct, total = measure_test_accuracy(model.float(), spec)   # fp32 eager on the CPU vs bf16 compiled on GPU
    assert total == 1000 and abs(correct / total - result.metrics["test/acc"]) <= 0.01


def test_nvjpeg_decoding_crops_the_regions_pillow_crops(tmp_path):
    tvio = pytest.importorskip("torchvision.io")
    from runs.imagefolder import FolderImages, GpuDecoder, collate_encoded
    from test_data import smooth_jpegs

    samples = smooth_jpegs(tmp_path, 8, size=(320, 240))
    keys = [(i, 100 + i) for i in range(8)] + [(0, None), (1, None)]
    enc = FolderImages(samples, size=64, channels=3, augment="rrc_flip", encoded=True)
    cpu = FolderImages(samples, size=64, channels=3, augment="rrc_flip")
    decoder = GpuDecoder(64, 3, (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), tvio=tvio)
    x, y = decoder(collate_encoded([enc[k] for k in keys]), torch.device("cuda"))
    assert x.is_cuda and x.shape == (10, 3, 64, 64) and y.tolist() == [s[1] for s in samples] + [0, 1]
    ref = torch.stack([cpu.pixels(*k).float() for k in keys])
    diff = (x.cpu() - ref).abs()
    assert diff.mean() < 1.5 and diff.amax((1, 2, 3)).max() < 24, (diff.mean(), diff.amax((1, 2, 3)))


def test_an_imagefolder_run_decodes_on_the_gpu(tmp_path):
    pytest.importorskip("torchvision.io")
    from test_data import smooth_jpegs

    for split, per_class in (("train", 12), ("val", 3)):
        for c in range(3):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            smooth_jpegs(tmp_path / split / f"c{c}", per_class)
    spec = load_spec("specs/fmnist_resnet20.yaml", [
        *SMALL[:3], "data.name=imagefolder", f"data.root={tmp_path}", "data.val_size=6", "data.test_subset=null",
        "input.channels=3", "input.size=32", "classes=3", "train.batch_size=8", "train.epochs=1",
        "data.num_workers=2", "data.augment=rrc_flip"])
    seen = []

    class Batches(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((type(trainer.datamodule.decoder).__name__, batch[0].device.type, tuple(batch[0].shape)))

    result = train(spec, RunOptions(output_dir=tmp_path / "outputs", progress=False, callbacks=[Batches()]))
    assert result.status == "FINISHED", result.reason
    assert seen and all(s == ("GpuDecoder", "cuda", (8, 3, 32, 32)) for s in seen), seen
