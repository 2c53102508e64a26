"""Embeddings and the contrastive loss, with an exact gradient cache for batches larger than memory.

Pooling and loss follow PAPER.md ("Training recipe"): the last hidden layer pooled over real tokens
(workers/pooling.py: the study's mean by default, or the grid's ``pooling``: last token, SGPT's weighted mean),
L2-normalised; symmetric InfoNCE over in-batch negatives with temperature tau. Batches are right-padded.

Gradient cache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup"): embed all sub-batches without grad, take the loss and its gradient w.r.t. the embeddings, then
re-embed each sub-batch with grad and back-propagate the cached embedding gradient. Parameter gradients
equal the one-shot batch's (tests/workers/test_loss.py).

Data parallel (workers/distributed.py): each rank passes its shard of the batch and a differentiable ``gather``
of the shards' embeddings, so the loss is still the whole batch's; ``backward`` is DeepSpeed's
``engine.backward`` there.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from workers.pooling import assert_right_padded, pool


def embed(model, ids: torch.Tensor, mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """(B, T) token ids and right-padded mask -> (B, D) unit-norm embeddings (fp32), pooled per ``pooling``."""
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, D)
    return F.normalize(pool(hidden, mask, pooling), dim=-1)


def info_nce(q: torch.Tensor, d: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: 1/2 [CE(q -> d) + CE(d -> q)], logits cos(q_i, d_j) / tau, positives on the diagonal."""
    logits = q @ d.T / temperature  # (B, B)
    labels = torch.arange(q.shape[0], device=q.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


class _RngFork:
    """Remembers the RNG state before a sub-batch's first forward so its re-run draws the same dropout."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda else None

    @contextlib.contextmanager
    def replay(self):
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if self.cuda else []):
            torch.set_rng_state(self.cpu_state)
            if self.cuda:
                torch.cuda.set_rng_state(self.cuda_state)
            yield


def _chunks(ids: torch.Tensor, mask: torch.Tensor, size: int):
    """Sub-batches trimmed to their own longest sequence (less padding, same result: right padding, checked)."""
    assert_right_padded(mask)
    for i in range(0, ids.shape[0], size):
        m = mask[i:i + size]
        t = int(m.sum(dim=1).max())
        yield ids[i:i + size, :t], m[:, :t]


def step_shapes(batch, chunk_size: int | None) -> list[tuple[int, int]]:
    """(pairs, padded length) of every forward a training step runs, both sides (for FLOP accounting)."""
    shapes = []
    for ids, mask in ((batch.q_ids, batch.q_mask), (batch.d_ids, batch.d_mask)):
        size = ids.shape[0] if chunk_size is None else min(chunk_size, ids.shape[0])
        shapes += [(i.shape[0], i.shape[1]) for i, _ in _chunks(ids, mask, size)]
    return shapes


def _whole(x: torch.Tensor) -> torch.Tensor:
    return x


def contrastive_backward(model, batch, temperature: float, chunk_size: int | None, autocast, *,
                         gather=None, backward=None, pooling: str = "mean") -> float:
    """Loss of one contrastive batch; parameter gradients accumulated in .grad. Returns the loss value.

    ``chunk_size`` None or >= the batch: one pass. Smaller: the exact gradient cache.
    ``autocast``: a zero-argument context-manager factory (bf16 autocast or a null context).
    ``gather``: (b, D) embeddings of this rank's shard -> (B, D) of the whole batch, differentiable; None: the
    batch is whole here. ``backward``: back-propagates a scalar (DeepSpeed's ``engine.backward``); None:
    ``Tensor.backward``. ``pooling``: the trial's (``spec.pooling``; workers/pooling.py).
    """
    gather = gather or _whole
    backward = backward or torch.Tensor.backward
    n = batch.q_ids.shape[0]
    if chunk_size is None or chunk_size >= n:
        (q_ids, q_mask), = _chunks(batch.q_ids, batch.q_mask, n)
        (d_ids, d_mask), = _chunks(batch.d_ids, batch.d_mask, n)
        with autocast():
            q = embed(model, q_ids, q_mask, pooling)
            d = embed(model, d_ids, d_mask, pooling)
        loss = info_nce(gather(q), gather(d), temperature)
        backward(loss)
        return loss.item()

    sides = [(batch.q_ids, batch.q_mask), (batch.d_ids, batch.d_mask)]
    device = batch.q_ids.device
    cached, forks = [], []
    with torch.no_grad():
        for ids, mask in sides:
            parts = []
            for c_ids, c_mask in _chunks(ids, mask, chunk_size):
                forks.append(_RngFork(device))
                with autocast():
                    parts.append(embed(model, c_ids, c_mask, pooling))
            cached.append(torch.cat(parts))
    q, d = (e.detach().requires_grad_() for e in cached)
    loss = info_nce(gather(q), gather(d), temperature)
    loss.backward()  # gradients w.r.t. the (local) embeddings only: (n, D) each; no parameter is reached
    grads = iter(forks)
    for (ids, mask), emb in zip(sides, (q, d)):
        for (c_ids, c_mask), g in zip(_chunks(ids, mask, chunk_size), emb.grad.split(chunk_size)):
            with next(grads).replay(), autocast():
                e = embed(model, c_ids, c_mask, pooling)
            backward((e * g).sum())  # its gradient w.r.t. e is exactly g: e.backward(g) as a scalar
    return loss.item()


@torch.no_grad()
def eval_embeddings(model, batches, chunk_size: int | None, autocast, *, split=None,
                    pooling: str = "mean") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per held-out batch, its (B, D) query and (B, D) document embeddings, fp32, unit norm: one forward pass
    serves both the eval loss and the retrieval metrics (workers/retrieval.py).

    ``split``: batch -> (this rank's shard, gather) for data parallel (workers/distributed.py): every rank then
    holds the whole batch's embeddings; None: whole.
    """
    out = []
    for batch in batches:
        batch, gather = split(batch) if split else (batch, _whole)
        embs = []
        for ids, mask in ((batch.q_ids, batch.q_mask), (batch.d_ids, batch.d_mask)):
            size = chunk_size or ids.shape[0]
            with autocast():
                embs.append(gather(torch.cat([embed(model, i, m, pooling) for i, m in _chunks(ids, mask, size)])))
        out.append((embs[0].float(), embs[1].float()))
    return out


def mean_info_nce(pairs: list[tuple[torch.Tensor, torch.Tensor]], temperature: float) -> float:
    """The mean contrastive loss over batches of embeddings, weighted by pairs; negatives = the whole batch."""
    total = sum(info_nce(q, d, temperature).item() * q.shape[0] for q, d in pairs)
    return total / max(sum(q.shape[0] for q, _ in pairs), 1)


def eval_loss(model, batches, temperature: float, chunk_size: int | None, autocast, *, split=None,
              pooling: str = "mean") -> float:
    """Mean contrastive loss over held-out batches (weighted by pairs); negatives = the whole batch."""
    return mean_info_nce(eval_embeddings(model, batches, chunk_size, autocast, split=split, pooling=pooling),
                         temperature)
