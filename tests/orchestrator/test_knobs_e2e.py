"""The knobs end to end through `repurpose submit`, `fit`, `recipe` and `export` on the tiny model: an lr axis
(lr_scale), a query instruction and one hard negative per pair in one small sweep; the exported folder with its `query` prompt reproduces the
trial's retrieval metrics on the eval pairs."""
from __future__ import annotations

import math
import os

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from workers.pair_files import load_eval_pairs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

INSTRUCTION = "search query: "
EVAL_PAIRS = 32


def retrieval(q: torch.Tensor, d: torch.Tensor) -> dict:
    """Each query against every eval positive (its own is relevant), by cosine: rank of the positive."""
    sims = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(d, dim=1).T
    rank = (sims > sims.diag()[:, None]).sum(1) + 1
    top10 = rank <= 10
    return {"recall_at_1": (rank == 1).double().mean().item(), "recall_at_10": top10.double().mean().item(),
            "ndcg_at_10": torch.where(top10, 1 / torch.log2(rank.double() + 1), torch.zeros(len(rank),
                                                                                            dtype=torch.double)).mean().item()}


def test_knobs_end_to_end(tiny_model, pairs_file, eval_file, ray_env, tmp_path):
    from sentence_transformers import SentenceTransformer

    grid = {"name": "knobs", "models": [tiny_model], "methods": {"full": {}},
            "budgets": [1.5e9, 2e9, 2.5e9, 3e9], "data": {"train": str(pairs_file), "eval": str(eval_file)},
            "train": {"batch_size": 16, "max_length": 32, "precision": "fp32", "lr_scale": [0.5, 1],
                      "query_instruction": INSTRUCTION, "negatives": {"hard": 1}},
            "plan": {"min_steps": 1, "max_epochs": 3}, "run": {"eval_pairs": EVAL_PAIRS, "report_every_s": 0}}
    path = tmp_path / "knobs.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    storage = str(tmp_path / "store")
    plan = ray_env.json(["plan", str(path), "--json"])
    assert {t.get("query_instruction") for t in plan["trials"]} == {INSTRUCTION}
    assert sorted({t.get("lr") for t in plan["trials"]}, key=str) == [5e-5, None]  # 1e-3 / 10 x 0.5; x 1 = auto
    proc = ray_env.run(["submit", str(path), "--storage", storage], timeout=1200)
    assert proc.returncode == 0, proc.stderr
    trials = {r["trial_id"]: r for r in pq.read_table(os.path.join(storage, "knobs", "trials.parquet")).to_pylist()}
    assert len(trials) == 8 and all(t["status"] == "completed" for t in trials.values())
    assert sorted({t["lr"] for t in trials.values()}) == [pytest.approx(5e-5), pytest.approx(1e-4)]
    assert {t["query_instruction"] for t in trials.values()} == {INSTRUCTION}
    assert {t["negatives"] for t in trials.values()} == {1}
    for t in trials.values():  # the negatives' tokens are spent from the budget, as the queries' and documents'
        assert t["flops"] <= t["budget_flops"] and t["flops"] == t["tokens"] * 6 * t["n_params"]

    proc = ray_env.run(["fit", "knobs", "--storage", storage])
    assert proc.returncode == 0, proc.stderr
    recipe = ray_env.json(["recipe", "knobs", "--budget", "3e9", "--storage", storage, "--json"])
    at = [t for t in trials.values() if t["budget_flops"] == 3e9]
    assert recipe["lr"] == pytest.approx(min(at, key=lambda t: t["eval_loss"])["lr"])
    assert recipe["query_instruction"] == INSTRUCTION

    best = min(at, key=lambda t: t["eval_loss"])
    out = tmp_path / "exported"
    proc = ray_env.run(["export", "knobs", "--trial", best["trial_id"], "--out", str(out), "--storage", storage])
    assert proc.returncode == 0, proc.stderr
    st = SentenceTransformer(str(out), device="cpu", local_files_only=True)
    assert st.prompts.get("query") == INSTRUCTION
    pairs = load_eval_pairs(eval_file, EVAL_PAIRS)
    q = st.encode([p[0] for p in pairs], prompt_name="query", convert_to_tensor=True, batch_size=16)
    d = st.encode([p[1] for p in pairs], convert_to_tensor=True, batch_size=16)
    got = retrieval(q.float(), d.float())
    for name, value in got.items():
        assert math.isclose(value, best[name], abs_tol=1e-6), (name, value, best[name])
    without = retrieval(st.encode([p[0] for p in pairs], convert_to_tensor=True).float(), d.float())
    assert without != got  # the prompt matters: the metrics are the instruction's, not a coincidence
