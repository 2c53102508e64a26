"""The knobs in the analysis: lr tuned within a cell (the best kept, the rest reported), the other knobs split
slices, the recipe names the best lr."""
from __future__ import annotations

import pandas as pd
import pytest

import storegen
from analysis.fit import split_usable
from analysis.report import format_recipe, recipe_at


def with_lrs(df: pd.DataFrame, factors=(0.5, 1.0, 2.0), best=1.0) -> pd.DataFrame:
    """Each completed trial three times, at lr 1e-4 x factor; the ``best`` factor keeps the trial's loss, the
    others are 5 % worse (as a real lr sweep around a good lr)."""
    rows = []
    for _, r in df.iterrows():
        for f in factors:
            row = r.to_dict()
            row.update(trial_id=f"{r['trial_id']}-lr{f:g}", lr=1e-4 * f)
            if f != best:
                row["eval_loss"] = r["eval_loss"] * 1.05
            rows.append(row)
    return pd.DataFrame(rows)


def test_best_lr_per_cell_keeps_one_trial_and_reports_the_others():
    base = storegen.make_trials(slices={"full": [None]}, models=tuple(storegen.PYTHIA)[:3], noise=0.0)
    usable, exclusions = split_usable(with_lrs(base, best=2.0))
    assert len(usable) == len(base)  # one per cell: 3 models x budgets
    assert set(usable["lr"]) == {2e-4} and set(usable["n_lr"]) == {3}
    assert sorted(usable["eval_loss"]) == sorted(base["eval_loss"])  # the untouched (best) losses
    assert exclusions.counts == {"another lr of its cell did better": 2 * len(base)}


def test_a_cell_with_one_lr_keeps_all_its_trials():
    base = storegen.make_trials(slices={"full": [None]}, models=tuple(storegen.PYTHIA)[:3], noise=0.0)
    twice = pd.concat([base, base.assign(trial_id=base["trial_id"] + "-b", seed=1)], ignore_index=True)
    usable, exclusions = split_usable(twice.assign(lr=1e-4))
    assert len(usable) == 2 * len(base) and exclusions.counts == {}


def test_knobs_split_slices():
    base = storegen.make_trials(slices={"full": [None]}, models=tuple(storegen.PYTHIA)[:3], noise=0.0)
    both = pd.concat([base.assign(attention="causal", negatives=0),
                      base.assign(trial_id=base["trial_id"] + "-bi", attention="bidirectional", negatives=0)])
    usable, _ = split_usable(both)
    assert set(usable["variant"]) == {"causal", "bidirectional"}
    instr = pd.concat([base, base.assign(trial_id=base["trial_id"] + "-i", query_instruction="Find the passage: ",
                                         negatives=4)])
    usable, _ = split_usable(instr)
    assert set(usable["variant"]) == {"neg=0 no instr", "neg=4 instr='Find the passage:'"}


def test_recipe_names_the_best_lr(tmp_path):
    base = storegen.make_trials(slices={"full": [None]}, models=tuple(storegen.PYTHIA)[:4], noise=0.0)
    sweep = storegen.write_store(tmp_path, with_lrs(base, best=0.5))
    budget = float(sorted(base["budget_flops"].unique())[-1])
    doc = recipe_at(sweep, budget, n_boot=5)
    assert doc["lr"] == pytest.approx(5e-5)
    assert not {"negatives", "attention", "query_instruction"} & set(doc)  # at their defaults: not named
    assert "  lr              5e-05" in format_recipe(doc)
