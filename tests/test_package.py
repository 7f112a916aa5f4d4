"""reslab as a user installs it: the wheel built from this tree, installed into a fresh venv (this interpreter's
site-packages for torch and the other dependencies), run from a folder outside the checkout: shipped specs and
study files resolve by name, a path in the folder still wins, and what a run prints names `reslab`, not
`python cli.py`."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from arches import complexity, load_spec
from conftest import FASHION_MNIST, ROOT

pytestmark = pytest.mark.slow
COPY_IGNORE = shutil.ignore_patterns(".git", "outputs", "build", "dist", "*.egg-info", "__pycache__", ".venv",
                                     ".whl", "mlruns", "mlflow.db", ".hypothesis", ".pytest_cache")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the venv's reslab script, a folder outside the checkout)."""
    tmp = tmp_path_factory.mktemp("package")
    tree = tmp / "tree"
    shutil.copytree(ROOT, tree, ignore=COPY_IGNORE)        # (the build writes build/ and *.egg-info into its tree)
    offline = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []   # (else pip fetches it)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(tree), "--no-deps", *offline, "-q", "-w",
                           str(tmp / "dist")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp / "dist").glob("reslab-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=600)
    # torch and the other dependencies: this interpreter's site-packages (a venv's own too, as CI's is), after the
    # new venv's own; their .pth files are not read, so an editable reslab installed here does not shadow the wheel
    (site_dir,) = venv.glob("lib/python*/site-packages")
    (site_dir / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index",
                           "--force-reinstall", "-q", str(wheel)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return venv / "bin" / "reslab", elsewhere


def reslab(installed, *args: str) -> subprocess.CompletedProcess:
    script, cwd = installed
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "RESLAB_STORAGE")}
    return subprocess.run([str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def test_the_installed_package_ships_its_specs_by_name(installed):
    done = reslab(installed, "show", "resnet34", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["params"] == complexity(load_spec(ROOT / "specs" / "resnet34.yaml")).params
    _, here = installed                                       # a file in the folder wins over the shipped one
    (here / "resnet20.yaml").write_text((ROOT / "specs" / "resnet20.yaml").read_text().replace(
        "base: _cifar.yaml", f"base: {ROOT / 'specs' / '_cifar.yaml'}").replace("name: resnet20", "name: mine"))
    done = reslab(installed, "validate", "resnet20", "shortcuts", "specs/searches/depth_width_macs.yaml",
                  "resnet20.yaml")
    assert done.returncode == 0, done.stderr
    *shipped, mine = done.stdout.splitlines()
    assert all("/venv/lib/" in line and "/site-packages/specs/" in line for line in shipped), done.stdout
    assert shipped[0].endswith("(resnet20)") and mine == "ok  resnet20.yaml  (mine)"
    done = reslab(installed, "show", "resnet2")
    assert done.returncode == 2 and done.stderr.strip().startswith(
        "resnet2: no such file, nor a spec shipped with reslab (did you mean 'resnet32'?)"), done.stderr


def test_a_run_from_the_installed_package(installed):
    tiny = ["stages.0.depth=1", "stages.1.depth=1", "stages.2.depth=1", "data.train_subset=256", "data.val_size=128",
            "data.test_subset=128", "train.epochs=1", "train.batch_size=128", f"data.root={FASHION_MNIST}"]
    done = reslab(installed, "run", "fmnist_resnet20", "--set", *tiny, "--output-dir", "mine", "--progress", "lines")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "see it: reslab ui --output-dir mine   (or: mlflow ui" in done.stdout, done.stdout
    assert "export: reslab export RUN_ID" in done.stdout and "cli.py" not in done.stdout
    assert (installed[1] / "mine" / "mlflow.db").is_file()
