#!/usr/bin/env python3
"""Can `imagefolder` feed the GPU? Loader images/s (decode, random-resized crop, flip, normalise, on the device)
against ResNet-50's training images/s, side by side on one machine.

Writes `--images` synthetic JPEGs at ImageNet-like sizes (400-640 x 300-480, smooth colour patterns with noise,
quality 90), then times reslab's training loader over them with Pillow decoding in `--workers` DataLoader
workers (data.decode: cpu) and, where torchvision imports on a CUDA machine, with nvJPEG decoding on the GPU
(data.decode: gpu: workers only read the files). Then ResNet-50 trains on synthetic batches of the same size
(bf16, channels_last). A ratio loader/model >= 1 means the loader keeps the GPU busy.

    python benchmarks/imagefolder_feed.py                       # on a CUDA machine: both decoders
    python benchmarks/imagefolder_feed.py --images 400 --batch 32 --workers 2 --size 112   # a CPU smoke run
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from arches import build_model, load_spec  # noqa: E402
from runs.data import ReslabData  # noqa: E402
from runs.imagefolder import torchvision_io  # noqa: E402

CLASSES = 10
for _name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):   # no "GPU available" banners
    logging.getLogger(_name).setLevel(logging.WARNING)


def write_jpeg(job: tuple[str, int]) -> int:
    """One JPEG of a smooth random pattern plus noise at a random ImageNet-like size; returns its bytes."""
    path, seed = job
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(400, 641)), int(rng.integers(300, 481))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.empty((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(5, 60, 2).tolist() + [rng.uniform(0, 6.3)]
        image[..., c] = 128 + 70 * np.sin(xx / fx + phase) * np.cos(yy / fy)
    image += rng.normal(0, 10, image.shape)
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return os.path.getsize(path)


def make_folder(root: Path, images: int, val_per_class: int = 4) -> float:
    """train/ and val/ with CLASSES class folders; returns the mean file size in KB."""
    jobs = []
    for split, count in (("train", images), ("val", val_per_class * CLASSES)):
        for c in range(CLASSES):
            (root / split / f"class{c}").mkdir(parents=True, exist_ok=True)
        jobs += [(str(root / split / f"class{i % CLASSES}" / f"{i}.jpg"), i + (0 if split == "train" else 10**6))
                 for i in range(count)]
    with Pool(os.cpu_count()) as pool:
        sizes = pool.map(write_jpeg, jobs, chunksize=16)
    return sum(sizes) / len(sizes) / 1024


def loader_speed(root: Path, decode: str, args, device: torch.device) -> tuple[float, int]:
    """Images/s of the training loader with the batch delivered on `device` (after the first 2 batches)."""
    spec = load_spec(ROOT / "specs" / "resnet50.yaml", [
        f"data.root={root}", f"classes={CLASSES}", f"data.num_workers={args.workers}", f"data.decode={decode}",
        f"data.val_size={CLASSES}", f"train.batch_size={args.batch}", f"input.size={args.size}"])
    data = ReslabData(spec)
    data.trainer = pl.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, logger=False,
                              enable_progress_bar=False, enable_model_summary=False)
    data.setup("fit")
    assert (data.decoder is not None) == (decode == "gpu"), "the decoder asked for is not the one in use"
    loader = data.train_dataloader()
    seen, t0 = 0, None
    for epoch in range(args.epochs):
        loader.sampler.set_epoch(epoch)
        for i, batch in enumerate(loader):
            images, labels = data.transfer_batch_to_device(batch, device, 0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if epoch == 0 and i == 1:
                t0, seen = time.perf_counter(), 0
            elif t0 is not None:
                seen += len(labels)
    assert images.shape == (args.batch, 3, args.size, args.size) and images.device.type == device.type
    return seen / (time.perf_counter() - t0), seen


def model_speed(args, device: torch.device, steps: int = 15) -> float:
    """ResNet-50 training images/s on synthetic batches (bf16 autocast and channels_last on CUDA, eager)."""
    spec = load_spec(ROOT / "specs" / "resnet50.yaml", [f"classes={CLASSES}", f"input.size={args.size}"])
    model = build_model(spec).to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, CLASSES, (args.batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * args.batch / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--epochs", type=int, default=2, help="passes over the images per loader")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    decoders = ["cpu"] + (["gpu"] if device.type == "cuda" and torchvision_io() is not None else [])
    with tempfile.TemporaryDirectory(prefix="reslab-folder-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        kb = make_folder(root, args.images)
        print(f"wrote {args.images} JPEGs (mean {kb:.0f} KB) in {time.perf_counter() - t0:.1f} s", flush=True)
        speeds = {}
        for decode in decoders:
            speeds[decode], seen = loader_speed(root, decode, args, device)
            print(f"  loader, decode {decode}: {speeds[decode]:.0f} images/s ({seen} images timed)", flush=True)
    model = model_speed(args, device)
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(f"\nimagefolder feed: {where}, {os.cpu_count()} CPU cores, {args.workers} DataLoader workers, batch "
          f"{args.batch} at {args.size}x{args.size}, torch {torch.__version__}")
    print(f"ResNet-50 training (bf16, channels_last, eager): {model:.0f} images/s")
    for decode, speed in speeds.items():
        what = "Pillow in the workers" if decode == "cpu" else "nvJPEG on the GPU, batched"
        print(f"decode {decode:3s} ({what}): {speed:7.0f} images/s   loader/model = {speed / model:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
