"""Spec language, block library, compiler and complexity: parity with torchvision and the papers, every block
x shortcut x placement combination, identity at init, and random valid specs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from arches import BLOCKS, SpecError, build_model, complexity, load_spec, spec_from_dict, spec_hash
from arches.schema import PLACEMENTS, SHORTCUTS, VARIANTS
from arches.spec import diff_from_base

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted(p for p in (ROOT / "specs").glob("*.yaml") if not p.name.startswith("_"))

# torchvision's num_params and GMACs at 224x224, 1000 classes (shared/REFERENCES.md).
TORCHVISION = {
    "resnet18": (11_689_512, 1.814), "resnet34": (21_797_672, 3.664), "resnet50": (25_557_032, 4.089),
    "resnet101": (44_549_160, 7.801), "resnet152": (60_192_808, 11.514),
    "resnext50_32x4d": (25_028_904, 4.23), "wide_resnet50_2": (68_883_240, 11.398),
}
# He et al. 2015 Table 6 (CIFAR-10, 10 classes); WRN and ResNeXt papers.
PAPER_PARAMS_M = {"resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85, "resnet110": 1.7,
                  "preact_resnet164": 1.7, "wrn_28_10": 36.5, "wrn_16_8": 11.0, "resnext29_8x64d": 34.4}


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_imagenet_parity_with_torchvision(name):
    params, gmacs = TORCHVISION[name]
    cost = complexity(load_spec(ROOT / "specs" / f"{name}.yaml"))
    assert cost.params == params
    assert abs(cost.macs / 1e9 - gmacs) / gmacs < 0.01


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_cifar_params_match_the_papers(name):
    cost = complexity(load_spec(ROOT / "specs" / f"{name}.yaml"))
    # the papers round to 2-3 significant figures
    assert round(cost.params / 1e6, 2 if cost.params < 1e6 else 1) == pytest.approx(PAPER_PARAMS_M[name], abs=0.011)


def test_state_dict_names_and_shapes_are_torchvisions():
    reference = json.loads((ROOT / "tests" / "data" / "torchvision_state_dict_shapes.json").read_text())
    for name, shapes in reference.items():
        with torch.device("meta"):
            model = build_model(load_spec(ROOT / "specs" / f"{name}.yaml"))
        assert {k: list(v.shape) for k, v in model.state_dict().items()} == shapes, name


def test_torchvision_weights_load_strict_and_agree():
    tv = pytest.importorskip("torchvision.models")
    for name in ("resnet18", "resnext50_32x4d"):
        theirs = getattr(tv, name)().eval()
        ours = build_model(load_spec(ROOT / "specs" / f"{name}.yaml")).eval()
        ours.load_state_dict(theirs.state_dict(), strict=True)
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            assert torch.allclose(ours(x), theirs(x), atol=1e-5)


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
    if placement not in BLOCKS[block].placements:
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
    for placement in set(BLOCKS[block].placements) & set(IDENTITY_PLACEMENTS):
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
    block = {"type": block_type, "shortcut": draw(st.sampled_from(SHORTCUTS)),
             "placement": draw(st.sampled_from(cls.placements)),
             "variant": draw(st.sampled_from(VARIANTS)),
             "cardinality": draw(st.sampled_from([1, 2])), "expansion": draw(st.sampled_from([1, 2, 4])),
             "zero_init_residual": draw(st.booleans()), "widen": draw(st.sampled_from([1.0, 1.5]))}
    n_stages = draw(st.integers(1, 3))
    stages = [{"depth": draw(st.integers(0 if i else 1, 2)), "width": draw(st.integers(2, 12)),
               "stride": draw(st.sampled_from([1, 2]))} for i in range(n_stages)]
    return {"name": "random", "input": {"channels": draw(st.integers(1, 3)), "size": draw(st.integers(8, 20))},
            "classes": draw(st.integers(2, 7)), "width_multiplier": draw(st.sampled_from([0.5, 1.0, 1.3])),
            "stem": {"type": draw(st.sampled_from(["cifar", "imagenet"])), "width": draw(st.integers(2, 8)),
                     "act": draw(st.booleans())},
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


@pytest.mark.parametrize("letter, name", zip("abcde", PLACEMENTS))
def test_placement_letters_name_the_papers_placements(letter, name):
    by_letter = load_spec(ROOT / "specs" / "resnet20.yaml", [f"block.placement={letter.upper()}"])
    by_name = load_spec(ROOT / "specs" / "resnet20.yaml", [f"block.placement={name}"])
    assert by_letter.block.placement == name and spec_hash(by_letter) == spec_hash(by_name)
