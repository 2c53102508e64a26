"""`repurpose replay NAME --strategy adaptive`: the command over a full synthetic sweep (the policy itself is tested
in tests/analysis/test_adaptive.py)."""
from __future__ import annotations

import json
import os
import sys

import pytest
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "analysis"))

import storegen  # noqa: E402

from orchestrator import cli  # noqa: E402


def full_sweep(tmp_path, **make):
    trials = storegen.make_trials(noise=0.005, seed=1, **make)
    sweep = storegen.write_store(tmp_path, trials, sweep="full")
    (tmp_path / "train.jsonl").write_text('{"query": "q", "pos": ["d"]}\n')
    grid = {"name": "full", "models": sorted(set(trials["model"])), "methods": {"full": {}, "lora": {"rank": [8, 128]},
            "freeze": {"trainable_fraction": [0.5]}, "bias": {}}, "budgets": list(storegen.BUDGETS),
            "data": {"train": str(tmp_path / "train.jsonl")}, "base_dir": str(tmp_path)}
    with open(os.path.join(sweep, "grid.yaml"), "w") as f:
        yaml.safe_dump({"grid": grid, "history": []}, f)
    return trials


@pytest.mark.slow  # fits every slice of a 6-model sweep at every rung
def test_replay_json_and_text(tmp_path, capsys):
    trials = full_sweep(tmp_path)
    assert cli.main(["replay", "full", "--storage", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"flops_fraction", "trials_run", "trial_ids", "per_budget"}
    done = trials[trials["status"] == "completed"]
    assert out["trials_run"] == len(out["trial_ids"]) < len(done)
    # the fraction by hand: FLOP of the chosen trials over all runnable ones
    chosen = done[done["trial_id"].isin(out["trial_ids"])]
    assert abs(out["flops_fraction"] - chosen["flops"].sum() / done["flops"].sum()) < 1e-9
    assert [b["budget_flops"] for b in out["per_budget"]] == list(storegen.BUDGETS)
    top = out["per_budget"][-1]
    best = done[done["budget_flops"] == storegen.BUDGETS[-1]].sort_values("eval_loss").iloc[0]
    assert (top["full"]["method"], top["full"]["model"]) == (best["method"], best["model"])
    assert cli.main(["replay", "full", "--storage", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert f"would have run {out['trials_run']} trials" in text and "cells it would have run" in text


def test_replay_refuses_an_unfinished_sweep(tmp_path, capsys):
    trials = full_sweep(tmp_path)
    trials.loc[trials.index[0], ["status", "eval_loss"]] = ["pending", None]
    import pyarrow.parquet as pq

    from analysis.schema import TRIALS_SCHEMA

    pq.write_table(storegen.to_table(trials, TRIALS_SCHEMA), tmp_path / "full" / "trials.parquet")
    assert cli.main(["replay", "full", "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "replay needs a sweep that ran every cell (1 pending or running" in err


# --- read-only commands on a store far from its data ---------------------------------------------------------
SMALL = dict(slices={"full": (None,)}, models=tuple(storegen.PYTHIA)[:4], budgets=storegen.BUDGETS[:3])


def moved_away(tmp_path, **make):
    """A finished sweep whose grid's base_dir and training data no longer exist where the command runs (a laptop
    reading an S3 sweep, a store copied elsewhere)."""
    trials = full_sweep(tmp_path, **make)
    os.remove(tmp_path / "train.jsonl")
    path = tmp_path / "full" / "grid.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["grid"]["base_dir"] = str(tmp_path / "gone")
    doc["grid"]["data"] = {"train": "data/train.jsonl", "eval": "/nowhere/eval.jsonl"}
    path.write_text(yaml.safe_dump(doc))
    return trials


def test_replay_needs_no_training_data(tmp_path, capsys):
    moved_away(tmp_path, **SMALL)
    assert cli.main(["replay", "full", "--storage", str(tmp_path), "--json"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["trials_run"] > 0


@pytest.mark.parametrize("argv", [
    ["status", "full", "--json"],
    pytest.param(["recipe", "full", "--budget", "1e17", "--json"], marks=pytest.mark.slow),  # bootstrap fits
    pytest.param(["fit", "full"], marks=pytest.mark.slow),
], ids=["status", "recipe", "fit"])
def test_status_fit_and_recipe_need_no_training_data(tmp_path, capsys, argv):
    moved_away(tmp_path, **SMALL)
    assert cli.main([*argv, "--storage", str(tmp_path)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    if argv[0] == "status":
        assert json.loads(out)["counts"]["completed"] == 12  # 4 models x 3 budgets of full fine-tuning
    elif argv[0] == "recipe":
        assert json.loads(out)["method"] == "full"
    else:
        assert "recipe.md" in out and os.path.exists(tmp_path / "full" / "analysis" / "recipe.md")


@pytest.mark.parametrize("edit,field", [
    (lambda doc: doc["grid"].pop("base_dir"), "grid.base_dir: required"),
    (lambda doc: doc.pop("grid"), "grid: required"),
    (lambda doc: doc["grid"].update(budgets="lots"), "budgets"),
], ids=["no-base_dir", "no-grid", "bad-budgets"])
def test_a_malformed_stored_grid_is_one_line(tmp_path, capsys, edit, field):
    full_sweep(tmp_path, **SMALL)
    path = tmp_path / "full" / "grid.yaml"
    doc = yaml.safe_load(path.read_text())
    edit(doc)
    path.write_text(yaml.safe_dump(doc))
    assert cli.main(["replay", "full", "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"{path}: ") and field in err, err


def test_a_stored_grid_that_is_not_yaml_is_one_line(tmp_path, capsys):
    full_sweep(tmp_path, **SMALL)
    path = tmp_path / "full" / "grid.yaml"
    path.write_text("grid: [unclosed\n")
    for argv in (["replay", "full"], ["status", "full"], ["recipe", "full", "--budget", "1e17"]):
        assert cli.main([*argv, "--storage", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{path}: not readable YAML" in err and "Traceback" not in err, err
