"""Arm statistics against textbook formulas (numpy) and scipy.stats; compute-matched widths."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import stats

from arches import complexity
from search.matching import match_arms, match_multiplier
from search.space import load_study_file
from search.stats import compare, compare_arms, count_mean_std

ROOT = Path(__file__).resolve().parents[1]


def test_describe_is_sample_mean_and_std():
    n, mean, std = count_mean_std([0.1, 0.2, 0.4])
    assert n == 3 and mean == pytest.approx(0.7 / 3)
    assert std == pytest.approx(math.sqrt(((0.1 - mean) ** 2 + (0.2 - mean) ** 2 + (0.4 - mean) ** 2) / 2))
    assert math.isnan(count_mean_std([0.3])[2])


def test_paired_by_seed():
    arm = {0: 0.080, 1: 0.091, 2: 0.085, 3: 0.079}
    ref = {3: 0.083, 0: 0.088, 2: 0.090, 1: 0.094}          # order does not matter: seeds pair up
    c = compare(arm, ref)
    d = np.array([arm[s] - ref[s] for s in range(4)])
    half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / math.sqrt(4)
    assert c.test == "paired t" and c.n == 4
    assert c.diff == pytest.approx(d.mean())
    assert (c.ci_low, c.ci_high) == pytest.approx((d.mean() - half, d.mean() + half))
    t = d.mean() / (d.std(ddof=1) / 2)
    assert c.p == pytest.approx(2 * stats.t.sf(abs(t), 3))


def test_welch_when_seeds_do_not_match():
    arm = {0: 0.30, 1: 0.35, 2: 0.31}
    ref = {0: 0.40, 1: 0.42, 3: 0.47, 4: 0.45}
    c = compare(arm, ref)
    a, b = np.array(list(arm.values())), np.array(list(ref.values()))
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))     # Welch-Satterthwaite
    diff = a.mean() - b.mean()
    half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert c.test == "Welch t"
    assert c.diff == pytest.approx(diff)
    assert (c.ci_low, c.ci_high) == pytest.approx((diff - half, diff + half))
    assert c.p == pytest.approx(2 * stats.t.sf(abs(diff) / math.sqrt(va + vb), df))


def test_undefined_cases_are_nan_not_errors():
    same = compare({0: 0.1, 1: 0.2}, {0: 0.1, 1: 0.2})
    assert same.diff == 0 and math.isnan(same.p)
    single = compare({0: 0.1}, {0: 0.2})
    assert single.diff == pytest.approx(-0.1) and math.isnan(single.p) and single.test == "Welch t"
    assert compare({}, {0: 0.1}) is None


def test_compare_arms_uses_each_arms_reference():
    values = {"plain20": {0: 0.10, 1: 0.11}, "res20": {0: 0.08, 1: 0.085},
              "plain56": {0: 0.14, 1: 0.15}, "res56": {0: 0.07, 1: 0.072}}
    refs = {"plain20": "plain20", "res20": "plain20", "plain56": "plain56", "res56": "plain56"}
    rows = {r.arm: r for r in compare_arms(values, refs)}
    assert rows["plain20"].comparison is None and rows["plain56"].comparison is None
    assert rows["res56"].comparison.diff == pytest.approx(np.mean([0.07 - 0.14, 0.072 - 0.15]))
    assert rows["res20"].n == 2 and rows["res20"].mean == pytest.approx(0.0825)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=2, max_size=8))
def test_paired_interval_and_p_are_scipys(pairs):
    """On any paired data: the interval and p-value scipy's own paired t-test gives (its confidence_interval,
    computed independently of reslab's t-quantile arithmetic)."""
    a, b = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    assume(np.std(a - b) > 1e-6)
    c = compare(dict(enumerate(a)), dict(enumerate(b)))
    scipy_test = stats.ttest_rel(a, b)
    ci = scipy_test.confidence_interval(0.95)
    assert c.test == "paired t" and c.n == len(pairs)
    assert (c.ci_low, c.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9, abs=1e-12)
    assert c.p == pytest.approx(scipy_test.pvalue, rel=1e-9, abs=1e-12)
    assert math.isnan(c.p) or 0.0 <= c.p <= 1.0


# ---- compute matching --------------------------------------------------------------------------------------
@pytest.mark.parametrize("by", ["macs", "params"])
def test_matched_arms_land_within_tolerance(by):
    plan = load_study_file(ROOT / "specs" / "ablations" / "shortcuts_matched.yaml")
    plan.match = plan.match.model_copy(update={"by": by})
    chosen = match_arms(plan)
    target = getattr(complexity(plan.arm_spec("A", 0)), by)
    for arm in plan.arms:
        spec = plan.arm_spec(arm.name, 0)
        cost = getattr(complexity(spec), by)
        assert abs(cost / target - 1) <= plan.match.tolerance, (arm.name, cost, target)
        assert spec.width_multiplier == chosen[arm.name]
    assert chosen["C"] < 1.0       # C's projections are paid for with narrower layers
    unmatched = load_study_file(ROOT / "specs" / "ablations" / "shortcuts.yaml")
    c_cost = getattr(complexity(unmatched.arm_spec("C", 0)), by)
    assert abs(c_cost / target - 1) > plan.match.tolerance   # without matching, C costs more


def test_match_multiplier_bisects_a_real_spec():
    plan = load_study_file(ROOT / "specs" / "ablations" / "shortcuts.yaml")
    base = plan.arm("A").settings

    def make(m):
        from search.space import Setting
        return plan.build(base + [Setting("width_multiplier", m, "<test>", None)])

    target = complexity(make(1.5)).macs
    m, cost = match_multiplier(make, target, "macs", 0.01)
    assert abs(cost / target - 1) <= 0.01 and 1.3 < m < 1.7
    assert complexity(make(m)).macs == cost


# ---- trial bookkeeping: budget, retries, no duplicate cells (no training) ----------------------------------
def _trial(state, params, outcome=None, value=None, **attrs):
    import optuna
    from optuna.distributions import CategoricalDistribution

    user = dict(attrs)
    if outcome:
        user["reslab.outcome"] = outcome
    return optuna.trial.create_trial(
        state=state, params=params, user_attrs=user, value=value,
        distributions={k: CategoricalDistribution([v]) for k, v in params.items()})


def study_plan(tmp_path: Path, name: str, body: str):
    """The plan of a study file `name`.yaml on resnet20 whose ablation/search section is `body` (one line)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"base: {ROOT / 'specs' / 'resnet20.yaml'}\n{body}\n")
    return load_study_file(path)


def test_ablation_cells_are_enqueued_once_and_retried_until_given_up(tmp_path):
    import optuna
    from optuna.trial import TrialState as S
    from search.study import RUN, STOP, WAIT, cell_status, enqueue_missing, next_action

    plan = study_plan(tmp_path, "cells",
                      "ablation: {axes: {block.shortcut: [A, B]}, baseline: A, seeds: 2, max_attempts: 2}")
    study = optuna.create_study()
    study.add_trial(_trial(S.COMPLETE, {"arm": "A", "seed": 0}, "complete", 0.1))
    study.add_trial(_trial(S.FAIL, {"arm": "A", "seed": 1}, "diverged"))            # a result: final
    study.add_trial(_trial(S.FAIL, {"arm": "B", "seed": 0}))                        # worker died once
    study.add_trial(_trial(S.FAIL, {"arm": "B", "seed": 1}))                        # died twice: given up
    study.add_trial(_trial(S.FAIL, {"arm": "B", "seed": 1}, "error"))
    assert enqueue_missing(study, plan) == 1
    assert enqueue_missing(study, plan) == 0                                        # already waiting
    waiting = study.get_trials(states=(S.WAITING,))
    assert [t.system_attrs["fixed_params"] for t in waiting] == [{"arm": "B", "seed": 0}]
    assert waiting[0].user_attrs == {"reslab.attempt": 2, "reslab.retry_of": 2}
    assert next_action(study, plan, None) == RUN
    trial = study.ask()
    assert next_action(study, plan, None) == WAIT                                   # it may still die
    study.tell(trial, 0.2)
    cells = cell_status(plan, study.get_trials())
    assert sum(c["done"] for c in cells.values()) == 3 and next_action(study, plan, None) == STOP


def test_a_cell_half_way_through_its_suggests_is_not_enqueued_again(tmp_path):
    """A worker fills in its cell's values one suggest at a time, outside the lock: another worker looking at
    that moment must still see the cell as taken (once it did not, and a cell ran twice)."""
    import optuna
    from search.study import cell_status, enqueue_missing

    plan = study_plan(tmp_path, "cells",
                      "ablation: {axes: {block.shortcut: [A, B]}, baseline: A, seeds: 2}")
    study = optuna.create_study()
    assert enqueue_missing(study, plan) == 4
    trial = study.ask()
    trial.suggest_categorical("arm", [a.name for a in plan.arms])      # the seed is not suggested yet
    assert study.get_trials()[0].params == {"arm": "A"}
    assert enqueue_missing(study, plan) == 0
    assert cell_status(plan, study.get_trials())['{"arm": "A", "seed": 0}']["active"]


def test_a_sampled_trial_in_a_study_of_cells_is_discarded(tmp_path, monkeypatch):
    """If ask() finds no queued cell to pop (it lost a race), the fresh trial it samples is never run."""
    import optuna
    from optuna.trial import TrialState as S
    from search.storage import open_storage
    from search.study import RUN, WAIT, _claim, cell_status

    plan = study_plan(tmp_path, "cells",
                      "ablation: {axes: {block.shortcut: [A, B]}, baseline: A, seeds: 1}")
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat=5)
    study = optuna.create_study(study_name=plan.name, storage=storage)
    popped = optuna.Study._pop_waiting_trial_id
    calls = []
    monkeypatch.setattr(optuna.Study, "_pop_waiting_trial_id", lambda self: calls.append(1) or None)
    assert _claim(study, storage, plan, None) == (WAIT, None) and calls
    [discarded] = study.get_trials()[2:]
    assert discarded.state == S.FAIL and discarded.user_attrs["reslab.outcome"] == "discarded"
    assert not any(discarded in c["trials"] for c in cell_status(plan, study.get_trials()).values())
    monkeypatch.setattr(optuna.Study, "_pop_waiting_trial_id", popped)
    action, trial = _claim(study, storage, plan, None)
    assert action == RUN and trial.number == 0 and len(study.get_trials()) == 3   # the queued cell, nothing new


def test_a_result_for_a_trial_failed_as_stale_is_not_lost_silently(tmp_path):
    """A worker whose heartbeats stopped reaching the storage finds its trial failed as stale when it reports:
    Optuna keeps the FAIL (the trial is retried), the MLflow run is ended FAILED to match, the worker goes on."""
    import optuna
    from optuna.trial import TrialState as S
    from runs.mlflow_client import client_for
    from search.objective import Outcome
    from search.storage import open_storage
    from search.study import tell_outcome

    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat=5)
    study = optuna.create_study(study_name="stale", storage=storage)
    client = client_for(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    experiment = client.create_experiment("stale", artifact_location=str(tmp_path / "artifacts"))
    runs = [client.create_run(experiment).info.run_id for _ in range(2)]

    kept = study.ask()
    assert tell_outcome(study, kept, Outcome(S.COMPLETE, "complete", values=[0.1], run_id=runs[0]), client)
    assert study.trials[0].state == S.COMPLETE and study.trials[0].user_attrs["reslab.outcome"] == "complete"

    stale = study.ask()
    storage.set_trial_state_values(stale._trial_id, S.FAIL)          # what fail_stale_trials does
    assert not tell_outcome(study, stale, Outcome(S.COMPLETE, "complete", values=[0.2], run_id=runs[1]), client)
    assert study.trials[1].state == S.FAIL and "reslab.outcome" not in study.trials[1].user_attrs  # so: retried
    run = client.get_run(runs[1])
    assert run.info.status == "FAILED" and run.data.tags["state"] == "FAILED" and "stale" in run.data.tags[
        "failure_reason"]
    assert client.get_run(runs[0]).info.status == "RUNNING"             # the kept trial's run is not touched


def test_search_budget_counts_every_worker_and_retries_dead_trials(tmp_path):
    import time

    import optuna
    from optuna.trial import TrialState as S
    from search.study import RUN, STOP, enqueue_retries, next_action, search_used

    plan = study_plan(tmp_path, "budget",
                      "search: {space: {block.shortcut: [A, B]}, trials: 4, max_attempts: 2}")
    study = optuna.create_study()
    study.add_trial(_trial(S.COMPLETE, {"block.shortcut": "A"}, "complete", 0.1))
    study.add_trial(_trial(S.PRUNED, {"block.shortcut": "B"}, "pruned"))
    study.add_trial(_trial(S.FAIL, {"block.shortcut": "B"}))                                  # died
    study.add_trial(_trial(S.FAIL, {"block.shortcut": "A"}, "error", **{"reslab.attempt": 2}))  # out of attempts
    assert enqueue_retries(study, plan) == 1 and enqueue_retries(study, plan) == 0
    assert search_used(plan, study.get_trials()) == 4          # complete, pruned, given up, waiting retry
    assert next_action(study, plan, None) == RUN                # the waiting retry still runs
    trial = study.ask()
    assert trial.params == {} and trial.user_attrs["reslab.retry_of"] == 2
    study.tell(trial, 0.3)
    assert next_action(study, plan, None) == STOP               # budget of 4 used
    plan.trials = 10
    assert next_action(study, plan, None) == RUN
    assert next_action(study, plan, time.time() - 1) == STOP    # past the timeout


def test_latency_and_costs_of_a_tiny_spec(tmp_path):
    from search.objective import costs

    plan = load_study_file(ROOT / "specs" / "ablations" / "shortcuts.yaml",
                           ["stages.*.depth=1", "stem.width=4", "stages.*.width=4"])
    spec = plan.arm_spec("A", 0)
    c = costs(spec, latency=True)
    # counted by hand: 1x28x28 input, widths 4, one basic block per stage (strides 1, 2, 2), option A, 10 classes
    conv = 4 * 4 * 9                                     # a 3x3 conv 4 -> 4
    params = (1 * 4 * 9 + 2 * 4) + 3 * (2 * conv + 2 * 2 * 4) + (4 * 10 + 10)          # stem, 3 blocks, fc
    macs = 28 * 28 * 4 * 9 + 2 * 28 * 28 * conv + 2 * 14 * 14 * conv + 2 * 7 * 7 * conv + 4 * 10
    assert (c["params"], c["macs"]) == (params, macs) == (1006, 324616)
    assert 0 < c["latency_ms"] < 10_000


def test_holm_adjustment_by_hand():
    """Holm (1979) on four p-values, worked by hand: sorted 0.005, 0.01, 0.03, 0.04 are multiplied by 4, 3, 2, 1
    (0.02, 0.03, 0.06, 0.04) and made non-decreasing (the last becomes 0.06); NaN is left out of the count."""
    from search.stats import holm

    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([0.2, float("nan"), 0.6])
    assert adjusted[0] == pytest.approx(0.4) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.6)
    assert holm([0.7, 0.9]) == pytest.approx([1.0, 1.0])          # capped at 1


def test_holm_only_with_more_than_one_comparison():
    from search.stats import compare_arms

    values = {"A": {0: 0.1, 1: 0.2, 2: 0.15}, "B": {0: 0.2, 1: 0.25, 2: 0.3}, "C": {0: 0.1, 1: 0.3, 2: 0.2}}
    two = compare_arms({k: values[k] for k in "AB"}, {"A": "A", "B": "A"})
    assert two[1].comparison.p_holm is None
    three = compare_arms(values, {"A": "A", "B": "A", "C": "A"})
    raw = [three[1].comparison.p, three[2].comparison.p]
    small, large = sorted(raw)
    assert min(three[1].comparison.p_holm, three[2].comparison.p_holm) == pytest.approx(2 * small)
    assert max(three[1].comparison.p_holm, three[2].comparison.p_holm) == pytest.approx(max(2 * small, large))
