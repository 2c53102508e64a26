"""`repurpose replay NAME --strategy adaptive`: the command over a full synthetic sweep (the policy itself is tested
in tests/analysis/test_adaptive.py)."""
from __future__ import annotations

import json
import os
import sys

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
