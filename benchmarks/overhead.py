#!/usr/bin/env python3
"""reslab's training step against a hand-written PyTorch loop, side by side on the same machine.

Both train the same network (build_model, same seed) with the same optimizer and per-step LambdaLR on the same
pre-made batches for the same number of steps. reslab's side is ReslabModule driven by the Trainer that
`runs.fit.train` builds, with its callbacks (epoch summary, per-epoch line, interrupt guard, last.ckpt every
epoch) and MLflow recording on (a throw-away sqlite store): each timed epoch runs from on_train_start to
on_train_end, so metric updates, the NaN check, the epoch's MLflow logging and checkpoint are all inside.
After a warm-up of each, the two alternate `--repeats` times; the ratio of median times is printed.

    python benchmarks/overhead.py                      # resnet8 on 28x28 batches of 128, 1 thread
    python benchmarks/overhead.py --spec specs/fmnist_resnet20.yaml --depth 0 --steps 30
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
from runs import tracking  # noqa: E402
from runs.fit import _quiet_lightning, build_trainer  # noqa: E402
from runs.module import ReslabModule  # noqa: E402
from runs.recipe import build_optimizer, build_scheduler  # noqa: E402


class Stopwatch(pl.Callback):
    """Time from on_train_start to on_train_end (setup and teardown excluded)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0 = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self._t0


class Batches:
    """The pre-made batches as one iterable (a bare list would be read by Lightning as a list of loaders)."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def make_batches(spec, steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` fixed batches of normalised random images and labels at the spec's input shape."""
    g = torch.Generator().manual_seed(seed)
    shape = (spec.train.batch_size, spec.input.channels, spec.input.size, spec.input.size)
    return [(torch.randn(shape, generator=g), torch.randint(0, spec.classes, (shape[0],), generator=g))
            for _ in range(steps)]


def plain_loop(spec, batches) -> float:
    """Seconds for a hand-written loop over the batches: forward, loss, backward, step, scheduler step."""
    model = build_model(spec).train()
    optimizer = build_optimizer(model, spec.train)
    scheduler = build_scheduler(optimizer, spec.train, len(batches))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=spec.train.label_smoothing)
    t0 = time.perf_counter()
    for images, labels in batches:
        loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return time.perf_counter() - t0


def reslab_loop(spec, batches, out: Path, client, run_id: str) -> float:
    """Seconds for one epoch over the batches by the Trainer and callbacks of runs.fit.train, recording on."""
    module = ReslabModule(spec.model_dump(mode="json"))
    watch = Stopwatch()
    uri = tracking.default_tracking_uri(out)
    trainer, (summary, guard, ckpt) = build_trainer(spec, out, progress=False, callbacks=[watch])
    trainer.callbacks.insert(trainer.callbacks.index(summary) + 1, tracking.MlflowRecorder(uri, run_id))
    ckpt.dirpath = str(out / "checkpoints" / run_id)
    guard.path = Path(ckpt.dirpath) / "last.ckpt"
    with redirect_stdout(io.StringIO()), _quiet_lightning():
        trainer.fit(module, train_dataloaders=Batches(batches))
    return watch.seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="specs/fmnist_resnet20.yaml")
    parser.add_argument("--depth", type=int, default=1, help="blocks per stage (0 = as in the spec)")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="alternating timed runs of each")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    overrides = [f"stages.{i}.depth={args.depth}" for i in range(3)] if args.depth else []
    spec = load_spec(ROOT / args.spec, [*overrides, "data.name=synthetic", f"train.epochs=1",
                                        "train.max_steps=null", "train.accelerator=cpu", *args.overrides])
    batches = make_batches(spec, args.steps)
    with tempfile.TemporaryDirectory(prefix="reslab-overhead-") as tmp:
        out = Path(tmp)
        client = tracking.client_for(None, out)
        exp = tracking.ensure_experiment(client, "overhead", out)
        run_id = client.create_run(exp).info.run_id
        plain_loop(spec, batches[:5])                                  # warm-up: allocator, kernels
        reslab_loop(spec, batches[:5], out, client, run_id)
        plain, ours = [], []
        for i in range(args.repeats):                                  # alternate, order swapped each round
            pair = [("plain", lambda: plain_loop(spec, batches)),
                    ("reslab", lambda: reslab_loop(spec, batches, out, client, run_id))]
            for name, fn in (pair if i % 2 == 0 else pair[::-1]):
                (plain if name == "plain" else ours).append(fn())
        client.set_terminated(run_id)
    per_step = lambda xs: 1000 * statistics.median(xs) / args.steps  # noqa: E731
    print(f"{spec.name}: depth {args.depth or 'spec'}, batch {spec.train.batch_size} x "
          f"{spec.input.channels}x{spec.input.size}x{spec.input.size}, {args.steps} steps x {args.repeats} "
          f"repeats, {args.threads} thread(s)")
    print(f"plain PyTorch loop   median {per_step(plain):7.2f} ms/step   runs {[round(x, 2) for x in plain]} s")
    print(f"reslab (Lightning)   median {per_step(ours):7.2f} ms/step   runs {[round(x, 2) for x in ours]} s")
    ratio = statistics.median(ours) / statistics.median(plain)
    print(f"overhead ratio reslab/plain = {ratio:.3f}  (target <= 1.10)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
