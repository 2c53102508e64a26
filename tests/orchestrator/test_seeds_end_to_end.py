"""`seeds: 2` through `repurpose submit` on the tiny fixtures: two runs of every cell with their own seeds, the
first with the id a one-seed grid gives it, and the noise between them in `status --json`."""
from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.slow


def test_two_seeds_run_every_cell_twice_and_status_measures_the_noise(tiny_model, pairs_file, eval_file, ray_env,
                                                                     tmp_path):
    grid = {"name": "twice", "models": [tiny_model], "methods": {"full": {}}, "budgets": [1.5e9, 3e9],
            "seeds": 2, "data": {"train": str(pairs_file), "eval": str(eval_file)},
            "train": {"batch_size": 8, "max_length": 32, "lr": 1e-3, "precision": "fp32", "seed": 3},
            "plan": {"min_steps": 2}, "run": {"eval_pairs": 32, "report_every_s": 0}}
    path = tmp_path / "twice.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    one_seed = dict(grid, seeds=1)
    (tmp_path / "once.yaml").write_text(yaml.safe_dump(one_seed, sort_keys=False))
    first_ids = {t["trial_id"] for t in ray_env.json(["plan", str(tmp_path / "once.yaml"), "--json"])["trials"]}
    storage = str(tmp_path / "store")
    proc = ray_env.run(["submit", str(path), "--storage", storage])
    assert proc.returncode == 0, proc.stderr
    rows = pq.read_table(os.path.join(storage, "twice", "trials.parquet")).to_pylist()
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)
    assert sorted((r["budget_flops"], r["replicate"], r["seed"]) for r in rows) == [
        (1.5e9, 0, 3), (1.5e9, 1, 4), (3e9, 0, 3), (3e9, 1, 4)]
    assert {r["trial_id"] for r in rows if r["replicate"] == 0} == first_ids
    losses = {(r["budget_flops"], r["replicate"]): r["eval_loss"] for r in rows}
    assert losses[1.5e9, 0] != losses[1.5e9, 1]  # another seed: another data order and initialisation
    status = ray_env.json(["status", "twice", "--storage", storage, "--json"])
    assert status["noise_sd"] is not None and status["noise_sd"] > 0
