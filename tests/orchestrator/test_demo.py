"""`repurpose demo`: its grid validates and plans on the mini suite's shapes (fast), and `demo --quick` runs
end to end from nothing (slow): pairs from the stdlib, a pretrained mini suite (reduced), a sweep on an
embedded Ray, the fit and the recipe table, with loss falling with budget. The full demo is the same code
with a bigger grid."""
import math
import os

import pandas as pd
import pytest

from orchestrator import demo
from orchestrator.grid import parse_grid
from orchestrator.plan import plan_grid
from workers.suite import cache as SC, models as SM


@pytest.mark.slow  # pretrains three suite models
def test_demo_grid_validates_and_plans_on_the_suite(tmp_path):
    # the suite's tokenizer and shapes, pretrained for one batch each (planning reads configs and tokenizes)
    models = SC.build_suite(cache_dir=str(tmp_path), sizes=[m.name for m in SM.SUITE[:demo.DEMO_MODELS]],
                           progress=False, token_scale=1e-6)
    data = SC.demo_data(str(tmp_path))
    plan = plan_grid(parse_grid(demo.demo_grid("demo", [m.path for m in models], data), source="demo grid"),
                     gpus_available=0)

    cells = {(t.model, t.spec.method, t.spec.lora_rank, t.spec.budget_flops) for t in plan.trials}
    assert len(cells) == len(plan.trials) == 3 * 5 * 3  # models x (full, freeze, bias, lora 8 and 32) x budgets
    assert {t.spec.method for t in plan.trials} == {"full", "freeze", "bias", "lora"}
    runnable = [t for t in plan.trials if t.skip_reason is None]
    assert all(t.steps >= demo.DEMO_PLAN["min_steps"] for t in runnable)
    assert all(t.planned_pairs <= demo.DEMO_PLAN["max_epochs"] * data["n_train"] for t in runnable)
    assert all(t.resources == {"CPU": 1} for t in plan.trials)
    # every model and every method runs at some budget, and the budgets span the steps the demo needs
    assert {t.model for t in runnable} == {m.path for m in models}
    assert {(t.spec.method, t.spec.lora_rank) for t in runnable} == {
        ("full", None), ("freeze", None), ("bias", None), ("lora", 8), ("lora", 32)}
    smallest_full = sorted((t for t in runnable if t.model == models[0].path and t.spec.method == "full"),
                           key=lambda t: t.spec.budget_flops)
    assert smallest_full[0].steps >= 50 and smallest_full[-1].steps >= 250
    # the degenerate ends are planned as skipped: data runs out for the smallest model at the top budget,
    # the largest takes too few steps at the lowest
    skipped = [t for t in plan.trials if t.skip_reason is not None]
    assert any(t.model == models[0].path and t.spec.budget_flops == max(demo.DEMO_BUDGETS)
               and "pairs" in t.skip_reason for t in skipped)
    assert any(t.model == models[-1].path and t.spec.budget_flops == min(demo.DEMO_BUDGETS)
               and "min_steps" in t.skip_reason for t in skipped)


@pytest.mark.slow
def test_quick_demo_from_nothing(tmp_path, ray_env):
    store = tmp_path / "store"
    proc = ray_env.run(["demo", "--quick", "--storage", str(store)], timeout=900,
                       REPURPOSE_CACHE=str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "# Recipe table" in proc.stdout
    trials = pd.read_parquet(store / "demo" / "trials.parquet")
    runnable = trials[trials.status != "skipped"]
    assert len(runnable) >= 4 and (runnable.status == "completed").all()
    assert ((runnable.flops <= runnable.budget_flops) & (runnable.flops >= 0.97 * runnable.budget_flops)).all()
    assert runnable.eval_loss.notna().all()
    # a real frontier: the best loss falls with budget, and below chance (ln of the batch: uniform logits)
    best = runnable.groupby("budget_flops").eval_loss.min().sort_index()
    chance = math.log(demo.DEMO_TRAIN["batch_size"])
    assert best.iloc[-1] < best.iloc[0] - 0.1 and best.iloc[-1] < chance - 0.2, best
    metrics = pd.read_parquet(store / "demo" / "metrics")
    assert not metrics.duplicated(["trial_id", "step"]).any()
    assert os.path.getsize(store / "demo" / "analysis" / "figure1_frontier.png") > 10_000
    models = os.listdir(tmp_path / "cache" / "suite")
    assert models  # the suite was built into the given cache, not the user's
