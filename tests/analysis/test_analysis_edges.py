"""Edge cases: one model only, one budget only, all trials failed, NaN losses, a method with a single point,
data running out."""
from __future__ import annotations

import json

import pytest

import storegen
from analysis import (
    FitError,
    analyze,
    compute_recipe,
    fit_surface,
    fit_surfaces,
    load_data_cap,
    load_trials,
    recipe_at,
    split_usable,
    write_fit_outputs,
)
from analysis.fit import FORM_D

MODELS = tuple(storegen.PYTHIA)
N_BOOT = 10


def test_one_model_fits_the_data_term_only(tmp_path):
    model = MODELS[2]
    trials = storegen.make_trials(slices={"full": (None,), "lora": (128,)}, models=(model,), seed=4)
    uri = storegen.write_store(tmp_path, trials)
    usable, _ = split_usable(load_trials(uri))
    fits = fit_surfaces(usable, n_boot=N_BOOT)
    s = fits.surfaces[("full", None, "")]
    assert s.form == FORM_D and s.A == 0
    assert abs(s.beta - storegen.LAWS["full"].beta) < 0.03  # the N term is a constant inside E
    for budget in (3e15, 4.8e16, 6e18):
        d = recipe_at(uri, budget, n_boot=N_BOOT)
        assert d["model"] == model
        truth = storegen.true_recipe(budget, slices={"full": (None,), "lora": (128,)}, models=(model,))
        assert d["method"] == truth[0][1]


def test_one_budget_refuses_trends_and_surfaces_but_reports(tmp_path):
    trials = storegen.make_trials(slices={"full": (None,), "lora": (8,)}, budgets=(2.4e16,), seed=5)
    uri = storegen.write_store(tmp_path, trials)
    # no surface: the best trial at that budget answers, said to be empirical, and why there is no fit
    d = recipe_at(uri, 2.4e16, n_boot=N_BOOT)
    best = load_trials(uri).sort_values("eval_loss").iloc[0]
    assert (d["source"], d["method"], d["model"], d["predicted_loss"]) == (
        "empirical", best["method"], best["model"], best["eval_loss"])
    assert "\n" not in d["no_fit"] and ">= 2 budgets" in d["no_fit"]
    with pytest.raises(FitError, match="no trial at or below 1e\\+16 FLOP"):
        recipe_at(uri, 1e16, n_boot=N_BOOT)
    summary = write_fit_outputs(uri, str(tmp_path / "out"), n_boot=N_BOOT)
    text = " ".join(summary["warnings"])
    assert "trend refused: full" in text and "surface refused" in text
    assert (tmp_path / "out" / "figure1_frontier.png").stat().st_size > 10_000
    assert summary["frontier"][0]["budget_flops"] == 2.4e16 and summary["recipes"] == []
    assert f"| 2.4e+16 | {best['method']} | {best['model']} |" in (tmp_path / "out" / "recipe.md").read_text()


def test_all_trials_failed(tmp_path):
    trials = storegen.make_trials(slices={"full": (None,)}, models=MODELS[:3], budgets=storegen.BUDGETS[:2],
                                  fail=1.0)
    uri = storegen.write_store(tmp_path, trials)
    assert len(load_trials(uri)) == 6
    with pytest.raises(FitError, match="no completed trial.*6 status failed"):
        recipe_at(uri, 1e16)
    with pytest.raises(FitError, match="no completed trial"):
        write_fit_outputs(uri, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing written when nothing can be fitted


def test_nan_losses_are_excluded_and_named(small_store, tmp_path):
    trials = load_trials(small_store)
    trials.loc[[0, 5], "eval_loss"] = float("nan")
    a = analyze(trials, n_boot=N_BOOT)
    assert a.exclusions.counts == {"completed with NaN/missing eval_loss": 2}
    assert len(a.usable) == len(trials) - 2
    nan_ids = set(trials.loc[[0, 5], "trial_id"])
    assert nan_ids.isdisjoint(a.optimum.best["trial_id"])
    assert any(all(i in w for i in nan_ids) for w in a.warnings)


def test_a_method_with_a_single_point(tmp_path):
    trials = storegen.make_trials(slices={"full": (None,), "bias": (None,)}, models=MODELS[:4],
                                  budgets=storegen.BUDGETS[:3], seed=6)
    bias = trials.index[trials["method"] == "bias"]
    trials = trials.drop(index=bias[1:]).reset_index(drop=True)
    uri = storegen.write_store(tmp_path, trials)
    a = analyze(load_trials(uri), n_boot=N_BOOT)
    assert "full" in a.trends.trends and "bias" in a.trends.refused
    assert ">= 2 budgets (has 1)" in a.trends.refused["bias"]
    assert "1 trial(s)" in a.surfaces.refused[("bias", None, "")]
    assert "bias" in set(a.optimum.best["method"])  # still shown as what it is: one trial
    d = recipe_at(uri, 6e15, n_boot=N_BOOT)
    assert d["method"] == "full" and "refused" in d["per_method"]["bias"]
    json.dumps(d, allow_nan=False)


def test_too_few_points_message():
    trials = storegen.make_trials(slices={"full": (None,)}, models=MODELS[:3], budgets=storegen.BUDGETS[:2])
    usable, _ = split_usable(trials)
    with pytest.raises(FitError, match=r"full: too few points .* 6 trial\(s\) at 2 budget\(s\) over 3 model"):
        fit_surface(usable, method="full", n_boot=0)


def test_the_one_data_cap_is_the_planners_measurement(small_store, tmp_path):
    """fit, recipe and demo read one cap: grid.yaml's data (train pairs x tokens per pair x max_epochs), written by
    the driver from the planner's measurement; no recipe proposes more tokens, and those it caps say so."""
    import yaml

    from analysis.fit import cost_per_token

    assert load_data_cap(small_store) is None  # a store without a measurement: no cap
    grid = f"{small_store}/grid.yaml"
    data = {"train_pairs": 1000, "tokens_per_pair": {"a": 60.0, "b": 75.0}, "max_epochs": 3}
    with open(grid, "w") as f:
        yaml.safe_dump({"grid": {"name": "synthetic"}, "history": [], "data": data}, f)
    cap = 1000 * 75 * 3  # by hand: the largest tokens per pair
    assert load_data_cap(small_store) == cap
    summary = write_fit_outputs(small_store, str(tmp_path / "out"), n_boot=N_BOOT)
    assert summary["max_tokens"] == cap and summary["max_tokens_source"] == "measured"
    assert all(r["tokens"] <= cap for r in summary["recipes"])
    d = recipe_at(small_store, 1.5e18, n_boot=N_BOOT)  # far more tokens than the data hold at this budget
    assert d["tokens"] <= cap
    choice = d["per_method"][d["method"]]
    assert choice["data_limited"] and choice["tokens"] == cap
    # the cap binds exactly where tokens_for_budget exceeds it
    assert 1.5e18 // cost_per_token("full", d["n_params"], d["n_params"]) > cap