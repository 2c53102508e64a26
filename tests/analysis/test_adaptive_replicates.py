"""The adaptive policy's replicates: where a decision is close, and not where it is not (hand-built stores)."""
from __future__ import annotations

import dataclasses
import math

import pandas as pd
import pytest

from analysis.adaptive import (MIN_MARGIN, NOISE_Z, AdaptiveConfig, noise_margin, replay, replicate_requests)

E = math.e


def _store(cells: dict) -> pd.DataFrame:
    """{(model, budget): [losses by replicate]} -> completed full-method rows, ids '<model>-<budget>-<rep>'."""
    rows = []
    for (model, budget), losses in cells.items():
        for r, loss in enumerate(losses):
            rows.append({"trial_id": f"{model}-{budget:.0e}-{r}", "model": model, "method": "full",
                         "lora_rank": None, "trainable_fraction": None, "budget_flops": budget, "n_params": 10,
                         "n_trainable": 10, "status": "completed", "eval_loss": loss, "replicate": r,
                         "flops": budget, "tokens": 100})
    return pd.DataFrame(rows)


# rung 1 (1e15): three cells run twice, log losses 0 and 0.02 apart: sigma = sqrt(3 * 2 * 0.01^2 / 3) = 0.01414
RUNG1 = {("a", 1e15): [2.0, 2.0 * E ** 0.02], ("b", 1e15): [2.1, 2.1 * E ** 0.02],
         ("c", 1e15): [2.3, 2.3 * E ** 0.02]}


def test_a_close_cell_gets_a_replicate_and_a_far_one_does_not():
    # rung 2 (4e15): x best, y 1 % behind, z 20 % behind; one run each. Band for one run against one run:
    # NOISE_Z * 0.01414 * sqrt(1 + 1) = 2.0 %: x and y are inside it, z is not.
    done = _store(RUNG1 | {("x", 4e15): [2.0], ("y", 4e15): [2.0 * E ** 0.01], ("z", 4e15): [2.0 * E ** 0.2]})
    asked = replicate_requests(done, 4e15, AdaptiveConfig())
    assert [(q.trial_id, q.replicate) for q in asked] == [("x-4e+15-0", 1), ("y-4e+15-0", 1)]
    assert "within the noise band 2.00%" in asked[1].reason
    # the cap: a cell with replicates runs already stops asking
    assert replicate_requests(done, 4e15, AdaptiveConfig(replicates=1)) == []


def test_the_cheap_first_rung_runs_every_cell_twice_and_no_noise_means_no_replicates_later():
    one_run = _store({("a", 1e15): [2.0], ("b", 1e15): [3.0]})
    asked = replicate_requests(one_run, 1e15, AdaptiveConfig(noise_rungs=1))
    assert [(q.trial_id, q.replicate) for q in asked] == [("a-1e+15-0", 1), ("b-1e+15-0", 1)]
    assert replicate_requests(one_run, 1e15, AdaptiveConfig()) == []  # the default: no sigma, nothing to judge
    assert replicate_requests(_store(RUNG1), 1e15, AdaptiveConfig(noise_rungs=1)) == []  # already twice each


def test_the_noise_rungs_run_every_cell_noise_runs_times_whatever_the_close_cell_cap():
    twice = _store(RUNG1)
    config = AdaptiveConfig(noise_rungs=1, noise_runs=4, replicates=2)
    asked = replicate_requests(twice, 1e15, config)
    assert [(q.trial_id, q.replicate) for q in asked] == [("a-1e+15-0", 2), ("b-1e+15-0", 2), ("c-1e+15-0", 2)]
    four = _store({k: v * 2 for k, v in RUNG1.items()})  # replicates 0..3
    assert replicate_requests(four, 1e15, config) == []
    with pytest.raises(ValueError, match="noise_runs"):
        AdaptiveConfig(noise_runs=1)


def test_the_margin_follows_the_measured_noise():
    sigma = math.sqrt(2e-4)
    assert noise_margin(_store(RUNG1), AdaptiveConfig()) == pytest.approx(NOISE_Z * math.sqrt(2) * sigma)
    assert noise_margin(_store({("a", 1e15): [2.0]}), AdaptiveConfig(margin=0.03)) == 0.03  # not measured
    flat = _store({("a", 1e15): [2.0, 2.0]})
    assert noise_margin(flat, AdaptiveConfig()) == MIN_MARGIN


def test_replay_draws_the_replicates_it_asks_for_and_counts_their_flop():
    """Two rungs run in full (full_rungs 2): rung 1's cells twice (noise), rung 2's close pair again."""
    full = _store({("a", 1e15): [2.0], ("b", 1e15): [2.1], ("x", 4e15): [2.0], ("y", 4e15): [2.0 * E ** 0.01],
                   ("z", 4e15): [2.6]})
    drawn = []

    def draw(first: dict, replicate: int):
        drawn.append((first["trial_id"], replicate))
        factor = E ** 0.02 if first["budget_flops"] == 1e15 else E ** -0.01
        return first | {"trial_id": f"{first['trial_id']}~{replicate}", "replicate": replicate,
                        "eval_loss": first["eval_loss"] * factor}

    result = replay(full, AdaptiveConfig(full_rungs=2, noise_rungs=1), draw=draw)
    # rung 1: a and b again (sigma = 0.01414 from them); rung 2: x and y within 2 %, z 26 % behind; cap 2 runs
    assert drawn == [("a-1e+15-0", 1), ("b-1e+15-0", 1), ("x-4e+15-0", 1), ("y-4e+15-0", 1)]
    assert result.trials_run == 5 + 4
    one_seed = 2 * 1e15 + 3 * 4e15
    assert result.flops_fraction == pytest.approx((one_seed + 2 * 1e15 + 2 * 4e15) / one_seed)
    # the adaptive pick is the best cell by its mean: x (2.0, 2.0/e^0.01) vs y (2.0 e^0.01, 2.0)
    assert result.per_budget[1].adaptive.eval_loss == pytest.approx(2.0 * E ** -0.005)


def _close_store(noise: float, seed: int = 0) -> pd.DataFrame:
    """full and freeze nearly alike (freeze's B 61 against 60: 0.1-0.2 % behind), five models, six budgets, one
    run each at `noise`; the first budget's cells run twice (1 % apart: the noise is measured)."""
    import storegen

    from analysis.fit import Law

    laws = storegen.LAWS | {"freeze": Law(E=0.50, A=40.0, alpha=0.32, B=61.0, beta=0.28)}
    trials = storegen.make_trials(laws=laws, slices={"full": (None,), "freeze": (0.5,)},
                                  models=tuple(storegen.PYTHIA)[:5], noise=noise, seed=seed).assign(replicate=0)
    trials = trials[trials["status"] == "completed"]
    first = trials[trials["budget_flops"] == 1.5e15]
    again = first.assign(trial_id=first["trial_id"] + "~1", replicate=1, eval_loss=first["eval_loss"] * 1.01)
    return pd.concat([trials, again], ignore_index=True)


def test_a_recipe_that_is_not_settled_asks_for_its_contenders_up_to_decide_runs():
    """The noise band asks for nothing (replicates 1), so what is asked at the top budget is the recipe's: at 2 %
    noise its choice there is more than 0.5 % behind another cell in over 20 % of the draws."""
    from analysis import compute_recipe, fit_surfaces, split_usable
    from analysis.adaptive import DECIDE_N_BOOT
    from analysis.confidence import supported

    top = 1.5e18
    done = _close_store(noise=0.02)
    config = AdaptiveConfig(replicates=1, decide_runs=2)
    asked = replicate_requests(done, top, config)
    at_top = set(done.loc[done["budget_flops"] == top, "trial_id"])
    assert asked and {q.trial_id for q in asked} <= at_top and {q.replicate for q in asked} == {1}
    assert all("this cell is a contender" in q.reason for q in asked)
    # the recipe's own choice at the top budget is among them
    fits = supported(fit_surfaces(split_usable(done)[0], n_boot=DECIDE_N_BOOT), top)
    best = compute_recipe(fits, top).best
    assert f"{best.method}-{best.hparam}-{best.model.split('-')[-1]}-1.5e+18" in {q.trial_id for q in asked}
    # off by default; the cap: cells with decide_runs runs are not asked again
    assert replicate_requests(done, top, AdaptiveConfig(replicates=1)) == []
    rows = done.set_index("trial_id")
    seconds = pd.DataFrame([rows.loc[q.trial_id].to_dict() | {"trial_id": f"{q.trial_id}~1", "replicate": 1}
                            for q in asked])
    again = replicate_requests(pd.concat([done, seconds], ignore_index=True), top, config)
    assert not {q.trial_id for q in asked} & {q.trial_id for q in again}


def test_a_noise_free_recipe_is_settled_and_asks_for_nothing():
    assert replicate_requests(_close_store(noise=0.0), 1.5e18, AdaptiveConfig(replicates=1, decide_runs=3)) == []


def test_at_the_final_rung_only_the_recipe_asks():
    """Nothing is pruned after the last rung, so its runs serve the recipe alone: with decide_runs the noise band's
    requests give way there to the recipe's contenders (and without decide_runs, the band asks as before)."""
    top = 1.5e18
    done = _close_store(noise=0.02)
    band = replicate_requests(done, top, AdaptiveConfig(replicates=2))
    assert band and all("within the noise band" in q.reason for q in band)
    assert replicate_requests(done, top, AdaptiveConfig(replicates=2), final=True) == band
    recipe = replicate_requests(done, top, AdaptiveConfig(replicates=2, decide_runs=2), final=True)
    assert recipe == replicate_requests(done, top, AdaptiveConfig(replicates=1, decide_runs=2))
    assert recipe and all("this cell is a contender" in q.reason for q in recipe)


def _freeze_pruned_at_top(noise: float, seed: int = 0) -> pd.DataFrame:
    """``_close_store`` with freeze's cells at the top budget pruned (skipped rows, as the driver writes them):
    freeze ran up to 3.8e17, its fit places it at 1.5e18 all the same."""
    from analysis.adaptive import PRUNED_PREFIX

    done = _close_store(noise, seed).assign(reason=None)
    pruned = (done["budget_flops"] == 1.5e18) & (done["method"] == "freeze")
    done.loc[pruned, ["status", "reason", "eval_loss", "flops", "tokens"]] = \
        ["skipped", f"{PRUNED_PREFIX}6: test", float("nan"), 0.0, 0]
    return done


def test_at_the_last_rung_decide_flops_runs_the_choice_and_its_strongest_rival_a_pruned_one_for_the_first_time():
    """At 2 % noise the recipe at the top budget (full: the only slice that ran there) is not settled against
    freeze's extrapolation. The choice runs again, and freeze's cell at the same model -- pruned, never run at this
    budget -- runs its first run (replicate 0, its own id), each while its FLOP fits in the room."""
    from analysis import compute_recipe, fit_surfaces, split_usable
    from analysis.adaptive import DECIDE_N_BOOT
    from analysis.confidence import supported

    top = 1.5e18
    done = _freeze_pruned_at_top(noise=0.02)
    config = AdaptiveConfig(replicates=1, decide_flops=0.3)
    best = compute_recipe(supported(fit_surfaces(split_usable(done)[0], n_boot=DECIDE_N_BOOT), top), top).best
    size = best.model.split("-")[-1]
    assert best.method == "full"
    runs = int((done["trial_id"].str.startswith(f"full-None-{size}-1.5e+18")).sum())
    asked = replicate_requests(done, top, config, final=True, room=2 * top)
    assert [(q.trial_id, q.replicate) for q in asked] == [(f"freeze-0.5-{size}-1.5e+18", 0),
                                                          (f"full-None-{size}-1.5e+18", runs)]
    assert "its strongest rival" in asked[0].reason and "its choice" in asked[1].reason
    # the room: one run's FLOP (at most the budget) pays for the choice alone; less than a run, for nothing
    assert [q.trial_id for q in replicate_requests(done, top, config, final=True, room=top)] == \
        [f"full-None-{size}-1.5e+18"]
    assert replicate_requests(done, top, config, final=True, room=0.5 * top) == []
    # no rival the grid can run at this budget (freeze has no cell there at all): nothing would decide it
    no_rival = done[~((done["budget_flops"] == top) & (done["method"] == "freeze"))]
    assert replicate_requests(no_rival, top, config, final=True, room=2 * top) == []
    # only at the last rung, and only with decide_flops
    assert replicate_requests(done, top, config, final=False, room=2 * top) == []
    assert replicate_requests(done, top, AdaptiveConfig(replicates=1), final=True, room=2 * top) == []


def test_a_settled_last_rung_spends_nothing_of_its_room_and_a_noise_free_pruned_winner_still_runs():
    """Noise-free, every refit agrees: the recipe is settled and the room stays unspent. With freeze pruned at the
    top, the recipe (full, the only slice that ran there) is behind freeze's extrapolation in every refit --
    freeze trains half the blocks, so it reads 1.5x the tokens of full for the FLOP -- and freeze's cell runs."""
    config = AdaptiveConfig(replicates=1, decide_flops=0.3)
    assert replicate_requests(_close_store(noise=0.0), 1.5e18, config, final=True, room=100 * 1.5e18) == []
    asked = replicate_requests(_freeze_pruned_at_top(noise=0.0), 1.5e18, config, final=True, room=100 * 1.5e18)
    assert [q.replicate for q in asked if q.trial_id.startswith("freeze-")] == [0]
    assert "behind the best in 100% of the bootstrap draws" in asked[0].reason


def test_replay_runs_a_pruned_cell_from_the_store_and_stays_within_decide_flops():
    """The close store, one run per cell, margin 0: freeze is pruned at the top rung, and the recipe there is not
    settled. With decide_flops 0.9 the replay runs freeze's cell at the top from the store's own row (no draw for
    replicate 0) and replicates after it, never past 0.9 of the one-seed grid's FLOP; with decide_flops 0 it runs
    exactly what it ran before."""
    import zlib

    import numpy as np

    full = _close_store(noise=0.02, seed=5)
    full = full[full["replicate"] == 0]
    drawn = []

    def draw(first: dict, replicate: int):
        drawn.append((first["trial_id"], replicate))
        z = np.random.default_rng([zlib.crc32(first["trial_id"].encode()), replicate]).standard_normal()
        return first | {"trial_id": f"{first['trial_id']}~{replicate}", "replicate": replicate,
                        "eval_loss": first["eval_loss"] * math.exp(0.02 * z)}

    config = AdaptiveConfig(margin=0.0, dominated_rungs=1)
    before = replay(full, config, draw=draw)
    assert drawn == []  # one run per cell, no noise measured: nothing asked without decide_flops
    after = replay(full, dataclasses.replace(config, decide_flops=0.9), draw=draw)
    pruned_top = {d.trial_id for d in after.decisions if not d.run and "1.5e+18" in d.trial_id}
    assert {d.trial_id for d in before.decisions if not d.run} == {d.trial_id for d in after.decisions if not d.run}
    revived = pruned_top & set(after.trial_ids)
    assert revived and not revived & set(before.trial_ids)
    assert all(r > 0 for _, r in drawn) and {t for t, _ in drawn} & revived  # first runs from the store
    added = set(after.trial_ids) - set(before.trial_ids)
    one_seed = float(full["flops"].sum())
    by_id = full.set_index("trial_id")["flops"]
    extra = sum(float(by_id[t.split("~")[0]]) for t in added)  # a replicate spends its cell's FLOP
    assert after.flops_fraction == pytest.approx(before.flops_fraction + extra / one_seed)
    assert before.flops_fraction < after.flops_fraction <= 0.9


def test_a_rung_is_decided_on_the_rungs_below_it_alone():
    """A resumed driver decides a rung again with that rung's own runs, replicates included, in the store. They
    must change nothing: here they would widen the noise margin from 1 % to 19 %."""
    from analysis.adaptive import decide

    top = 1.5e18
    full = _close_store(noise=0.02, seed=1)
    below = full[full["budget_flops"] < top]
    cells = full[(full["budget_flops"] == top) & (full["replicate"] == 0)].assign(status="pending", eval_loss=None)
    ran = full[full["budget_flops"] == top]
    again = ran.assign(trial_id=ran["trial_id"] + "~1", replicate=1, eval_loss=ran["eval_loss"] * 1.3)
    config = AdaptiveConfig(dominated_rungs=1, margin=0.0)
    assert noise_margin(pd.concat([below, ran, again]), config) > 10 * noise_margin(below, config)
    assert decide(pd.concat([below, ran, again]), cells, config) == decide(below, cells, config)
