#!/usr/bin/env python3
"""reslab's training step against a hand-written PyTorch loop, side by side on the same machine.

Both train the same network (build_model, same seed) with the same optimizer and per-step LambdaLR on the same
pre-made batches for the same number of steps. reslab's side is `runs.fit.train` itself on those batches (a data
module of them), with its callbacks (epoch summary, per-epoch line, interrupt guard, last.ckpt every epoch) and
MLflow recording on (a throw-away sqlite store): each timed epoch runs from on_train_start to on_train_end, so
metric updates, the NaN check, the epoch's MLflow logging and checkpoint are all inside.
After a warm-up of each, the two alternate `--repeats` times; the ratio of median times is printed, for the
whole epoch and for the training steps alone (first batch start to last batch end: the epoch's end, with its
checkpoint and MLflow writes, left out). On CUDA (`--device cuda`) both sides use bf16 autocast and channels_last
with the batches held on the GPU, and the clocks are read after a device sync.

    python benchmarks/overhead.py                      # resnet8 on 28x28 batches of 128, 1 thread
    python benchmarks/overhead.py --spec specs/fmnist_resnet20.yaml --depth 0 --steps 30
    python benchmarks/overhead.py --device cuda --depth 0 --steps 200                       # ResNet-20 on a GPU
    python benchmarks/overhead.py --device cuda --spec specs/resnet50.yaml --depth 0 --steps 40
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from arches import build_model, load_spec  # noqa: E402
from runs.fit import RunOptions, train  # noqa: E402
from runs.recipe import build_optimizer, build_scheduler  # noqa: E402


def clock(device: torch.device) -> float:
    """perf_counter after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Stopwatch(pl.Callback):
    """Time from on_train_start to on_train_end (setup and teardown excluded), and from the first batch's start
    to the last batch's end (the steps alone)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = self.step_seconds = 0.0
        self._t0 = self._first = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = clock(self.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self._first = clock(self.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == trainer.num_training_batches:
            self.step_seconds = clock(self.device) - self._first

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds = clock(self.device) - self._t0


class Batches:
    """The pre-made batches as one iterable (a bare list would be read by Lightning as a list of loaders)."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class PremadeData(pl.LightningDataModule):
    """The pre-made batches as a data module for `train(..., data=...)`: all of them to train, two to test."""

    def __init__(self, batches: list) -> None:
        super().__init__()
        self.batches = batches
        self.steps_per_epoch = len(batches)

    def train_dataloader(self) -> Batches:
        return Batches(self.batches)

    def test_dataloader(self) -> Batches:
        return Batches(self.batches[:2])


def make_batches(spec, steps: int, device: torch.device, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` fixed batches of normalised random images and labels at the spec's input shape, on `device`."""
    g = torch.Generator().manual_seed(seed)
    shape = (spec.train.batch_size, spec.input.channels, spec.input.size, spec.input.size)
    return [(torch.randn(shape, generator=g).to(device), torch.randint(0, spec.classes, (shape[0],), generator=g)
             .to(device)) for _ in range(steps)]


def plain_loop(spec, batches, device: torch.device) -> tuple[float, float]:
    """Seconds for a hand-written loop over the batches: forward, loss, backward, step, scheduler step (on CUDA:
    bf16 autocast and channels_last, as reslab does there). Returns (seconds, seconds): it has no epoch end."""
    cuda = device.type == "cuda"
    model = build_model(spec).to(device).train()
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, spec.train)
    scheduler = build_scheduler(optimizer, spec.train, len(batches))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=spec.train.label_smoothing)
    t0 = clock(device)
    for images, labels in batches:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            if cuda:
                images = images.contiguous(memory_format=torch.channels_last)
            loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    seconds = clock(device) - t0
    return seconds, seconds


def reslab_loop(spec, batches, out: Path, device: torch.device) -> tuple[float, float]:
    """(epoch seconds, steps-only seconds) of one epoch over the batches by runs.fit.train, recording on."""
    watch = Stopwatch(device)
    with redirect_stdout(io.StringIO()):
        train(spec, RunOptions(data=PremadeData(batches), output_dir=out, callbacks=[watch], progress=False))
    return watch.seconds, watch.step_seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="specs/fmnist_resnet20.yaml")
    parser.add_argument("--depth", type=int, default=1, help="blocks per stage (0 = as in the spec)")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="alternating timed runs of each")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True               # as runs.fit.train's Trainer sets it on CUDA
    stages = len(load_spec(ROOT / args.spec).stages)
    overrides = [f"stages.{i}.depth={args.depth}" for i in range(stages)] if args.depth else []
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    spec = load_spec(ROOT / args.spec, [*overrides, "data.name=synthetic", "train.epochs=1", "train.max_steps=null",
                                        f"train.accelerator={accelerator}", *args.overrides])
    batches = make_batches(spec, args.steps, device)
    with tempfile.TemporaryDirectory(prefix="reslab-overhead-") as tmp:
        out = Path(tmp)
        plain_loop(spec, batches[:5], device)                          # warm-up: allocator, kernels, cudnn
        reslab_loop(spec, batches[:5], out, device)
        plain, ours = [], []
        for i in range(args.repeats):                                  # alternate, order swapped each round
            pair = [("plain", lambda: plain_loop(spec, batches, device)),
                    ("reslab", lambda: reslab_loop(spec, batches, out, device))]
            for name, fn in (pair if i % 2 == 0 else pair[::-1]):
                (plain if name == "plain" else ours).append(fn())
    per_step = lambda xs: 1000 * statistics.median(xs) / args.steps  # noqa: E731
    where = torch.cuda.get_device_name(device) + ", bf16 autocast, channels_last" if device.type == "cuda" \
        else f"CPU, {args.threads} thread(s)"
    print(f"{spec.name}: depth {args.depth or 'spec'}, batch {spec.train.batch_size} x "
          f"{spec.input.channels}x{spec.input.size}x{spec.input.size}, {args.steps} steps x {args.repeats} "
          f"repeats; {where} (torch {torch.__version__})")
    plain_total, ours_total, ours_steps = [p[0] for p in plain], [o[0] for o in ours], [o[1] for o in ours]
    print(f"plain PyTorch loop   median {per_step(plain_total):7.2f} ms/step   runs {[round(x, 3) for x in plain_total]} s")
    print(f"reslab (Lightning)   median {per_step(ours_total):7.2f} ms/step   runs {[round(x, 3) for x in ours_total]} s")
    print(f"reslab steps only    median {per_step(ours_steps):7.2f} ms/step   runs {[round(x, 3) for x in ours_steps]} s")
    end_s = statistics.median(ours_total) - statistics.median(ours_steps)
    ratio = statistics.median(ours_total) / statistics.median(plain_total)
    steps_ratio = statistics.median(ours_steps) / statistics.median(plain_total)
    print(f"epoch end (validation hooks, checkpoint, MLflow): {end_s:.3f} s per epoch")
    print(f"overhead ratio reslab/plain = {ratio:.3f} whole epoch of {args.steps} steps, {steps_ratio:.3f} steps only "
          f"(target <= {1.05 if device.type == 'cuda' else 1.10:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
