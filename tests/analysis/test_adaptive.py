"""The adaptive policy (analysis/adaptive.py) on hand-made noise-free stores where the right decision
follows from the ground truth: a dominated method pruned after two rungs, the optimum's neighbours kept, a
method that crosses late kept, a hyperparameter outside the margin pruned; determinism; the reason format;
replay against the live loop of ``decide`` calls and the contract's JSON keys.

Expected values come from the truths below (computed here, by hand), never from the code under test."""
from __future__ import annotations

import importlib.util
import math
import os
import re
import sys

import numpy as np
import pandas as pd
import pytest

from analysis.adaptive import AdaptiveConfig, Decision, decide, replay

# Six models 4x apart (N = 1e6 ... 1.024e9), five budgets 4x apart: a small paper-shaped ladder.
MODELS = {f"m{i}": 1e6 * 4.0 ** i for i in range(6)}
BUDGETS = (1e15, 4e15, 1.6e16, 6.4e16, 2.56e17)
# Truths L = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022's form, the one analysis.fit fits).
FULL = (0.50, 40.0, 0.32, 60.0, 0.28)
BIAS = tuple(x * f for x, f in zip(FULL, (1.3, 1.3, 1.0, 1.3, 1.0)))  # 30 % worse everywhere
LATE = (0.25, 40.0, 0.32, 150.0, 0.28)  # freeze f=0.5: lower floor, slower per token; overtakes full at rung 4
LATE_SLOW = (0.25, 40.0, 0.32, 150.0 * 1.4, 0.28)  # freeze f=0.25: 40 % more B, same floor
LAWS = {("full", None): FULL, ("bias", None): BIAS, ("freeze", 0.5): LATE, ("freeze", 0.25): LATE_SLOW}
PRUNED_METHOD = re.compile(r"^pruned at rung \d+: predicted \d+\.\d{3} \[\d+\.\d{3}, \d+\.\d{3}\] > "
                           r"frontier \d+\.\d{3} \+ margin$")


def cost(method: str, n: float, hparam) -> tuple[float, float]:
    """(N_tr, FLOP per token), docs/study.md's table: full 6N, freeze 2N + 4N_tr, bias 4N + 2N_tr."""
    if method == "full":
        return n, 6 * n
    if method == "freeze":
        return hparam * n, 2 * n + 4 * hparam * n
    return 1e-3 * n, 4 * n + 2e-3 * n


def truth(method: str, hparam, n: float, tokens: float) -> float:
    E, A, alpha, B, beta = LAWS[(method, hparam)]
    return E + A / n ** alpha + B / tokens ** beta


def row(method: str, hparam, model: str, budget: float) -> dict:
    n = MODELS[model]
    ntr, per_token = cost(method, n, hparam)
    tokens = int(budget // per_token)
    return dict(trial_id=f"{method}-{hparam}-{model}-{budget:.3g}", model=model, method=method,
                lora_rank=None, trainable_fraction=hparam, budget_flops=budget, n_params=int(n),
                n_trainable=int(ntr), tokens=tokens, flops=tokens * per_token, status="completed",
                eval_loss=truth(method, hparam, n, tokens))


def store(budgets, slices=tuple(LAWS)) -> pd.DataFrame:
    return pd.DataFrame([row(m, h, model, b) for m, h in slices for model in MODELS for b in budgets])


def true_optimum(method: str, hparam, budget: float) -> tuple[str, float]:
    """(model, loss) minimising the truth at a budget: the iso-FLOP optimum."""
    losses = {m: truth(method, hparam, n, int(budget // cost(method, n, hparam)[1])) for m, n in MODELS.items()}
    best = min(losses, key=losses.get)
    return best, losses[best]


def by_id(decisions: list[Decision]) -> dict[str, Decision]:
    return {d.trial_id: d for d in decisions}


CONFIG = AdaptiveConfig(margin=0.02, neighbours=1, full_rungs=2, dominated_rungs=2, n_boot=10)


@pytest.fixture(scope="module")
def rung3():
    """Decisions for rung 3 after rungs 1-2 ran in full."""
    done, cells = store(BUDGETS[:2]), store(BUDGETS[2:3])
    return done, cells, by_id(decide(done, cells, CONFIG))


def test_truths_have_the_intended_shape():
    """Preconditions computed from the truths: bias 30 % behind; LATE > 2 % behind full at rungs 1-2, within
    the margin at rung 3, ahead at rung 4; f=0.25 more than the margin behind f=0.5 at rung 2; full's
    optimum at rung 3 is interior (m2)."""
    gap = lambda h, b: true_optimum("freeze", h, b)[1] / true_optimum("full", None, b)[1] - 1  # noqa: E731
    assert gap(0.5, BUDGETS[0]) > 0.1 and gap(0.5, BUDGETS[1]) > 0.05
    assert 0 < gap(0.5, BUDGETS[2]) < 0.02 and gap(0.5, BUDGETS[3]) < -0.02
    assert true_optimum("freeze", 0.25, BUDGETS[1])[1] > true_optimum("freeze", 0.5, BUDGETS[1])[1] * 1.02
    assert true_optimum("full", None, BUDGETS[2])[0] == "m2"


def test_dominated_method_pruned_at_rung_3_with_the_reason(rung3):
    _, cells, decisions = rung3
    bias = [decisions[t] for t in cells.loc[cells["method"] == "bias", "trial_id"]]
    assert bias and not any(d.run for d in bias)
    for d in bias:
        assert d.rung == 3 and PRUNED_METHOD.match(d.reason), d.reason
        predicted, low, high, frontier = map(float, re.findall(r"\d+\.\d{3}", d.reason.split(":", 1)[1]))
        assert low <= predicted <= high and low > frontier * 1.02
        # the frontier at rung 3 is the best true loss there (full at m2), to the printed 3 decimals
        assert frontier == pytest.approx(true_optimum("full", None, BUDGETS[2])[1], abs=2e-3)


def test_dominated_method_not_pruned_after_one_rung():
    """full_rungs 1: at rung 2 bias has been dominated at one decision point only: its cells near the
    empirical optimum still run."""
    config = AdaptiveConfig(margin=0.02, neighbours=1, full_rungs=1, dominated_rungs=2, n_boot=10)
    done, cells = store(BUDGETS[:1]), store(BUDGETS[1:2])
    decisions = by_id(decide(done, cells, config))
    bias = [decisions[t] for t in cells.loc[cells["method"] == "bias", "trial_id"]]
    assert any(d.run for d in bias)
    assert not any(PRUNED_METHOD.match(d.reason) for d in bias)


def test_optimum_and_its_neighbours_kept(rung3):
    _, cells, decisions = rung3
    full = cells[cells["method"] == "full"]
    ran = {m for m, t in zip(full["model"], full["trial_id"]) if decisions[t].run}
    assert ran == {"m1", "m2", "m3"}  # true optimum m2 (test above) +- one size step
    assert all(d.rung == 3 for d in decisions.values())
    pruned = decisions[full.loc[full["model"] == "m5", "trial_id"].iloc[0]]
    assert pruned.reason.startswith("pruned at rung 3: m5 is 3 size step(s) from the predicted optimum m2")


def test_late_crossing_method_kept(rung3):
    """LATE is 7 % behind at rung 2 (the last observed) but its fit predicts it within the margin at rung 3."""
    _, cells, decisions = rung3
    late = cells[(cells["method"] == "freeze") & (cells["trainable_fraction"] == 0.5)]
    ran = {m for m, t in zip(late["model"], late["trial_id"]) if decisions[t].run}
    best = true_optimum("freeze", 0.5, BUDGETS[2])[0]
    assert best in ran and ran <= {f"m{i}" for i in range(int(best[1]) - 1, int(best[1]) + 2)}


def test_hyperparameter_outside_margin_pruned(rung3):
    _, cells, decisions = rung3
    slow = cells[(cells["method"] == "freeze") & (cells["trainable_fraction"] == 0.25)]
    assert len(slow) == len(MODELS)
    for t in slow["trial_id"]:
        assert not decisions[t].run
        assert re.match(r"^pruned at rung 3: freeze f=0\.25 scored \d\.\d{3} at rung 2 > best freeze f=0\.5 "
                        r"\d\.\d{3} \+ margin$", decisions[t].reason), decisions[t].reason


def test_deterministic_under_row_order(rung3):
    done, cells, decisions = rung3
    rng = np.random.default_rng(7)
    shuffled = decide(done.sample(frac=1, random_state=rng.integers(1 << 31)).reset_index(drop=True),
                      cells.sample(frac=1, random_state=rng.integers(1 << 31)).reset_index(drop=True), CONFIG)
    assert by_id(shuffled) == decisions


def test_full_rungs_run_everything_and_skipped_cells_get_no_decision():
    done, cells = store(BUDGETS[:1]), store(BUDGETS[1:2])
    cells.loc[0, "status"] = "skipped"
    decisions = decide(done, cells, CONFIG)
    assert {d.trial_id for d in decisions} == set(cells["trial_id"].iloc[1:])
    assert all(d.run and d.rung == 2 for d in decisions)


def test_never_prunes_every_cell():
    """A rung offered only bias cells (dominated for two rungs): one of them still runs."""
    done, cells = store(BUDGETS[:2]), store(BUDGETS[2:3], slices=(("bias", None),))
    decisions = decide(done, cells, CONFIG)
    assert sum(d.run for d in decisions) == 1


def test_config_validates():
    with pytest.raises(ValueError, match="margin"):
        AdaptiveConfig(margin=-0.1)
    with pytest.raises(ValueError, match="full_rungs"):
        AdaptiveConfig(full_rungs=0)
    with pytest.raises(ValueError, match="decide_runs"):
        AdaptiveConfig(decide_runs=0)
    with pytest.raises(ValueError, match="decide_flops"):
        AdaptiveConfig(decide_flops=-0.1)


# ----------------------------------------------------------------------------------------------------------
# replay

def _benchmark():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "adaptive.py")
    spec = importlib.util.spec_from_file_location("benchmark_adaptive", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_replay_equals_the_live_loop_of_decide():
    """On a full store: replay's cells = a driver's loop (decide on what it ran, rung after rung); its FLOP
    fraction and per-budget picks recomputed from the store by hand."""
    full = store(BUDGETS)
    full.loc[full["trial_id"] == row("full", None, "m5", BUDGETS[0])["trial_id"],
             ["status", "eval_loss", "flops"]] = ["skipped", np.nan, 0.0]
    result = replay(full, CONFIG)

    ran = []
    for budget in BUDGETS:
        cells = full[full["budget_flops"] == budget]
        ran += [d.trial_id for d in decide(full[full["trial_id"].isin(ran)], cells, CONFIG) if d.run]
    assert sorted(ran) == list(result.trial_ids) and result.trials_run == len(ran)
    assert full.loc[full["status"] == "skipped", "trial_id"].iloc[0] not in ran

    runnable = full[full["status"] == "completed"]
    fraction = runnable.loc[runnable["trial_id"].isin(ran), "flops"].sum() / runnable["flops"].sum()
    assert result.flops_fraction == pytest.approx(fraction)
    assert result.flops_fraction < 0.5  # rungs 1-2 are 5/341 of the FLOP; the rest is pruned
    for budget, comparison in zip(BUDGETS, result.per_budget):
        at = runnable[runnable["budget_flops"] == budget]
        best = at.loc[at["eval_loss"].idxmin()]
        assert comparison.budget_flops == budget
        assert (comparison.full.method, comparison.full.model) == (best["method"], best["model"])
        # noise-free: the adaptive sweep keeps every budget's optimum
        assert comparison.adaptive == comparison.full

    # the top budget's winner is the late method (LATE overtakes full at rung 4), at its true optimum
    assert result.per_budget[-1].full.method == "freeze"
    assert result.per_budget[-1].full.model == true_optimum("freeze", 0.5, BUDGETS[-1])[0]


def test_replay_json_keys():
    result = replay(store(BUDGETS[:3], slices=(("full", None), ("bias", None))), CONFIG)
    doc = result.to_json()
    assert set(doc) == {"flops_fraction", "trials_run", "trial_ids", "per_budget"}
    assert isinstance(doc["trial_ids"], list) and len(doc["trial_ids"]) == doc["trials_run"]
    assert [p["budget_flops"] for p in doc["per_budget"]] == list(BUDGETS[:3])
    for p in doc["per_budget"]:
        assert set(p) == {"budget_flops", "full", "adaptive"}
        assert set(p["full"]) == set(p["adaptive"]) == {"method", "model", "eval_loss"}


@pytest.mark.slow
def test_replay_on_the_benchmark_store_matches_its_truth():
    """The benchmark's paper-shaped noise-free store: every budget's true optimum (computed from the truth's
    formula here) is the full grid's pick, and the adaptive sweep keeps the top one."""
    bench = _benchmark()
    for truth in bench.TRUTHS:
        full = bench.make_store(truth, 0.0, 0)
        result = replay(full)
        top = result.per_budget[-1]
        runnable = full[full["status"] == "completed"]
        at = runnable[runnable["budget_flops"] == bench.BUDGETS[-1]]
        best = at.loc[at["eval_loss"].idxmin()]
        assert top.full.trial_id == best["trial_id"] and best["trial_id"] in result.trial_ids
        assert result.flops_fraction <= 0.25
        assert math.isclose(result.per_budget[0].adaptive.eval_loss, result.per_budget[0].full.eval_loss)
