"""The CLI layer: `repurpose fit` outputs and the `repurpose recipe --json` document."""
from __future__ import annotations

import json

import pandas as pd
import pytest

import storegen
from analysis import format_recipe, load_trials, recipe_at, split_usable, write_fit_outputs
from analysis.report import RECIPE_KEYS

N_BOOT = 20
SLICES = {"full": (None,), "freeze": (0.25, 0.5), "lora": (8, 128), "bias": (None,)}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    trials = storegen.make_trials(slices=SLICES, models=tuple(storegen.PYTHIA)[:5], budgets=storegen.BUDGETS[:5],
                                  drop=0.05, fail=0.05, nan=1, seed=7)
    return storegen.write_store(root, trials, sweep="report-sweep")


@pytest.fixture(scope="module")
def outputs(sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    return out, write_fit_outputs(sweep, str(out), n_boot=N_BOOT)


def test_fit_writes_every_figure_table_and_summary(outputs):
    out, summary = outputs
    names = ["figure1_frontier", "isoflop", "lora_rank", "trainable_fraction"]
    for name in names:
        assert (out / f"{name}.png").stat().st_size > 20_000
        assert len(pd.read_csv(out / f"{name}.csv")) > 0
    assert set(pd.read_csv(out / "figure1_frontier.csv")["kind"]) >= {"optimum", "trend", "frontier"}
    assert set(pd.read_csv(out / "isoflop.csv")["kind"]) == {"trial", "fit", "fit_min"}
    recipe = pd.read_csv(out / "recipe.csv")
    assert len(recipe) == 5 + 2 and recipe["on_grid"].sum() == 5  # grid budgets + 2 steps beyond
    assert {"method", "model", "tokens", "predicted_loss_low", "empirical_method", "agree"} <= set(recipe.columns)
    md = (out / "recipe.md").read_text()
    assert md.count("\n| ") >= 7 and "95% CI" in md
    findings = (out / "findings.md").read_text()
    for heading in ("compute-optimal at each budget", "Optimal LoRA rank", "Optimal trainable fraction",
                    "bias-only", "Surfaces L(N, D)"):
        assert heading in findings
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["files"] == summary["files"] and all((out / p.rsplit("/", 1)[-1]).exists()
                                                         for p in summary["files"].values())
    assert summary["excluded"]["completed with NaN/missing eval_loss"] == 1
    assert any("status failed" in w for w in summary["warnings"])
    assert summary["n_usable"] + sum(summary["excluded"].values()) == summary["n_trials"]


def test_recipe_json_has_the_contract_keys(sweep):
    d = recipe_at(sweep, 2.4e16, n_boot=N_BOOT)
    assert tuple(d)[:len(RECIPE_KEYS)] == RECIPE_KEYS and set(d) == set(RECIPE_KEYS) | {"per_method", "empirical"}
    json.dumps(d, allow_nan=False)
    assert d["model"] in storegen.PYTHIA and d["budget_flops"] == 2.4e16
    assert d["predicted_loss_low"] <= d["predicted_loss"] <= d["predicted_loss_high"]
    assert (d["lora_rank"] is None) == (d["method"] != "lora")
    assert (d["trainable_fraction"] is None) == (d["method"] != "freeze")
    assert set(d["per_method"]) == {"full", "freeze", "lora", "bias"}
    assert list(d["per_method"])[0] == d["method"]  # best first
    usable, _ = split_usable(load_trials(sweep))
    at = usable[usable["budget_flops"] == 2.4e16]
    assert d["empirical"]["eval_loss"] == at["eval_loss"].min()
    text = format_recipe(d)
    assert d["model"] in text and "per method" in text and "empirical best trial" in text


def test_recipe_off_grid_has_no_empirical_and_is_stable(sweep):
    a = recipe_at(sweep, 1e17, n_boot=N_BOOT)
    b = recipe_at(sweep, 1e17, n_boot=N_BOOT)
    assert a == b  # seeded bootstrap: same answer every time
    assert a["empirical"] is None
    assert a["tokens"] * a["per_method"][a["method"]]["flops"] / a["tokens"] <= 1e17
    with pytest.raises(ValueError, match="positive"):
        recipe_at(sweep, -1, n_boot=N_BOOT)
