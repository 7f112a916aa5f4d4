"""reslab's pieces in the ecosystem's own tools: ReslabModule and ReslabData in a user's plain Lightning Trainer with
CSV and MLflow loggers; a finished run's MLflow model (mlflow.pytorch.load_model, the model registry, datasets,
source fields, exact metrics); exports to torch.export / TorchScript / ONNX checked against the checkpoint; the rich
progress bar; the figures' shared styles."""
from __future__ import annotations

import csv
import json
import math
import subprocess
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient

import runs
from arches import load_spec, spec_hash
from conftest import FASHION_MNIST, run_cli
from runs.checkpoint import load_model
from runs.fit import RunOptions, train
from runs.mlflow_client import default_tracking_uri

TINY = ["stages.0.depth=1", "stages.1.depth=1", "stages.2.depth=1", "stem.width=8", "stages.0.width=8",
        "stages.1.width=16", "stages.2.width=32", "data.train_subset=384", "data.val_size=256",
        "data.test_subset=250", "train.batch_size=128", "data.augment=none"]
METRICS = ("train/loss", "train/acc", "train/error", "val/loss", "val/acc", "val/error", "lr", "images_per_s")


def tiny_spec(root: Path, *extra: str):
    return load_spec("specs/fmnist_resnet20.yaml", [*TINY, f"data.root={root}", *extra])


def is_ratio_of(value: float, total: int) -> bool:
    """value is k / total exactly (as float64 division gives it) for an integer k."""
    k = round(value * total)
    return value == k / total


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished, registered 2-epoch run: (outputs folder, spec, RunResult)."""
    out = tmp_path_factory.mktemp("eco") / "outputs"
    spec = tiny_spec(FASHION_MNIST, "train.epochs=2")
    result = train(spec, RunOptions(output_dir=out, progress=False, register="reslab-tiny"))
    assert result.status == "FINISHED", result.reason
    return out, spec, result


def test_module_and_data_in_a_users_trainer_log_through_lightning(fashion_mnist, tmp_path):
    """A plain pl.Trainer with a CSVLogger and an MLFlowLogger (no reslab callback): every metric reslab records
    reaches both loggers under the same names, per epoch, with the values of module.history."""
    from pytorch_lightning.loggers import CSVLogger, MLFlowLogger

    from runs import ReslabData, ReslabModule

    spec = tiny_spec(fashion_mnist, "train.epochs=2")
    module, data = ReslabModule(spec), ReslabData(spec)
    uri = f"sqlite:///{tmp_path / 'user.db'}"
    loggers = [CSVLogger(str(tmp_path / "csv"), name="user"), MLFlowLogger(experiment_name="user", tracking_uri=uri)]
    trainer = pl.Trainer(max_epochs=2, logger=loggers, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(module, datamodule=data)
    trainer.test(module, datamodule=data, verbose=False)

    rows = list(csv.DictReader(open(loggers[0].experiment.metrics_file_path)))
    by_epoch: dict[int, dict[str, float]] = {}
    for row in rows:
        for key, value in row.items():
            if value and key not in ("epoch", "step"):
                by_epoch.setdefault(int(row["epoch"]), {})[key] = float(value)
    assert [h["epoch"] for h in module.history] == [1, 2]
    for h in module.history:                          # Lightning counts epochs from 0, reslab's rows from 1
        logged = by_epoch[h["epoch"] - 1]
        for key in METRICS:
            assert logged[key] == pytest.approx(h[key], rel=1e-12), key
        assert is_ratio_of(logged["val/acc"], data.num_val) and is_ratio_of(logged["train/acc"], data.num_train)
    # the last validation's accuracy and error against a count of the trained model's own correct predictions
    module.eval()
    with torch.no_grad():
        correct = sum(int((module(images).argmax(1) == labels).sum()) for images, labels in data.val_dataloader())
    last = by_epoch[module.history[-1]["epoch"] - 1]
    assert 0 < correct < data.num_val
    assert last["val/acc"] == correct / data.num_val and last["val/error"] == (data.num_val - correct) / data.num_val
    test = by_epoch[max(by_epoch)]
    assert set(test) >= {"test/loss", "test/acc", "test/error"} and is_ratio_of(test["test/acc"], 250)

    client = MlflowClient(uri)
    run_id = loggers[1].run_id
    for key in METRICS:
        assert len(client.get_metric_history(run_id, key)) == 2, key
    assert client.get_run(run_id).data.metrics["test/acc"] == pytest.approx(test["test/acc"], rel=1e-12)


def test_a_finished_run_is_an_mlflow_model_in_the_registry(finished, monkeypatch):
    import mlflow.pytorch

    out, spec, result = finished
    uri = default_tracking_uri(out)
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", uri)       # mlflow.pytorch.load_model reads the global store
    assert result.model_uri == f"runs:/{result.run_id}/model" and result.model_version == "1"
    loaded = mlflow.pytorch.load_model(result.model_uri)
    registered = mlflow.pytorch.load_model("models:/reslab-tiny/1")
    _, eager = load_model(result.checkpoint)
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(3))      # another batch size
    with torch.no_grad():
        expected = eager(x)
        assert torch.allclose(loaded(x), expected, atol=1e-5)
        assert torch.allclose(registered(x), expected, atol=1e-5)

    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    (output,) = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.name == "model" and model.source_run_id == result.run_id and model.status.name == "READY"
    assert {m.key for m in model.metrics} >= {"test/acc", "val/acc", "train/loss"}   # the final step's metrics
    info = mlflow.models.get_model_info(result.model_uri)
    assert tuple(info.signature.inputs.inputs[0].shape) == (-1, 1, 28, 28)
    assert info.metadata["reslab_spec_hash"] == spec_hash(spec)
    local = Path(mlflow.artifacts.download_artifacts(result.model_uri))
    assert (local / "input_example.json").exists()
    assert load_spec(local / "spec.yaml").name == spec.name
    version = client.get_model_version("reslab-tiny", "1")
    assert version.run_id == result.run_id and version.status == "READY"
    # linked both ways, as mlflow.register_model links them (the UI's model page lists the version)
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": "reslab-tiny", "version": 1}]
    assert client.get_model_version_download_uri("reslab-tiny", "1") == model.artifact_location

    # the data set as dataset inputs, the source fields, exact accuracies
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation", "testing"}
    assert {d.name for d in inputs.values()} == {"fashion-mnist"} and len({d.digest for d in inputs.values()}) == 3
    sizes = {ctx: json.loads(d.profile)["num_rows"] for ctx, d in inputs.items()}
    assert sizes == {"training": 384, "validation": 256, "testing": 250}
    tags = run.data.tags
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"] and tags["mlflow.user"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(runs.__file__).resolve().parents[1],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head and tags["git_commit"] == head   # the checkout's commit
    assert is_ratio_of(run.data.metrics["test/acc"], 250) and is_ratio_of(run.data.metrics["val/acc"], 256)
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.note.content"]


def test_load_model_finds_a_run_where_mlflow_is_pointed(finished, monkeypatch, tmp_path):
    """runs.checkpoint.load_model(RUN_ID) reads the store of mlflow.set_tracking_uri or $MLFLOW_TRACKING_URI (from a
    folder with no outputs/ of its own); without either its error names tracking_uri=, not a CLI flag."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    from arches.errors import ReslabError

    out, spec, result = finished
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(utils, "_tracking_uri", None)          # (restored after the test)
    with pytest.raises(ReslabError) as info:
        load_model(result.run_id)
    assert "tracking_uri=" in str(info.value) and "--" not in str(info.value)
    mlflow.set_tracking_uri(default_tracking_uri(out))
    back, network = load_model(result.run_id)
    assert spec_hash(back) == spec_hash(spec) and not network.training
    mlflow.set_tracking_uri(None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", default_tracking_uri(out))
    assert spec_hash(load_model(result.run_id)[0]) == spec_hash(spec)


def test_a_resumed_run_keeps_one_set_of_dataset_inputs(fashion_mnist, tmp_path):
    from test_train import StopAfterEpoch

    from runs.fit import Interrupted

    out = tmp_path / "outputs"
    spec = tiny_spec(fashion_mnist, "train.epochs=2", "train.limit_batches=1")
    with pytest.raises(Interrupted) as info:
        train(spec, RunOptions(output_dir=out, progress=False, callbacks=[StopAfterEpoch(1, KeyboardInterrupt())]))
    result = train(None, RunOptions(output_dir=out, progress=False, resume=info.value.run_id))
    run = MlflowClient(default_tracking_uri(out)).get_run(result.run_id)
    assert result.status == "FINISHED" and len(run.inputs.dataset_inputs) == 3
    assert len(run.outputs.model_outputs) == 1


@pytest.mark.parametrize("fmt", ["torch.export", "torchscript", "onnx"])
def test_export_gives_the_checkpoints_logits(finished, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnx")
    out, spec, result = finished
    target = out / "exports" / f"tiny.{fmt}"
    done = run_cli("export", result.run_id, "--format", fmt, "--output", str(target), "--output-dir", str(out))
    assert done.returncode == 0, done.stderr
    assert f"{fmt}: {target}" in done.stdout and "equal the checkpoint's" in done.stdout
    _, eager = load_model(result.checkpoint)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        if fmt == "torch.export":
            got = torch.export.load(str(target)).module()(x)
        elif fmt == "torchscript":
            got = torch.jit.load(str(target))(x)
        else:
            import onnx
            from onnx.reference import ReferenceEvaluator

            got = torch.from_numpy(ReferenceEvaluator(onnx.load(str(target))).run(None, {"images": x.numpy()})[0])
        assert torch.allclose(got, eager(x), atol=1e-4)


def test_export_refuses_a_file_that_does_not_match(finished, monkeypatch):
    """The check is real: an exported file whose logits are off is reported, exit code 1."""
    from cli import main
    from runs import export

    real = export._torchscript
    monkeypatch.setattr(export, "_torchscript", lambda *a: (lambda x, run=real(*a): run(x) + 1e-2))
    out, _, result = finished
    assert main(["export", str(result.checkpoint), "--format", "torchscript", "--output-dir", str(out)]) == 1


def test_export_without_onnx_and_bad_refs_are_one_line(finished, monkeypatch, capsys, tmp_path):
    import importlib.util

    from cli import main

    out, _, result = finished
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else find(name, *a))
    assert main(["export", result.run_id, "--format", "onnx", "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err.strip() == ("--format: ONNX export needs the onnx package: pip install onnx (or "
                                               "choose --format torch.export or torchscript)")
    assert main(["export", str(tmp_path / "none.ckpt"), "--format", "torchscript"]) == 2
    assert capsys.readouterr().err.strip().endswith("none.ckpt: no such checkpoint")
    assert main(["run", "specs/fmnist_resnet20.yaml", "--register", "a/b"]) == 2
    assert capsys.readouterr().err.strip().startswith("--register: Invalid model name 'a/b'")


class BarProbe(pl.Callback):
    """Reads the rich bar's description and metrics at the end of each training batch."""

    def __init__(self):
        self.seen: list[tuple[str, dict]] = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        bar = next(c for c in trainer.callbacks if type(c).__name__ == "EpochBar")
        task = bar.progress.tasks[bar.train_progress_bar_id]
        self.seen.append((task.description, bar.get_metrics(trainer, pl_module)))


def test_the_progress_bar_counts_epochs_from_one_and_shows_train_loss(fashion_mnist, tmp_path):
    probe = BarProbe()
    spec = tiny_spec(fashion_mnist, "train.epochs=2", "train.limit_batches=2")
    result = train(spec, RunOptions(output_dir=tmp_path / "outputs", progress=True, callbacks=[probe]))
    assert result.status == "FINISHED"
    assert [d.strip() for d, _ in probe.seen] == ["Epoch 1/2", "Epoch 1/2", "Epoch 2/2", "Epoch 2/2"]
    losses = [m["train loss"] for _, m in probe.seen]
    assert all(math.isfinite(v) and v > 0 for v in losses)
    assert losses[1] == pytest.approx(result.history[0]["train/loss"], abs=1e-4)   # epoch 1's mean so far


def test_every_figure_draws_train_dashed_and_validation_bold():
    from runs.plots import TRAIN_STYLE, VAL_STYLE, error_curves_figure
    from search.plots import arm_curves_figure

    history = [{"epoch": e, "train/error": 0.5 / e, "val/error": 0.6 / e} for e in (1, 2, 3)]
    seeds = [{e: {"train/error": 0.5 / e + d, "val/error": 0.6 / e + d} for e in (1, 2, 3)} for d in (0.0, 0.02)]
    for fig in (error_curves_figure({"run": history}), arm_curves_figure({"A": seeds, "B": seeds})):
        lines = fig.axes[0].lines
        train = [ln for ln in lines if "train" in ln.get_label()]
        val = [ln for ln in lines if "train" not in ln.get_label()]
        assert train and val
        assert all(ln.get_linestyle() == "--" and ln.get_linewidth() == TRAIN_STYLE["linewidth"] for ln in train)
        assert all(ln.get_linestyle() == "-" and ln.get_linewidth() == VAL_STYLE["linewidth"] for ln in val)


def test_ablation_curves_carry_a_band_of_one_std_over_seeds():
    import numpy as np

    from search.plots import arm_curves_figure

    seeds = [{e: {"train/error": 0.30 + d, "val/error": 0.40 + 2 * d} for e in (1, 2)} for d in (0.0, 0.1, 0.2)]
    ax = arm_curves_figure({"A": seeds}).axes[0]
    bands = ax.collections
    assert len(bands) == 2                                        # train and validation
    val_band = bands[1].get_paths()[0].vertices
    std = 100 * np.std([0.40, 0.60, 0.80], ddof=1)
    assert val_band[:, 1].max() == pytest.approx(60 + std) and val_band[:, 1].min() == pytest.approx(60 - std)
    assert "n=3" in ax.lines[1].get_label()


def test_pareto_front_is_a_staircase_in_the_metrics_units():
    from search.plots import pareto_figure

    front = [(0.30, 2e6), (0.20, 5e6), (0.10, 4e7)]
    ax = pareto_figure([*front, (0.35, 6e6)], front, ["val/error", "macs"], ["minimize", "minimize"]).axes[0]
    (stairs,) = [ln for ln in ax.lines if ln.get_label() == "Pareto front"]
    assert stairs.get_drawstyle() == "steps-post"
    assert list(stairs.get_xdata()) == [2.0, 5.0, 40.0] and list(stairs.get_ydata()) == pytest.approx([30, 20, 10])
    assert ax.get_xlabel() == "multiply-accumulates (M) (minimize)"
    assert ax.get_ylabel() == "validation error (%) (minimize)"
