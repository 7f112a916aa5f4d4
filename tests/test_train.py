"""Training one spec end to end, in process: a small ResNet learns Fashion-MNIST; the MLflow run holds params,
per-epoch metrics and artifacts; the checkpoint reloads (weights_only); NaN losses, pruning and interrupts end the
run with the right status; an interrupted run resumes into the same MLflow run."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient

from arches import build_model, load_spec, spec_hash
from conftest import measure_test_accuracy
from arches.errors import ReslabError
from runs.checkpoint import load_model
from runs.fit import Interrupted, Pruned, RunOptions, train
from runs.mlflow_client import default_tracking_uri
from runs.mlflow_write import experiment_name

# resnet8: the demo spec with one block per stage (widths 16/32/64), on a Fashion-MNIST subset.
SMALL = ["stages.0.depth=1", "stages.1.depth=1", "stages.2.depth=1", "data.val_size=1000",
         "data.test_subset=2000"]
# Measured on 2 busy shared cores, 1 thread: 6000 images x 3 epochs -> test accuracy 0.81 in ~40 s (0.76-0.81
# with lr 0.05-0.2); chance is 0.10.
LEARN_THRESHOLD = 0.70


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One outputs/ folder (MLflow sqlite store, artifacts, checkpoints) for this module's runs."""
    return tmp_path_factory.mktemp("train") / "outputs"


def small_spec(data_root: Path, *extra: str):
    return load_spec("specs/fmnist_resnet20.yaml", [*SMALL, f"data.root={data_root}", *extra])


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, f.path) if f.is_dir else {f.path}
    return out


@pytest.mark.slow
def test_small_resnet_learns_fashion_mnist_and_is_recorded(fashion_mnist, store):
    spec = small_spec(fashion_mnist, "data.train_subset=6000", "train.epochs=3")
    result = train(spec, RunOptions(output_dir=store, progress=False, tags={"purpose": "test"}))
    assert result.status == "FINISHED" and result.reason is None
    assert result.metrics["test/acc"] > LEARN_THRESHOLD
    assert result.metrics["test/error"] == pytest.approx(1 - result.metrics["test/acc"])
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert result.history[-1]["val/acc"] > result.history[0]["val/acc"] - 0.05

    client = MlflowClient(default_tracking_uri(store))
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == experiment_name(spec) == "fmnist_resnet"
    params, tags = run.data.params, run.data.tags
    assert params["block.shortcut"] == "A" and params["stages.1.width"] == "32"
    assert params["train.optimizer"] == "sgd" and params["data.name"] == "fashion-mnist"
    assert tags["spec"] == "fmnist_resnet20" and tags["block"] == "basic" and tags["shortcut"] == "A"
    assert tags["spec_hash"] == spec_hash(spec) and tags["purpose"] == "test"
    assert int(tags["params"]) > 0 and int(tags["macs"]) > 0
    assert "stages.0.depth: 3 -> 1" in tags["diff"]
    for key in ("train/loss", "train/acc", "train/error", "val/loss", "val/acc", "val/error", "lr", "images_per_s"):
        history = client.get_metric_history(result.run_id, key)
        assert sorted(m.step for m in history) == [1, 2, 3], key
    assert [m.step for m in client.get_metric_history(result.run_id, "test/acc")] == [3]
    assert run.data.metrics["test/acc"] == pytest.approx(result.metrics["test/acc"])
    assert {"spec.yaml", "model.txt", "complexity.json", "curves.png", "checkpoints/last.ckpt",
            "diff_from_base.json"} <= artifact_paths(client, result.run_id)

    # the checkpoint loads with weights_only=True, alone or through the run id, and gives the logged accuracy
    ckpt = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["spec"]["name"] == "fmnist_resnet20"
    spec_back, model = load_model(result.run_id, tracking_uri=default_tracking_uri(store))
    assert spec_hash(spec_back) == spec_hash(spec)
    correct, total = measure_test_accuracy(model, spec)
    assert total == 2000
    assert correct / total == pytest.approx(result.metrics["test/acc"], abs=1e-6)


def test_load_model_errors(store, tmp_path):
    with pytest.raises(ReslabError, match="no such checkpoint"):
        load_model(tmp_path / "missing.ckpt")
    with pytest.raises(ReslabError, match="no MLflow store at .*empty/mlflow.db"):       # a look-up makes no store
        load_model("0123456789abcdef", tracking_uri=default_tracking_uri(tmp_path / "empty"))
    assert not (tmp_path / "empty" / "mlflow.db").exists()
    made = default_tracking_uri(tmp_path / "made")
    MlflowClient(made).search_experiments()                                            # a store, without the run
    with pytest.raises(ReslabError, match="no MLflow run"):
        load_model("0123456789abcdef", tracking_uri=made)
    (tmp_path / "notes.ckpt").write_text("epoch 3 looked good\n")
    with pytest.raises(ReslabError, match=r"not a checkpoint \(a file written by torch.save"):
        load_model(tmp_path / "notes.ckpt")
    torch.save({"state_dict": {}, "extra": Path("/x")}, tmp_path / "objects.ckpt")    # a pickled Python object
    with pytest.raises(ReslabError) as info:
        load_model(tmp_path / "objects.ckpt")
    assert "weights_only=True" in str(info.value) and "weights_only=False" not in str(info.value)


class StopAfterEpoch(pl.Callback):
    """Raises `error` at the end of training epoch `epoch` (1-based), after that epoch was recorded."""

    def __init__(self, epoch: int, error: BaseException):
        self.epoch, self.error = epoch, error

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 == self.epoch:
            raise self.error


class InterruptInEpoch(pl.Callback):
    """A real Ctrl-C (SIGINT to this process) during batch `batch` of training epoch `epoch` (1-based)."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch + 1 == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGINT)


def test_interrupted_run_resumes_into_the_same_run(fashion_mnist, store):
    spec = small_spec(fashion_mnist, "data.train_subset=1024", "train.epochs=3", "train.batch_size=128",
                      "data.test_subset=256", "data.val_size=256")
    with pytest.raises(Interrupted) as info:
        train(spec, RunOptions(output_dir=store, progress=False, callbacks=[InterruptInEpoch(epoch=2, batch=3)]))
    run_id = info.value.run_id
    assert info.value.signal_name == "SIGINT" and info.value.exit_code == 130
    assert info.value.checkpoint and Path(info.value.checkpoint).exists()
    client = MlflowClient(default_tracking_uri(store))
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["state"] == "INTERRUPTED"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1]
    saved = torch.load(info.value.checkpoint, weights_only=True)
    assert saved["global_step"] == 8 + 4      # 8 steps of epoch 1, 4 of epoch 2: stopped at the batch's end

    result = train(None, RunOptions(output_dir=store, progress=False, resume=run_id))
    assert result.run_id == run_id and result.status == "FINISHED"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "1"
    for key in ("train/loss", "val/acc", "lr"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2, 3], key
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert torch.load(result.checkpoint, weights_only=True)["global_step"] == 3 * 8
    with pytest.raises(ReslabError, match="already finished"):
        train(None, RunOptions(output_dir=store, progress=False, resume=run_id))


def model_weights(checkpoint: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in torch.load(checkpoint, weights_only=True)["state_dict"].items() if k.startswith("model.")}


@pytest.mark.parametrize("augment", ["crop_flip", "rrc_flip"])
def test_a_run_stopped_mid_epoch_resumes_bit_for_bit(fashion_mnist, tmp_path, augment):
    """Ctrl-C in the middle of epoch 2, then --resume: the same batches, augmentation, weights and metrics as a run
    never stopped (the loader starts the epoch at the batch after the last one trained)."""
    spec = small_spec(fashion_mnist, "data.train_subset=768", "train.epochs=2", "train.batch_size=128",
                      "data.test_subset=256", "data.val_size=256", f"data.augment={augment}")
    whole = train(spec, RunOptions(output_dir=tmp_path / "whole", progress=False))
    with pytest.raises(Interrupted) as info:
        train(spec, RunOptions(output_dir=tmp_path / "stopped", progress=False, callbacks=[InterruptInEpoch(epoch=2, batch=2)]))
    assert torch.load(info.value.checkpoint, weights_only=True)["global_step"] == 6 + 3
    resumed = train(None, RunOptions(output_dir=tmp_path / "stopped", progress=False, resume=info.value.run_id))
    a, b = model_weights(whole.checkpoint), model_weights(resumed.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    for key in ("train/loss", "train/acc", "val/loss", "test/acc"):
        assert resumed.metrics[key] == whole.metrics[key], key


def test_resume_skips_epochs_already_recorded(fashion_mnist, store):
    """A run that died after logging an epoch but before its checkpoint: the redone epoch is not logged twice."""
    spec = small_spec(fashion_mnist, "data.train_subset=512", "train.epochs=2", "data.test_subset=256",
                      "data.val_size=256")
    with pytest.raises(Interrupted) as info:
        train(spec, RunOptions(output_dir=store, progress=False, callbacks=[StopAfterEpoch(1, KeyboardInterrupt())]))
    run_id = info.value.run_id
    client = MlflowClient(default_tracking_uri(store))
    assert [m.step for m in client.get_metric_history(run_id, "val/loss")] == [1]
    result = train(spec, RunOptions(output_dir=store, progress=False, resume=run_id))
    assert result.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "val/loss")] == [1, 2]


def test_non_finite_loss_fails_the_run(fashion_mnist, store):
    spec = small_spec(fashion_mnist, "data.train_subset=512", "train.epochs=2", "train.lr=1.0e+6",
                      "train.schedule.type=constant", "data.test_subset=256", "data.val_size=256")
    result = train(spec, RunOptions(output_dir=store, progress=False))
    assert result.status == "FAILED"
    assert "loss became" in result.reason and "step" in result.reason
    run = MlflowClient(default_tracking_uri(store)).get_run(result.run_id)
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == result.reason


def test_pruned_run_is_killed_and_reraised(fashion_mnist, store):
    spec = small_spec(fashion_mnist, "data.train_subset=512", "train.epochs=3", "data.test_subset=256",
                      "data.val_size=256")
    with pytest.raises(Pruned):
        train(spec, RunOptions(output_dir=store, progress=False, experiment="pruning", callbacks=[StopAfterEpoch(1, Pruned())]))
    client = MlflowClient(default_tracking_uri(store))
    (run,) = client.search_runs([client.get_experiment_by_name("pruning").experiment_id])
    assert run.info.status == "KILLED" and run.data.tags["state"] == "PRUNED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [1]


def test_nested_child_run(fashion_mnist, store):
    client = MlflowClient(default_tracking_uri(store))
    parent = client.create_run(client.create_experiment("parents")).info.run_id
    spec = small_spec(fashion_mnist, "data.train_subset=256", "train.epochs=1", "data.test_subset=128",
                      "data.val_size=128", "train.limit_batches=2")
    result = train(spec, RunOptions(output_dir=store, progress=False, experiment="parents", parent_run_id=parent,
                                    run_name="child"))
    run = client.get_run(result.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.info.run_name == "child"
    assert [m.step for m in client.get_metric_history(result.run_id, "train/loss")] == [1]


def test_a_run_given_only_max_steps(fashion_mnist, store):
    """epochs: null, max_steps: 6 with 4 batches an epoch: two epochs, the second cut at step 6 (it crashed when
    Lightning had not sized an epoch yet)."""
    spec = small_spec(fashion_mnist, "data.train_subset=256", "train.batch_size=64", "train.epochs=null",
                      "train.max_steps=6", "data.test_subset=128", "data.val_size=128")
    result = train(spec, RunOptions(output_dir=store, progress=False))
    assert result.status == "FINISHED", result.reason
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert "test/acc" in result.metrics


@pytest.mark.slow
def test_compiled_channels_last_run_on_cpu(fashion_mnist, store):
    """train.compile and train.channels_last (the GPU settings) also run on CPU: the compiled forward trains and
    tests, the checkpoint keeps the plain module's keys, and the eager model reloaded from it scores the same."""
    spec = small_spec(fashion_mnist, "data.train_subset=500", "train.epochs=1", "data.test_subset=300",
                      "data.val_size=100", "train.compile=true", "train.channels_last=true", "data.augment=none")
    result = train(spec, RunOptions(output_dir=store, progress=False))
    assert result.status == "FINISHED", result.reason
    keys = set(torch.load(result.checkpoint, weights_only=True, map_location="cpu")["state_dict"])
    assert keys == {f"model.{k}" for k in build_model(spec).state_dict()} | {k for k in keys if "metric" in k}
    _, model = load_model(result.checkpoint)
    correct, total = measure_test_accuracy(model, spec)
    assert total == 300 and abs(correct / total - result.metrics["test/acc"]) <= 2 / total


def test_the_summary_of_a_run_whose_test_loss_was_not_finite():
    """A net that blew up only at test time: its NaN test loss is not recorded (MLflow refuses NaN); the summary
    still prints (it once raised KeyError)."""
    from runs.fit import RunResult, summary_lines

    lines = summary_lines(RunResult("r1", "FINISHED", {"test/acc": 0.1, "test/error": 0.9}), "sqlite:///x.db")
    assert lines[0] == "test accuracy 0.1000  (error 90.00%, loss nan)" and "r1" in lines[1]


def test_the_hint_after_a_run_opens_its_store(tmp_path, monkeypatch):
    """`see it:` names the store's flag (--output-dir, --tracking-uri; none for outputs/) and the program as it was
    started: `python cli.py` from a checkout, `reslab` from an installed package."""
    import sys

    from runs.fit import RunResult, summary_lines
    from runs.mlflow_client import default_tracking_uri

    result = RunResult("r1", "FINISHED", {})
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RESLAB_PROGRAM", raising=False)          # (what `python cli.py` tells its workers)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/reslab", "run"])
    mine = tmp_path / "runs" / "x"
    assert summary_lines(result, default_tracking_uri(mine), "runs/x")[-1].startswith(
        "see it: reslab ui --output-dir runs/x   (or: mlflow ui --backend-store-uri sqlite:///")
    assert summary_lines(result, default_tracking_uri("outputs"), "outputs")[-1].startswith("see it: reslab ui   (")
    monkeypatch.setattr(sys, "argv", ["cli.py", "run"])
    assert summary_lines(result, "sqlite:////data/m.db", "outputs")[-1].startswith(
        "see it: python cli.py ui --tracking-uri sqlite:////data/m.db")
    assert summary_lines(result, "http://host:5000")[-1].startswith("see it: http://host:5000/#/experiments")
