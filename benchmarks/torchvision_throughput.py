#!/usr/bin/env python3
"""Training images/s of reslab's compiled specs against torchvision's models, side by side in one harness.

For each model, reslab's network (build_model of specs/<name>.yaml) and torchvision's (torchvision.models.<name>,
loaded with the same weights) train in the same loop: synthetic 224x224 batches held on the device, bf16
autocast, channels_last, SGD with the spec's optimizer settings, optionally both under torch.compile. After a
warm-up of each (compilation included), the two alternate `--rounds` times (order swapped each round), each
round timing `--steps` steps with CUDA events; the ratio of median step times is printed (goal >= 1.00:
the modules are the same, so anything lower is reslab's overhead).

    python benchmarks/torchvision_throughput.py                                   # on CUDA, all three models
    python benchmarks/torchvision_throughput.py --models resnet50 --modes eager   # one model, no compile
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from arches import build_model, load_spec  # noqa: E402
from runs.recipe import build_optimizer  # noqa: E402

MODELS = ("resnet18", "resnet50", "resnext50_32x4d")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"


class Trainee:
    """One model with its optimizer and a step function: bf16 autocast on CUDA, channels_last inputs."""

    def __init__(self, model: torch.nn.Module, spec, device: torch.device, compiled: bool):
        self.model = model.to(device).to(memory_format=torch.channels_last).train()
        self.optimizer = build_optimizer(self.model, spec.train)
        self.forward = torch.compile(self.model) if compiled else self.model
        self.device = device

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = F.cross_entropy(self.forward(images), labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed(self, batches: list, steps: int) -> float:
        """Milliseconds per step over `steps` steps (CUDA events on GPU, a host clock after a sync on CPU)."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(steps):
                self.step(*batches[i % len(batches)])
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / steps
        t0 = time.perf_counter()
        for i in range(steps):
            self.step(*batches[i % len(batches)])
        return 1000 * (time.perf_counter() - t0) / steps


def compare(name: str, compiled: bool, args, device: torch.device) -> dict:
    import torchvision

    spec = load_spec(ROOT / "specs" / f"{name}.yaml", [f"input.size={args.size}"])
    ours = build_model(spec)
    theirs = getattr(torchvision.models, name)()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():   # the same function before any training: fp32, eval mode
        probe = torch.randn(4, 3, args.size, args.size)
        same = (ours.eval()(probe) - theirs.eval()(probe)).abs().max().item()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)
                .contiguous(memory_format=torch.channels_last),
                torch.randint(0, 1000, (args.batch,), generator=g).to(device)) for _ in range(4)]
    pair = {"reslab": Trainee(ours, spec, device, compiled), "torchvision": Trainee(theirs, spec, device, compiled)}
    t0 = time.perf_counter()
    for trainee in pair.values():
        trainee.timed(batches, args.warmup)
    warm_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {k: [] for k in pair}
    for r in range(args.rounds):
        for key in (list(pair) if r % 2 == 0 else list(pair)[::-1]):
            times[key].append(pair[key].timed(batches, args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"model": name, "mode": "compile" if compiled else "eager", "max_abs_diff_fp32": same, "warmup_s": warm_s,
           **{f"{k}_img_s": args.batch * 1000 / med[k] for k in pair},
           **{f"{k}_ms": v for k, v in times.items()}, "ratio": med["torchvision"] / med["reslab"]}
    del pair, batches
    if compiled:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds of each model")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps of each model first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    print(f"device: {device_name(device)}; batch {args.batch} x 3x{args.size}x{args.size}, bf16 autocast"
          f"{'' if device.type == 'cuda' else ' (off on CPU)'}, channels_last, {args.rounds} rounds x "
          f"{args.steps} steps", flush=True)
    rows = []
    for mode in args.modes:
        for name in args.models:
            row = compare(name, mode == "compile", args, device)
            rows.append(row)
            print(f"{name:16s} {row['mode']:8s} reslab {row['reslab_img_s']:8.1f} img/s   torchvision "
                  f"{row['torchvision_img_s']:8.1f} img/s   ratio reslab/torchvision {row['ratio']:.3f}   "
                  f"(rounds ms reslab {[round(x, 1) for x in row['reslab_ms']]}, torchvision "
                  f"{[round(x, 1) for x in row['torchvision_ms']]}; warm-up {row['warmup_s']:.0f} s; same "
                  f"function: max |diff| {row['max_abs_diff_fp32']:.1e})", flush=True)
    print("\nmodel            mode      reslab img/s  torchvision img/s  ratio (goal >= 1.00)")
    for r in rows:
        print(f"{r['model']:16s} {r['mode']:8s} {r['reslab_img_s']:12.1f} {r['torchvision_img_s']:18.1f}  "
              f"{r['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
