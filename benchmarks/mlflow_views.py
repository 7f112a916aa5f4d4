#!/usr/bin/env python3
"""Screenshots of the real MLflow UI and optuna-dashboard (headless Chromium, Debian's package `chromium`) over
what reslab records: a registered single run and a 3-arm ablation on Fashion-MNIST subsets, served by
`python cli.py ui` and `optuna-dashboard`.

    python benchmarks/mlflow_views.py [--out DIR] [--port 5077]     # ~2 min on 2 CPU cores; PNGs in DIR/shots

Each view is checked for what must be on it (the page's rendered text, read with --dump-dom) and saved as a PNG
to look at. Exit 1 when a view lacks what it should show, 2 when chromium is missing.
"""
from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMALL = ["stages.0.depth=1", "stages.1.depth=1", "stages.2.depth=1", "data.train_subset=2000", "data.val_size=500",
         "data.test_subset=500", "train.epochs=3", "train.batch_size=128"]
ABLATION = f"""\
# Shortcut options A/B/C on a one-block-per-stage ResNet (the views demo of benchmarks/mlflow_views.py).
# Fashion-MNIST subsets, 3 epochs, 2 paired seeds.
base: {ROOT / 'specs' / 'resnet20.yaml'}
set:
  data: {{name: fashion-mnist, train_subset: 2000, val_size: 500, test_subset: 500}}
  input: {{channels: 1, size: 28}}
  stages: [{{depth: 1, width: 16}}, {{depth: 1, width: 32, stride: 2}}, {{depth: 1, width: 64, stride: 2}}]
  train: {{epochs: 3, max_steps: null, batch_size: 128, schedule: {{type: multistep, milestones: [2], unit: epoch}}}}
ablation:
  axes: {{block.shortcut: [A, B, C]}}
  baseline: A
  seeds: 2
  metric: [test/error, train/error]
"""


def cli(*args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"cli.py {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def chromium(url: str, png: Path, size: str = "1600,1000", wait_ms: int = 20000) -> str:
    """Screenshot `url` into png and return the rendered DOM's text (both after wait_ms of virtual time)."""
    base = ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--window-size={size}", f"--virtual-time-budget={wait_ms}", "--run-all-compositor-stages-before-draw"]
    subprocess.run([*base, f"--screenshot={png}", url], capture_output=True, timeout=180, check=True)
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True).stdout
    return dom


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/views", help="outputs folder of the demo (fresh each time)")
    parser.add_argument("--port", type=int, default=5077)
    args = parser.parse_args()
    if shutil.which("chromium") is None:
        print("chromium is not installed: apt-get install -y chromium", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    shots = out / "shots"
    shots.mkdir(parents=True)
    print("training: one registered run, then a 3-arm x 2-seed ablation ...", flush=True)
    sets = [x for s in SMALL for x in ("--set", s)]
    text = cli("run", "specs/fmnist_resnet20.yaml", *sets, "--output-dir", str(out), "--progress", "lines",
               "--register", "fmnist-resnet8")
    run_id = next(line.split()[1] for line in text.splitlines() if line.startswith("run "))
    study = out / "views_demo.yaml"
    study.write_text(textwrap.dedent(ABLATION))
    cli("ablate", str(study), "--output-dir", str(out), "--workers", "2")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    single = client.get_run(run_id)
    ablation = client.get_experiment_by_name("ablation/views_demo")
    parent = next(r for r in client.search_runs([ablation.experiment_id])
                  if r.data.tags.get("reslab.role") == "study")
    host = f"http://127.0.0.1:{args.port}"
    ui = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "ui", "--port", str(args.port), "--output-dir",
                           str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    board = subprocess.Popen([sys.executable, "-c", "from optuna_dashboard._cli import main; main()",
                              f"sqlite:///{out / 'optuna.db'}", "--port",
                              str(args.port + 1)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    failures = []
    try:
        for url in (f"{host}/health", f"http://127.0.0.1:{args.port + 1}/api/meta"):
            for _ in range(120):
                try:
                    urllib.request.urlopen(url, timeout=3).close()
                    break
                except OSError:
                    time.sleep(1)
        e, s = ablation.experiment_id, single.info.experiment_id
        shared = "?viewStateShareKey=reslab-trials"          # the saved trials view reslab makes (search.views)
        (model,) = client.search_logged_models(experiment_ids=[s])
        views = [  # (file, url, what the rendered page must contain)
            ("1_experiments.png", f"{host}/#/experiments", ["ablation/views_demo", "fmnist_resnet"]),
            ("2_ablation_runs.png", f"{host}/#/experiments/{e}/runs{shared}", ["A seed 0", "arm", "test/error"]),
            ("3_ablation_charts.png", f"{host}/#/experiments/{e}/runs{shared}&compareRunsMode=CHART",
             ["test/error"]),
            ("3b_runs_table.png", f"{host}/#/experiments/{s}/runs", ["fmnist_resnet20", "fashion-mnist"]),
            ("4_parent_run.png", f"{host}/#/experiments/{e}/runs/{parent.info.run_id}",
             ["Shortcut options A/B/C", "mean ± std", "95% CI", "Δ vs A"]),
            ("5_arms_table.png", f"{host}/#/experiments/{e}/runs/{parent.info.run_id}/artifacts/results/arms.json",
             ["p_holm", "seed 1"]),
            ("6_single_run.png", f"{host}/#/experiments/{s}/runs/{run_id}",
             ["fashion-mnist", "model", "test/acc"]),
            ("7_logged_models.png", f"{host}/#/experiments/{s}/models", ["model", "fmnist-resnet8"]),
            ("7b_logged_model.png", f"{host}/#/experiments/{s}/models/{model.model_id}", ["fmnist-resnet8"]),
            ("8_registered_model.png", f"{host}/#/models/fmnist-resnet8", ["Version 1"]),
            ("8b_model_version.png", f"{host}/#/models/fmnist-resnet8/versions/1", ["Version 1", run_id[:8]]),
        ]
        dashboard = f"http://127.0.0.1:{args.port + 1}"
        views += [
            ("9_optuna_study.png", f"{dashboard}/dashboard/studies/1", ["views_demo", "arm"]),
            ("9b_optuna_trials.png", f"{dashboard}/dashboard/studies/1/trials", ["MLflow run", "#/experiments/"]),
        ]
        for name, url, needed in views:
            dom = chromium(url, shots / name, size="1600,1100" if "run" in name else "1600,900")
            missing = [n for n in needed if n not in dom]
            print(f"{shots / name}: {url}" + (f"  MISSING {missing}" if missing else "  ok"), flush=True)
            if missing:
                failures.append(name)
    finally:
        for proc in (ui, board):
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
