"""The training recipe: per-step learning-rate factors (against torch's own schedulers and the paper's numbers),
weight-decay groups, optimizers. Fast: no training."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from arches import build_model, load_spec
from arches.schema import TrainSpec
from runs.recipe import (ONECYCLE_PCT_START, build_optimizer, build_scheduler, lr_schedule, param_groups,
                         total_steps)


def recipe(**kw) -> TrainSpec:
    return TrainSpec.model_validate(kw)


def lrs_of(scheduler_factory, steps: int, lr: float = 0.1) -> list[float]:
    """The lr used at each optimizer step 0..steps-1 by a torch scheduler stepped after every step."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = scheduler_factory(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_paper_multistep_in_iterations():
    """He et al. 2015 CIFAR: 0.1, /10 at 32k and 48k iterations, stop at 64k."""
    t = recipe(lr=0.1, epochs=None, max_steps=64000,
               schedule={"type": "multistep", "milestones": [32000, 48000], "unit": "step"})
    f = lr_schedule(t, steps_per_epoch=352)
    assert f.total == 64000
    lr = {k: t.lr * f(k) for k in (0, 31999, 32000, 47999, 48000, 63999)}
    assert lr[0] == pytest.approx(0.1) and lr[31999] == pytest.approx(0.1)
    assert lr[32000] == pytest.approx(0.01) and lr[47999] == pytest.approx(0.01)
    assert lr[48000] == pytest.approx(0.001) and lr[63999] == pytest.approx(0.001)


def test_multistep_epochs_matches_torch_multisteplr():
    spe, epochs = 7, 6
    t = recipe(lr=0.1, epochs=epochs, schedule={"type": "multistep", "milestones": [2, 4], "unit": "epoch",
                                                "gamma": 0.2})
    mine = lrs_of(lambda o: build_scheduler(o, t, spe), spe * epochs)
    ref = lrs_of(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [2 * spe, 4 * spe], gamma=0.2), spe * epochs)
    assert mine == pytest.approx(ref)
    assert mine[2 * spe - 1] == pytest.approx(0.1) and mine[2 * spe] == pytest.approx(0.02)


def test_cosine_matches_torch_and_reaches_floor():
    t = recipe(lr=0.1, epochs=5, schedule={"type": "cosine", "min_lr": 0.001})
    steps = 5 * 10
    mine = lrs_of(lambda o: build_scheduler(o, t, 10), steps)
    ref = lrs_of(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=steps, eta_min=0.001), steps)
    assert mine == pytest.approx(ref, rel=1e-6, abs=1e-9)
    f = lr_schedule(t, 10)
    assert t.lr * f(steps) == pytest.approx(0.001)
    assert t.lr * f(steps // 2) == pytest.approx((0.1 + 0.001) / 2)


def test_onecycle_matches_torch_onecyclelr():
    t = recipe(lr=0.4, epochs=4, schedule={"type": "onecycle"})
    spe = 25
    steps = 4 * spe
    mine = lrs_of(lambda o: build_scheduler(o, t, spe), steps, lr=0.4)
    ref = lrs_of(lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.4, total_steps=steps,
                                                                cycle_momentum=False), steps, lr=0.4)
    assert mine == pytest.approx(ref, rel=1e-6)
    peak = max(range(steps), key=lambda k: mine[k])
    assert peak == round(ONECYCLE_PCT_START * steps) - 1 and mine[peak] == pytest.approx(0.4)


def test_constant_schedule():
    t = recipe(lr=0.05, epochs=2, schedule={"type": "constant"})
    assert {t.lr * lr_schedule(t, 10)(k) for k in range(20)} == {0.05}


def test_he_constant_warmup_resnet110():
    """ResNet-110: lr 0.01 for the first 400 iterations, then 0.1 (until the first milestone)."""
    spec = load_spec("specs/resnet110.yaml")
    f = lr_schedule(spec.train, steps_per_epoch=352)
    lr = [spec.train.lr * f(k) for k in (0, 200, 399, 400, 31999, 32000)]
    assert lr == pytest.approx([0.01, 0.01, 0.01, 0.1, 0.1, 0.01])


def test_linear_warmup_ramps_then_follows_schedule():
    t = recipe(lr=1.0, epochs=10, warmup={"steps": 10, "start_factor": 0.1},
               schedule={"type": "multistep", "milestones": [5], "unit": "epoch"})
    f = lr_schedule(t, steps_per_epoch=10)
    assert [f(k) for k in (0, 5, 10, 49, 50)] == pytest.approx([0.1, 0.55, 1.0, 1.0, 0.1])
    assert all(f(k) < f(k + 1) for k in range(9))


def test_total_steps_takes_the_earlier_end():
    assert total_steps(recipe(epochs=3), 100) == 300
    assert total_steps(recipe(epochs=3, max_steps=250), 100) == 250
    assert total_steps(recipe(epochs=None, max_steps=64000), 352) == 64000


def test_no_decay_on_bn_and_bias():
    model = build_model(load_spec("specs/resnet20.yaml"))
    decay, no_decay = param_groups(model, 1e-4, decay_bn_and_bias=False)
    bn_and_bias = {id(p) for n, p in model.named_parameters() if p.ndim == 1}
    assert {id(p) for p in no_decay["params"]} == bn_and_bias and no_decay["weight_decay"] == 0
    assert all(p.ndim > 1 for p in decay["params"]) and decay["weight_decay"] == 1e-4
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    (single,) = param_groups(model, 1e-4, decay_bn_and_bias=True)
    assert single["weight_decay"] == 1e-4 and len(single["params"]) == len(list(model.parameters()))


def test_optimizers():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    sgd = build_optimizer(model, recipe(optimizer="sgd", lr=0.3, momentum=0.8, nesterov=True))
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["momentum"] == 0.8 and sgd.defaults["nesterov"] and sgd.defaults["lr"] == 0.3
    adamw = build_optimizer(model, recipe(optimizer="adamw", lr=1e-3, weight_decay=0.05, decay_bn_and_bias=False))
    assert isinstance(adamw, torch.optim.AdamW)
    assert sorted(g["weight_decay"] for g in adamw.param_groups) == [0.0, 0.05]


def test_schedule_state_is_plain_data():
    """The LambdaLR state goes into checkpoints that load with weights_only=True."""
    import io

    t = recipe(epochs=2, schedule={"type": "multistep", "milestones": [1]})
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_scheduler(opt, t, 5)
    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["lr_lambdas"][0]["milestones"] == [5]
    assert not math.isnan(state["base_lrs"][0])


@pytest.mark.parametrize("path, family", [("specs/resnet20.yaml", "resnet"), ("specs/resnet110.yaml", "resnet"),
                                          ("specs/wrn_28_10.yaml", "wrn"), ("specs/plain56.yaml", "plain"),
                                          ("specs/preact_resnet164.yaml", "preact_resnet"),
                                          ("specs/resnext29_8x64d.yaml", "resnext"),
                                          ("specs/fmnist_resnet20.yaml", "fmnist_resnet")])
def test_experiment_per_family(path, family):
    from runs.mlflow_write import experiment_name

    assert experiment_name(load_spec(path)) == family


def test_params_fit_mlflow_limits():
    from runs.mlflow_write import MAX_KEY, MAX_PARAM_VALUE, spec_params

    spec = load_spec("specs/resnet20.yaml", [("description", "x" * 10000)])
    params = {p.key: p.value for p in spec_params(spec)}
    assert params["block.shortcut"] == "A" and params["train.schedule.milestones.1"] == "48000"
    assert len(params["description"]) == MAX_PARAM_VALUE
    assert all(len(k) <= MAX_KEY for k in params)
