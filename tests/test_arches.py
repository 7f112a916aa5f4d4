"""Spec language, block library, compiler and complexity: parity with torchvision and the papers, every block
x shortcut x placement combination, identity at init, and random valid specs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from arches import (BLOCKS, PLACEMENTS, SHORTCUTS, STEMS, VARIANTS, SpecError, build_model, complexity, load_spec,
                    plan_network, spec_from_dict, spec_hash)
from arches.spec import diff_from_base

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted(p for p in (ROOT / "specs").glob("*.yaml") if not p.name.startswith("_"))

# torchvision's num_params and GMACs at 224x224, 1000 classes (shared/REFERENCES.md).
TORCHVISION = {
    "resnet18": (11_689_512, 1.814), "resnet34": (21_797_672, 3.664), "resnet50": (25_557_032, 4.089),
    "resnet101": (44_549_160, 7.801), "resnet152": (60_192_808, 11.514),
    "resnext50_32x4d": (25_028_904, 4.23), "wide_resnet50_2": (68_883_240, 11.398),
}
# The authors' published code, 10 classes (shared/REFERENCES.md); the CIFAR ResNets and timm's models are in
# tests/test_arches_references.py.
AUTHORS = {"preact_resnet110": 1_730_522, "preact_resnet164": 1_703_258, "wrn_28_10": 36_479_194,
           "wrn_16_8": 10_961_370, "resnext29_8x64d": 34_426_698}


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_imagenet_parity_with_torchvision(name):
    params, gmacs = TORCHVISION[name]
    cost = complexity(load_spec(ROOT / "specs" / f"{name}.yaml"))
    assert cost.params == params
    assert abs(cost.macs / 1e9 - gmacs) / gmacs < 0.01


@pytest.mark.parametrize("name", sorted(AUTHORS))
def test_params_equal_the_authors_code(name):
    assert complexity(load_spec(ROOT / "specs" / f"{name}.yaml")).params == AUTHORS[name]


def test_readme_exactness_table_lists_every_spec():
    """Every spec has a row: reference, its count, reslab's count (measured here) and the difference."""
    import re

    text = (ROOT / "README.md").read_text()
    row = r"^\| `(\w+)` \| ([^|]+) \| ([\d,]+|-) \| ([\d,]+) \| ([^|]+) \|$"   # spec, reference, its count, ours, diff
    rows = {m[0]: m[1:] for m in re.findall(row, text, re.M)}
    assert sorted(rows) == sorted(p.stem for p in SPECS)
    for name, (_, reference, ours, difference) in rows.items():
        params = complexity(load_spec(ROOT / "specs" / f"{name}.yaml")).params
        assert int(ours.replace(",", "")) == params, name
        if reference != "-":
            assert difference.strip() == "0" and int(reference.replace(",", "")) == params, name


def test_state_dict_names_and_shapes_are_torchvisions():
    reference = json.loads((ROOT / "tests" / "data" / "torchvision_state_dict_shapes.json").read_text())
    for name, shapes in reference.items():
        with torch.device("meta"):
            model = build_model(load_spec(ROOT / "specs" / f"{name}.yaml"))
        assert {k: list(v.shape) for k, v in model.state_dict().items()} == shapes, name


def test_complexity_rows_add_up():
    cost = complexity(load_spec(ROOT / "specs" / "resnet50.yaml"))
    assert sum(r.params for r in cost.stages) == cost.params
    assert sum(r.macs for r in cost.stages) == cost.macs
    stage_blocks = [r for r in cost.blocks if r.name.startswith("layer3.")]
    layer3 = next(r for r in cost.stages if r.name == "layer3")
    assert sum(r.macs for r in stage_blocks) == layer3.macs and layer3.blocks == 6
    assert cost.stages[-1].out_shape == (1000,) and layer3.out_shape == (1024, 14, 14)


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_every_spec_runs_forward_and_backward(path):
    spec = load_spec(path)
    size = 64 if spec.stem.type == "imagenet" else spec.input.size
    model = build_model(load_spec(path, [f"input.size={size}"]))
    x = torch.randn(2, spec.input.channels, size, size)
    out = model(x)
    assert out.shape == (2, spec.classes)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def tiny(block: dict, **extra) -> dict:
    """A two-stage net small enough for hundreds of combinations: widths 4 -> 8, channels change and stride 2."""
    return {"name": "tiny", "input": {"channels": 3, "size": 8}, "classes": 5,
            "stem": {"type": "cifar", "width": 4}, "block": block,
            "stages": [{"depth": 2, "width": 4, "stride": 1}, {"depth": 2, "width": 8, "stride": 2}], **extra}


COMBOS = [(b, s, p) for b in sorted(BLOCKS) for s in SHORTCUTS for p in PLACEMENTS]


@pytest.mark.parametrize("block,shortcut,placement", COMBOS)
def test_every_block_shortcut_placement(block, shortcut, placement):
    cfg = {"type": block, "shortcut": shortcut, "placement": placement, "cardinality": 2, "base_width": 64,
           "dropout": 0.1}
    if placement not in BLOCKS[block].supported_placements():
        with pytest.raises(SpecError, match="supports placements"):
            spec_from_dict(tiny(cfg))
        return
    model = build_model(spec_from_dict(tiny(cfg)))
    out = model(torch.randn(3, 3, 8, 8))
    assert out.shape == (3, 5) and torch.isfinite(out).all()
    out.sum().backward()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("block", ["basic", "bottleneck", "preact"])
def test_every_shortcut_variant(block, variant):
    spec = spec_from_dict(tiny({"type": block, "shortcut": "A" if block == "basic" else "B", "variant": variant,
                                "gate_bias": -6.0, "scale_residual": True}))
    model = build_model(spec)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    if variant in ("exclusive_gate", "shortcut_gate"):
        assert torch.all(model.layer1[0].gate.bias == -6.0)


IDENTITY_PLACEMENTS = ("original", "relu_preact", "relu_before_add", "full_preact")


@pytest.mark.parametrize("block", sorted(n for n, c in BLOCKS.items() if c.residual and not c.forced))
def test_zero_init_residual_block_is_identity(block):
    for placement in set(BLOCKS[block].supported_placements()) & set(IDENTITY_PLACEMENTS):
        spec = spec_from_dict(tiny({"type": block, "placement": placement, "zero_init_residual": True,
                                    "shortcut": "B"}))
        model = build_model(spec)
        blk = model.layer1[1]                         # same shape in and out: identity shortcut
        x = torch.relu(torch.randn(2, blk.in_channels, 8, 8))  # post-activation blocks see ReLU outputs
        for mode in (True, False):
            blk.train(mode)
            assert torch.allclose(blk(x), x), (block, placement, mode)


def test_option_a_zero_pads_and_subsamples():
    model = build_model(spec_from_dict(tiny({"type": "basic", "shortcut": "A"})))
    blk = model.layer2[0]
    assert not list(blk.downsample.parameters())
    x = torch.randn(1, 4, 8, 8)
    s = blk.downsample(x)
    assert s.shape == (1, 8, 4, 4)
    assert torch.equal(s[:, :4], x[:, :, ::2, ::2]) and torch.all(s[:, 4:] == 0)


def test_option_b_projects_only_on_change_and_c_everywhere():
    def projections(option):
        model = build_model(spec_from_dict(tiny({"type": "basic", "shortcut": option})))
        return [name for name, b in model.blocks() if b.downsample is not None]
    assert projections("B") == ["layer2.0"]   # the stem already gives 4 channels: only layer2.0 changes shape
    assert len(projections("C")) == 4


def test_paired_init_shares_weights_between_arms():
    base = tiny({"type": "basic", "shortcut": "A"})
    a = build_model(spec_from_dict(base)).state_dict()
    b = build_model(spec_from_dict({**base, "block": {"type": "basic", "shortcut": "C"}})).state_dict()
    shared = [k for k in a if k in b]
    assert shared and all(torch.equal(a[k], b[k]) for k in shared)
    c = build_model(spec_from_dict({**base, "train": {"seed": 1}})).state_dict()
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])


# ---- loading: inheritance, overrides, hashes -------------------------------------------------------------
def test_base_inheritance_and_overrides():
    spec = load_spec(ROOT / "specs" / "resnet56.yaml", ["block.shortcut=B", "stages.2.depth=4"])
    assert spec.name == "resnet56" and spec.train.max_steps == 64000     # from _cifar.yaml via resnet20.yaml
    assert spec.block.shortcut == "B" and [s.depth for s in spec.stages] == [9, 9, 4]
    diff = diff_from_base(spec)
    assert diff["block.shortcut"] == ("A", "B") and diff["name"] == ("resnet20", "resnet56")
    assert "stages.0.depth" in diff


def test_spec_hash_is_canonical(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("name: n\nstages: [{depth: 1, width: 8}]\ninput: {size: 16}\n")
    b = tmp_path / "b.yaml"
    b.write_text("input:\n  size: 16\nstages:\n  - width: 8\n    depth: 1\nname: n\n")
    assert spec_hash(load_spec(a)) == spec_hash(load_spec(b))
    assert spec_hash(load_spec(a)) != spec_hash(load_spec(a, ["stages.0.depth=2"]))


def test_stage_and_block_overrides():
    spec = spec_from_dict({**tiny({"type": "basic"}), "stages": [
        {"depth": 2, "width": 4, "block": {"type": "plain"}, "blocks": {1: {"type": "bottleneck", "shortcut": "C"}}},
        {"depth": 1, "width": 8, "stride": 2}]})
    types = [b.name for _, b in build_model(spec).blocks()]
    assert types == ["plain", "bottleneck", "basic"]


# ---- malformed specs: one line, file:line, exit 2 ----------------------------------------------------------
BAD = {
    "syntax": ("name: x\nstages: [{depth: 1, width: 8}\n", r"bad\.yaml:3: YAML syntax error"),
    "unknown_key": ("name: x\nstages: [{depth: 1, width: 8}]\nblock: {shortcutt: A}\n",
                    r"bad\.yaml:3: block\.shortcutt: unknown key 'shortcutt' \(did you mean 'shortcut'\?\)"),
    "wrong_type": ("name: x\nstages:\n  - {depth: three, width: 8}\n", r"bad\.yaml:3: stages\.0\.depth: .*integer"),
    "bad_choice": ("name: x\nstages: [{depth: 1, width: 8}]\nblock: {shortcut: E}\n",
                   r"bad\.yaml:3: block\.shortcut: got 'E'; expected 'A', 'B', 'C' or 'D'"),
    "unknown_block": ("name: x\nstages: [{depth: 1, width: 8}]\nblock: {type: bottelneck}\n",
                      r"bad\.yaml:3: block\.type: unknown block type 'bottelneck' \(did you mean 'bottleneck'\?\)"),
    "too_small": ("name: x\ninput: {size: 8}\nstem: {type: imagenet}\nstages:\n  - {depth: 1, width: 8}\n"
                  "  - {depth: 1, width: 8, stride: 2}\n  - {depth: 1, width: 8, stride: 2}\n",
                  r"bad\.yaml:7: stages\.2\.stride: input 8x8 is too small"),
    "shrinking_option_a": ("name: x\nblock: {type: basic, shortcut: A}\nstages:\n  - {depth: 1, width: 16}\n"
                           "  - {depth: 1, width: 8, stride: 2}\n",
                           r"bad\.yaml:2: block\.shortcut: stage 0 block 0: shortcut A \(zero-pad\) cannot reduce channels 64 -> 16"),
    "groups": ("name: x\nblock: {type: grouped, cardinality: 4, base_width: 2}\nstages: [{depth: 1, width: 8}]\n",
               r"bad\.yaml:2: block\.base_width: .*inner width"),
    "data_shape": ("name: x\ndata: {name: fashion-mnist}\nstages: [{depth: 1, width: 8}]\n",
                   r"bad\.yaml:2: data\.name: fashion-mnist has 1x28x28 images"),
    "missing": ("stages: [{depth: 1, width: 8}]\n", r"bad\.yaml:1: name: required key is missing"),
    "block_index": ("name: x\nstages:\n  - {depth: 1, width: 8, blocks: {3: {type: plain}}}\n",
                    r"bad\.yaml:3: stages\.0\.blocks\.3: block index 3 out of range"),
    "placement": ("name: x\nstages: [{depth: 1, width: 8}]\nblock: {placement: full_preat}\n",
                  r"bad\.yaml:3: block\.placement: got 'full_preat'; .* \(did you mean 'full_preact'\?\)"),
    "se_ratio": ("name: x\nstages: [{depth: 1, width: 8}]\nblock:\n  se_ratio: 16\n",
                 r"bad\.yaml:4: block\.se_ratio: must lie in \[0, 1\] .*a reduction of 16 is 0\.0625"),
    "drop_path": ("name: x\nstages: [{depth: 1, width: 8}]\ndrop_path: {rate: 1.0}\n",
                  r"bad\.yaml:3: drop_path\.rate: Input should be less than 1"),
    "stride_on": ("name: x\nblock:\n  type: basic\n  stride_on: 1x1\nstages: [{depth: 1, width: 8}]\n",
                  r"bad\.yaml:4: block\.stride_on: .*'basic' has no 1x1 conv.*: bottleneck, grouped, "
                  r"preact_bottleneck"),
    "stem": ("name: x\nstem: {type: deeep}\nstages: [{depth: 1, width: 8}]\n",
             r"bad\.yaml:2: stem\.type: got 'deeep'; expected 'imagenet', 'cifar' or 'deep' \(did you mean 'deep'\?\)"),
    "init_map": ("name: x\nstages: [{depth: 1, width: 8}]\ninit_map: {'layer(': x}\n",
                 r"bad\.yaml:3: init_map: 'layer\(' is not a regular expression"),
    "init_missing": ("name: x\nstages: [{depth: 1, width: 8}]\ninit_from: weights.pt\n",
                     r"bad\.yaml:3: init_from: no such file 'weights\.pt' \(nor an MLflow run id"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_spec_is_one_line_exit_2(case, tmp_path):
    from conftest import run_cli

    text, pattern = BAD[case]
    (tmp_path / "bad.yaml").write_text(text)
    result = run_cli("validate", "bad.yaml", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    import re
    assert re.search(pattern, lines[0]), lines[0]


def test_bad_overrides_and_files(tmp_path):
    from conftest import run_cli

    cases = [
        (["show", "nope.yaml"], r"nope\.yaml: no such file"),
        (["show", str(ROOT / "specs/resnet20.yaml"), "--set", "stages.7.depth=1"], r"--set: stages\.7: index"),
        (["show", str(ROOT / "specs/resnet20.yaml"), "--set", "depth"], r"--set expects key\.path=value"),
        (["show", str(ROOT / "specs/resnet20.yaml"), "--set", "stages.0.depth=-1"],
         r"--set: stages\.0\.depth: Input should be greater than or equal to 0"),
        (["show", str(ROOT / "specs/resnet20.yaml"), "--jsn"], r"unrecognized arguments: --jsn \(did you mean '--json'\?\)"),
        (["shwo"], r"invalid choice: 'shwo'.*did you mean 'show'"),
        (["run", str(ROOT / "specs/ablations/shortcuts.yaml")],
         r"shortcuts\.yaml: this is an ablation file, not a network spec; run it with `python cli\.py ablate "),
        (["show", str(ROOT / "specs/searches/depth_width_macs.yaml")], r"this is a search file.*`python cli\.py search "),
        (["ablate", str(ROOT / "specs/resnet20.yaml")], r"this is a network spec.*`python cli\.py run "),
    ]
    (tmp_path / "a.yaml").write_text("base: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nstages: [{depth: 1, width: 8}]\n")
    cases.append((["show", "a.yaml"], r"inheritance cycle"))
    import re
    for args, pattern in cases:
        result = run_cli(*args, cwd=tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (args, result.stderr)
        assert re.search(pattern, lines[0]), (args, lines[0])


def test_show_json_and_validate_everything():
    from conftest import run_cli

    result = run_cli("show", "specs/resnet18.yaml", "--json")
    data = json.loads(result.stdout)
    assert data["name"] == "resnet18" and data["params"] == 11_689_512 and isinstance(data["macs"], int)
    table = run_cli("show", "specs/resnet20.yaml").stdout
    assert "layer3" in table and "269,722" in table
    everything = sorted(map(str, (ROOT / "specs").glob("**/*.yaml")))   # partial bases, ablations, searches too
    result = run_cli("validate", *everything)
    assert result.returncode == 0 and result.stdout.count("ok  ") == len(everything), result.stderr
    assert "_cifar.yaml  (partial base)" in result.stdout
    assert "shortcuts.yaml  (ablation 'shortcuts': 3 arms x 3 seeds)" in result.stdout
    assert "depth_width_macs.yaml  (search 'depth_width_macs': 3 dimensions, 40 trials)" in result.stdout


def test_console_script_installed():
    import shutil
    import subprocess

    exe = shutil.which("reslab")
    assert exe, "the `reslab` console script is missing: pip install -e . (README)"
    result = subprocess.run([exe, "show", str(ROOT / "specs/resnet20.yaml"), "--json"], capture_output=True, text=True)
    assert json.loads(result.stdout)["params"] == 269_722


# ---- random valid specs compile and run ------------------------------------------------------------------
@st.composite
def random_specs(draw):
    block_type = draw(st.sampled_from(sorted(BLOCKS)))
    cls = BLOCKS[block_type]
    block = {"type": block_type, "shortcut": draw(st.sampled_from(list(SHORTCUTS))),
             "placement": draw(st.sampled_from(cls.supported_placements())),
             "variant": draw(st.sampled_from(list(VARIANTS))),
             "cardinality": draw(st.sampled_from([1, 2])), "expansion": draw(st.sampled_from([1, 2, 4])),
             "zero_init_residual": draw(st.booleans()), "widen": draw(st.sampled_from([1.0, 1.5])),
             "projection_bn": draw(st.sampled_from([None, True, False])),
             "zero_pad": draw(st.sampled_from(["append", "split"])),
             "se_ratio": draw(st.sampled_from([0.0, 0.25, 1.0])), "se_divisor": draw(st.sampled_from([1, 8])),
             "stride_on": draw(st.sampled_from([None, *cls.stride_positions]))}
    n_stages = draw(st.integers(1, 3))
    stages = [{"depth": draw(st.integers(0 if i else 1, 2)), "width": draw(st.integers(2, 12)),
               "stride": draw(st.sampled_from([1, 2]))} for i in range(n_stages)]
    return {"name": "random", "input": {"channels": draw(st.integers(1, 3)), "size": draw(st.integers(8, 20))},
            "classes": draw(st.integers(2, 7)), "width_multiplier": draw(st.sampled_from([0.5, 1.0, 1.3])),
            "stem": {"type": draw(st.sampled_from(list(STEMS))), "width": draw(st.integers(2, 8)),
                     "act": draw(st.booleans()), "pool": draw(st.sampled_from([None, "max", "conv", "none"]))},
            "drop_path": {"rate": draw(st.sampled_from([0.0, 0.5])),
                          "schedule": draw(st.sampled_from(["linear", "linear_from_zero", "constant"]))},
            "head": {"pool": draw(st.sampled_from(["avg", "max"]))}, "block": block, "stages": stages}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_specs())
def test_random_valid_specs_compile_and_run(data):
    try:
        spec = spec_from_dict(data)
    except SpecError as e:   # only the documented cross-field rules may reject a schema-valid spec
        assert any(s in str(e) for s in ("cannot reduce channels", "too small for the strides", "inner width",
                                         "no blocks")), str(e)
        assume(False)
    model = build_model(spec)
    x = torch.randn(2, spec.input.channels, spec.input.size, spec.input.size)
    out = model(x)
    assert out.shape == (2, spec.classes)
    out.float().sum().backward()
    assert complexity(spec).params == sum(p.numel() for p in model.parameters())


# ---- the composable pieces: stems, stride position, projections, option A, SE, drop-path --------------------
@pytest.mark.parametrize("pool", ["max", "conv", "none"])
@pytest.mark.parametrize("stem", sorted(STEMS))
def test_every_stem_and_pool(stem, pool):
    spec = spec_from_dict({**tiny({"type": "basic"}), "input": {"channels": 3, "size": 16},
                           "stem": {"type": stem, "width": 4, "pool": pool}})
    model = build_model(spec)
    x = torch.randn(2, 3, 16, 16)
    side = plan_network(spec).stem_size
    assert model.maxpool(model.relu(model.bn1(model.conv1(x)))).shape[-1] == side
    assert complexity(spec).params == sum(p.numel() for p in model.parameters())
    model(x).sum().backward()


@pytest.mark.parametrize("block", sorted(n for n, c in BLOCKS.items() if c.stride_positions))
def test_stride_on_moves_the_stride_between_the_1x1_and_the_3x3(block):
    strides = {}
    for where in ("1x1", "3x3"):
        b = build_model(spec_from_dict(tiny({"type": block, "stride_on": where, "cardinality": 2}))).layer2[0]
        strides[where] = (b.conv1.stride[0], b.conv2.stride[0], b.conv3.stride[0])
    assert strides == {"1x1": (2, 1, 1), "3x3": (1, 2, 1)}
    assert plan_network(spec_from_dict(tiny({"type": block}))).blocks[2].cfg.stride_on == "3x3"  # the type's own


def test_projection_bn_is_the_placements_own_unless_set():
    def downsample(**block):
        return build_model(spec_from_dict(tiny({"type": "basic", "shortcut": "B", **block}))).layer2[0].downsample
    assert [type(m).__name__ for m in downsample()] == ["Conv2d", "BatchNorm2d"]
    assert [type(m).__name__ for m in downsample(placement="full_preact")] == ["Conv2d"]   # the authors' code
    assert [type(m).__name__ for m in downsample(placement="full_preact", projection_bn=True)] == \
        ["Conv2d", "BatchNorm2d"]
    assert [type(m).__name__ for m in downsample(shortcut="D", projection_bn=False)] == ["AvgPool2d", "Conv2d"]


def test_option_d_pools_and_projects_only_where_the_shape_changes():
    model = build_model(spec_from_dict(tiny({"type": "basic", "shortcut": "D"})))
    assert [name for name, b in model.blocks() if b.downsample is not None] == ["layer2.0"]
    blk = model.layer2[0].eval()
    x = torch.randn(1, 4, 8, 8)
    expected = blk.downsample[2](blk.downsample[1](torch.nn.functional.avg_pool2d(x, 2)))
    assert torch.equal(blk.downsample(x), expected)


def test_option_a_split_puts_the_zero_channels_around_x():
    blk = build_model(spec_from_dict(tiny({"type": "basic", "shortcut": "A", "zero_pad": "split"}))).layer2[0]
    x = torch.randn(1, 4, 8, 8)
    s = blk.downsample(x)
    assert torch.equal(s[:, 2:6], x[:, :, ::2, ::2]) and torch.all(s[:, :2] == 0) and torch.all(s[:, 6:] == 0)


def test_squeeze_excitation_width_and_function():
    model = build_model(spec_from_dict(tiny({"type": "basic", "se_ratio": 0.25, "se_divisor": 1})))
    se = model.layer2[1].se
    assert (se.fc1.out_channels, se.fc2.out_channels) == (2, 8)
    x = torch.randn(2, 8, 4, 4)
    gate = torch.sigmoid(se.fc2(torch.relu(se.fc1(x.mean((2, 3), keepdim=True)))))
    assert torch.equal(se(x), x * gate)
    timm_rounding = build_model(spec_from_dict(tiny({"type": "basic", "se_ratio": 0.0625}))).layer2[1].se
    assert timm_rounding.fc1.out_channels == 8       # at least the divisor, as timm's make_divisible


@pytest.mark.parametrize("schedule, rates", [("linear", [0.1, 0.2, 0.3, 0.4]), ("constant", [0.4] * 4),
                                             ("linear_from_zero", [0.0, 0.4 / 3, 0.8 / 3, 0.4])])
def test_drop_path_schedules(schedule, rates):
    spec = spec_from_dict(tiny({"type": "basic"}, drop_path={"rate": 0.4, "schedule": schedule}))
    assert [b.drop_path for b in plan_network(spec).blocks] == pytest.approx(rates, abs=1e-12)
    model = build_model(spec)
    assert [b.drop_path.p if b.drop_path else 0.0 for _, b in model.blocks()] == pytest.approx(rates, abs=1e-12)


def test_drop_path_drops_whole_branches_in_training_only():
    spec = spec_from_dict(tiny({"type": "preact"}, drop_path={"rate": 0.5, "schedule": "constant"}))
    model = build_model(spec).eval()
    blk = model.layer1[1]
    torch.manual_seed(0)
    x = torch.randn(64, 4, 8, 8)
    with torch.no_grad():
        kept = blk(x)                                  # eval: no drop; preact: y = f + x
        blk.drop_path.train()
        y = blk(x)
    f = kept - x
    dropped = torch.isclose(y, x, atol=1e-6).flatten(1).all(1)
    scaled = torch.isclose(y, x + 2 * f, atol=1e-5).flatten(1).all(1)
    assert torch.all(dropped ^ scaled) and 10 < int(dropped.sum()) < 54


def test_a_new_block_type_or_merge_is_one_class_and_one_registry_line():
    """Registered pieces reach validation, the compiler, complexity and lesions without other changes."""
    from arches.blocks import Block
    from arches.blocks.merges import Merge
    from arches.layers import conv3x3

    @BLOCKS.register("triple")
    class Triple(Block):
        """x + f(x), f = three 3x3 convs."""
        @classmethod
        def convs(cls, in_channels, width, stride, cfg):
            return [conv3x3(in_channels, width, stride), conv3x3(width, width), conv3x3(width, width)]

    @VARIANTS.register("half")
    class Half(Merge):
        """f / 2 + s."""
        def join(self, b, f, s, x):
            return 0.5 * f + s

    try:
        spec = spec_from_dict(tiny({"type": "triple", "variant": "half", "placement": "e"}))
        model = build_model(spec)
        assert model.layer1[0].depth == 3 and complexity(spec).params == sum(p.numel() for p in model.parameters())
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        with pytest.raises(SpecError, match="got 'halve'.*did you mean 'half'"):
            spec_from_dict(tiny({"type": "triple", "variant": "halve"}))
    finally:
        del BLOCKS["triple"], VARIANTS["half"]


# He et al. 2016, Fig. 4, read off the figure: (a) original ... (e) full pre-activation
PAPER_LETTERS = {"a": "original", "b": "bn_after_add", "c": "relu_before_add", "d": "relu_preact",
                 "e": "full_preact"}


@pytest.mark.parametrize("letter, name", sorted(PAPER_LETTERS.items()))
def test_placement_letters_name_the_papers_placements(letter, name):
    by_letter = load_spec(ROOT / "specs" / "resnet20.yaml", [f"block.placement={letter.upper()}"])
    by_name = load_spec(ROOT / "specs" / "resnet20.yaml", [f"block.placement={name}"])
    assert by_letter.block.placement == name and spec_hash(by_letter) == spec_hash(by_name)


# ---- placements and shortcut variants against their definitions, computed here on tiny tensors -----------------
def _randomised(block: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter and BN running statistic drawn at random, eval mode (BN uses its running statistics)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return block.eval()


def _bn(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _conv(x, conv):
    return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)


# y for a basic block with identity shortcut (same width, stride 1), He et al. 2016 Fig. 4 (a)-(e)
PLACEMENT_DEFINITIONS = {
    "original": lambda x, b: F.relu(_bn(_conv(F.relu(_bn(_conv(x, b.conv1), b.bn1)), b.conv2), b.bn2) + x),
    "bn_after_add": lambda x, b: F.relu(_bn(_conv(F.relu(_bn(_conv(x, b.conv1), b.bn1)), b.conv2) + x, b.bn2)),
    "relu_before_add": lambda x, b: F.relu(_bn(_conv(F.relu(_bn(_conv(x, b.conv1), b.bn1)), b.conv2), b.bn2)) + x,
    "relu_preact": lambda x, b: _bn(_conv(F.relu(_bn(_conv(F.relu(x), b.conv1), b.bn1)), b.conv2), b.bn2) + x,
    "full_preact": lambda x, b: _conv(F.relu(_bn(_conv(F.relu(_bn(x, b.bn1)), b.conv1), b.bn2)), b.conv2) + x,
}


@pytest.mark.parametrize("placement", sorted(PLACEMENT_DEFINITIONS))
def test_each_placement_computes_the_papers_block(placement):
    spec = spec_from_dict(tiny({"type": "basic", "placement": placement, "shortcut": "B"}))
    block = _randomised(build_model(spec).layer1[1])                 # 4 -> 4 channels, stride 1: identity shortcut
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(block(x), PLACEMENT_DEFINITIONS[placement](x, block), atol=1e-5)


def _branch(x, b):
    """f(x) of a basic block in the original placement: BN(conv(ReLU(BN(conv(x)))))."""
    return _bn(_conv(F.relu(_bn(_conv(x, b.conv1), b.bn1)), b.conv2), b.bn2)


# y = ReLU(merge(f, s, x)) in the original placement; He et al. 2016 Table 1 / Fig. 2 (lambda = 0.5, b = -6)
VARIANT_DEFINITIONS = {
    "identity": lambda f, x, b: f + x,
    "scaling": lambda f, x, b: 0.5 * x + 0.5 * f,                   # with scale_residual: (1 - lambda) f
    "exclusive_gate": lambda f, x, b: torch.sigmoid(_conv(x, b.gate)) * f + (1 - torch.sigmoid(_conv(x, b.gate))) * x,
    "shortcut_gate": lambda f, x, b: f + (1 - torch.sigmoid(_conv(x, b.gate))) * x,
    "conv": lambda f, x, b: f + _conv(x, b.downsample[0]),
    "dropout": lambda f, x, b: f + x,                               # eval mode: dropout passes s through
}


@pytest.mark.parametrize("variant", sorted(VARIANT_DEFINITIONS))
def test_each_shortcut_variant_computes_its_definition(variant):
    spec = spec_from_dict(tiny({"type": "basic", "placement": "original", "shortcut": "B", "variant": variant,
                                "scale": 0.5, "scale_residual": True, "gate_bias": -6.0}))
    block = _randomised(build_model(spec).layer1[1])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = F.relu(VARIANT_DEFINITIONS[variant](_branch(x, block), x, block))
        assert torch.allclose(block(x), expected, atol=1e-5)
    if variant == "dropout":       # training: each element of s dropped with p = 0.5, the kept ones doubled
        block.train()
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()                            # (BN on running statistics, so f is the one computed above)
        torch.manual_seed(0)
        with torch.no_grad():
            y, f = block(x), _branch(x, block)
        dropped, kept = torch.isclose(y, F.relu(f), atol=1e-5), torch.isclose(y, F.relu(f + 2 * x), atol=1e-5)
        assert bool((dropped | kept).all()) and 0.3 < float((kept & ~dropped).float().mean()) < 0.7
