"""Packs (runs/pack.py): members trained together equal their solo runs; failures, pruning, resume, checkpoints."""
from __future__ import annotations

import math

import pytest
import torch

from arches import BLOCKS, SHORTCUTS, build_model, load_spec
from arches.errors import ReslabError
from runs.checkpoint import load_model
from runs.module import ReslabModule
from runs.pack import FUSIBLE, Pack, PackError, check_pack, fusible_key, train_alone

LOSS_TOLERANCE = 1e-5     # relative: |pack - solo| / |solo|, every epoch's train and val loss, the test loss
WEIGHT_TOLERANCE = 1e-5   # relative, final weights: max|pack - solo| over every tensor / the network's max|solo|
# (per tensor, small BN biases reach 5e-3: a few small-lr steps leave them ~1e-4, and their gradients are sums that
# cancel, which the batched kernels round otherwise; AdamW divides such gradients by their own scale)
ADAMW_WEIGHT_TOLERANCE = 1e-4
TINY = ["data.name=synthetic", "input.channels=1", "input.size=16", "classes=10", "data.synthetic_size=96",
        "data.val_size=32", "data.augment=crop_flip", "train.batch_size=16", "train.epochs=2", "train.max_steps=null",
        "stem.width=8", "stages=[{depth: 1, width: 8, stride: 1}, {depth: 1, width: 16, stride: 2}]",
        "train.accelerator=cpu"]
# two members that differ in every kind of fusible setting (and in seed: init, split, order, augmentation)
MEMBERS = (["train.seed=0", "train.lr=0.02", "train.schedule.type=cosine", "train.warmup.steps=3"],
           ["train.seed=1", "train.lr=0.01", "train.nesterov=true", "train.momentum=0.8", "train.label_smoothing=0.1",
            "train.weight_decay=1e-3", "train.decay_bn_and_bias=false", "train.epochs=1"])


def tiny(*overrides: str):
    return load_spec("specs/resnet20.yaml", [*TINY, *overrides])


solo = train_alone


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def solo_difference(member, module: ReslabModule) -> tuple[float, float]:
    """(largest relative difference of the per-epoch train/val losses and the test loss, largest relative difference
    of a final weight tensor) between a pack member and its solo run; the metrics' epochs and lr must agree."""
    assert len(member.history) == len(module.history)
    losses = [(member.metrics["test/loss"], module.results["test"]["test/loss"])]
    for ours, theirs in zip(member.history, module.history):
        losses += [(ours[k], theirs[k]) for k in ("train/loss", "val/loss")]
        assert ours["lr"] == pytest.approx(theirs["lr"], rel=1e-12) and ours["epoch"] == theirs["epoch"]
    solo_weights = module.model.state_dict()
    assert list(member.weights) == list(solo_weights)
    scale = max(float(v.double().abs().max()) for v in solo_weights.values())
    weights = max(float((member.weights[k].double() - v.double()).abs().max()) for k, v in solo_weights.items())
    return max(abs(a - b) / abs(b) for a, b in losses), weights / scale


def assert_as_solo(member, module: ReslabModule, weight_tolerance: float = WEIGHT_TOLERANCE) -> None:
    loss, weights = solo_difference(member, module)
    print(f"{member.spec.block.type}-{member.spec.block.shortcut} member {member.index}: loss {loss:.1e} "
          f"weights {weights:.1e}")
    assert loss <= LOSS_TOLERANCE and weights <= weight_tolerance, (loss, weights)


def same_weights(ours: dict, theirs: dict) -> bool:
    """Final weights equal within WEIGHT_TOLERANCE (relative to the network's largest weight)."""
    scale = max(float(v.double().abs().max()) for v in theirs.values())
    return max(float((ours[k].double() - v.double()).abs().max()) for k, v in theirs.items()) <= WEIGHT_TOLERANCE * scale


def _combos() -> list[tuple[str, str]]:
    """Every block type x shortcut the tiny network can be built with (a plain block has no shortcut: one)."""
    out = []
    for block in BLOCKS:
        for shortcut in SHORTCUTS if BLOCKS[block].residual else list(SHORTCUTS)[:1]:
            try:
                tiny(f"block.type={block}", f"block.shortcut={shortcut}")
            except ReslabError:
                continue
            out.append((block, shortcut))
    return out


@pytest.mark.parametrize("block,shortcut", _combos())
def test_members_train_as_alone(block, shortcut):
    specs = [tiny(f"block.type={block}", f"block.shortcut={shortcut}", *m) for m in MEMBERS]
    pack = Pack(specs)
    pack.fit()
    for i, spec in enumerate(specs):
        assert pack.finished[i].status == "FINISHED"
        assert_as_solo(pack.finished[i], solo(spec))


def test_probe_step_is_one_training_step_as_alone():
    """search.packing's memory probe trains one step as an epoch does: each member then equals its solo run stopped
    after one step."""
    calm = ["train.schedule.type=constant", "train.warmup.steps=0"]
    specs = [tiny(*m, *calm) for m in MEMBERS]
    pack = Pack(specs)
    before = {k: v.clone() for k, v in pack.member_weights(0).items()}
    pack.probe_step()
    assert pack.step == 1 and not same_weights(pack.member_weights(0), before)
    for i, member in enumerate(MEMBERS):
        alone = solo(tiny(*member, *calm, "train.max_steps=1")).model.state_dict()
        assert same_weights(pack.member_weights(i), alone)


def test_adamw_and_gates_train_as_alone():
    extra = ["train.optimizer=adamw", "train.lr=0.01", "block.variant=exclusive_gate", "block.se_ratio=0.5",
             "block.se_divisor=1"]
    specs = [tiny(*extra, *m[:1], *m[2:]) for m in MEMBERS]
    pack = Pack(specs)
    pack.fit()
    for i, spec in enumerate(specs):
        assert_as_solo(pack.finished[i], solo(spec), ADAMW_WEIGHT_TOLERANCE)


def test_nonfinite_member_is_frozen_the_others_go_on():
    good = [tiny(*MEMBERS[0]), tiny("train.seed=2", "train.lr=0.02")]
    bad = tiny("train.seed=1", "train.lr=1e6")
    together = Pack([good[0], bad, good[1]])
    together.fit()
    alone = Pack(good)
    alone.fit()
    failed = together.finished[1]
    assert failed.status == "FAILED" and "non-finite" in failed.reason
    assert failed.history[-1]["epoch"] <= 2 and failed.history[-1]["lr"] == 1e6
    for ours, theirs in ((together.finished[0], alone.finished[0]), (together.finished[2], alone.finished[1])):
        assert ours.status == "FINISHED" and len(ours.history) == 2
        assert same_weights(ours.weights, theirs.weights)
        assert all(math.isfinite(r["train/loss"]) for r in ours.history)


def test_pruned_member_leaves_and_the_pack_shrinks():
    specs = [tiny(f"train.seed={s}", "train.epochs=3") for s in range(3)]
    sizes = []
    pack = Pack(specs)
    pack.fit(prune=lambda m, row: "worse than the median" if m.index == 1 and row["epoch"] == 1 else None,
             on_epoch=lambda p, left: sizes.append(p.size))
    assert sizes == [2, 2, 0]
    assert pack.finished[1].status == "PRUNED" and len(pack.finished[1].history) == 1
    full = Pack(specs)
    full.fit()
    for i in (0, 2):
        assert same_weights(pack.finished[i].weights, full.finished[i].weights)


def test_resumed_pack_equals_an_uninterrupted_one(tmp_path):
    specs = [tiny(*m[:-1], "train.epochs=3") for m in MEMBERS]
    whole = Pack(specs)
    whole.fit()
    first = Pack(specs)
    first.run_epoch()
    path = first.save(tmp_path / "pack.ckpt")
    del first                                          # (the process that trained it is gone)
    resumed = Pack.load(path)
    assert resumed.epoch == 1 and resumed.step == resumed.steps_per_epoch
    resumed.fit()
    for i in range(2):
        timeless = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]  # noqa: E731
        assert timeless(resumed.finished[i].history) == timeless(whole.finished[i].history)
        for key, value in whole.finished[i].weights.items():
            assert torch.equal(resumed.finished[i].weights[key], value), key


def test_member_checkpoint_works_as_a_solo_one(tmp_path):
    specs = [tiny(*m) for m in MEMBERS]
    pack = Pack(specs)
    pack.fit()
    path = tmp_path / "member1.ckpt"
    torch.save(pack.member_checkpoint(1), path)
    spec, net = load_model(path)
    assert spec.model_dump() == specs[1].model_dump()
    for key, value in net.state_dict().items():
        assert torch.equal(value, pack.finished[1].weights[key])
    started = build_model(tiny(*MEMBERS[0], f"init_from={path}"), init=True)
    for key, value in started.state_dict().items():
        assert torch.equal(value, pack.finished[1].weights[key])


@pytest.mark.parametrize("overrides,expected", [
    (["train.batch_size=8"], "differs from member 0 in train.batch_size (16 vs 8), which does not fuse"),
    (["stages.1.width=32"], "differs from member 0 in stages"),
    (["block.dropout=0.1"], "cannot pack: network: layer1.0.drop is a dropout"),
    (["drop_path.rate=0.1"], "drops paths (drop_path.rate > 0)"),
    (["train.optimizer=adamw"], "train.optimizer"),
])
def test_what_does_not_pack_is_one_line(overrides, expected):
    with pytest.raises(PackError) as e:
        check_pack([tiny(), tiny(*overrides)])
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_fusible_settings_do_not_change_the_key():
    assert fusible_key(tiny(*MEMBERS[0])) == fusible_key(tiny(*MEMBERS[1]))
    assert "train.seed" in FUSIBLE
    with pytest.raises(PackError, match="stops mid-epoch"):
        Pack([tiny("train.max_steps=5")])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile_mode", [False, True])
def test_pack_on_cuda_trains_as_alone(compile_mode):
    specs = [tiny(*m, "train.accelerator=gpu", "train.precision='32'", "data.on_device=always") for m in MEMBERS]
    pack = Pack(specs, compile=compile_mode)
    assert pack.device.type == "cuda"
    pack.fit()
    for i, spec in enumerate(specs):
        module = solo(spec)
        loss, _ = solo_difference(pack.finished[i], module)
        assert loss <= 1e-3, loss        # cuDNN picks its own algorithms (and TF32) for grouped and plain convs


def test_each_member_is_its_own_mlflow_run(outputs):
    from mlflow import MlflowClient

    from runs.mlflow_write import spec_params, spec_tags
    from runs.pack_record import train_pack

    specs = [tiny(*MEMBERS[0]), tiny(*MEMBERS[1]), tiny("train.seed=2", "train.lr=1e6")]
    uri = f"sqlite:///{outputs / 'mlflow.db'}"
    results = train_pack(specs, tracking_uri=uri, output_dir=outputs)
    client = MlflowClient(uri)
    assert [r.status for r in results] == ["FINISHED", "FINISHED", "FAILED"]
    for i, (spec, result) in enumerate(zip(specs, results)):
        run = client.get_run(result.run_id)
        assert run.data.params == {p.key: p.value for p in spec_params(spec)}
        assert run.data.tags["reslab.pack_size"] == "3" and run.data.tags["reslab.pack_index"] == str(i)
        assert run.data.tags["spec_hash"] == spec_tags(spec, complexity_of(spec))["spec_hash"]
        losses = client.get_metric_history(result.run_id, "train/loss")
        assert [m.step for m in losses] == [r["epoch"] for r in result.history]
    assert len({client.get_run(r.run_id).data.tags["reslab.pack"] for r in results}) == 1
    failed = client.get_run(results[2].run_id)
    assert failed.info.status == "FAILED" and "non-finite" in failed.data.tags["failure_reason"]
    assert results[0].model_uri and "test/loss" in results[0].metrics
    spec, net = load_model(results[1].run_id, uri)          # the member's checkpoint artifact, as a solo run's
    assert spec.model_dump() == specs[1].model_dump()
    assert [f.path for f in client.list_artifacts(results[0].run_id)] >= ["checkpoints", "complexity.json"]
    from runs.fit import RunOptions, train

    with pytest.raises(ReslabError, match=r"trained in a pack; it resumes with its pack .*packs/\w+\.ckpt"):
        train(None, RunOptions(resume=results[0].run_id, tracking_uri=uri, output_dir=outputs))


def complexity_of(spec):
    from arches import complexity

    return complexity(spec)
