"""Replicates of a cell: ``seeds: k`` in the grid, the replicate's seed and id, and old stores read as one run."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from analysis.load import load_trials
from core.spec import TrialSpec
from orchestrator.errors import GridError
from orchestrator.plan import DataStats, plan_grid

from test_grid import ids_by_cell, load, ws  # noqa: F401  (the fixture; pytest puts this folder on the path)


def _plan(grid):
    return plan_grid(grid, gpus_available=0,
                     data=DataStats({m: 78.0 for m in grid.models}, train_pairs=None))


def test_replicate_zero_keeps_the_cells_id_and_later_ones_get_their_own(ws):  # noqa: F811
    one, three = _plan(load(ws)), _plan(load(ws, seeds=3, train__seed=7))
    assert len(three.trials) == 3 * len(one.trials)
    base = {(t.method, t.lora_rank, t.trainable_fraction, t.budget_flops): t.trial_id for t in one.trials}
    by_rep = {}
    for t in three.trials:
        by_rep.setdefault(t.spec.replicate, []).append(t)
    assert sorted(by_rep) == [0, 1, 2]
    assert all(t.spec.seed == 7 + t.spec.replicate for t in three.trials)
    # train.seed 7 changes every id; replicate 0 of seed 7 is what a one-seed grid with seed 7 gives
    seven = {(t.method, t.lora_rank, t.trainable_fraction, t.budget_flops): t.trial_id
             for t in _plan(load(ws, train__seed=7)).trials}
    assert {(t.method, t.lora_rank, t.trainable_fraction, t.budget_flops): t.trial_id for t in by_rep[0]} == seven
    ids = [t.trial_id for t in three.trials]
    assert len(set(ids)) == len(ids)
    assert set(base.values()).isdisjoint(ids)  # seed 0's ids are not seed 7's


def test_seeds_default_plans_the_same_ids_as_before(ws):  # noqa: F811
    assert [t.trial_id for t in _plan(load(ws)).trials] == list(ids_by_cell(load(ws)).values())
    assert [t.trial_id for t in _plan(load(ws, seeds=1)).trials] == list(ids_by_cell(load(ws)).values())


def test_replicate_enters_the_identity_only_above_zero():
    spec = TrialSpec(model="m", method="full", budget_flops=1e15, train_data="d")
    assert "replicate" not in spec.identity()
    again = TrialSpec(model="m", method="full", budget_flops=1e15, train_data="d", replicate=1, seed=1)
    assert again.identity()["replicate"] == 1
    assert again.trial_id() != spec.trial_id()
    with pytest.raises(ValueError, match="replicate"):
        TrialSpec(model="m", method="full", budget_flops=1e15, train_data="d", replicate=-1)


@pytest.mark.parametrize("value, problem", [(0, "seeds: must be >= 1"), (-2, "seeds: must be >= 1"),
                                            (1.5, "seeds: must be an integer"), ("two", "seeds: must be an integer")])
def test_bad_seeds_is_one_line(ws, value, problem):  # noqa: F811
    with pytest.raises(GridError) as e:
        load(ws, seeds=value)
    message = str(e.value)
    assert "\n" not in message and problem in message and "grid.yaml" in message


def test_a_store_without_the_columns_reads_as_one_replicate_per_cell(tmp_path):
    sweep = tmp_path / "old"
    sweep.mkdir()
    (sweep / "grid.yaml").write_text(yaml.safe_dump({"name": "old", "train": {"seed": 5}}))
    columns = {"sweep": ["old"] * 2, "trial_id": ["a", "b"], "model": ["m", "m"], "method": ["full", "bias"],
               "lora_rank": [None, None], "trainable_fraction": [None, None], "budget_flops": [1e15, 1e15],
               "n_params": [10, 10], "n_trainable": [10, 1], "status": ["completed"] * 2, "reason": [None, None],
               "tokens": [5, 5], "steps": [1, 1], "flops": [1e15, 1e15], "hardware_flops": [1e15, 1e15],
               "eval_loss": [2.0, 2.1], "train_loss": [2.0, 2.1], "wall_s": [1.0, 1.0]}
    types = {"lora_rank": pa.int64(), "trainable_fraction": pa.float64()}
    pq.write_table(pa.table({k: pa.array(v, type=types.get(k)) for k, v in columns.items()}),
                   sweep / "trials.parquet")
    trials = load_trials(str(sweep))
    assert trials["replicate"].tolist() == [0, 0]
    assert trials["seed"].tolist() == [5, 5]


def test_status_shows_the_noise_measured_from_replicates():
    import math

    from orchestrator.driver import measured_noise, render_status, summarize

    def row(tid, rep, loss):
        return {"trial_id": tid, "model": "m", "method": "full", "lora_rank": None, "trainable_fraction": None,
                "budget_flops": 1e15, "status": "completed", "steps": 1, "flops": 1e15, "eval_loss": loss,
                "ndcg_at_10": None, "mfu": None, "reason": None, "replicate": rep, "family": "gpt_neox",
                "pooling": "mean"}

    one = {"a": row("a", 0, 2.0)}
    assert measured_noise(one) is None
    two = one | {"b": row("b", 1, 2.0 * math.exp(0.02))}
    # log losses 0.0 and 0.02 above log 2: deviations +-0.01 over 1 dof -> sqrt(2e-4)
    assert measured_noise(two) == pytest.approx(math.sqrt(2e-4))
    summary = summarize("s", two) | {"noise_sd": measured_noise(two)}
    assert "run-to-run noise 1.4 %" in render_status(summary, two).replace("1.4%", "1.4 %")


def test_the_driver_tells_the_policy_which_rung_is_the_last(ws, monkeypatch):  # noqa: F811
    """``_replicates`` asks the policy after each rung with ``final`` true only at the grid's largest budget (its
    runs serve the recipe alone), per family and pooling, and stops when nothing is asked."""
    import analysis.adaptive
    from orchestrator.driver import _replicates, initial_row

    grid = load(ws, strategy="adaptive", adaptive={"decide_runs": 2})
    cells = _plan(grid).trials
    asked = []

    def spy(done, budget, config, final=False, room=0.0):
        asked.append((budget, final, config.decide_runs))
        return []

    monkeypatch.setattr(analysis.adaptive, "replicate_requests", spy)

    class Recorder:
        trials = {t.trial_id: initial_row("t", t) for t in cells}

        def flush(self):
            pass

    class Store:
        sweep = "t"

    for budget in (1e9, 4e9):
        assert list(_replicates(grid, budget, cells, Recorder(), Store(), grid.adaptive.config())) == []
    assert asked == [(1e9, False, 2), (4e9, True, 2)]


def test_the_last_rung_spends_what_decide_flops_leaves_and_runs_a_pruned_cell_as_planned(ws, monkeypatch):  # noqa: F811
    """With ``decide_flops``, the policy is told the FLOP left: that fraction of the one-seed grid's planned FLOP
    less what the sweep spent (a completed run's FLOP, a failed one's budget); a pruned cell it asks for as
    replicate 0 becomes a pending row of its own id and runs in the next group."""
    import analysis.adaptive
    from analysis.adaptive import PRUNED_PREFIX, ReplicateRequest
    from orchestrator.driver import _replicates, initial_row

    grid = load(ws, strategy="adaptive", adaptive={"decide_flops": 0.5}, plan__min_steps=1, train__batch_size=4)
    cells = [t for t in _plan(grid).trials if t.runnable]
    top = max(t.budget_flops for t in cells)
    done, failed, pruned = cells[0], cells[1], [t for t in cells if t.budget_flops == top][-1]
    rows = {t.trial_id: initial_row("t", t) for t in cells}
    rows[done.trial_id] |= {"status": "completed", "flops": 3e8, "eval_loss": 2.0}
    rows[failed.trial_id] |= {"status": "failed", "flops": 0.0}
    rows[pruned.trial_id] |= {"status": "skipped", "reason": f"{PRUNED_PREFIX}2: test"}
    rooms = []

    def spy(done, budget, config, final=False, room=0.0):
        rooms.append(room)
        return [ReplicateRequest(pruned.trial_id, 0, "test")] if len(rooms) == 1 else []

    monkeypatch.setattr(analysis.adaptive, "replicate_requests", spy)

    class Recorder:
        trials = rows

        def flush(self):
            pass

    class Store:
        sweep = "t"

    groups = list(_replicates(grid, top, cells, Recorder(), Store(), grid.adaptive.config()))
    one_seed = sum(t.planned_flops for t in cells)  # no seeds: every runnable cell is a first run
    assert rooms[0] == pytest.approx(0.5 * one_seed - 3e8 - failed.budget_flops)
    assert [[t.trial_id for t in g] for g in groups] == [[pruned.trial_id]]
    assert groups[0][0].spec.replicate == 0 and rows[pruned.trial_id]["status"] == "pending"


def test_plan_says_what_decide_flops_may_bring_the_sweep_to(ws):  # noqa: F811
    """`repurpose plan` of an adaptive grid with decide_flops names the FLOP the sweep stops at: that fraction of the
    one-seed grid's planned FLOP (with seeds 2, the replicates are not counted in the base)."""
    from orchestrator.plan_view import render_plan, sci

    grid = load(ws, strategy="adaptive", adaptive={"decide_flops": 0.25}, seeds=2, plan__min_steps=1,
                train__batch_size=4)
    plan = _plan(grid)
    firsts = sum(t.planned_flops for t in plan.runnable) / 2  # two runs of every cell, alike
    assert (f"the last rung settles the recipe within {sci(0.25 * firsts)} FLOP in all (adaptive.decide_flops 0.25"
            in render_plan(plan))
    assert "settles the recipe" not in render_plan(_plan(load(ws, strategy="adaptive", plan__min_steps=1,
                                                              train__batch_size=4)))
