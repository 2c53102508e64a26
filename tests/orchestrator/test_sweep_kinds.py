"""Two kinds of sweep end to end through `repurpose submit` on tiny local checkpoints: a grid mixing three decoder
families and two poolings (fitted; the recipe names family, model, method and pooling), and an adaptive sweep
that prunes, extended by a `strategy: grid` submit that runs exactly the pruned cells."""
from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest
import yaml
from support import build_family_checkpoint, build_tokenizer, make_pairs

pytestmark = pytest.mark.slow


def trials_of(storage: str, sweep: str) -> dict[str, dict]:
    return {r["trial_id"]: r for r in pq.read_table(os.path.join(storage, sweep, "trials.parquet")).to_pylist()}


def write_grid(tmp_path, name: str, grid: dict) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    texts = [p["query"] + " " + p["pos"][0] for p in make_pairs(500, seed=3)]
    tokenizer = build_tokenizer(root / "tokenizer", texts)
    return {f: build_family_checkpoint(root / f, f, tokenizer) for f in ("gpt_neox", "llama", "qwen3")}


def test_three_families_two_poolings(families, pairs_file, eval_file, ray_env, tmp_path):
    grid = {"name": "mixed", "models": list(families.values()), "methods": {"full": {}},
            "pooling": ["mean", "last"], "budgets": [1.5e9, 3e9, 6e9, 1.2e10],  # 4 points per (family, pooling)
            "data": {"train": str(pairs_file), "eval": str(eval_file)},
            "train": {"batch_size": 8, "max_length": 32, "lr": 1e-3, "precision": "fp32"},
            "plan": {"min_steps": 2, "max_epochs": 3}, "run": {"eval_pairs": 32, "report_every_s": 0}}
    path = write_grid(tmp_path, "mixed", grid)
    storage = str(tmp_path / "store")
    proc = ray_env.run(["submit", path, "--storage", storage])
    assert proc.returncode == 0, proc.stderr
    trials = trials_of(storage, "mixed")
    assert len(trials) == 24 and all(t["status"] == "completed" for t in trials.values())
    by_model = {os.path.basename(m): m for m in families.values()}
    assert {(t["family"], t["pooling"]) for t in trials.values()} == {
        (f, p) for f in families for p in ("mean", "last")}
    for t in trials.values():
        assert os.path.basename(t["model"]) == t["family"]  # each checkpoint is named after its family
        assert 0 <= t["ndcg_at_10"] <= 1 and t["mfu"] > 0
    proc = ray_env.run(["fit", "mixed", "--storage", storage])
    assert proc.returncode == 0, proc.stderr
    recipe = ray_env.json(["recipe", "mixed", "--budget", "6e9", "--storage", storage, "--json"])
    assert recipe["family"] in families and recipe["pooling"] in ("mean", "last") and recipe["method"] == "full"
    assert recipe["model"] == families[recipe["family"]] or by_model.get(os.path.basename(recipe["model"]))
    best = min((t for t in trials.values() if t["budget_flops"] == 6e9), key=lambda t: t["eval_loss"])
    if recipe["source"] == "empirical":  # a thin fit at a grid budget answers with the best trial
        assert (recipe["family"], recipe["pooling"]) == (best["family"], best["pooling"])


def test_adaptive_prunes_and_a_grid_submit_runs_exactly_the_pruned(families, pairs_file, eval_file, ray_env,
                                                                   tmp_path):
    """full_rungs 1: after the first budget the policy decides; pruned cells are skipped rows whose reason says
    why. The same grid with strategy grid then runs those cells and nothing else."""
    grid = {"name": "ladder", "models": [families["gpt_neox"]], "strategy": "adaptive",
            "adaptive": {"full_rungs": 1, "margin": 0.0, "dominated_rungs": 1, "neighbours": 0, "n_boot": 5},
            "methods": {"full": {}, "bias": {}, "lora": {"rank": [2, 8]}}, "budgets": [1.5e9, 3e9, 6e9],
            "data": {"train": str(pairs_file), "eval": str(eval_file)},
            "train": {"batch_size": 8, "max_length": 32, "lr": 1e-3, "precision": "fp32"},
            "plan": {"min_steps": 2}, "run": {"eval_pairs": 32, "report_every_s": 0}}
    storage = str(tmp_path / "store")
    proc = ray_env.run(["submit", write_grid(tmp_path, "ladder", grid), "--storage", storage])
    assert proc.returncode == 0, proc.stderr
    trials = trials_of(storage, "ladder")
    pruned = {i for i, t in trials.items() if t["status"] == "skipped"}
    assert pruned, "the policy pruned nothing"
    assert all(trials[i]["reason"].startswith("pruned at rung ") and trials[i]["budget_flops"] > 1.5e9
               for i in pruned)
    assert all(t["status"] == "completed" for i, t in trials.items() if i not in pruned)
    done_before = {i: t["updated_at"] for i, t in trials.items() if t["status"] == "completed"}

    grid["strategy"] = "grid"
    proc = ray_env.run(["submit", write_grid(tmp_path, "ladder-grid", grid), "--storage", storage])
    assert proc.returncode == 0, proc.stderr
    assert f"{len(done_before)} already completed, {len(pruned)} to run" in proc.stderr
    after = trials_of(storage, "ladder")
    assert all(t["status"] == "completed" for t in after.values())
    assert {i: after[i]["updated_at"] for i in done_before} == done_before  # nothing ran twice
