"""The authors' exact networks, written here again in the tests' own words from the papers and their published
code (He et al.'s pre-activation code, the Wide-ResNet code, the original Caffe ResNet-50, the common PyTorch
CIFAR ResNets), and timm's models: reslab's specs must compute the same function after a weight copy."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from arches import build_model, load_spec, plan_network, spec_from_dict

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"


# ---- the reference networks, functional: a dict of named tensors in, logits out ------------------------------
def bn(p: dict, name: str, x, training: bool):
    return F.batch_norm(x, p[f"{name}.running_mean"].clone(), p[f"{name}.running_var"].clone(),
                        p[f"{name}.weight"], p[f"{name}.bias"], training)


def conv(p: dict, name: str, x, stride: int = 1):
    w = p[name] if name in p else p[f"{name}.weight"]
    return F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2)


def classify(p: dict, x, fc: str = "fc"):
    return F.linear(F.adaptive_avg_pool2d(x, 1).flatten(1), p[f"{fc}.weight"], p[f"{fc}.bias"])


def units(depths, widths, first_in):
    """(name, stride, projects) of every unit, torchvision's names; a unit projects where its shape changes."""
    out, channels = [], first_in
    for s, (depth, width) in enumerate(zip(depths, widths)):
        for i in range(depth):
            stride = 2 if s > 0 and i == 0 else 1
            out.append((f"layer{s + 1}.{i}", stride, stride != 1 or channels != width))
            channels = width
    return out


def preact_resnet(p, x, depths, widths, training, dropout=0.0, bottleneck=False):
    """He et al. 2016's pre-activation nets as their code builds them (fb.resnet.torch `preresnet`,
    resnet-1k-layers; the WRN code with dropout): 3x3 stem conv; each unit BN-ReLUs its input once, and a
    projection (a bare 1x1 conv) reads that pre-activated input; bottlenecks stride their first 1x1; WRN
    dropout after the second BN-ReLU; BN-ReLU before pooling."""
    h = conv(p, "conv1", x)
    for name, stride, projects in units(depths, widths, h.shape[1]):
        o1 = F.relu(bn(p, f"{name}.bn1", h, training))
        shortcut = conv(p, f"{name}.downsample.0", o1, stride) if projects else h
        y = conv(p, f"{name}.conv1", o1, stride)
        if bottleneck:
            y = conv(p, f"{name}.conv2", F.relu(bn(p, f"{name}.bn2", y, training)))
            y = conv(p, f"{name}.conv3", F.relu(bn(p, f"{name}.bn3", y, training)))
        else:
            o2 = F.dropout(F.relu(bn(p, f"{name}.bn2", y, training)), dropout, training)
            y = conv(p, f"{name}.conv2", o2)
        h = y + shortcut
    return classify(p, F.relu(bn(p, "final_bn", h, training)))


def resnet50_v1(p, x, depths, widths, training):
    """He et al. 2015's ResNet-50 (the Caffe model): 7x7/2 stem, max-pool; bottlenecks stride their first 1x1;
    projections 1x1 conv + BN where the shape changes; ReLU after the addition."""
    h = F.max_pool2d(F.relu(bn(p, "bn1", conv(p, "conv1", x, 2), training)), 3, 2, 1)
    for name, stride, projects in units(depths, [4 * w for w in widths], h.shape[1]):
        y = F.relu(bn(p, f"{name}.bn1", conv(p, f"{name}.conv1", h, stride), training))
        y = F.relu(bn(p, f"{name}.bn2", conv(p, f"{name}.conv2", y), training))
        y = bn(p, f"{name}.bn3", conv(p, f"{name}.conv3", y), training)
        shortcut = bn(p, f"{name}.downsample.1", conv(p, f"{name}.downsample.0", h, stride), training) \
            if projects else h
        h = F.relu(y + shortcut)
    return classify(p, h)


def randomise_statistics(model: torch.nn.Module, seed: int = 0) -> None:
    """BN running statistics and affine parameters away from 0/1, so that a misplaced BN shows in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith(("running_mean", "bias")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
            elif name.endswith("running_var") or (name.endswith("weight") and t.dim() == 1):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)


def same_function(model, reference, x) -> None:
    """Equal outputs in eval mode and in training mode (batch statistics, dropout from the same seed)."""
    randomise_statistics(model)
    p = dict(model.state_dict())
    for training in (False, True):
        model.train(training)
        with torch.no_grad():
            torch.manual_seed(5)
            ours = model(x)
            torch.manual_seed(5)
            theirs = reference(p, x, training)
        assert torch.equal(ours, theirs), (training, (ours - theirs).abs().max())


def small(name: str, *extra: str):
    """A spec file with fewer blocks per stage (every other setting as shipped)."""
    spec = load_spec(SPECS / f"{name}.yaml")
    depths = [f"stages.{i}.depth={2 if i == 0 else 1}" for i in range(len(spec.stages))]
    return load_spec(SPECS / f"{name}.yaml", [*depths, *extra])


@pytest.mark.parametrize("name, bottleneck", [("preact_resnet110", False), ("preact_resnet164", True)])
def test_preact_nets_compute_the_authors_networks(name, bottleneck):
    spec = small(name)
    widths = [s.width * (4 if bottleneck else 1) for s in spec.stages]
    same_function(build_model(spec), lambda p, x, t: preact_resnet(p, x, [2, 1, 1], widths, t, bottleneck=bottleneck),
                  torch.randn(2, 3, 32, 32))


def test_wide_resnet_computes_the_wrn_code_dropout_included():
    spec = small("wrn_28_10", "block.widen=2")
    assert spec.block.dropout == 0.3
    widths = [2 * s.width for s in spec.stages]
    same_function(build_model(spec), lambda p, x, t: preact_resnet(p, x, [2, 1, 1], widths, t, dropout=0.3),
                  torch.randn(4, 3, 32, 32))


def test_resnet50_v1_strides_the_first_1x1_as_the_original():
    spec = small("resnet50_v1", "width_multiplier=0.125", "input.size=64")
    assert [b.cfg.stride_on for b in plan_network(spec).blocks] == ["1x1"] * 5
    widths = [round(s.width * 0.125) for s in spec.stages]
    same_function(build_model(spec), lambda p, x, t: resnet50_v1(p, x, [2, 1, 1, 1], widths, t),
                  torch.randn(2, 3, 64, 64))
    v15 = build_model(small("resnet50", "width_multiplier=0.125", "input.size=64"))
    assert v15.layer2[0].conv1.stride == (1, 1) and v15.layer2[0].conv2.stride == (2, 2)


def test_stride_position_moves_compute_not_parameters():
    from arches import complexity

    v1, v15 = complexity(load_spec(SPECS / "resnet50_v1.yaml")), complexity(load_spec(SPECS / "resnet50.yaml"))
    assert v1.params == v15.params == 25_557_032
    assert v1.macs == 3_857_973_248 and v15.macs == 4_089_184_256
    assert complexity(load_spec(SPECS / "preact_resnet164.yaml")).macs == 244_500_992   # REFERENCES: 244.5M


# ---- the common PyTorch CIFAR ResNet (option A split around the identity), and its checkpoints ---------------
def cifar_resnet(p, x, n, training, prefix=""):
    """He et al. 2015's CIFAR ResNet-(6n+2) as the most used PyTorch code writes it: 3x3 stem conv-BN-ReLU, basic
    blocks, option A pads planes/4 zero channels on each side of the subsampled x, head `linear`."""
    p = {k[len(prefix):]: v for k, v in p.items()}
    h = F.relu(bn(p, "bn1", conv(p, "conv1", x), training))
    for name, stride, projects in units([n] * 3, [16, 32, 64], 16):
        y = F.relu(bn(p, f"{name}.bn1", conv(p, f"{name}.conv1", h, stride), training))
        y = bn(p, f"{name}.bn2", conv(p, f"{name}.conv2", y), training)
        planes = y.shape[1]
        shortcut = F.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4)) if projects else h
        h = F.relu(y + shortcut)
    return classify(p, h, fc="linear")


def cifar_resnet_weights(n: int, seed: int = 3) -> dict:
    """Random weights under the CIFAR code's own names, as its DataParallel checkpoints store them."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"conv1.weight": (16, 3, 3, 3), "linear.weight": (10, 64), "linear.bias": (10,)}
    bns = {"bn1": 16}
    channels = 16
    for name, _, _ in units([n] * 3, [16, 32, 64], 16):
        width = 16 * 2 ** (int(name[5]) - 1)
        shapes[f"{name}.conv1.weight"] = (width, channels, 3, 3)
        shapes[f"{name}.conv2.weight"] = (width, width, 3, 3)
        bns.update({f"{name}.bn1": width, f"{name}.bn2": width})
        channels = width
    state = {k: torch.randn(s, generator=g) * 0.2 for k, s in shapes.items()}
    for name, c in bns.items():
        state.update({f"{name}.weight": torch.rand(c, generator=g) + 0.5, f"{name}.bias": torch.randn(c, generator=g),
                      f"{name}.running_mean": torch.randn(c, generator=g) * 0.2,
                      f"{name}.running_var": torch.rand(c, generator=g) + 0.5,
                      f"{name}.num_batches_tracked": torch.tensor(100)})
    return {f"module.{k}": v for k, v in state.items()}


@pytest.mark.parametrize("n, params", [(3, 269_722), (5, 464_154), (7, 658_586), (9, 853_018), (18, 1_727_962)])
def test_cifar_resnets_have_the_papers_layers(n, params):
    """He et al. 2015, Table 6 (0.27M ... 1.7M): the reference's parameters, counted, equal the specs'."""
    from arches import complexity

    reference = sum(v.numel() for k, v in cifar_resnet_weights(n).items()
                    if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert reference == params == complexity(load_spec(SPECS / f"resnet{6 * n + 2}.yaml")).params


def test_a_cifar_resnet_checkpoint_loads_with_option_a_split(tmp_path):
    state = cifar_resnet_weights(3)
    path = tmp_path / "resnet20-cifar.th"
    torch.save({"state_dict": state, "best_prec1": 91.7}, path)     # as that code's checkpoints are written
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        theirs = cifar_resnet(state, x, 3, False, prefix="module.")
        split = build_model(load_spec(SPECS / "resnet20.yaml", [f"init_from={path}", "block.zero_pad=split"]),
                            init=True).eval()
        assert split.init_report.rules == {"prefix module. dropped": len(state), r"^linear\. -> fc.": 2}
        assert torch.equal(split(x), theirs)
        appended = build_model(load_spec(SPECS / "resnet20.yaml", [f"init_from={path}"]), init=True).eval()
        assert not torch.allclose(appended(x), theirs, atol=1e-3)   # same weights, other channel layout


# ---- timm: SE-ResNet, ResNet-D, ResNet-RS ------------------------------------------------------------------
def test_state_dict_names_and_shapes_are_timms():
    import json

    reference = json.loads((ROOT / "tests" / "data" / "timm_state_dict_shapes.json").read_text())
    for name, ref in reference.items():
        with torch.device("meta"):
            model = build_model(load_spec(SPECS / f"{name}.yaml"))
        assert {k: list(v.shape) for k, v in model.state_dict().items()} == ref["state_dict"], name
        assert sum(p.numel() for p in model.parameters()) == ref["params"], name


TINY_TIMM = {   # the two small timm ResNets of tests/data/make_timm_reference.py, as reslab specs
    "tiny_rs": {"stem": {"type": "deep", "width": 8, "pool": "conv"},
                "block": {"type": "bottleneck", "shortcut": "D", "se_ratio": 0.25},
                "stages": [(1, 4, 1), (1, 8, 2), (1, 8, 2), (1, 8, 2)]},
    "tiny_se_basic": {"stem": {"type": "imagenet", "width": 64},
                      "block": {"type": "basic", "shortcut": "B", "se_ratio": 0.0625},
                      "stages": [(2, 8, 1), (1, 8, 2), (1, 16, 2), (1, 16, 2)]},
}


@pytest.mark.parametrize("name", sorted(TINY_TIMM))
def test_timm_models_outputs_after_a_weight_copy(name, tmp_path):
    """timm's own outputs (stored by tests/data/make_timm_reference.py), through a .safetensors file."""
    ref = torch.load(ROOT / "tests" / "data" / "timm_tiny_reference.pt", weights_only=True)[name]
    path = tmp_path / "model.safetensors"
    write_safetensors(ref["state_dict"], path)
    net = TINY_TIMM[name]
    spec = spec_from_dict({"name": name, "input": {"channels": 3, "size": 32}, "classes": 5, "stem": net["stem"],
                           "block": net["block"], "init_from": str(path),
                           "stages": [{"depth": d, "width": w, "stride": s} for d, w, s in net["stages"]]})
    model = build_model(spec, init=True).eval()
    assert model.init_report.loaded == list(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(ref["input"]), ref["output"], rtol=0, atol=1e-6)


def write_safetensors(state: dict, path: Path) -> None:
    """The safetensors layout: 8-byte little-endian header size, a JSON header of dtype/shape/offsets, the data."""
    import json

    names = {torch.float32: "F32", torch.int64: "I64"}
    header, blobs, offset = {}, [], 0
    for key, t in state.items():
        data = t.contiguous().numpy().tobytes()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
