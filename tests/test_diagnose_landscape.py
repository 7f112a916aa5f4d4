"""The loss landscape (Li et al. 2018): filter-normalised directions, exact curvature, `diagnose --landscape`."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from arches import build_model, load_spec
from conftest import ROOT
from diagnose.landscape import LossOnData, local_minima, random_direction, second_differences, shifted
from test_diagnose import TINY_FM, trained  # noqa: F401  (the tiny trained ResNet, a module fixture)

SPECS = ROOT / "specs"
SMALL = ["data.name=synthetic", "input.channels=1", "input.size=8", "width_multiplier=0.5",
         "stages.0.depth=1", "stages.1.depth=1", "stages.2.depth=1"]


def small(name: str, seed: int = 0):
    return build_model(load_spec(SPECS / f"{name}.yaml", SMALL + [f"train.seed={seed}"]))


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out.squeeze(-1) - y) ** 2).mean()


def quadratic_problem(seed: int = 0):
    """Least squares: L(w) = mean((Xw - y)^2) has Hessian 2 X^T X / n, so d^T H d is known in closed form."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randn(40, generator=g, dtype=torch.float64)
    model = nn.Linear(5, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 5, generator=g, dtype=torch.float64))
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]      # two batches of different sizes: the mean is weighted
    return model, x, y, batches


def test_curvature_and_line_of_a_quadratic_are_the_closed_form():
    model, x, y, batches = quadratic_problem()
    loss = LossOnData(model, batches, loss=mse, accuracy=False)
    d = random_direction(model, seed=3)
    w, v = model.weight.detach().ravel(), d["weight"].ravel()
    hessian = 2 * x.T @ x / len(y)
    assert loss.curvature(d) == pytest.approx(float(v @ hessian @ v), rel=1e-10)
    alphas = [-1.0, -0.5, 0.0, 0.5, 1.0]
    line = [loss(shifted(loss.theta, (a, d)))[0] for a in alphas]
    by_hand = [float(((x @ (w + a * v) - y) ** 2).mean()) for a in alphas]
    assert line == pytest.approx(by_hand, rel=1e-12)
    inner = second_differences(alphas, line)[1:-1]      # a quadratic's second differences are its curvature
    assert inner == pytest.approx([float(v @ hessian @ v)] * 3, rel=1e-8)


def test_filter_normalisation_layer_by_layer():
    model = small("resnet20")
    d = random_direction(model, seed=7)
    g = torch.Generator().manual_seed(7)
    for name, p in model.named_parameters():
        raw = torch.randn(p.shape, generator=g)
        if p.dim() <= 1:                                # biases and BN weights stay put (Li et al.'s biasbn)
            assert torch.count_nonzero(d[name]) == 0, name
            continue
        for i in range(p.shape[0]):                     # every filter: the weight's norm, the draw's orientation
            assert d[name][i].norm() == pytest.approx(float(p[i].norm()), rel=1e-5), (name, i)
            unit = raw[i] / raw[i].norm()
            assert torch.allclose(d[name][i] / d[name][i].norm(), unit, atol=1e-6), (name, i)
    moved = random_direction(model, seed=7, ignore="none")
    assert all(torch.equal(moved[n], p.detach()) for n, p in model.named_parameters() if p.dim() <= 1)


def test_the_same_seed_gives_the_same_directions_to_networks_of_the_same_shapes():
    a, b = small("plain20", seed=0), small("resnet20", seed=1)   # option A shortcuts: no extra parameters
    shapes = lambda m: [(n, p.shape) for n, p in m.named_parameters()]  # noqa: E731
    assert shapes(a) == shapes(b)
    da, db, other = random_direction(a, 5), random_direction(b, 5), random_direction(b, 6)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for name, p in pa.items():
        if p.dim() > 1:                                 # per filter: the same direction at each net's scale
            dims = tuple(range(1, p.dim()))
            ua = da[name] / torch.linalg.vector_norm(pa[name].detach(), dim=dims, keepdim=True)
            ub = db[name] / torch.linalg.vector_norm(pb[name].detach(), dim=dims, keepdim=True)
            assert torch.allclose(ua, ub, atol=1e-6), name
    first = next(n for n, p in pb.items() if p.dim() > 1)
    assert not torch.allclose(db[first], other[first])          # another seed, another direction


def test_the_centre_is_the_stored_network_and_nothing_is_changed():
    model = small("resnet20").eval()
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 10, (12,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = LossOnData(model, [(x, y)])
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(model(x), y))
    assert loss(loss.theta)[0] == pytest.approx(expected, rel=1e-6)
    d = random_direction(model, 0)
    loss(shifted(loss.theta, (0.5, d)))
    loss.curvature(d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_local_minima_counts_bowls():
    axis = torch.linspace(-1, 1, 9)
    bowl = (axis[:, None] ** 2 + axis[None, :] ** 2).tolist()
    assert local_minima(bowl) == 1
    wavy = (torch.cos(6 * axis[:, None]) + torch.cos(6 * axis[None, :])).tolist()
    assert local_minima(wavy) > 1


# ---------------------------------------------------------------- the command line

def diagnose(capsys, trained, spec: str, *args: str) -> tuple[int, str, str]:
    from cli import main

    try:
        code = main(["diagnose", str(SPECS / f"{spec}.yaml"), "--set", *TINY_FM, *args,
                     "--tracking-uri", trained["uri"], "--output-dir", str(trained["out"])])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_landscape_logs_the_grid_and_figures_in_one_run(capsys, trained):
    from mlflow.tracking import MlflowClient
    from runs.checkpoint import load_model

    run_id = trained["run_id"]
    code, out, err = diagnose(capsys, trained, "resnet20", "--landscape", "--checkpoint", run_id, "--images",
                              "96", "--line=-1:1:5", "--surface=-0.5:0.5:3", "--directions", "2",
                              "--run", run_id)
    assert code == 0, err
    client = MlflowClient(trained["uri"])
    parent = client.get_run(run_id)
    (child,) = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{run_id}' and tags.`reslab.diagnostic` = 'landscape'")
    assert child.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"landscape.json", "landscape_line.png", "landscape_contour.png", "sharpness.png"} <= artifacts
    (result,) = json.loads(Path(client.download_artifacts(child.info.run_id, "landscape.json",
                                                          str(trained["out"]))).read_text())["results"]
    assert result["alphas"] == pytest.approx([-1, -0.5, 0, 0.5, 1])
    assert len(result["surface_loss"]) == 3 and all(len(row) == 3 for row in result["surface_loss"])
    assert len(result["curvatures"]) == 2 and result["images"] == 96
    # the centre of the line and of the surface is the checkpoint's own loss on those 96 training images
    assert result["line_loss"][2] == pytest.approx(result["loss"]) == pytest.approx(result["surface_loss"][1][1])
    _, model = load_model(run_id, trained["uri"])
    from diagnose.landscape_suite import training_batches
    spec = load_spec(SPECS / "resnet20.yaml", TINY_FM)      # the data of the spec on the command line
    batches = training_batches(spec, 96, torch.device("cpu"))
    assert sum(len(y) for _, y in batches) == 96
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(batches, training_batches(spec, 96, torch.device("cpu"))))
    with torch.no_grad():
        by_hand = sum(float(nn.functional.cross_entropy(model(x), y, reduction="sum")) for x, y in batches) / 96
    assert result["loss"] == pytest.approx(by_hand, rel=1e-5)
    label = f"resnet20:{run_id[:8]}"
    assert child.data.metrics[f"curvature_n/{label}"] == 2
    assert child.data.metrics[f"curvature/{label}"] == pytest.approx(sum(result["curvatures"]) / 2)


@pytest.mark.parametrize("spec, args, message", [
    ("plain20", ["--checkpoint", "{run}"], "is not the network .*plain20.yaml describes"),
    ("resnet20", ["--checkpoint", "{run}", "--surface=-1:1:400", "--images", "500", "--max-minutes", "0.05"],
     r"--surface: the landscape needs 160\d+ loss evaluations .* over --max-minutes 0.05"),
    ("resnet20", ["--checkpoint", "{run}", "--line=-1:1"], "--line must be MIN:MAX:N"),
    ("resnet20", ["--checkpoint", "{run}", "--surface", "1:-1:5"], "MIN must be below MAX"),
    ("resnet20", ["--checkpoint", "{run}", "--line=-1:1:1000"], "N must be 2..401 points"),
    ("resnet20", ["--checkpoint", "{run}", "--images", "0"], "--images must be 1..60000"),
    ("resnet20", [], "--landscape maps the loss around a trained network: give --checkpoint"),
])
def test_cli_bad_landscape_requests_get_one_line_and_exit_2(capsys, trained, spec, args, message):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(trained["uri"])
    before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    code, out, err = diagnose(capsys, trained, spec, "--landscape",
                              *[a.format(run=trained["run_id"]) for a in args])
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == before
