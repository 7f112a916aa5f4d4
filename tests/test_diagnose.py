"""Diagnostics: gradient norms and shattered-gradient correlation, lesions, the `diagnose` command."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from arches import build_model, load_spec
from arches.errors import ReslabError
from conftest import ROOT, run_cli
from diagnose import (block_gradient_norms, gradient_correlation, lesion_study, lesioned, line_between,
                      neighbour_correlation, network_depth, path_gradients, resolve_blocks)
from diagnose.gradients import bn_mode

SPECS = ROOT / "specs"
# a CIFAR-style net shrunk to run in milliseconds: 8x8 single-channel input, widths 8/16/32
SMALL = ["data.name=synthetic", "input.channels=1", "input.size=8", "width_multiplier=0.5"]
# the same at Fashion-MNIST's shape, one block per stage, widths 4/8/16 (for the command-line tests)
TINY_FM = ["data.name=fashion-mnist", "input.channels=1", "input.size=28", "width_multiplier=0.25",
           "stages.0.depth=1", "stages.1.depth=1", "stages.2.depth=1"]


def small(name: str, depth: int = 3, seed: int = 0, *extra: str):
    spec = load_spec(SPECS / f"{name}.yaml", SMALL + [f"stages.{s}.depth={depth}" for s in range(3)]
                     + [f"train.seed={seed}", *extra])
    return build_model(spec)


def endpoints(seed: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.randn(2, 1, size, size, generator=torch.Generator().manual_seed(seed))
    return a, b


# ---------------------------------------------------------------- gradient correlation

def test_line_between_runs_from_a_to_b_evenly():
    a, b = torch.zeros(3), torch.ones(3) * 2
    path = line_between(a, b, 5)
    assert path.shape == (5, 3)
    assert torch.equal(path[0], a) and torch.equal(path[-1], b)
    assert torch.allclose(path[:, 0], torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0]))


def test_a_linear_net_has_perfectly_correlated_gradients():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 10))
    a, b = endpoints(1)
    r = torch.randn(10)
    grads = path_gradients(lambda x: net(x) @ r, line_between(a, b, 64))
    assert grads.shape == (64, 64)
    assert neighbour_correlation(grads) == pytest.approx(1.0, abs=1e-9)
    assert neighbour_correlation(grads, lag=40, kind="pearson") == pytest.approx(1.0, abs=1e-9)
    corr, by_lag = gradient_correlation(net, a, b, points=64, bn="eval")
    assert corr == pytest.approx(1.0, abs=1e-6) and all(c == pytest.approx(1.0, abs=1e-6) for c in by_lag)


def test_correlation_detects_gradients_that_flip_sign():
    # fn = |x . w| has gradient +w on one side of the hyperplane and -w on the other: one flip on the path
    w = torch.randn(16)
    grads = path_gradients(lambda x: (x.flatten(1) @ w).abs(), line_between(-w, w, 10))
    assert neighbour_correlation(grads) == pytest.approx(7 / 9, abs=1e-9)   # 8 of 9 pairs +1, one pair -1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plain_net_decorrelates_faster_than_the_residual_net_of_equal_depth(seed):
    a, b = endpoints(seed)
    plain, _ = gradient_correlation(small("plain20", 3, seed), a, b, points=64, seed=seed)
    residual, _ = gradient_correlation(small("resnet20", 3, seed), a, b, points=64, seed=seed)
    assert residual > plain + 0.3


def test_plain_nets_lose_gradient_correlation_with_depth():
    shallow = deep = 0.0
    for seed in range(3):
        a, b = endpoints(seed)
        shallow += gradient_correlation(small("plain20", 1, seed), a, b, points=64, seed=seed)[0] / 3
        deep += gradient_correlation(small("plain20", 5, seed), a, b, points=64, seed=seed)[0] / 3
    assert shallow > deep + 0.2


def test_measurements_leave_the_network_as_they_found_it():
    model = small("resnet20", 1).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a, b = endpoints(0)
    gradient_correlation(model, a, b, points=16, bn="batch")
    block_gradient_norms(model, torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # BN running stats untouched
    assert model.training and all(m.training for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    with bn_mode(model, "batch"):
        assert not model.training and all(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


# ---------------------------------------------------------------- block gradient norms

def test_block_gradient_norms_match_autograd_on_the_block_outputs():
    model = small("plain20", 2)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    norms = block_gradient_norms(model, x, y, bn="batch")
    assert [name for name, _ in norms] == [name for name, _ in model.blocks()]

    outputs = []
    handles = [b.register_forward_hook(lambda m, i, o: outputs.append(o)) for _, b in model.blocks()]
    with bn_mode(model, "batch"):
        loss = nn.functional.cross_entropy(model(x), y)
        expected = [float(g.norm()) for g in torch.autograd.grad(loss, outputs)]
    for h in handles:
        h.remove()
    assert [n for _, n in norms] == pytest.approx(expected, rel=1e-5)
    assert all(n > 0 for n in expected)


def test_network_depth_counts_weighted_layers_as_the_papers():
    for name, depth in (("plain20", 20), ("resnet56", 56)):
        assert network_depth(build_model(load_spec(SPECS / f"{name}.yaml"))) == depth


# ---------------------------------------------------------------- lesions

def test_lesion_of_an_identity_initialised_residual_net_changes_nothing_outside_downsampling():
    model = small("resnet20", 2, 0, "block.zero_init_residual=true", "block.shortcut=B").eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        intact = model(x)
        for name, block in model.blocks():
            with lesioned(model, [name]):
                out = model(x)
            if not (block.stride != 1 or block.in_channels != block.out_ch):
                assert torch.allclose(out, intact, atol=1e-6), name
        assert torch.equal(model(x), intact)          # every block restored
    assert not any("forward" in vars(b) for _, b in model.blocks())


def test_lesion_of_a_plain_net_changes_its_outputs():
    model = small("plain20", 2).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        intact = model(x)
        for name, _ in model.blocks():
            with lesioned(model, [name]):
                assert not torch.allclose(model(x), intact, atol=1e-4), name
        assert torch.equal(model(x), intact)


def test_lesion_study_reports_every_block_and_restores_training_mode():
    model = small("resnet20", 1).train()
    batches = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))]
    intact, rows = lesion_study(model, batches)
    assert [r.block for r in rows] == ["layer1.0", "layer2.0", "layer3.0"]
    assert [r.downsampling for r in rows] == [False, True, True]
    assert all(0 <= r.accuracy <= 1 and r.drop == pytest.approx(intact - r.accuracy) for r in rows)
    assert model.training


def test_unknown_block_names_get_a_did_you_mean():
    with pytest.raises(ReslabError, match=r"no block 'layer2\.9'.*did you mean 'layer2\.0'"):
        resolve_blocks(small("resnet20", 1), ["layer2.9"])


def test_checkpoints_match_specs_by_the_network_they_build():
    from diagnose.suite import architecture_diff

    spec_wide = load_spec(SPECS / "plain20.yaml", SMALL)
    per_stage = load_spec(SPECS / "resnet20.yaml", SMALL + [f"stages.{s}.block={{type: plain}}" for s in range(3)])
    assert architecture_diff(spec_wide, per_stage) == {}
    other_recipe = load_spec(SPECS / "plain20.yaml", SMALL + ["train.lr=0.01", "data.test_subset=10"])
    assert architecture_diff(spec_wide, other_recipe) == {}
    deeper = load_spec(SPECS / "plain20.yaml", SMALL + ["stages.2.depth=4"])
    assert architecture_diff(spec_wide, deeper) == {"stages.2.depth": (3, 4)}


# ---------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny ResNet trained for one epoch on 2,000 Fashion-MNIST images, recorded in a fresh MLflow store."""
    from conftest import FASHION_MNIST
    from runs.fit import RunOptions, train
    from runs.mlflow_client import default_tracking_uri

    if not (FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.fail("Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
    out = tmp_path_factory.mktemp("trained") / "outputs"
    uri = default_tracking_uri(out)
    recipe = ["data.train_subset=2000", "data.val_size=200", "train.epochs=1", "train.max_steps=null",
              "train.batch_size=64", "train.lr=0.05", "train.schedule.type=constant"]
    result = train(load_spec(SPECS / "resnet20.yaml", TINY_FM + recipe),
                   RunOptions(tracking_uri=uri, output_dir=out, progress=False))
    assert result.status == "FINISHED" and result.checkpoint
    return {"run_id": result.run_id, "uri": uri, "out": out, "checkpoint": result.checkpoint}


def diagnose_in_process(capsys, *args: str) -> tuple[int, str, str]:
    from cli import main

    try:
        code = main(["diagnose", *args])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_gradients_logs_one_run_with_metrics_and_plots(fashion_mnist, outputs):
    specs = [str(SPECS / "plain20.yaml"), str(SPECS / "resnet20.yaml")]
    proc = run_cli("diagnose", *specs, "--set", *TINY_FM, "--gradients", "--seeds", "2", "--points", "32",
                   "--batch-size", "32", "--output-dir", str(outputs))
    assert proc.returncode == 0, proc.stderr
    assert "plain20" in proc.stdout and "resnet20" in proc.stdout and "±" in proc.stdout

    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{outputs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("diagnostics")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["reslab.diagnostic"] == "gradients"
    metrics = run.data.metrics
    for name in ("plain20", "resnet20"):
        assert -1 <= metrics[f"grad_corr/{name}"] <= 1
        assert metrics[f"grad_corr_n/{name}"] == 2 and metrics[f"grad_corr_std/{name}"] >= 0
        assert metrics[f"depth/{name}"] == 8
        history = client.get_metric_history(run.info.run_id, f"grad_norm/{name}")
        assert sorted(m.step for m in history) == [0, 1, 2] and all(m.value > 0 for m in history)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"gradient_correlation.png", "gradient_norms.png", "gradients.json"} <= artifacts
    rows = json.loads(Path(client.download_artifacts(run.info.run_id, "gradients.json", str(outputs)))
                      .read_text())["rows"]
    assert sorted((r["label"], r["seed"]) for r in rows) == [("plain20", 0), ("plain20", 1), ("resnet20", 0),
                                                             ("resnet20", 1)]
    mean = sum(r["correlation"] for r in rows if r["label"] == "plain20") / 2
    assert metrics["grad_corr/plain20"] == pytest.approx(mean)


def test_cli_lesion_of_a_trained_model_is_a_child_of_its_training_run(trained):
    run_id = trained["run_id"]
    proc = run_cli("diagnose", str(SPECS / "resnet20.yaml"), "--set", *TINY_FM, "--lesion", "--checkpoint", run_id,
                   "--limit", "300", "--run", run_id, "--tracking-uri", trained["uri"],
                   "--output-dir", str(trained["out"]))
    assert proc.returncode == 0, proc.stderr
    assert "layer2.0" in proc.stdout and "downsampling" in proc.stdout

    from mlflow.tracking import MlflowClient
    from runs.checkpoint import load_model
    from runs.data import ReslabData
    client = MlflowClient(trained["uri"])
    parent = client.get_run(run_id)
    (child,) = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert child.info.status == "FINISHED" and child.data.tags["reslab.diagnostic"] == "lesion"
    label = f"resnet20:{run_id[:8]}"
    metrics = child.data.metrics
    assert {f"lesion_acc/{label}/{b}" for b in ("layer1.0", "layer2.0", "layer3.0")} <= set(metrics)
    assert "lesion.png" in {a.path for a in client.list_artifacts(child.info.run_id)}

    # the intact accuracy is the trained model's accuracy on the same 300 test images
    spec, model = load_model(run_id, trained["uri"])
    spec = load_spec(SPECS / "resnet20.yaml", TINY_FM + ["data.test_subset=300"])
    data = ReslabData(spec)
    data.setup("test")
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in data.test_dataloader())
    assert metrics[f"intact_acc/{label}"] == pytest.approx(correct / 300)


@pytest.mark.parametrize("args, message", [
    (["resnet20", "--lesion"], "give --checkpoint"),
    (["resnet20", "--lesion", "--checkpoint", "{run}", "--blocks", "layer9.0"],
     "no block 'layer9.0' in this network (did you mean 'layer3.0'?)"),
    (["plain20", "--lesion", "--checkpoint", "{run}"],
     "is not the network .*plain20.yaml describes: block.type: 'basic' in the checkpoint, 'plain' in the spec"),
    (["resnet20", "--lesion", "--checkpoint", "{ckpt}", "--set", "stages.1.depth=2"], "stages.1.depth: 1 in the"),
    (["resnet20", "--gradients", "--readout", "first"], "--readout must be 'projection' or a logit index"),
    (["resnet20"], "say what to measure"),
    (["resnet20", "--gradients", "--run", "0123abcd"], "no MLflow run '0123abcd'"),
    (["resnet20", "--gradients", "--device", "tpu"], "--device: 'tpu' is not a device"),
    pytest.param(["resnet20", "--gradients", "--device", "cuda:0"], "--device: there is no cuda:0 here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_cli_bad_requests_get_one_line_and_exit_2(capsys, trained, args, message):
    import re

    spec, *rest = args
    rest = [a.format(run=trained["run_id"], ckpt=trained["checkpoint"]) for a in rest]
    code, out, err = diagnose_in_process(capsys, str(SPECS / f"{spec}.yaml"), "--set", *TINY_FM, *rest,
                                         "--tracking-uri", trained["uri"], "--output-dir", str(trained["out"]))
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(message if ".*" in message else re.escape(message), err), err
