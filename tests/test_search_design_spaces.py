"""Design spaces (search.design_spaces): the same draws in every space, complexity-normalised EDFs by hand, a real
study's report with its figures in MLflow, and one-line errors."""
from __future__ import annotations

import json
from pathlib import Path
import re

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from cli import main
from conftest import ROOT
from search.design_spaces import DESIGN_SPACE, bin_edges, complexity_weights, edf
from search.space import load_study_file

HEAD = f"""\
base: {ROOT / 'specs' / 'resnet20.yaml'}
set:
  data: {{name: synthetic, train_subset: 200, val_size: 40, test_subset: 100, augment: none}}
  input: {{channels: 1, size: 8}}
  stem.width: 4
  train: {{epochs: 1, max_steps: null, batch_size: 50, lr: 0.05, schedule: {{type: constant}}, warmup: {{steps: 0}}}}
"""
SEARCH = """\
search:
  space:
    stages.*.depth: {low: 1, high: 2}
    width_multiplier: {low: 0.25, high: 0.5, log: true}
  design_spaces: SPACES
  objectives: [val/error]
  trials: TRIALS
  sampler_seed: SEED
"""


def search_file(tmp_path, spaces="{plain: {block.type: plain}, residual: {block.type: basic}}", trials=3, seed=0,
                extra=""):
    path = tmp_path / "spaces.yaml"
    path.write_text(HEAD + SEARCH.replace("SPACES", spaces).replace("TRIALS", str(trials)).replace("SEED", str(seed)) + extra)
    return path


def test_every_design_space_gets_the_same_draws(tmp_path):
    plan = load_study_file(search_file(tmp_path, trials=5))
    cells = plan.fixed_cells()
    assert len(cells) == 10 and plan.design_spaces == ["plain", "residual"]
    points = {name: [{k: v for k, v in c.items() if k != DESIGN_SPACE} for c in cells if c[DESIGN_SPACE] == name]
              for name in plan.design_spaces}
    assert points["plain"] == points["residual"] and len({json.dumps(p) for p in points["plain"]}) == 5
    for p in points["plain"]:
        assert p["stages.*.depth"] in (1, 2) and 0.25 <= p["width_multiplier"] <= 0.5
    assert load_study_file(search_file(tmp_path, trials=5)).fixed_cells() == cells            # seeded
    assert load_study_file(search_file(tmp_path, trials=5, seed=1)).fixed_cells() != cells
    spec = plan.search_spec(cells[0])
    assert spec.block.type == "plain" and plan.search_spec(cells[1]).block.type == "basic"


def test_complexity_normalised_edf_by_hand():
    # MACs 1, 1, 1 (bin 0) and 100 (bin 9) over bins from 1 to 100: two occupied bins of weight 1/2 each
    edges = bin_edges([1, 1, 1, 100])
    assert len(edges) == 11 and edges[0] == 1
    w = complexity_weights([1, 1, 1, 100], edges)
    assert w.tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 6, 1 / 2])
    # errors 0.1, 0.2, 0.3 for the small nets, 0.05 for the big one: F(e) = weight share with error < e
    at = np.array([0.06, 0.15, 0.25, 0.35])
    assert edf([0.1, 0.2, 0.3, 0.05], w, at).tolist() == pytest.approx([0.5, 0.5 + 1 / 6, 0.5 + 2 / 6, 1.0])
    # without normalisation the big net would count 1/4, not 1/2
    assert edf([0.1, 0.2, 0.3, 0.05], np.ones(4), at).tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0])


@pytest.mark.slow
def test_a_design_space_study_reports_edfs_and_figures_in_mlflow(tmp_path, capsys):
    path, out = search_file(tmp_path, trials=3), tmp_path / "outputs"
    assert main(["search", str(path), "--workers", "2", "--output-dir", str(out)]) == 0
    capsys.readouterr()
    assert main(["report", str(path), "--output-dir", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    ds = summary["design_spaces"]
    assert [s["name"] for s in ds["spaces"]] == ["plain", "residual"] and all(s["n"] == 3 for s in ds["spaces"])
    for s in ds["spaces"]:
        assert s["edf"][-1] == pytest.approx(1.0) and s["edf"] == sorted(s["edf"])
        assert all(lo <= v + 1e-12 and v <= hi + 1e-12 for lo, v, hi in zip(s["edf_low"], s["edf"], s["edf_high"]))
        assert s["min"] == min(s["errors"]) and s["mean"] == pytest.approx(np.mean(s["errors"]))
    # the errors are the trials' validation errors, the MACs their measured cost
    rows = {r["number"]: r for r in summary["trials_table"]}
    for s in ds["spaces"]:
        assert s["errors"] == [rows[n]["values"][0] for n in s["trials"]]
        assert all(rows[n]["params"][DESIGN_SPACE] == s["name"] for n in s["trials"])
    assert main(["report", str(path), "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "by design space" in text and "normalised by complexity" in text and "D(plain, residual)" in text
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("search/spaces")
    (parent,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("reslab.role") == "study"]
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "results")}
    assert {"results/edf.png", "results/error_vs_macs.png", "results/results.md"} <= files
    md = Path(client.download_artifacts(parent.info.run_id, "results/results.md", str(tmp_path))).read_text()
    assert "## Design spaces" in md and "| residual | 3 |" in md


@pytest.mark.parametrize("spaces, extra, message", [
    ("{}", "", r"spaces.yaml:\d+: search.design_spaces: needs at least one design space"),
    ("{plain: {}, residual: {block.type: basic}}", "", r"search.design_spaces.plain: design space 'plain' is empty"),
    ("{plain: {block.type: plain}}", "  sampler: tpe\n", r"search.sampler: design spaces are sampled uniformly"),
    ("{plain: {block.typo: plain}}", "", r"spaces.yaml:\d+: block.typo: unknown key 'typo' \(did you mean 'type'\?\)"),
])
def test_bad_design_spaces_get_one_line_and_exit_2(tmp_path, capsys, spaces, extra, message):
    path = search_file(tmp_path, spaces=spaces, extra=extra)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err
