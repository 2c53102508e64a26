"""analysis/agreement.py: best by loss vs best by nDCG@10 and their Spearman rho per budget, by hand."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.agreement import Pick, agreement, render_markdown, spearman

M14, M70 = "EleutherAI/pythia-14m", "/cache/suite/mini-pythia-0.1m"


def frame(rows) -> pd.DataFrame:
    cols = ["trial_id", "status", "budget_flops", "method", "model", "lora_rank", "trainable_fraction", "pooling",
            "eval_loss", "ndcg_at_10"]
    df = pd.DataFrame([dict(zip(cols, r)) for r in rows], columns=cols)
    df["lora_rank"] = df["lora_rank"].astype("Int64")  # as load_trials returns it
    return df.astype({"eval_loss": float, "ndcg_at_10": float, "trainable_fraction": float})


NA = None
TRIALS = frame([
    # budget 1e15: loss ranks a3 b1 c2 d4, nDCG ranks a2 b3 c4 d1 -> sum d^2 = 1+4+4+9 = 18, rho = 1 - 6*18/(4*15)
    ("a", "completed", 1e15, "full", M14, NA, NA, "mean", 2.0, 0.50),
    ("b", "completed", 1e15, "lora", M14, 8, NA, "mean", 1.8, 0.55),
    ("c", "completed", 1e15, "lora", M70, 32, NA, "mean", 1.9, 0.60),
    ("d", "completed", 1e15, "freeze", M70, NA, 0.5, "mean", 2.2, 0.40),
    ("e", "failed", 1e15, "bias", M14, NA, NA, "mean", NA, NA),
    ("f", "completed", 1e15, "bias", M14, NA, NA, "mean", 1.0, NA),  # no nDCG: left out, counted
    # budget 4e15: two trials, the same one best both ways; too few for rho
    ("x", "completed", 4e15, "full", M14, NA, NA, "mean", 1.5, 0.70),
    ("y", "completed", 4e15, "full", M14, NA, NA, "last", 1.6, 0.65),
    # budget 1.6e16: nDCG all equal -> rho undefined; the nDCG tie goes to the lower loss
    ("p", "completed", 1.6e16, "full", M14, NA, NA, "mean", 1.3, 0.5),
    ("q", "completed", 1.6e16, "lora", M14, 8, NA, "mean", 1.2, 0.5),
    ("r", "completed", 1.6e16, "bias", M14, NA, NA, "mean", 1.4, 0.5),
    # budget 6.4e16: only trials without nDCG -> no row
    ("z", "completed", 6.4e16, "full", M14, NA, NA, "mean", 1.1, NA),
])


def test_picks_and_rho_by_hand():
    rows = agreement(TRIALS)
    assert [a.budget_flops for a in rows] == [1e15, 4e15, 1.6e16]
    a = rows[0]
    assert a.n_trials == 4 and a.n_without_ndcg == 1
    assert a.by_loss == Pick("b", "lora", M14, 8.0, "mean", 1.8, 0.55)
    assert a.by_ndcg == Pick("c", "lora", M70, 32.0, "mean", 1.9, 0.60)
    assert not a.same_recipe
    assert a.ndcg_regret == pytest.approx(0.05)
    assert a.spearman == pytest.approx(1 - 6 * 18 / (4 * 15))  # -0.8

    b = rows[1]
    assert b.by_loss.trial_id == b.by_ndcg.trial_id == "x" and b.same_recipe
    assert b.spearman is None and b.ndcg_regret == 0.0

    c = rows[2]
    assert c.by_loss.trial_id == c.by_ndcg.trial_id == "q" and c.same_recipe and c.spearman is None


def test_pooling_is_part_of_the_recipe():
    df = frame([("m", "completed", 1e15, "full", M14, NA, NA, "mean", 1.0, 0.4),
                ("l", "completed", 1e15, "full", M14, NA, NA, "last", 1.1, 0.6)])
    (a,) = agreement(df)
    assert a.by_loss.recipe == ("full", M14, None, "mean") and a.by_ndcg.recipe == ("full", M14, None, "last")
    assert not a.same_recipe
    df["pooling"] = None  # a store from before the pooling axis: every trial is mean
    (a,) = agreement(df)
    assert a.by_loss.pooling == "mean"


def test_spearman_with_ties_matches_scipy():
    from scipy.stats import spearmanr

    x = pd.Series([1.0, 2.0, 2.0, 3.0, 5.0, 4.0])
    y = pd.Series([0.9, 0.5, 0.7, 0.5, 0.1, 0.2])
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert spearman(x[:2], y[:2]) is None


def test_a_store_without_retrieval_metrics_gives_no_rows():
    assert agreement(TRIALS.drop(columns=["ndcg_at_10"])) == []
    assert agreement(TRIALS.assign(ndcg_at_10=np.nan)) == []
    assert agreement(TRIALS.iloc[0:0]) == []
    assert "nothing to compare" in render_markdown([])


def test_markdown_table():
    md = render_markdown(agreement(TRIALS))
    lines = md.splitlines()
    assert lines[0] == "### Does the loss pick the same recipe as nDCG@10?"
    table = [line for line in lines if line.startswith("| 1") or line.startswith("| 4")]
    assert len(table) == 3
    assert table[0] == ("| 1e+15 | 4 (+1 without nDCG) | lora r=8, EleutherAI/pythia-14m (1.800, 0.550) | "
                        "lora r=32, mini-pythia-0.1m (1.900, 0.600) | no | 0.050 | -0.80 |")
    assert "| yes |" in table[1] and "n/a" in table[1]
    assert "| full, EleutherAI/pythia-14m (1.500, 0.700) |" in table[1]
    assert md.rstrip().endswith("The loss picks the nDCG@10 recipe at 2 of 3 budgets.")
