"""The adaptive policy's replicates: where a decision is close, and not where it is not (hand-built stores)."""
from __future__ import annotations

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
