"""The knobs end to end through `repurpose submit`, `fit`, `recipe` and `export` on the tiny model: an lr axis
(lr_scale), a query instruction, one hard negative per pair and both attentions in one small sweep (one cluster, one
submit). The hard-negative trials read the token cache built for them (its manifest read back); the best causal
and the best bidirectional trial, exported, reproduce their trial's retrieval metrics on the eval pairs with the
folder's `query` prompt (the bidirectional folder loaded with trust_remote_code=True)."""
from __future__ import annotations

import glob
import json
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
                      "query_instruction": INSTRUCTION, "negatives": {"hard": 1},
                      "attention": ["causal", "bidirectional"]},
            "plan": {"min_steps": 1, "max_epochs": 3}, "run": {"eval_pairs": EVAL_PAIRS, "report_every_s": 0}}
    path = tmp_path / "knobs.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    storage = str(tmp_path / "store")
    plan = ray_env.json(["plan", str(path), "--json"])
    assert {t.get("query_instruction") for t in plan["trials"]} == {INSTRUCTION}
    assert sorted(t.get("attention", "causal") for t in plan["trials"]).count("bidirectional") == 8
    assert sorted({t.get("lr") for t in plan["trials"]}, key=str) == [5e-5, None]  # 1e-3 / 10 x 0.5; x 1 = auto
    proc = ray_env.run(["submit", str(path), "--storage", storage], timeout=1200)
    assert proc.returncode == 0, proc.stderr
    trials = {r["trial_id"]: r for r in pq.read_table(os.path.join(storage, "knobs", "trials.parquet")).to_pylist()}
    assert len(trials) == 16 and all(t["status"] == "completed" for t in trials.values()), \
        [(t["status"], t["reason"]) for t in trials.values()]
    assert sorted({t["lr"] for t in trials.values()}) == [pytest.approx(5e-5), pytest.approx(1e-4)]
    assert {t["query_instruction"] for t in trials.values()} == {INSTRUCTION}
    assert {t["negatives"] for t in trials.values()} == {1}
    assert sorted(t["attention"] for t in trials.values()).count("bidirectional") == 8
    cells = {}
    for t in trials.values():  # the same cell under either attention: the mask changes what is learnt
        cells.setdefault((t["budget_flops"], t["lr"]), {})[t["attention"]] = t["eval_loss"]
    assert all(c["causal"] != c["bidirectional"] for c in cells.values())
    # the token cache of this grid's texts: one hard negative per pair, the instruction; every pair has one `neg`
    manifests = [json.load(open(p)) for p in glob.glob(os.path.join(storage, "_cache", "tokens", "*", "manifest.json"))]
    (m,) = manifests
    assert m["inputs"]["hard_negatives"] == 1 and m["inputs"]["query_instruction"] == INSTRUCTION
    assert (m["splits"]["train"]["pairs"], m["splits"]["train"]["short_negatives"]) == (2000, 0)
    assert "token cache" in proc.stderr and "built in" in proc.stderr
    for t in trials.values():  # the negatives' tokens are spent from the budget, as the queries' and documents'
        assert t["flops"] <= t["budget_flops"] and t["flops"] == t["tokens"] * 6 * t["n_params"]

    proc = ray_env.run(["fit", "knobs", "--storage", storage])
    assert proc.returncode == 0, proc.stderr
    recipe = ray_env.json(["recipe", "knobs", "--budget", "3e9", "--storage", storage, "--json"])
    assert recipe["query_instruction"] == INSTRUCTION
    # the recipe's slice is one attention: its lr is the best of that slice's trials at the budget
    mine = [t for t in trials.values() if t["budget_flops"] == 3e9
            and t["attention"] == recipe.get("attention", "causal")]
    assert recipe["lr"] == pytest.approx(min(mine, key=lambda t: t["eval_loss"])["lr"])

    pairs = load_eval_pairs(eval_file, EVAL_PAIRS)
    for attention in ("causal", "bidirectional"):
        best = min((t for t in trials.values() if t["budget_flops"] == 3e9 and t["attention"] == attention),
                   key=lambda t: t["eval_loss"])
        out = tmp_path / f"exported-{attention}"
        proc = ray_env.run(["export", "knobs", "--trial", best["trial_id"], "--out", str(out), "--storage", storage])
        assert proc.returncode == 0, proc.stderr
        st = SentenceTransformer(str(out), device="cpu", local_files_only=True,
                                 trust_remote_code=attention == "bidirectional")
        assert st.prompts.get("query") == INSTRUCTION
        q = st.encode([p[0] for p in pairs], prompt_name="query", convert_to_tensor=True, batch_size=16)
        d = st.encode([p[1] for p in pairs], convert_to_tensor=True, batch_size=16)
        got = retrieval(q.float(), d.float())
        for name, value in got.items():
            assert math.isclose(value, best[name], abs_tol=1e-6), (attention, name, value, best[name])
        without = retrieval(st.encode([p[0] for p in pairs], convert_to_tensor=True).float(), d.float())
        assert without != got  # the prompt matters: the metrics are the instruction's, not a coincidence
