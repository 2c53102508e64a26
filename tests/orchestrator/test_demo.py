"""`repurpose demo --quick` end to end, from nothing: pairs from the stdlib, a pretrained mini suite (reduced),
a sweep on an embedded Ray, the fit and the recipe table. The full demo is the same code with a bigger grid."""
import os

import pandas as pd
import pytest


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
    metrics = pd.read_parquet(store / "demo" / "metrics")
    assert not metrics.duplicated(["trial_id", "step"]).any()
    assert os.path.getsize(store / "demo" / "analysis" / "figure1_frontier.png") > 10_000
    models = os.listdir(tmp_path / "cache" / "suite")
    assert models  # the suite was built into the given cache, not the user's
