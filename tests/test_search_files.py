"""Ablation/search files: what they mean (arms, baselines, seeds, overrides, spaces) and one-line errors."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from arches.errors import SpecError
from cli import main
from search.space import load_study_file, study_name_of

ROOT = Path(__file__).resolve().parents[1]
RESNET20 = ROOT / "specs" / "resnet20.yaml"
FMNIST = (f"base: {RESNET20}\n"
          "set: {data.name: fashion-mnist, input.channels: 1, input.size: 28, train.epochs: 1, "
          "train.max_steps: null}\n")


def write(tmp_path: Path, body: str, name: str = "study.yaml", head: str = FMNIST) -> Path:
    path = tmp_path / name
    path.write_text(head + textwrap.dedent(body))
    return path


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI in-process; assert exit code 2 and a one-line stderr; return that line."""
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    return err


# ---- meaning ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((ROOT / "specs" / "ablations").glob("*.yaml")) +
                         sorted((ROOT / "specs" / "searches").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_files_load(path):
    plan = load_study_file(path)
    if plan.kind == "ablation":
        assert plan.arms and plan.seeds and plan.metrics
        for arm in plan.arms:                       # every arm builds a valid spec
            assert plan.arm_spec(arm.name, plan.seeds[-1]).train.seed == plan.seeds[-1]
    else:
        assert plan.dimensions and plan.objectives


def test_degradation_grid_and_training_error():
    plan = load_study_file(ROOT / "specs" / "ablations" / "degradation.yaml")
    assert plan.metrics[0].name == "train/error"
    assert plan.axes == {"block.type": ["plain", "basic"], "depth": ["20", "32", "44", "56"]}
    for arm in plan.arms:
        spec = plan.arm_spec(arm.name, 0)
        n = (int(arm.labels["depth"]) - 2) // 6
        assert [s.depth for s in spec.stages] == [n, n, n]
        assert spec.block.type == arm.labels["block.type"]
        assert spec.data.name == "fashion-mnist"
        # each residual net is compared with the plain net of the same depth
        assert plan.arm(arm.reference).labels == {"block.type": "plain", "depth": arm.labels["depth"]}
    cifar = load_study_file(ROOT / "specs" / "ablations" / "degradation.yaml",
                            ["data.name=cifar10", "input.channels=3", "input.size=32"])
    assert cifar.arm_spec(cifar.arms[0].name, 0).data.name == "cifar10"


def test_named_arms_set_several_keys(tmp_path):
    path = write(tmp_path, """
        ablation:
          arms:
            identity: {block.variant: identity}
            gate: {block.variant: exclusive_gate, block.gate_bias: -6}
          baseline: identity
          seeds: [4, 7]
        """)
    plan = load_study_file(path)
    assert [a.name for a in plan.arms] == ["identity", "gate"] and plan.seeds == [4, 7]
    spec = plan.arm_spec("gate", 7)
    assert (spec.block.variant, spec.block.gate_bias, spec.train.seed) == ("exclusive_gate", -6, 7)
    assert all(a.reference == "identity" for a in plan.arms)
    listed = write(tmp_path, """
        ablation:
          arms:
            - {name: identity, set: {block.variant: identity}}
            - {name: conv, set: {block.variant: conv}}
          baseline: conv
        """, name="listed.yaml")
    assert [a.reference for a in load_study_file(listed).arms] == ["conv", "conv"]


def test_override_order_and_wildcards(tmp_path):
    path = write(tmp_path, """
        set: {block.shortcut: C, train.lr: 0.05}
        ablation:
          axes:
            block.shortcut: [A, B]
            depth: {8: {stages.*.depth: 1}, 14: {stages.*.depth: 2}}
          baseline: {block.shortcut: A, depth: 8}
        """, head=f"base: {RESNET20}\n")
    plan = load_study_file(path, ["train.lr=0.2", "block.shortcut=C", "data.name=fashion-mnist",
                                  "input.channels=1", "input.size=28"])
    spec = plan.arm_spec("shortcut=B,depth=14", 1)
    assert spec.block.shortcut == "B"              # the arm wins over `set:` and --set
    assert spec.train.lr == 0.2                    # --set wins over `set:`
    assert [s.depth for s in spec.stages] == [2, 2, 2]
    assert {a.reference for a in plan.arms} == {"shortcut=A,depth=8"}


def test_a_trials_diff_is_what_its_arm_or_sample_changed(tmp_path):
    """diff_from_base of a cell or a search trial: its own settings against the study's document (base + set: +
    --set), never the base file's stale values of keys the study set for every trial."""
    from arches import diff_from_base

    path = write(tmp_path, """
        set: {data.train_subset: 1000, train.epochs: 2}
        ablation: {axes: {block.shortcut: [A, B]}, baseline: A, seeds: 2}
        """)
    plan = load_study_file(path, ["train.lr=0.05"])
    # (the documents as written: resnet20.yaml states no seed)
    assert diff_from_base(plan.arm_spec("B", 1, threads=2)) == {"block.shortcut": ("A", "B"),
                                                                 "train.seed": (None, 1)}
    assert diff_from_base(plan.arm_spec("A", 0)) == {"train.seed": (None, 0)}
    search = write(tmp_path, """
        search: {space: {block.shortcut: [A, B], stages.0.width: {low: 16, high: 24}}, trials: 2}
        """, name="search.yaml")
    spec = load_study_file(search).search_spec({"block.shortcut": "B", "stages.0.width": 20})
    assert diff_from_base(spec) == {"block.shortcut": ("A", "B"), "stages.0.width": (16, 20)}


def test_every_study_file_key_can_be_set_on_the_command_line(tmp_path, capsys):
    """--set KEY=VALUE on a study file's own keys (the budget, seeds, axes, a range's end, the study's name);
    other keys still override the base spec; a bad value is located at --set, one line, exit 2."""
    search = write(tmp_path, """
        search:
          space: {block.shortcut: [A, B], stages.0.width: {low: 16, high: 24}}
          trials: 20
        """, name="search.yaml")
    plan = load_study_file(search, ["search.trials=4", "search.space.stages.0.width.high=32", "train.lr=0.05",
                                    "study.name=budget", "search.sampler=random", "set.train.momentum=0.5"])
    assert (plan.trials, plan.name, plan.sampler) == (4, "budget", "random")
    width = next(d for d in plan.dimensions if d.key == "stages.0.width")
    assert (width.low, width.high) == (16, 32)
    spec = plan.search_spec({"block.shortcut": "B", "stages.0.width": 32})
    assert (spec.train.lr, spec.train.momentum, spec.stages[0].width) == (0.05, 0.5, 32)

    ablation = write(tmp_path, "ablation: {axes: {block.shortcut: [A, B]}, baseline: A, seeds: 2}\n")
    plan = load_study_file(ablation, ["ablation.seeds=[3, 4, 5]", "ablation.axes.block.shortcut=[A, C]",
                                      "devices_per_trial=2"])
    assert plan.seeds == [3, 4, 5] and [a.name for a in plan.arms] == ["A", "C"] and plan.devices_per_trial == 2
    assert plan.arm_spec("C", 3).block.shortcut == "C"

    for override, expected in (
            ("search.trials=0", "--set: search.trials: Input should be greater than or equal to 1"),
            ("search.sampler=tpee", "--set: search.sampler: "),
            ("search.space.stages.0.width.low=99", "search.yaml:5: search.space.stages.0.width: low (99) must be "
                                                   "below high (24)"),
            ("search.objectives.3=val/acc", "--set: search.objectives: Input should be a valid list")):
        err = cli_error(capsys, "search", str(search), "--set", override, "--output-dir", str(tmp_path / "out"))
        assert err.startswith(expected) or expected in err and err.startswith(str(search)), err
    assert not (tmp_path / "out" / "optuna.db").exists()


def test_fingerprint_follows_the_definition(tmp_path):
    path = write(tmp_path, """
        ablation: {axes: {block.shortcut: [A, B]}, baseline: A, seeds: 2}
        """)
    a, b = load_study_file(path), load_study_file(path)
    assert a.fingerprint() == b.fingerprint()
    assert load_study_file(path, ["train.lr=0.01"]).fingerprint() != a.fingerprint()
    assert a.name == "study" == study_name_of(str(path))


def test_search_space_kinds(tmp_path):
    path = write(tmp_path, """
        search:
          space:
            block.type: [plain, basic]
            stages.*.depth: {low: 1, high: 3}
            width_multiplier: {low: 0.5, high: 2.0, log: true}
            train.lr: {low: 0.05, high: 0.2, step: 0.05}
            depth: {shallow: {stages.0.depth: 1}, deep: {stages.0.depth: 3}}
          objectives: [val/error, {name: macs}]
          sampler: nsga2
        """)
    plan = load_study_file(path)
    kinds = {d.key: d.kind for d in plan.dimensions}
    assert kinds == {"block.type": "categorical", "stages.*.depth": "int", "width_multiplier": "float",
                     "train.lr": "float", "depth": "groups"}
    assert [(m.name, m.goal) for m in plan.objectives] == [("val/error", "minimize"), ("macs", "minimize")]
    assert plan.pruner.type == "none"              # multi-objective studies are not pruned
    spec = plan.search_spec({"block.type": "plain", "stages.*.depth": 2, "width_multiplier": 1.5,
                             "train.lr": 0.1, "depth": "deep"})
    assert [s.depth for s in spec.stages] == [3, 2, 2] and spec.width_multiplier == 1.5
    grid = write(tmp_path, """
        search:
          space: {block.type: [plain, basic], stages.*.depth: {low: 1, high: 3}}
          sampler: grid
        """, name="grid.yaml")
    assert load_study_file(grid).trials == 6


# ---- errors: one line, file:line, exit 2 ------------------------------------------------------------------
BAD = {
    "unknown top key": ("ablaton: {axes: {block.shortcut: [A]}, baseline: A}\n",
                        ":3: ablaton: unknown key 'ablaton' (did you mean 'ablation'?)"),
    "unknown ablation key": ("ablation:\n  axes: {block.shortcut: [A, B]}\n  baseline: A\n  seed: 3\n",
                             ":6: ablation.seed: unknown key 'seed' (did you mean 'seeds'?)"),
    "bad axis path": ("ablation:\n  axes: {block.shortcutt: [A, B]}\n  baseline: A\n",
                      ":4: block.shortcutt: unknown key 'shortcutt' (did you mean 'shortcut'?)"),
    "bad axis value": ("ablation:\n  axes:\n    block.shortcut:\n      - A\n      - E\n  baseline: A\n",
                       ":7: block.shortcut: got 'E'"),
    "baseline not an arm": ("ablation:\n  axes: {block.shortcut: [A, B]}\n  baseline: {block.shortcut: D}\n",
                            ":5: ablation.baseline.block.shortcut: 'D' is not among the arms' labels"),
    "baseline name": ("ablation:\n  arms: {one: {train.lr: 0.1}, two: {train.lr: 0.2}}\n  baseline: tow\n",
                      ":5: ablation.baseline: baseline 'tow' is not among the arms (did you mean 'two'?)"),
    "baseline axis": ("ablation:\n  axes: {block.shortcut: [A, B]}\n  baseline: {block.shortcu: A}\n",
                      "'block.shortcu' is not an axis (did you mean 'block.shortcut'?)"),
    "unknown metric": ("ablation:\n  axes: {block.shortcut: [A, B]}\n  baseline: A\n  metric: test/eror\n",
                       ":6: ablation.metric: unknown metric 'test/eror' (did you mean 'test/error'?)"),
    "stage out of range": ("ablation:\n  axes: {stages.5.depth: [1, 2]}\n  baseline: 1\n",
                           ":4: stages.5: index '5' out of range"),
    "both kinds": ("ablation: {axes: {block.shortcut: [A]}, baseline: A}\nsearch: {space: {train.lr: [0.1]}}\n",
                   "give exactly one of `ablation:` and `search:`"),
    "prune multi-objective": ("search:\n  space: {train.lr: [0.1, 0.2]}\n  objectives: [val/error, macs]\n"
                              "  pruner: median\n", ":6: search.pruner: Optuna cannot prune multi-objective"),
    "empty range": ("search:\n  space:\n    train.lr: {low: 0.2, high: 0.1}\n",
                    ":5: search.space.train.lr: low (0.2) must be below high (0.1)"),
    "range key": ("search:\n  space:\n    train.lr: {low: 0.1, hi: 0.2}\n",
                  "unknown key 'hi' (did you mean 'high'?)"),
    "grid float": ("search:\n  space: {train.lr: {low: 0.1, high: 0.2}}\n  sampler: grid\n",
                   "sampler grid needs a step"),
    "yaml syntax": ("ablation: {axes: [\n", "YAML syntax error"),
    "match twice": ("ablation:\n  arms: {a: {width_multiplier: 2}, b: {train.lr: 0.2}}\n  baseline: a\n"
                    "  match: macs\n", "chooses width_multiplier itself"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_malformed_files_give_one_line_errors(tmp_path, capsys, case):
    body, expected = BAD[case]
    path = write(tmp_path, body)
    err = cli_error(capsys, "ablate", str(path), "--output-dir", str(tmp_path / "out"))
    assert expected in err
    assert err.startswith(path.name) or err.startswith(str(path))
    assert not (tmp_path / "out" / "optuna.db").exists()      # nothing was created


def test_command_and_flag_errors(tmp_path, capsys):
    good = write(tmp_path, "ablation: {axes: {block.shortcut: [A, B]}, baseline: A}\n")
    err = cli_error(capsys, "search", str(good), "--output-dir", str(tmp_path / "out"))
    assert "is an ablation file; run it with `python cli.py ablate`" in err
    err = cli_error(capsys, "ablate", str(good), "--set", "block.shortcutt=B", "--output-dir", str(tmp_path / "o"))
    assert err.startswith("--set: block.shortcutt: unknown key 'shortcutt' (did you mean 'shortcut'?)")
    err = cli_error(capsys, "ablate", str(tmp_path / "missing.yaml"))
    assert err.endswith("missing.yaml: no such file")
    missing_base = write(tmp_path, "base: nowhere.yaml\nablation: {axes: {train.lr: [1]}, baseline: 1}\n",
                         name="nobase.yaml", head="")
    assert ":1: base: base spec not found" in cli_error(capsys, "ablate", str(missing_base))
    err = cli_error(capsys, "ablate", str(good), "--workers", "0", "--output-dir", str(tmp_path / "o"))
    assert "--workers: must be at least 1" in err
    err = cli_error(capsys, "ablate", str(good), "--storage", "nowhere", "--output-dir", str(tmp_path / "o"))
    assert err.startswith("--storage: storage URL 'nowhere' has no scheme")
    search = write(tmp_path, "search: {space: {train.lr: [0.1, 0.2]}}\n", name="search.yaml")
    err = cli_error(capsys, "search", str(search), "--set", "data.val_size=0", "--output-dir", str(tmp_path / "o"))
    assert err.endswith(":3: search.objectives: val/error needs a validation split, but data.val_size is 0")
    err = cli_error(capsys, "report", "nosuch", "--output-dir", str(tmp_path / "empty"))
    assert "no study storage" in err


def test_match_tolerance_out_of_reach_is_a_spec_error(tmp_path):
    path = write(tmp_path, """
        set: {stem.width: 2, stages: [{depth: 1, width: 2}, {depth: 1, width: 2, stride: 2}]}
        ablation:
          axes: {block.shortcut: [A, C]}
          baseline: A
          match: {by: params, tolerance: 0.001}
        """)
    with pytest.raises(SpecError, match="cannot match params"):
        load_study_file(path)


def test_a_study_is_not_resumed_with_another_definition(tmp_path, capsys):
    from search.storage import open_storage
    from search.study import StudyOptions, prepare

    path = write(tmp_path, "ablation: {axes: {block.shortcut: [A, B]}, baseline: A, seeds: 1}\n")
    out = tmp_path / "out"
    opts = StudyOptions(str(path), output_dir=str(out)).resolved()
    first = prepare(load_study_file(path), opts, open_storage(opts.storage))
    again = prepare(load_study_file(path), opts, open_storage(opts.storage))     # same definition: resumed
    assert again.parent_run_id == first.parent_run_id and first.created and not again.created
    err = cli_error(capsys, "ablate", str(path), "--set", "train.lr=0.01", "--output-dir", str(out))
    assert "study 'study' in sqlite:///" in err and "was made from another definition" in err
    assert err.endswith("run it under a new name with --study NAME")


@pytest.mark.parametrize("body, where, words", [
    ("search: {space: {width_multiplier: {low: 0.5, high: 2.0, step: -0.5}}}\n",
     "search.space.width_multiplier.step", "greater than 0"),
    ("search: {space: {width_multiplier: {low: 0.5, high: .inf}}}\n", "search.space.width_multiplier.high",
     "finite number"),
    ("search: {space: {stages.0.depth: {low: 1, high: 1000000}}}\n", "stages.0.depth", "less than or equal to 2000"),
    ("ablation: {axes: {block.shortcut: [A, B]}, baseline: A, seeds: [0, -1]}\n", "ablation.seeds.1",
     "greater than or equal to 0"),
    ("ablation: {axes: {block.shortcut: [A, B]}, baseline: A, seeds: 3, match: {by: macs, tolerance: -0.1}}\n",
     "ablation.match.tolerance", "greater than 0"),
    ("ablation: {axes: {train.batch_size: [0, 128]}, baseline: {train.batch_size: 128}, seeds: 1}\n",
     "train.batch_size", "greater than or equal to 1"),
])
def test_study_files_with_values_out_of_range_are_one_line(tmp_path, capsys, body, where, words):
    """Each of these once passed (an empty study, a RecursionError, an hour of validating, a crash at train time) or
    blamed the wrong key; now one line names the key and the bound."""
    err = cli_error(capsys, "validate", str(write(tmp_path, body)))
    assert f": {where}: " in err and words in err, err
