"""Adaptive seeds (search.seeding): the stopping rule by hand, the detectable difference by simulation, a real
ablation that adds seeds with two workers and resumes, and one-line errors for bad rules."""
from __future__ import annotations

import json
import math
import textwrap

import numpy as np
import optuna
import pytest
from scipy import stats

from cli import main
from conftest import ROOT
from search.seeding import AT_MAX, PRECISION, RUNNING, SeedRule, decide, detectable_difference

# test/error of arm B minus arm A per seed, in percentage points: 1.0, 1.6, 0.4, 1.2, 1.0, 1.1
A = {s: 0.100 for s in range(6)}
B = {s: 0.100 + d / 100 for s, d in enumerate([1.0, 1.6, 0.4, 1.2, 1.0, 1.1])}
ALL = {(arm, s) for arm in "AB" for s in range(6)}


def test_the_rule_stops_where_the_hand_computation_says():
    # by hand, half-width = t(0.975, n-1) * sd / sqrt(n) of the differences in pp:
    #   n = 3: mean 1.0,  sd 0.6,    4.303 * 0.6 / 1.732   = 1.491
    #   n = 4: mean 1.05, sd 0.5,    3.182 * 0.5 / 2       = 0.796
    #   n = 5: mean 1.04, sd 0.4336, 2.776 * 0.4336 / 2.236 = 0.538
    refs = {"A": "A", "B": "A"}
    rule = SeedRule(min=3, max=6, precision=0.6)
    d = decide(rule, list(range(6)), refs, "test/error", {"A": A, "B": B}, ALL)
    assert (d.n, d.reason) == (5, PRECISION)
    (c,) = d.comparisons
    assert (c.arm, c.reference, c.n) == ("B", "A", 5)
    assert c.half_width == pytest.approx(0.538, abs=5e-4) and c.diff == pytest.approx(1.04)
    assert "stopped at n = 5" in d.sentence() and "±0.6 percentage points" in d.sentence()

    for precision, n in ((1.5, 3), (0.8, 4)):               # 1.491 < 1.5 at 3; 0.796 < 0.8 at 4
        assert decide(SeedRule(min=3, max=6, precision=precision), list(range(6)), refs, "test/error",
                      {"A": A, "B": B}, ALL).n == n
    at_max = decide(SeedRule(min=3, max=4, precision=0.6), list(range(4)), refs, "test/error", {"A": A, "B": B}, ALL)
    assert (at_max.n, at_max.reason) == (4, AT_MAX) and "still wider" in at_max.sentence()
    # the 5th seed of B is not finished: the rule waits at 5 (it never stops on an unfinished round)
    waiting = decide(rule, list(range(6)), refs, "test/error", {"A": A, "B": {s: B[s] for s in range(4)}},
                     ALL - {("B", 4), ("B", 5)})
    assert (waiting.n, waiting.reason) == (5, RUNNING)
    # non-percentage metrics are in their own units: the same differences as raw numbers, precision 0.006
    raw = decide(SeedRule(min=3, max=6, precision=0.006), list(range(6)), refs, "test/loss", {"A": A, "B": B}, ALL)
    assert raw.n == 5 and raw.comparisons[0].half_width == pytest.approx(0.00538, abs=5e-6)


def test_the_rule_never_looks_at_p():
    # a huge, consistent difference (p ~ 0) with a wide CI still adds seeds; a zero difference with a narrow CI stops
    refs = {"A": "A", "B": "A"}
    big = {s: 0.5 + d for s, d in enumerate([0.10, 0.30, 0.15, 0.25, 0.20, 0.18])}
    assert stats.ttest_rel(list(big.values()), list(A.values())).pvalue < 1e-3
    assert decide(SeedRule(min=3, max=6, precision=1.0), list(range(6)), refs, "test/error",
                  {"A": A, "B": big}, ALL).reason == AT_MAX
    same = {s: v + (1e-4 if s % 2 else -1e-4) for s, v in A.items()}
    d = decide(SeedRule(min=3, max=6, precision=0.1), list(range(6)), refs, "test/error", {"A": A, "B": same}, ALL)
    assert (d.n, d.reason) == (3, PRECISION)


def test_the_detectable_difference_has_80_percent_power_by_simulation():
    rng = np.random.default_rng(0)
    for n, sd in ((3, 1.0), (6, 0.4), (12, 2.5)):
        delta = detectable_difference(sd, n)
        diffs = rng.normal(delta, sd, size=(40_000, n))
        t = diffs.mean(1) / (diffs.std(1, ddof=1) / math.sqrt(n))
        power = float(np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1)))
        assert power == pytest.approx(0.80, abs=0.01), (n, sd, power)
    assert detectable_difference(1.0, 1) is None and detectable_difference(0.0, 5) == 0.0
    assert detectable_difference(1.0, 12) < detectable_difference(1.0, 6) < detectable_difference(1.0, 3)


TINY = f"""\
base: {ROOT / 'specs' / 'resnet20.yaml'}
set:
  data: {{name: synthetic, train_subset: 200, val_size: 40, test_subset: 100, augment: none}}
  input: {{channels: 1, size: 8}}
  classes: 10
  stem.width: 4
  stages: [{{depth: 1, width: 4}}, {{depth: 1, width: 8, stride: 2}}, {{depth: 1, width: 8, stride: 2}}]
  train: {{epochs: 1, max_steps: null, batch_size: 50, lr: 0.05, schedule: {{type: constant}}, warmup: {{steps: 0}}}}
"""


def study(tmp_path, seeds: str, metric: str = "test/loss"):
    path = tmp_path / "seeded.yaml"
    path.write_text(TINY + textwrap.dedent(f"""\
        ablation:
          axes: {{block.shortcut: [A, B]}}
          baseline: A
          seeds: {seeds}
          metric: {metric}
        """))
    return path


@pytest.mark.slow
def test_an_ablation_adds_paired_seeds_with_two_workers_and_resumes(tmp_path, capsys):
    path, out = study(tmp_path, "{min: 2, max: 3, precision: 1.0e-9}"), tmp_path / "outputs"
    assert main(["ablate", str(path), "--workers", "2", "--output-dir", str(out)]) == 0
    trials = optuna.load_study(study_name="seeded", storage=f"sqlite:///{out / 'optuna.db'}").get_trials()
    cells = sorted((t.params["arm"], t.params["seed"]) for t in trials if t.state.name == "COMPLETE")
    assert cells == [("A", 0), ("A", 1), ("A", 2), ("B", 0), ("B", 1), ("B", 2)]   # a third paired seed, then max
    assert len(trials) == 6

    # resumed: nothing more to run, the same decision
    assert main(["ablate", str(path), "--workers", "1", "--output-dir", str(out)]) == 0
    assert len(optuna.load_study(study_name="seeded", storage=f"sqlite:///{out / 'optuna.db'}").get_trials()) == 6
    capsys.readouterr()
    assert main(["report", str(path), "--output-dir", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    seeding = summary["seeding"]
    assert (seeding["n"], seeding["reason"]) == (3, AT_MAX) and summary["seeds"] == [0, 1, 2]
    # by hand from the trials: the paired CI half-width and detectable difference at n = 3
    loss = {(t.params["arm"], t.params["seed"]): t.user_attrs["reslab.metrics"]["test/loss"] for t in trials}
    d = np.array([loss["B", s] - loss["A", s] for s in range(3)])
    (c,) = seeding["comparisons"]
    assert c["half_width"] == pytest.approx(stats.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3))
    assert c["detectable"] == pytest.approx(detectable_difference(float(d.std(ddof=1)), 3))
    assert main(["report", str(path), "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "stopped at the maximum n = 3" in text and "never on p" in text and "80% power, paired t" in text


@pytest.mark.parametrize("seeds, message", [
    ("{min: 3, max: 12, precision: 0}", r"seeded.yaml:\d+: ablation.seeds.precision: .*greater than 0"),
    ("{min: 3, max: 12, precision: -0.5}", r"ablation.seeds.precision: .*greater than 0"),
    ("{min: 5, max: 3, precision: 0.3}", r"ablation.seeds.max: seeds: max \(3\) must be at least min \(5\)"),
    ("{min: 1, max: 3, precision: 0.3}", r"ablation.seeds.min: .*greater than or equal to 2"),
    ("{min: 3, max: 12, precison: 0.3}", r"ablation.seeds"),
])
def test_bad_seed_rules_get_one_line_and_exit_2(tmp_path, capsys, seeds, message):
    import re

    path = study(tmp_path, seeds)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err
