"""Packs in studies (search/packing.py): an ablation packed equals it solo, bad --pack values are one line, a search
with a dimension that changes the network trains alone, a worker killed mid-pack loses no cell."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from cli import main
from conftest import ROOT, tiny_study

# A calm lr on one thread: fp32 pack members equal their solo runs to ~2e-7 relative (tests/test_pack.py)
TINY = tiny_study(data=(256, 64, 128), widths=(8, 16), epochs=1, batch_size=64, lr=0.02)
ABLATION = """
ablation:
  arms: {A: {train.lr: 0.02}, B: {train.lr: 0.01}}
  baseline: A
  seeds: 2
  metric: [test/loss, test/error]
"""
TOLERANCE = 1e-5          # relative, per cell's test/loss and per arm's mean (measured: ~1e-6)
STD_TOLERANCE = 1e-5      # absolute, per arm's std (of two seeds: their difference, which the cells' rounding moves)


def study_file(tmp_path: Path, body: str, name: str = "packs") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(TINY + textwrap.dedent(body))
    return path


def trials_of(out: Path, name: str = "packs") -> list:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'optuna.db'}").get_trials()


def test_an_ablation_packed_equals_it_solo(tmp_path, fashion_mnist, capsys):
    path = study_file(tmp_path, ABLATION)
    reports = {}
    for how in ("8", "off"):
        out = tmp_path / how
        assert main(["ablate", str(path), "--pack", how, "--output-dir", str(out), "--json"]) == 0
        captured = capsys.readouterr()
        reports[how] = json.loads(captured.out[captured.out.index("{\n"):])
        if how == "8":       # more than the cells: packs of what there is, said once
            assert "note: --pack 8: the study has 4 trials; packs of at most 4" in captured.err
            assert captured.out.count("started in pack ") == 4
    packed, solo = reports["8"], reports["off"]
    shown: list[str] = []
    assert len(packed["packs"]) == 1 and packed["packs"][0]["size"] == 4 and solo["packs"] == []
    assert sorted(packed["packs"][0]["cells"]) == ["A seed 0", "A seed 1", "B seed 0", "B seed 1"]
    for metric in ("test/loss", "test/error"):
        for ours, theirs in zip(packed["results"][metric], solo["results"][metric]):
            assert ours["arm"] == theirs["arm"] and ours["n"] == theirs["n"] == 2
            assert ours["mean"] == pytest.approx(theirs["mean"], rel=TOLERANCE), metric
            assert ours["std"] == pytest.approx(theirs["std"], abs=STD_TOLERANCE), metric
            shown.append(f"{metric} {ours['arm']}: mean {ours['mean']:.6g} vs {theirs['mean']:.6g}, "
                         f"std {ours['std']:.4g} vs {theirs['std']:.4g}")
    packed_trials = trials_of(tmp_path / "8")
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in packed_trials) and len(packed_trials) == 4
    solo_loss = {(t.params["arm"], t.params["seed"]): t.user_attrs["reslab.metrics"]["test/loss"]
                 for t in trials_of(tmp_path / "off")}
    for t in packed_trials:
        ratio = t.user_attrs["reslab.metrics"]["test/loss"] / solo_loss[t.params["arm"], t.params["seed"]]
        shown.append(f"cell {t.params}: test/loss relative difference {abs(ratio - 1):.1e}")
        assert t.user_attrs["reslab.pack"] == packed["packs"][0]["pack"] and t.user_attrs["reslab.pack_size"] == 4
        assert t.user_attrs["reslab.metrics"]["test/loss"] == pytest.approx(solo_loss[t.params["arm"],
                                                                                    t.params["seed"]], rel=TOLERANCE)
    with capsys.disabled():
        print("\n" + "\n".join(shown))
    client = MlflowClient(f"sqlite:///{tmp_path / '8' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ablation/packs")
    kids = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert sorted((k.data.tags["arm"], k.data.tags["seed"]) for k in kids) == [("A", "0"), ("A", "1"), ("B", "0"),
                                                                               ("B", "1")]
    for k in kids:
        assert k.info.status == "FINISHED" and k.data.tags["state"] == "COMPLETE"
        assert k.data.tags["reslab.pack"] == packed["packs"][0]["pack"] and k.data.tags["reslab.pack_size"] == "4"
    assert main(["report", "packs", "--output-dir", str(tmp_path / "8")]) == 0
    assert f"pack {packed['packs'][0]['pack']} (4 trained together): A seed 0 (trial 0)" in capsys.readouterr().out


@pytest.mark.parametrize("args,expected", [
    (["--pack", "0"], "--pack: expected auto, off or a number of trials per pack >= 1 (got '0')"),
    (["--pack", "banana"], "--pack: expected auto, off or a number of trials per pack >= 1 (got 'banana')"),
    (["--pack", "2", "--devices-per-trial", "2"], "--pack: packs train on one device, but every trial of this "
                                                  "study takes 2"),
    (["--set", "pack=-1"], "pack: "),
])
def test_bad_pack_values_are_one_line(tmp_path, capsys, args, expected):
    path = study_file(tmp_path, ABLATION)
    assert main(["ablate", str(path), "--output-dir", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err, err
    db = tmp_path / "out" / "optuna.db"                           # nothing recorded
    assert not db.exists() or optuna.get_all_study_names(f"sqlite:///{db}") == []


def test_study_file_pack_key_and_a_search_that_cannot_pack(tmp_path, fashion_mnist, capsys):
    bad = study_file(tmp_path, "pack: 0\n" + ABLATION, name="bad")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml:8: pack: " in err and "expected auto, off" in err
    path = study_file(tmp_path, """
        pack: 2
        search:
          space: {block.type: [plain, basic], train.lr: {low: 0.01, high: 0.02}}
          objectives: [val/error]
          sampler: random
          sampler_seed: 0
          trials: 2
        """, name="search")
    out = tmp_path / "out"
    assert main(["search", str(path), "--output-dir", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("note: pack 2: the search samples block.type, which changes the network") == 1
    assert "in pack" not in captured.out and captured.out.count("started") == 2
    assert all(t.state == optuna.trial.TrialState.COMPLETE and "reslab.pack" not in t.user_attrs
               for t in trials_of(out, "search"))
    assert main(["ablate", str(study_file(tmp_path, ABLATION)), "--pack", "auto", "--output-dir", str(out),
                 "--set", "ablation.seeds=1", "--study", "auto"]) == 0
    assert "note: --pack auto: packs train slower than their members alone on a CPU" in capsys.readouterr().err


def test_a_worker_killed_mid_pack_loses_no_cell(tmp_path, fashion_mnist):
    """Arm A's members leave the pack after epoch 1 (told COMPLETE), B's train on; the worker is killed then. Run
    again, B's retries resume the pack from its checkpoint in the same MLflow runs; every cell ends COMPLETE once."""
    path = study_file(tmp_path, ABLATION.replace("A: {train.lr: 0.02}", "A: {train.lr: 0.02, train.epochs: 1}"))
    out = tmp_path / "out"
    args = [sys.executable, str(ROOT / "cli.py"), "ablate", str(path), "--pack", "4", "--heartbeat", "1",
            "--output-dir", str(out), "--set", "train.epochs=3"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    log = []
    for line in proc.stdout:
        log.append(line)
        if "trial 1 [A seed 1] COMPLETE" in line:
            os.kill(proc.pid, signal.SIGKILL)       # mid-pack: B's members are in epoch 2 (or 3)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(log)
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, "".join(log) + done.stdout + done.stderr
    trials = trials_of(out)
    complete = {(t.params["arm"], t.params["seed"]): t for t in trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert sorted(complete) == [("A", 0), ("A", 1), ("B", 0), ("B", 1)], done.stdout      # each cell once
    assert len(trials) == 6 and [t.user_attrs.get("reslab.retry_of") for t in trials[4:]] == [2, 3]
    assert done.stdout.count("resumed in pack") == 2, done.stdout + done.stderr
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ablation/packs")
    kids = {k.data.tags["arm"] + k.data.tags["seed"]: k for k in client.search_runs([exp.experiment_id])
            if "mlflow.parentRunId" in k.data.tags}
    assert sorted(kids) == ["A0", "A1", "B0", "B1"] and all(k.info.status == "FINISHED" for k in kids.values())
    for cell, epochs in (("A0", 1), ("A1", 1), ("B0", 3), ("B1", 3)):   # every epoch recorded once
        run = kids[cell]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, epochs + 1))
        assert complete[cell[0], int(cell[1])].user_attrs["reslab.run_id"] == run.info.run_id
    assert kids["B0"].data.tags["resumed"] == "1" and kids["B0"].data.tags["reslab.attempts"] == "2, 4"


def test_a_search_packs_when_every_dimension_fuses_and_prunes_each_member(tmp_path, fashion_mnist, capsys):
    path = study_file(tmp_path, """
        search:
          space: {train.lr: {low: 0.01, high: 0.02}, train.weight_decay: [0.0, 0.0001]}
          objectives: [val/error]
          pruner: {type: median, warmup_epochs: 0}
          sampler_seed: 0
          trials: 4
        """, name="fuses")
    out = tmp_path / "out"
    assert main(["search", str(path), "--pack", "2", "--output-dir", str(out), "--set", "train.epochs=2"]) == 0
    assert capsys.readouterr().out.count("started in pack") == 4
    trials = trials_of(out, "fuses")
    assert len(trials) == 4 and len({t.user_attrs["reslab.pack"] for t in trials}) == 2
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    for t in trials:                 # each member asked its own pruner each epoch, told its own outcome
        assert t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        epochs = 2 if t.state == optuna.trial.TrialState.COMPLETE else max(t.intermediate_values)
        assert sorted(t.intermediate_values) == list(range(1, epochs + 1))
        run = client.get_run(t.user_attrs["reslab.run_id"])
        assert run.data.tags["state"] == t.state.name and run.data.tags["reslab.pack"] == t.user_attrs["reslab.pack"]


def test_auto_sizes_packs_from_the_memory_probe(tmp_path, monkeypatch):
    from search import packing
    from search.space import load_study_file
    from search.study import StudyOptions

    plan = load_study_file(study_file(tmp_path, ABLATION.replace("seeds: 2", "seeds: 5")))
    monkeypatch.setattr(packing.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(packing, "probe", lambda spec, sharing: (3, "one step of a pack of 2 peaks at 9 MiB"))
    assert packing.pack_size(plan, StudyOptions(str(plan.file)), 1, 1) == (3, [
        "note: pack auto (the default): one step of a pack of 2 peaks at 9 MiB; packs of at most 3"])
    size, notes = packing.pack_size(plan, StudyOptions(str(plan.file), pack="8"), 1, 1)
    assert size == 3 and notes == ["note: --pack 8: one step of a pack of 2 peaks at 9 MiB; packs of at most 3"]
    assert packing.pack_size(plan, StudyOptions(str(plan.file), pack="off"), 1, 1) == (1, [])
    assert packing.pack_size(plan, StudyOptions(str(plan.file), pack="2"), 1, 2) == (1, [])   # DDP trials
