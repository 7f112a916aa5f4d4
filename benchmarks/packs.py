#!/usr/bin/env python3
"""Packs (runs/pack.py) against solo trials, side by side in one run.

Sections:
  throughput  P = 1 2 4 8 16 ResNet-20 members (seeds 0..P-1) on Fashion-MNIST trained as one pack, against solo
              trials one after another (runs.fit's module, data and Trainer): images/s per member and in all,
              the ratio of the pack's total to a solo trial's, the pack's peak GPU memory and utilisation (CUDA).
              Each setting: CPU eager; on CUDA eager, torch.compile and compile mode reduce-overhead (bf16).
              Speeds are the last epoch's training images/s (validation and, with --epochs 2, compilation left out).
  ablation    an ablation file's cells packed (grouped by runs.pack.fusible_key) and solo: wall time of each way,
              and per arm n, mean and std of test/error for both (the statistics must not depend on packing).

    python benchmarks/packs.py throughput --sizes 1 2 4 8 16 --set data.train_subset=2048 --epochs 1
    python benchmarks/packs.py ablation --file specs/ablations/shortcuts.yaml --set train.epochs=1
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from arches import load_spec  # noqa: E402
from runs.pack import Pack, fusible_key, train_alone  # noqa: E402
from small_nets import GpuUtilisation, device_line  # noqa: E402

SPEC = ROOT / "specs" / "fmnist_resnet20.yaml"
# setting name -> (spec overrides of the solo trial, the pack's torch.compile argument)
CPU_SETTINGS = {"cpu fp32 eager": (["train.accelerator=cpu", "train.precision='32'"], False)}
CUDA_SETTINGS = {
    "cuda bf16 eager": (["train.precision=bf16-mixed", "train.compile=false"], False),
    "cuda bf16 compile": (["train.precision=bf16-mixed", "train.compile=true"], True),
    "cuda bf16 compile reduce-overhead": (["train.precision=bf16-mixed", "train.compile=reduce-overhead"],
                                          "reduce-overhead"),
}


solo = train_alone


def settings() -> dict:
    return CUDA_SETTINGS if torch.cuda.is_available() else CPU_SETTINGS


# ---- throughput -----------------------------------------------------------------------------------------------
def section_throughput(args) -> None:
    rows = []
    for name, (overrides, compile_mode) in settings().items():
        common = [f"train.epochs={args.epochs}", *overrides, *args.overrides]
        solo_speeds = []
        for seed in range(args.solo_trials):
            module = solo(load_spec(SPEC, [*common, f"train.seed={seed}"]))
            solo_speeds.append(module.history[-1]["images_per_s"])
            torch._dynamo.reset()
        one = statistics.mean(solo_speeds)
        print(f"  {name}: solo images/s {[round(s) for s in solo_speeds]}", flush=True)
        for size in args.sizes:
            specs = [load_spec(SPEC, [*common, f"train.seed={seed}"]) for seed in range(size)]
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            with GpuUtilisation() as gpu:
                pack = Pack(specs, compile=compile_mode)
                pack.fit()
            member = pack.finished[0].history[-1]["images_per_s"]
            memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
            util = statistics.mean(gpu.util) if gpu.util else float("nan")
            rows.append((name, size, one, member, member * size, memory, util))
            print(f"  {name}: P={size} per member {member:.0f} images/s, in all {member * size:.0f}", flush=True)
            del pack
            torch._dynamo.reset()
    spec = load_spec(SPEC, args.overrides)
    print(f"\npacks vs solo trials one after another: ResNet-20 on Fashion-MNIST ({spec.data.train_subset or 'all'} "
          f"training images, batch {spec.train.batch_size}), last of {args.epochs} epoch(s), {args.solo_trials} solo "
          f"trials; {device_line()}, {torch.get_num_threads()} threads")
    print(f"{'setting':36s} {'P':>3s} {'solo img/s':>10s} {'member img/s':>12s} {'pack img/s':>10s} "
          f"{'pack / solo':>11s} {'GPU GiB':>8s} {'GPU util %':>10s}")
    for name, size, one, member, total, memory, util in rows:
        print(f"{name:36s} {size:3d} {one:10.0f} {member:12.0f} {total:10.0f} {total / one:11.2f} {memory:8.2f} "
              f"{util:10.0f}")


# ---- ablation -------------------------------------------------------------------------------------------------
def section_ablation(args) -> None:
    from search.space import load_study_file

    plan = load_study_file(args.file, args.overrides)
    cells = {(arm, seed): plan.arm_spec(arm, seed) for arm, seed in plan.cells()}
    groups = defaultdict(list)
    for cell, spec in cells.items():
        groups[fusible_key(spec)].append(cell)
    metric = plan.metrics[0].name
    t0 = time.perf_counter()
    packed = {}
    for number, group in enumerate(groups.values()):
        pack = Pack([cells[c] for c in group])
        pack.fit()
        for i, cell in enumerate(group):
            packed[cell] = pack.finished[i].metrics.get(metric, float("nan"))
        print(f"  pack {number}: {', '.join(f'{a}/seed {s}' for a, s in group)}", flush=True)
    packed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    alone = {cell: final(solo(spec), metric) for cell, spec in cells.items()}
    solo_s = time.perf_counter() - t0
    # the floor: the same solo trials on another thread count (other float rounding in the kernels)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    again = {cell: final(solo(spec), metric) for cell, spec in cells.items()}
    torch.set_num_threads(threads)
    print(f"\n{plan.name}: {len(cells)} cells in {len(groups)} packs; packed {packed_s:.1f} s, solo one after "
          f"another {solo_s:.1f} s (x{solo_s / packed_s:.2f}); {device_line()}, {threads} threads")
    print(f"{'arm':12s} {'n':>3s} {metric + ' packed':>26s} {metric + ' solo':>26s} "
          f"{'solo, ' + str(threads + 1) + ' threads':>26s}")
    spread = lambda v: statistics.stdev(v) if len(v) > 1 else float("nan")  # noqa: E731
    for arm in dict.fromkeys(a for a, _ in cells):
        values = [[way[c] for c in cells if c[0] == arm] for way in (packed, alone, again)]
        print(f"{arm:12s} {len(values[0]):3d} " + " ".join(f"{statistics.mean(v):16.4f} +- {spread(v):.4f}"
                                                           for v in values))
    largest = lambda a, b: max(abs(a[c] - b[c]) for c in cells)  # noqa: E731
    print(f"largest per-cell difference of {metric}: packed vs solo {largest(packed, alone):.4f}, solo on "
          f"{threads + 1} vs {threads} threads {largest(again, alone):.4f}")


def final(module, metric: str) -> float:
    """A trained module's final value of `metric` (the last epoch's row, then the test results)."""
    return {**module.history[-1], **module.results.get("test", {})}.get(metric, float("nan"))


SECTIONS = {"throughput": section_throughput, "ablation": section_ablation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="+", choices=list(SECTIONS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="pack sizes P")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per trial (speeds: the last epoch's)")
    parser.add_argument("--solo-trials", type=int, default=2, help="solo trials timed (their mean is 'solo')")
    parser.add_argument("--file", default=str(ROOT / "specs" / "ablations" / "shortcuts.yaml"),
                        help="ablation file (section ablation)")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], help="spec overrides, key=value")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    for name in args.sections:
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
