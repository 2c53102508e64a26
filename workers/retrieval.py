"""Exact retrieval metrics on the held-out eval pairs: every query against *all* eval positives.

Query i's one relevant document is document i (its own positive); the corpus is every eval pair's positive, not
only its batch's. With one relevant document per query (docs/study.md, "Where this project departs"):

    recall@k = share of queries whose positive ranks in the top k         (k = 1, 10)
    MRR@10   = mean of 1/rank, 0 past rank 10
    nDCG@10  = mean of 1/log2(rank + 1), 0 past rank 10 (the ideal DCG of one relevant document is 1)

Exact: scores are cosines (the embeddings are unit-norm) from a matmul over the whole corpus, a block of queries
at a time, so no (Q, Q) matrix is held whole for large Q; no approximate index.

Ties are counted against the query (pessimistic): rank = 1 + #documents scoring strictly higher than the positive
+ #other documents scoring exactly the same. A model that maps every text to one point ranks every positive last
(rank Q), not first; two eval pairs with the same positive text tie and each counts the other above it. The
positive's score is read from the same matmul block as the others' (never recomputed another way), so rounding
cannot put a document "above" an identical one.

``embed_pairs`` embeds the eval batches (workers/pair_batches.py's ``Batch``: q_ids, q_mask, d_ids, d_mask) with any
pooling: the caller passes ``embed(model, ids, mask) -> (B, D)`` unit-norm embeddings.
"""
from __future__ import annotations

import contextlib

import torch

METRICS = ("recall_at_1", "recall_at_10", "mrr_at_10", "ndcg_at_10")  # core.store.RETRIEVAL_NAMES, same order
CUTOFF = 10  # MRR@10, nDCG@10
# scores held at once: 1 MB of fp32 (64 queries x 4,096 documents), cache-resident: ranking 4,096 pairs (D = 64,
# one thread) took 0.09 s in blocks of 2^18 scores, 0.15 / 0.18 / 0.32 s in blocks of 2^20 / 2^22 / 2^24
SCORE_BLOCK_ELEMENTS = 1 << 18


def retrieval_metrics(q: torch.Tensor, d: torch.Tensor, *, block_elements: int = SCORE_BLOCK_ELEMENTS
                      ) -> dict[str, float]:
    """(Q, D) query and (Q, D) document embeddings, L2-normalised, row i of each one pair -> the four metrics."""
    return metrics_from_ranks(positive_ranks(q, d, block_elements=block_elements))


def positive_ranks(q: torch.Tensor, d: torch.Tensor, *, block_elements: int = SCORE_BLOCK_ELEMENTS) -> torch.Tensor:
    """(Q,) 1-based rank of each query's positive among all Q documents, ties counted against the query."""
    if q.ndim != 2 or q.shape != d.shape or q.shape[0] == 0:
        raise ValueError(f"retrieval: queries and documents must be two non-empty (Q, D) tensors of one shape, "
                         f"got {tuple(q.shape)} and {tuple(d.shape)}")
    q, d = q.float(), d.float()
    n = q.shape[0]
    rows = max(1, block_elements // n)  # queries per block
    ranks = torch.empty(n, dtype=torch.long, device=q.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        scores = q[start:stop] @ d.T  # (b, Q) cosines
        idx = torch.arange(stop - start, device=q.device)
        pos = scores[idx, start + idx].unsqueeze(1)  # (b, 1): the positive's score, from this very block
        # 1 + #(strictly higher) + #(others equal) = #(scores >= the positive's), the positive itself included
        ranks[start:stop] = (scores >= pos).sum(dim=1, dtype=torch.int32)
    return ranks


def metrics_from_ranks(ranks: torch.Tensor) -> dict[str, float]:
    """(Q,) 1-based ranks of the one relevant document -> recall@1, recall@10, MRR@10, nDCG@10 (python floats)."""
    r = ranks.double()
    top = r <= CUTOFF
    zero = torch.zeros_like(r)
    return {
        "recall_at_1": (r <= 1).double().mean().item(),
        "recall_at_10": top.double().mean().item(),
        "mrr_at_10": torch.where(top, 1.0 / r, zero).mean().item(),
        "ndcg_at_10": torch.where(top, 1.0 / torch.log2(r + 1.0), zero).mean().item(),
    }


@torch.no_grad()
def embed_pairs(model, batches, embed, *, chunk_size: int | None = None,
                autocast=contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval batches' (Q, D) query and (Q, D) document embeddings (fp32), in pair order.

    ``embed(model, ids, mask) -> (B, D)`` unit-norm: the trial's pooling. The model runs in eval mode under
    no_grad and is put back in the mode it was in. ``chunk_size``: sequences per forward (None: a whole batch
    side); each forward takes sequences of similar length (sorted within the batch side) trimmed to their
    longest, so less padding is computed. ``autocast``: a zero-argument context-manager factory, as the trial's.
    """
    was_training = model.training
    model.eval()
    try:
        qs, ds = [], []
        for batch in batches:
            qs.append(_embed_side(model, batch.q_ids, batch.q_mask, embed, chunk_size, autocast))
            ds.append(_embed_side(model, batch.d_ids, batch.d_mask, embed, chunk_size, autocast))
    finally:
        model.train(was_training)
    if not qs:
        raise ValueError("retrieval: no eval batches to embed")
    return torch.cat(qs), torch.cat(ds)


def _embed_side(model, ids: torch.Tensor, mask: torch.Tensor, embed, chunk_size: int | None, autocast):
    """(B, T) ids and mask -> (B, D): forwards of ``chunk_size`` sequences sorted by length, back in order."""
    lengths = mask.sum(dim=1)  # (B,)
    order = torch.argsort(lengths, descending=True)
    size = chunk_size or ids.shape[0]
    out = None
    for start in range(0, ids.shape[0], size):
        rows = order[start:start + size]
        t = max(1, int(lengths[rows].max()))
        with autocast():
            e = embed(model, ids[rows, :t], mask[rows, :t]).float()  # (b, D)
        if out is None:
            out = torch.empty(ids.shape[0], e.shape[1], dtype=torch.float32, device=e.device)
        out[rows] = e
    return out


def evaluate_retrieval(model, batches, embed, **kwargs) -> dict[str, float]:
    """``embed_pairs`` then ``retrieval_metrics``: the four metrics of a model on its eval batches."""
    q, d = embed_pairs(model, batches, embed, **kwargs)
    return retrieval_metrics(q, d)

