#!/usr/bin/env python3
"""Small nets on one GPU: how fast one ResNet-20 trial trains on Fashion-MNIST held on the device, how fast it
reaches 93% test accuracy, and how many trials per hour one GPU runs when several share it.

Sections (run any of them; each prints its table, side by side measurements in one run):
  single     images/s of one trial in each GPU setting (fp32 eager; bf16 + channels_last eager; + torch.compile;
             + compile mode reduce-overhead), from reslab's own per-epoch images/s, epoch 2 on (compiled)
  to93       one run with the test set scored after every epoch (its time left out of the clock): the training
             time to 93% test accuracy, and the best accuracy of the run
  share      K trials at once on one GPU (`ablate --workers K`, K = 1 2 4 8): trials/hour, GPU utilisation (NVML),
             images/s per trial and in all
  ablation   a shipped ablation file end to end (`ablate`, then `report`): wall time and GPU utilisation

    python benchmarks/small_nets.py single to93 share
    python benchmarks/small_nets.py ablation --file specs/ablations/shortcuts_gpu.yaml --workers 8
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from arches import load_spec  # noqa: E402
from runs.fit import RunOptions, train  # noqa: E402

SPEC = ROOT / "specs" / "fmnist_resnet20.yaml"
FULL = ["data.train_subset=null", "data.augment=crop_flip"]         # all 55k training images, the standard aug
SETTINGS = {  # name: overrides
    "fp32 eager": ["train.precision='32'", "train.channels_last=false", "train.compile=false"],
    "bf16 + channels_last": ["train.precision=bf16-mixed", "train.channels_last=true", "train.compile=false"],
    "bf16 + channels_last + compile": ["train.precision=bf16-mixed", "train.channels_last=true",
                                       "train.compile=true"],
    "bf16 + channels_last + compile reduce-overhead": ["train.precision=bf16-mixed", "train.channels_last=true",
                                                       "train.compile=reduce-overhead"],
}


def device_line() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    return f"CPU only ({os.cpu_count()} cores), torch {torch.__version__}"


class GpuUtilisation:
    """Samples GPU utilisation (%) and memory used (GiB) every `every` seconds through NVML while active."""

    def __init__(self, every: float = 0.25):
        self.every, self.util, self.memory = every, [], []
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # noqa: BLE001  (no NVML: no GPU, or no nvidia-ml-py)
            self._nvml = None

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.util.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            self.memory.append(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**30)

    def __enter__(self) -> "GpuUtilisation":
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._nvml is not None:
            self._thread.join()

    def summary(self) -> str:
        if not self.util:
            return "GPU utilisation: not measured (no NVML)"
        return (f"GPU utilisation mean {statistics.mean(self.util):.0f}% (median {statistics.median(self.util):.0f}%, "
                f"{len(self.util)} samples), memory up to {max(self.memory):.1f} GiB")


# ---- single ---------------------------------------------------------------------------------------------
def section_single(args, out: Path) -> None:
    rows = []
    for name, overrides in SETTINGS.items():
        spec = load_spec(SPEC, [*FULL, f"train.epochs={args.single_epochs}", *overrides, *args.overrides])
        t0 = time.perf_counter()
        result = train(spec, RunOptions(output_dir=out / "single", progress=False, run_name=name))
        wall = time.perf_counter() - t0
        speeds = [row["images_per_s"] for row in result.history]
        later = speeds[1:] or speeds
        rows.append((name, speeds[0], statistics.median(later), wall, result.metrics.get("test/acc", float("nan"))))
        torch._dynamo.reset()
        print(f"  {name}: epoch images/s {[round(s) for s in speeds]}, whole run {wall:.1f} s", flush=True)
    base = rows[0][2]
    print(f"\nsingle trial, ResNet-20 on Fashion-MNIST (55k images, batch {spec.train.batch_size}, data on the "
          f"device), {args.single_epochs} epochs; {device_line()}")
    print(f"{'setting':48s} {'epoch 1 img/s':>13s} {'later img/s':>12s} {'vs fp32':>8s} {'run s':>7s} {'test acc':>8s}")
    for name, first, later, wall, acc in rows:
        print(f"{name:48s} {first:13.0f} {later:12.0f} {later / base:8.2f} {wall:7.1f} {acc:8.4f}")


# ---- to93 -----------------------------------------------------------------------------------------------
class TestEveryEpoch(pl.Callback):
    """After each training epoch: test accuracy of the current weights (bf16 as trained), the training clock
    (from on_train_start, minus the time spent here) at that moment."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float, float]] = []
        self._t0 = self._excluded = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        was_training = pl_module.training
        pl_module.eval()
        correct = total = 0
        device = pl_module.device
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for images, labels in trainer.datamodule.test_dataloader():
                images, labels = images.to(device), labels.to(device)
                correct += int((pl_module(images).argmax(1) == labels).sum())
                total += len(labels)
        pl_module.train(was_training)
        end = time.perf_counter()
        self.rows.append((trainer.current_epoch + 1, start - self._t0 - self._excluded, correct / total))
        self._excluded += end - start


def section_to93(args, out: Path) -> None:
    spec = load_spec(SPEC, [*FULL, f"train.epochs={args.epochs93}", *SETTINGS[args.setting], *args.overrides])
    probe = TestEveryEpoch()
    t0 = time.perf_counter()
    result = train(spec, RunOptions(output_dir=out / "to93", progress=False, callbacks=[probe], run_name="to93"))
    wall = time.perf_counter() - t0
    print(f"\ntime to 93% test accuracy, ResNet-20 on Fashion-MNIST ({args.setting}; {args.epochs93} epochs "
          f"{spec.train.schedule.type}, lr {spec.train.lr}, batch {spec.train.batch_size}); {device_line()}")
    print(f"{'epoch':>5s} {'train s':>8s} {'test acc':>8s}")
    for epoch, seconds, acc in probe.rows:
        print(f"{epoch:5d} {seconds:8.1f} {acc:8.4f}")
    hit = next(((e, s) for e, s, a in probe.rows if a >= 0.93), None)
    best = max(probe.rows, key=lambda r: r[2])
    print(f"93% reached: {'epoch %d after %.1f s of training' % hit if hit else 'no'}; best {best[2]:.4f} at epoch "
          f"{best[0]} ({best[1]:.1f} s); final reslab test/acc {result.metrics.get('test/acc', float('nan')):.4f}; "
          f"whole run {wall:.1f} s including start, compile, validation and the scoring above")


# ---- share / ablation -----------------------------------------------------------------------------------
def run_ablation(file: Path, workers: int, out: Path, overrides: list[str], study: str) -> tuple[float, GpuUtilisation]:
    cmd = [sys.executable, str(ROOT / "cli.py"), "ablate", str(file), "--workers", str(workers), "--output-dir",
           str(out), "--study", study]
    if overrides:
        cmd += ["--set", *overrides]
    with GpuUtilisation() as util:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        raise SystemExit(f"ablate exited {proc.returncode}")
    (out / f"{study}.log").write_text(proc.stdout + proc.stderr)
    return wall, util


def trial_speeds(out: Path, study: str) -> list[float]:
    """Each trial's images/s, median over its epochs after the first (MLflow metric images_per_s)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name(f"ablation/{study}")
    speeds = []
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        history = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "images_per_s"),
                                           key=lambda m: m.step)]
        if history:
            speeds.append(statistics.median(history[1:] or history))
    return speeds


def section_share(args, out: Path) -> None:
    rows = []
    n_train = 55000
    for k in args.share:
        study = f"share_{k}"
        file = out / f"{study}.yaml"
        file.write_text(f"base: {ROOT / 'specs' / 'resnet20.yaml'}\n"
                        "set: {data.name: fashion-mnist, input.channels: 1, input.size: 28, data.augment: crop_flip, "
                        f"train.epochs: {args.share_epochs}, train.max_steps: null, "
                        "train.schedule: {type: constant}}\n"
                        f"ablation: {{axes: {{block.shortcut: [A]}}, baseline: {{block.shortcut: A}}, "
                        f"seeds: {k * args.trials_per_worker}, "
                        "metric: [test/error]}\n")
        wall, util = run_ablation(file, k, out / "share", args.overrides, study)
        trials = k * args.trials_per_worker
        speeds = trial_speeds(out / "share", study)
        rows.append((k, trials, wall, trials * 3600 / wall, util, statistics.median(speeds) if speeds else float("nan"),
                     trials * args.share_epochs * n_train / wall))
        print(f"  {k} worker(s): {trials} trials in {wall:.1f} s; {util.summary()}", flush=True)
    print(f"\ntrials sharing one GPU: ResNet-20, {args.share_epochs} epochs of Fashion-MNIST each (55k images, data "
          f"on the device){' with ' + ' '.join(args.overrides) if args.overrides else ''}; {device_line()}")
    print(f"{'workers':>7s} {'trials':>6s} {'wall s':>7s} {'trials/h':>9s} {'GPU util %':>10s} "
          f"{'img/s per trial':>15s} {'img/s in all':>12s} {'(incl. start)':>13s}")
    for k, trials, wall, per_hour, util, speed, total in rows:
        u = f"{statistics.mean(util.util):.0f}" if util.util else "n/a"
        print(f"{k:7d} {trials:6d} {wall:7.1f} {per_hour:9.0f} {u:>10s} {speed:15.0f} {speed * k:12.0f} {total:13.0f}")


def section_ablation(args, out: Path) -> None:
    file = Path(args.file).resolve()
    study = file.stem
    wall, util = run_ablation(file, args.workers, out / "ablation", args.overrides, study)
    speeds = trial_speeds(out / "ablation", study)
    report = subprocess.run([sys.executable, str(ROOT / "cli.py"), "report", study, "--output-dir",
                             str(out / "ablation")], cwd=ROOT, capture_output=True, text=True)
    print(report.stdout[-6000:])
    print(f"{file.name}: {len(speeds)} trials with {args.workers} workers on one GPU in {wall:.1f} s "
          f"({wall / 60:.2f} min); images/s per trial median {statistics.median(speeds):.0f}; {util.summary()}; "
          f"{device_line()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="+", choices=["single", "to93", "share", "ablation"])
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra overrides for every run (e.g. train.compile=true)")
    parser.add_argument("--single-epochs", type=int, default=3)
    parser.add_argument("--epochs93", type=int, default=15, help="to93: length of the run (one-cycle schedule)")
    parser.add_argument("--setting", default="bf16 + channels_last", choices=list(SETTINGS), help="to93's setting")
    parser.add_argument("--share", type=int, nargs="+", default=[1, 2, 4, 8], help="workers sharing the GPU")
    parser.add_argument("--share-epochs", type=int, default=3)
    parser.add_argument("--trials-per-worker", type=int, default=1)
    parser.add_argument("--file", default=str(ROOT / "specs" / "ablations" / "shortcuts_gpu.yaml"))
    parser.add_argument("--workers", type=int, default=8, help="ablation: workers on the one GPU")
    parser.add_argument("--output-dir", help="keep the MLflow stores here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="reslab-small-") as tmp:
        out = Path(args.output_dir or tmp).resolve()
        out.mkdir(parents=True, exist_ok=True)
        for section in args.sections:
            print(f"== {section}", flush=True)
            t0 = time.perf_counter()
            globals()[f"section_{section}"](args, out)
            print(f"== {section} took {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
