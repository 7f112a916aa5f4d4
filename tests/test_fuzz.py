"""Hostile input, generated: thousands of specs, study files and YAML texts, each either accepted or refused with one
SpecError line, within a time bound; never another exception, never a hang."""
from __future__ import annotations

import copy
import time
from pathlib import Path

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from arches.errors import ReslabError, SpecError
from arches.spec import Source, read_yaml, set_path, spec_from_dict
from search.space import load_study_file

ROOT = Path(__file__).resolve().parents[1]
SECONDS = 5.0                 # per case: validate answers in a second or two on any input (CI machines are slow)

BASE = {"name": "fuzz", "input": {"channels": 1, "size": 16}, "classes": 10, "stem": {"type": "cifar", "width": 8},
        "block": {"type": "basic", "shortcut": "A"},
        "stages": [{"depth": 1, "width": 8}, {"depth": 1, "width": 16, "stride": 2}],
        "data": {"name": "synthetic"}, "train": {"epochs": 1}}
KEYS = ["name", "classes", "width_multiplier", "input.channels", "input.size", "stem.type", "stem.width",
        "stem.stride", "stem.pool", "block.type", "block.shortcut", "block.placement", "block.variant", "block.scale",
        "block.gate_bias", "block.expansion", "block.cardinality", "block.base_width", "block.widen",
        "block.dropout", "block.se_ratio", "block.stride_on", "block.zero_pad", "stages.0.depth", "stages.0.width",
        "stages.1.stride", "stages.1.block", "stages.0.blocks", "stages", "head.pool", "head.dropout",
        "drop_path.rate", "data.name", "data.val_size", "data.train_subset", "train.lr", "train.seed",
        "train.epochs", "train.max_steps", "train.batch_size", "train.schedule.milestones", "train.schedule.type",
        "train.warmup.steps", "train.threads", "train.compile", "train.devices", "init_map", "nonsense", "block.typo"]

# values a hostile user types: huge, negative, infinite, wrong types, nested structures
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, 1, -1, 2**31, 2**32, 10**6]),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, -1e308, 1e-308, 0.5]),
                    st.text(max_size=12), st.sampled_from(["A", "B", "basic", "bottleneck", "e", "nan", ".inf"]))
hostile = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                       max_leaves=12)
# ... and, for the keys that have them, values that make sense, so that many generated specs are valid and reach
# the plan and the compiler's checks (mixed: valid ones twice as often as hostile ones)
small = st.integers(1, 4)
VALID = {"classes": st.integers(1, 20), "width_multiplier": st.floats(0.25, 2.0), "input.channels": st.sampled_from([1, 3]),
         "input.size": st.sampled_from([8, 16, 32]), "stem.type": st.sampled_from(["cifar", "imagenet", "deep"]),
         "stem.width": st.integers(1, 16), "stem.stride": st.integers(1, 2),
         "stem.pool": st.sampled_from(["max", "conv", "none", None]),
         "block.type": st.sampled_from(["plain", "basic", "bottleneck", "grouped", "preact", "preact_bottleneck",
                                        "wide", "highway"]),
         "block.shortcut": st.sampled_from(list("ABCD")), "block.placement": st.sampled_from(
             ["original", "bn_after_add", "relu_before_add", "relu_preact", "full_preact", "a", "e", None]),
         "block.variant": st.sampled_from(["identity", "scaling", "exclusive_gate", "shortcut_gate", "conv",
                                           "dropout"]),
         "block.scale": st.floats(0.1, 1.0), "block.gate_bias": st.floats(-5, 5), "block.expansion": small,
         "block.cardinality": small, "block.base_width": st.sampled_from([4, 16, 64]),
         "block.widen": st.sampled_from([0.5, 1.0, 2.0]), "block.dropout": st.sampled_from([0.0, 0.3]),
         "block.se_ratio": st.sampled_from([0.0, 0.25]), "block.stride_on": st.sampled_from(["1x1", "3x3", None]),
         "block.zero_pad": st.sampled_from(["append", "split"]), "stages.0.depth": st.integers(0, 3),
         "stages.0.width": st.integers(1, 16), "stages.1.stride": st.integers(1, 2),
         "stages.1.block": st.sampled_from([{"type": "bottleneck"}, {"shortcut": "C"}, {"placement": "e"}]),
         "stages.0.blocks": st.sampled_from([{0: {"type": "plain"}}, {1: {"shortcut": "B"}}]),
         "head.pool": st.sampled_from(["avg", "max"]), "head.dropout": st.sampled_from([0.0, 0.5]),
         "drop_path.rate": st.sampled_from([0.0, 0.1]), "train.lr": st.floats(0.001, 1.0),
         "train.seed": st.integers(0, 2**32 - 1), "train.epochs": small, "train.batch_size": st.integers(1, 256),
         "train.schedule.type": st.sampled_from(["constant", "multistep", "cosine", "onecycle"]),
         "train.threads": small, "train.compile": st.sampled_from([False, True, "reduce-overhead"])}


def changes(keys: list[str]):
    """(dotted key, value) pairs: a valid value for the key (when it has some) twice as often as a hostile one."""
    def value_for(key: str):
        return st.one_of(VALID[key], VALID[key], hostile) if key in VALID else hostile
    return st.lists(st.sampled_from(keys).flatmap(lambda k: st.tuples(st.just(k), value_for(k))),
                    min_size=1, max_size=4)


def bounded(fn, *args):
    """fn(*args) must return or raise a ReslabError, within SECONDS."""
    started = time.perf_counter()
    try:
        fn(*args)
    except ReslabError as e:
        assert "\n" not in str(e) and str(e), repr(e)
    assert time.perf_counter() - started < SECONDS, args


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(changes(KEYS))
def test_any_spec_is_accepted_or_refused_in_one_line(pairs):
    doc = copy.deepcopy(BASE)
    for key, value in pairs:
        try:
            set_path(doc, key, value)
        except SpecError:
            return                                    # (a --set that cannot apply: itself a one-line error)
    bounded(spec_from_dict, doc, Source("<fuzz>"))


STUDY_KEYS = ["ablation.axes", "ablation.seeds", "ablation.baseline", "ablation.metric", "ablation.match",
              "ablation.match.tolerance", "ablation.pivot", "ablation.arms", "ablation.max_attempts", "set",
              "search", "base", "name"]
SEARCH_KEYS = ["search.space", "search.space.width_multiplier", "search.space.stages.0.depth", "search.trials",
               "search.sampler", "search.pruner", "search.objectives", "search.timeout"]


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.booleans(), changes(STUDY_KEYS + SEARCH_KEYS))
@example(search=False, pairs=[("ablation.axes", {"\u00b2": None})])   # found here: '²'.isdigit(), int('²') fails
@example(search=True, pairs=[("search.space", {"\n": None})])          # found here: a newline in a key's error
def test_any_study_file_is_accepted_or_refused_in_one_line(tmp_path_factory, search, pairs):
    doc = {"base": str(ROOT / "specs" / "resnet20.yaml"),
           "set": {"data.name": "synthetic", "input.channels": 3, "input.size": 16, "stages.*.depth": 1}}
    doc.update({"search": {"space": {"width_multiplier": {"low": 0.5, "high": 1.0}}, "trials": 2}} if search else
               {"ablation": {"axes": {"block.shortcut": ["A", "B"]}, "baseline": "A", "seeds": 1}})
    for key, value in pairs:
        try:
            set_path(doc, key, value)
        except SpecError:
            return
    path = tmp_path_factory.mktemp("study") / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    bounded(load_study_file, path)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode),
                 st.sampled_from([b"a: &a [1,1]\nb: &b [*a,*a]\n", b"\xff\xfe", b"[" * 200, b"{a: {b: {c: }}}",
                                  b"a: !!python/object:os.system 1", b"\x00\x00"])))
def test_any_file_is_read_or_refused_in_one_line(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("yaml") / "x.yaml"
    path.write_bytes(raw)
    bounded(read_yaml, path)


def test_the_known_attacks_are_refused_quickly(tmp_path):
    """The cases found by hand: every one a SpecError in well under a second."""
    laughs = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    cases = {"laughs": laughs.encode(), "deep": ("a: " + "[" * 1000 + "]" * 1000).encode(),
             "latin1": "name: caf\xe9\n".encode("latin-1"), "binary": b"\x00\x01name: x",
             "huge": b"# " + b"x" * 2_000_000}
    for name, raw in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_bytes(raw)
        started = time.perf_counter()
        try:
            read_yaml(path)
            raise AssertionError(f"{name} was accepted")
        except SpecError as e:
            assert "\n" not in str(e), name
        assert time.perf_counter() - started < 1.0, name
    for key, value in [("stages.0.depth", 100000), ("width_multiplier", float("inf")), ("width_multiplier", 1e308),
                       ("block.widen", float("inf")), ("stages.0.width", 2**32), ("train.seed", -1),
                       ("train.seed", 2**32), ("stages", [{"depth": 600, "width": 8}] * 3)]:
        doc = copy.deepcopy(BASE)
        set_path(doc, key, value)
        started = time.perf_counter()
        try:
            spec_from_dict(doc, Source("<attack>"))
            raise AssertionError(f"{key}={value!r} was accepted")
        except SpecError as e:
            assert key.split(".")[0] in str(e), (key, str(e))
        assert time.perf_counter() - started < 1.0, key
