"""workers/retrieval.py: the metrics by hand on toy corpora (perfect, reversed, ties, a mixed case), the blocked
matmul against a brute-force sort, and the eval-pair embedding on the tiny model."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from support import make_pairs

from workers.pair_batches import collate
from workers.pair_files import make_encoder, pad_id_of
from workers.retrieval import (METRICS, embed_pairs, evaluate_retrieval, metrics_from_ranks, positive_ranks,
                               retrieval_metrics)
from core.store import RETRIEVAL_NAMES

pytestmark = pytest.mark.usefixtures("one_thread")


def on_circle(degrees) -> torch.Tensor:
    """Unit vectors in the plane at the given angles: (n, 2)."""
    a = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], dim=1).float()


def test_metric_names_are_the_store_columns():
    assert METRICS == RETRIEVAL_NAMES


def test_perfect_retrieval_scores_one_everywhere():
    e = torch.eye(16)  # 16 orthonormal pairs: each query is its positive
    assert retrieval_metrics(e, e.clone()) == {m: 1.0 for m in METRICS}


def test_reversed_retrieval_ranks_every_positive_last():
    # documents on a 60-degree arc; each query points away from its positive, so its positive is the farthest
    d = on_circle([5.0 * j for j in range(12)])
    assert positive_ranks(-d, d).tolist() == [12] * 12
    assert retrieval_metrics(-d, d) == {m: 0.0 for m in METRICS}  # rank 12 > 10: no credit at all
    d4 = d[:4]
    got = retrieval_metrics(-d4, d4)  # rank 4 of 4: inside the top 10
    assert got["recall_at_1"] == 0.0 and got["recall_at_10"] == 1.0
    assert got["mrr_at_10"] == pytest.approx(1 / 4)
    assert got["ndcg_at_10"] == pytest.approx(1 / math.log2(5))


def test_mixed_ranks_by_hand():
    # documents every 10 degrees; queries 0, 1, 2 at 0 degrees (positives 0, 10, 20: ranks 1, 2, 3); query 3 at
    # 119 degrees, its positive at 30: the 8 documents at 40..110 and the one at 120 are closer -> rank 10;
    # query 4 at 220 degrees, opposite its positive at 40: all 12 others are closer -> rank 13
    d = on_circle([10.0 * j for j in range(13)])
    q = torch.cat([on_circle([0, 0, 0, 119, 220]), d[5:]])  # queries 5.. are their positives: rank 1
    ranks = positive_ranks(q, d)
    assert ranks[:5].tolist() == [1, 2, 3, 10, 13]
    assert ranks[5:].tolist() == [1] * 8
    r = [1, 2, 3, 10, 13] + [1] * 8
    got = retrieval_metrics(q, d)
    assert got["recall_at_1"] == pytest.approx(9 / 13)
    assert got["recall_at_10"] == pytest.approx(12 / 13)
    assert got["mrr_at_10"] == pytest.approx(sum(1 / x for x in r if x <= 10) / 13)
    assert got["ndcg_at_10"] == pytest.approx(sum(1 / math.log2(x + 1) for x in r if x <= 10) / 13)


def test_ties_count_against_the_query():
    # documents 0 and 1 are the same point; queries 0 and 1 point exactly at it: each sees the other tied
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    d = torch.stack([e1, e1, e2])
    q = torch.stack([e1, e1, e2])
    assert positive_ranks(q, d).tolist() == [2, 2, 1]
    # a collapsed model (every text at one point) ranks every positive last, never first
    same = F.normalize(torch.ones(20, 8), dim=1)
    assert positive_ranks(same, same).tolist() == [20] * 20
    assert retrieval_metrics(same, same) == {m: 0.0 for m in METRICS}


def test_metrics_from_ranks_by_hand():
    got = metrics_from_ranks(torch.tensor([1, 2, 3, 11]))
    assert got["recall_at_1"] == 0.25 and got["recall_at_10"] == 0.75
    assert got["mrr_at_10"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 4)
    assert got["ndcg_at_10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / 2) / 4)


def brute_force_ranks(q, d) -> list[int]:
    """The definition, one query at a time: 1 + strictly higher + other equal scores."""
    s = q @ d.T
    return [int(1 + (s[i] > s[i, i]).sum() + (s[i] == s[i, i]).sum() - 1) for i in range(len(q))]


@pytest.mark.parametrize("block_elements", [1, 37, 300, 1 << 24])
def test_blocked_matmul_equals_brute_force(block_elements):
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(100, 8, generator=g), dim=1)
    d = F.normalize(q + 0.8 * torch.randn(100, 8, generator=g), dim=1)
    d[7] = d[3]  # a duplicate positive: a tie
    q[7] = d[3]
    ranks = positive_ranks(q, d, block_elements=block_elements)
    assert ranks.tolist() == brute_force_ranks(q, d)
    assert ranks[7] >= 2  # tied with document 3


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        positive_ranks(torch.zeros(3, 4), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="non-empty"):
        positive_ranks(torch.zeros(0, 4), torch.zeros(0, 4))


# --- embedding the eval pairs -------------------------------------------------------------------------------
def mean_embed(model, ids, mask):
    """The study's pooling (masked mean, L2-normalised), from its definition."""
    h = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)


@pytest.fixture(scope="module")
def model_and_batches(tiny_model):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModel.from_pretrained(tiny_model, attn_implementation="eager", dtype=torch.float32)
    pairs = make_pairs(40, seed=3)
    encode, pad = make_encoder(tokenizer, 24), pad_id_of(tokenizer)
    batches = [collate(encode([p["query"] for p in chunk]), encode([p["pos"][0] for p in chunk]), pad, i)
               for i, chunk in enumerate([pairs[:16], pairs[16:32], pairs[32:]])]
    return model, batches


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_embed_pairs_equals_embedding_each_batch(model_and_batches, chunk_size):
    model, batches = model_and_batches
    model.train()
    q, d = embed_pairs(model, batches, mean_embed, chunk_size=chunk_size)
    assert model.training  # put back as it was
    assert q.shape == d.shape == (40, 64) and not q.requires_grad
    model.eval()
    with torch.no_grad():
        want_q = torch.cat([mean_embed(model, b.q_ids, b.q_mask) for b in batches])
        want_d = torch.cat([mean_embed(model, b.d_ids, b.d_mask) for b in batches])
    torch.testing.assert_close(q, want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d, want_d, atol=1e-5, rtol=1e-5)


def test_evaluate_retrieval_on_the_tiny_model(model_and_batches):
    model, batches = model_and_batches
    got = evaluate_retrieval(model, batches, mean_embed)
    assert set(got) == set(METRICS)
    assert all(0.0 <= v <= 1.0 for v in got.values())
    assert got["recall_at_1"] <= got["recall_at_10"] and got["recall_at_1"] <= got["mrr_at_10"] <= 1.0
