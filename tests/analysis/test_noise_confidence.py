"""Run-to-run noise from replicates and how sure a recipe is: numbers computed by hand."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis import noise
from analysis.confidence import DECISIVE, Candidate, judge, unsettled


def _rows(cells: dict) -> pd.DataFrame:
    """{(model, budget): [losses of its replicates]} -> completed full-method trial rows."""
    rows = []
    for (model, budget), losses in cells.items():
        for r, loss in enumerate(losses):
            rows.append({"trial_id": f"{model}-{budget:g}-{r}", "model": model, "method": "full", "lora_rank": None,
                         "trainable_fraction": None, "budget_flops": budget, "status": "completed",
                         "eval_loss": loss, "replicate": r})
    return pd.DataFrame(rows)


def test_noise_sd_is_the_pooled_spread_of_log_losses():
    e = math.e
    # cell a: log losses 0 and 0.02 (dev +-0.01); cell b: 0.1, 0.13, 0.16 (dev -0.03, 0, 0.03); cell c: one run
    trials = _rows({("a", 1e15): [1.0, e ** 0.02], ("b", 1e15): [e ** 0.1, e ** 0.13, e ** 0.16],
                    ("c", 4e15): [2.0]})
    # sum of squares 2 * 0.01^2 + 2 * 0.03^2 = 0.002 over (2 - 1) + (3 - 1) = 3 dof
    assert noise.noise_sd(trials) == pytest.approx(math.sqrt(0.002 / 3), rel=1e-9)
    s = noise.summary(trials)
    assert s["noise_dof"] == 3 and s["replicated_cells"] == 2
    assert s["noise_by_budget"] == {1e15: pytest.approx(math.sqrt(0.002 / 3), rel=1e-9)}  # 4e15: nothing replicated
    table = noise.cells(trials).set_index("model")
    assert table.loc["b", "runs"] == 3 and table.loc["b", "mean_loss"] == pytest.approx(e ** 0.13)
    assert table.loc["b", "sd"] == pytest.approx(0.03)  # sample sd of -0.03, 0, 0.03
    assert math.isnan(table.loc["c", "sd"])


def test_no_replicates_no_noise_and_failed_runs_do_not_count():
    one = _rows({("a", 1e15): [1.0], ("b", 1e15): [1.1]})
    assert noise.noise_sd(one) is None and noise.summary(one)["noise_dof"] == 0
    failed = _rows({("a", 1e15): [1.0, 5.0]}).assign(status=["completed", "failed"])
    assert noise.noise_sd(failed) is None
    assert "not measured" in noise.describe(noise.summary(one))


def test_noise_at_a_budget_falls_back_to_the_pooled_estimate():
    e = math.e
    trials = _rows({("a", 1e15): [1.0, e ** 0.02], ("b", 1e15): [1.0, e ** 0.02], ("c", 1e15): [1.0, e ** 0.02],
                    ("a", 4e15): [1.0, e ** 0.1]})
    assert noise.noise_at(trials, 1e15) == pytest.approx(math.sqrt(3 * 2 * 0.01 ** 2 / 3))  # own: 3 dof
    pooled = math.sqrt((3 * 2 * 0.01 ** 2 + 2 * 0.05 ** 2) / 4)
    assert noise.noise_at(trials, 4e15) == pytest.approx(pooled)  # own: 1 dof only


def _cand(model: str, loss: float) -> Candidate:
    return Candidate("full", None, "", None, "mean", model, 1e6, 1e6, 1e6, 6e12, loss)


def test_p_best_counts_the_draws_the_choice_wins():
    found = [_cand("a", 2.00), _cand("b", 2.01), _cand("c", 2.50)]
    # 10 joint draws: a wins 7, b wins 3, c never
    a = np.array([2.0] * 7 + [2.05] * 3)
    b = np.array([2.02] * 7 + [2.00] * 3)
    c = np.full(10, 2.5)
    sure = judge(found, np.stack([a, b, c]), found[0].key, 1e15)
    assert sure.p_best == pytest.approx(0.7) and sure.p_best < DECISIVE and sure.decisive is False
    assert sure.runner_up.model == "b" and sure.gap == pytest.approx(0.005)
    assert [x.model for x in sure.contenders] == ["a", "b"]  # c wins no draw: nothing to learn from it
    assert sure.decide_flops == pytest.approx(2 * 6e12)
    j = sure.to_json()
    assert j["p_best"] == pytest.approx(0.7) and j["runner_up"]["model"] == "b"
    assert j["runner_up"]["gap"] == pytest.approx(0.005) and j["to_decide"]["flops"] == pytest.approx(1.2e13)


def test_a_clear_choice_is_decisive_and_asks_for_nothing():
    found = [_cand("a", 2.0), _cand("b", 2.2)]
    draws = np.stack([np.full(20, 2.0), np.r_[np.full(19, 2.2), 1.9]])  # b wins one draw of 20
    sure = judge(found, draws, found[0].key, 1e15)
    assert sure.p_best == pytest.approx(0.95) and sure.decisive is True and sure.contenders == ()
    assert sure.to_json()["to_decide"] is None


def test_a_choice_is_unsettled_where_it_is_clearly_behind_in_enough_draws():
    # 10 draws of three candidates; the choice a is > 0.5 % behind b in draws 0-2 (2.02 vs 2.00: 1 %), within
    # 0.5 % of it in draws 3-4 (2.005 vs 2.00: 0.25 %), ahead of it in 5-9; c beats a by > 0.5 % in draw 9 only
    a = np.array([2.02] * 3 + [2.005] * 2 + [2.0] * 5)
    b = np.array([2.00] * 3 + [2.000] * 2 + [2.1] * 5)
    c = np.array([2.5] * 9 + [1.9])
    behind, rivals = unsettled(np.stack([a, b, c]), 0)
    assert behind == pytest.approx(0.4) and rivals == [1, 2]
    # a near-tie -- b ahead in every draw, but by 0.25 % -- is settled: either choice costs less than 0.5 %
    behind, rivals = unsettled(np.stack([np.full(10, 2.005), np.full(10, 2.0)]), 0)
    assert behind == 0.0 and rivals == []
    # a non-finite draw (a refit that failed) never wins
    behind, rivals = unsettled(np.stack([np.full(4, 2.0), np.array([np.nan, np.inf, 1.0, 2.5])]), 0)
    assert behind == pytest.approx(0.25) and rivals == [1]
    # the rivals come the most often first: c beats a in 4 draws of 10, b in 2
    a, b, c = np.full(10, 2.0), np.r_[[1.9] * 2, [2.1] * 8], np.r_[[2.1] * 6, [1.9] * 4]
    assert unsettled(np.stack([a, b, c]), 0) == (pytest.approx(0.6), [2, 1])


def test_the_recipe_goes_by_the_median_of_its_refits():
    """At 1.5e18 FLOP the point fit (the noise-free law) prefers the largest model; two of three refits are
    data-hungry and prefer the smallest: the recipe chooses the smallest, and its predicted loss is the median of
    the three refits' predictions."""
    from dataclasses import replace

    import storegen

    from analysis import compute_recipe, fit_surfaces, split_usable

    trials = storegen.make_trials(slices={"full": (None,)}, models=tuple(storegen.PYTHIA)[:4], noise=0.0)
    surface = fit_surfaces(split_usable(trials)[0], n_boot=0).surfaces[("full", None, "")]
    names = [m for m, _, _ in surface.models]
    n = np.array([x for _, x, _ in surface.models], dtype=float)
    budget = 1.5e18
    d = np.floor(budget / (6.0 * n))
    # three hand-made refits (E, A, alpha, B, beta): two data-hungry (small models win), one size-hungry
    boot = np.array([[0.5, 10.0, 0.3, 5e3, 0.4], [0.5, 12.0, 0.3, 5.5e3, 0.4], [0.5, 4e3, 0.6, 10.0, 0.3]])
    law = lambda p: p[0] + p[1] / n ** p[2] + p[3] / d ** p[4]  # noqa: E731
    by_hand = np.median(np.stack([law(p) for p in boot]), axis=0)
    bagged = replace(surface, boot=boot)
    assert bagged.predict_bagged(n, d) == pytest.approx(by_hand, rel=1e-12)
    assert surface.predict_bagged(n, d) == pytest.approx(surface.predict(n, d))  # no refits: the point fit
    point_choice = names[int(np.argmin(surface.predict(n, d)))]
    bagged_choice = names[int(np.argmin(by_hand))]
    assert (point_choice, bagged_choice) == ("EleutherAI/pythia-160m", "EleutherAI/pythia-14m")
    fits = fit_surfaces(split_usable(trials)[0], n_boot=0)
    fits.surfaces[("full", None, "")] = bagged
    best = compute_recipe(fits, budget).best
    assert best.model == bagged_choice and best.predicted_loss == pytest.approx(by_hand.min(), rel=1e-12)


def test_without_a_bootstrap_there_is_no_p_best():
    found = [_cand("a", 2.0), _cand("b", 2.1)]
    sure = judge(found, None, found[0].key, 1e15)
    assert sure.p_best is None and sure.decisive is None and sure.runner_up.model == "b"


def test_a_sweep_with_two_seeds_reports_its_noise_p_best_and_cell_means(tmp_path):
    """Two runs of every cell (the second with ids '~1'): recipe --json's noise_sd is the pooled spread of the
    budget's pairs, sqrt(sum over cells of (log a - log b)^2 / 2 / cells); findings.md shows the sweep's, and each
    best cell's mean."""
    import storegen

    from analysis.report import recipe_at, write_fit_outputs

    kw = dict(slices={"full": (None,), "lora": (8,)}, models=tuple(storegen.PYTHIA)[:4], noise=0.01,
              budgets=storegen.BUDGETS[:4])
    first = storegen.make_trials(seed=0, **kw).assign(replicate=0, seed=0)
    second = storegen.make_trials(seed=1, **kw)
    second = second.assign(trial_id=second["trial_id"] + "~1", replicate=1, seed=1)
    sweep = storegen.write_store(tmp_path, pd.concat([first, second], ignore_index=True), metrics=False)
    def pooled(ok):
        diff = np.log(first["eval_loss"][ok].to_numpy(float)) - np.log(second["eval_loss"][ok].to_numpy(float))
        return math.sqrt(float((diff ** 2 / 2).sum()) / ok.sum())

    ok = (first["status"] == "completed").to_numpy()
    expected = pooled(ok)  # the sweep's
    at_budget = pooled(ok & (first["budget_flops"] == 2.4e16).to_numpy())  # 8 cells there: the budget's own
    d = recipe_at(sweep, 2.4e16, n_boot=5)
    assert d["noise_sd"] == pytest.approx(at_budget, rel=1e-9)
    assert 0 <= d["p_best"] <= 1 and d["runner_up"]["gap"] >= 0
    out = tmp_path / "out"
    write_fit_outputs(sweep, str(out), n_boot=5)
    findings = (out / "findings.md").read_text()
    assert f"run-to-run noise {expected:.1%}" in findings
    assert "its cell: mean (runs, sd)" in findings and "p_best" in findings
    assert "p_best" in (out / "recipe.md").read_text()
