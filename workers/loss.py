"""Embeddings and the contrastive loss, with an exact gradient cache for batches larger than memory.

Pooling and loss follow docs/study.md ("Training recipe"): the last hidden layer pooled over real tokens
(workers/pooling.py: the study's mean by default, or the grid's ``pooling``: last token, SGPT's weighted mean),
L2-normalised; symmetric InfoNCE over in-batch negatives with temperature tau. Batches are right-padded.

Gradient cache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup"): embed all sub-batches without grad, take the loss and its gradient w.r.t. the embeddings, then
re-embed each sub-batch with grad and back-propagate the cached embedding gradient. Parameter gradients
equal the one-shot batch's (tests/workers/test_loss.py).

Data parallel (workers/distributed.py): each rank passes its shard of the batch and a differentiable ``gather``
of the shards' embeddings, so the loss is still the whole batch's; ``backward`` is DeepSpeed's
``engine.backward`` there.

Packing (workers/packing.py, ``packing=True``): each sub-batch's queries and documents run as one forward of
packed rows (no padding) instead of two padded ones; the pooled embeddings, the loss and the gradients are the
padded forward's up to float rounding (tests/workers/test_packing.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.packing import Packed, Packer, as_packer, lengths_of, unpack
from workers.pooling import assert_right_padded, pool


def embed(model, ids: torch.Tensor, mask: torch.Tensor, pooling: str = "mean",
          packed: Packed | None = None) -> torch.Tensor:
    """(B, T) token ids and right-padded mask -> (B, D) unit-norm embeddings (fp32), pooled per ``pooling``.
    ``packed``: the same texts packed (workers/packing.py): the model runs its rows, pooling reads them back."""
    if packed is None:
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, D)
    else:  # no attention mask: the texts' boundaries come from the restarting positions or cu_seqlens
        rows = model(**packed.model_kwargs()).last_hidden_state  # (R, L, D)
        hidden = unpack(rows, packed)  # (B, T, D)
    return F.normalize(pool(hidden, mask, pooling), dim=-1)


def info_nce(q: torch.Tensor, d: torch.Tensor, temperature: float, negatives: torch.Tensor | None = None
             ) -> torch.Tensor:
    """Symmetric InfoNCE: 1/2 [CE(q -> d) + CE(d -> q)], logits cos(q_i, d_j) / tau, positives on the diagonal.
    ``negatives`` (B * k, D): hard negatives, extra columns of the query -> document logits (every query
    against every pair's negatives too, as in-batch negatives are shared); the document -> query direction is
    unchanged (a negative is no query's positive)."""
    logits = q @ d.T / temperature  # (B, B)
    labels = torch.arange(q.shape[0], device=q.device)
    to_docs = logits if negatives is None else torch.cat([logits, q @ negatives.T / temperature], dim=1)
    return 0.5 * (F.cross_entropy(to_docs, labels) + F.cross_entropy(logits.T, labels))


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


@dataclass(frozen=True)
class _Forward:
    """One forward pass of a step: the texts it embeds, right-padded, and which of the stacked (2B,) [queries;
    documents] they are; packed: one sub-batch's queries and documents together."""

    rows: torch.Tensor  # (S,) long: positions in the stacked [queries; documents]
    ids: torch.Tensor  # (S, T)
    mask: torch.Tensor  # (S, T)
    packed: Packed | None = None

    def embed(self, model, pooling: str) -> torch.Tensor:
        return embed(model, self.ids, self.mask, pooling, self.packed)


def _forwards(batch, size: int, packing) -> list[_Forward]:
    """The forwards that embed a batch in sub-batches of ``size`` pairs: padded, every query sub-batch then every
    document sub-batch; packed (``packing``: workers/packing.py ``as_packer``), one per sub-batch, its queries and
    documents together."""
    n, dev = batch.q_ids.shape[0], batch.q_ids.device
    packer = as_packer(packing)
    q_parts = list(_chunks(batch.q_ids, batch.q_mask, size))
    d_parts = list(_chunks(batch.d_ids, batch.d_mask, size))
    starts = range(0, n, size)
    negatives = _negative_forwards(batch, size, packer)
    if packer is None:
        return [_Forward(torch.arange(side + i, side + i + ids.shape[0], device=dev), ids, mask)
                for side, parts in ((0, q_parts), (n, d_parts)) for i, (ids, mask) in zip(starts, parts)] + negatives
    out = []
    for i, (q_ids, q_mask), (d_ids, d_mask) in zip(starts, q_parts, d_parts):
        ids, mask = _stack(q_ids, d_ids), _stack(q_mask, d_mask)  # (2b, T)
        b = q_ids.shape[0]
        rows = torch.cat([torch.arange(i, i + b, device=dev), torch.arange(n + i, n + i + b, device=dev)])
        out.append(_Forward(rows, ids, mask, packer(ids, mask)))
    return out + negatives


def _negative_forwards(batch, size: int, packer: Packer | None) -> list[_Forward]:
    """The hard negatives' forwards (rows 2n ... 2n + nk - 1 of the stacked [queries; documents; negatives]):
    sub-batches of ``size`` pairs' negatives (size * k texts), packed alone when the step packs."""
    k = getattr(batch, "hard_negatives", 0)
    if not k:
        return []
    n, dev = batch.q_ids.shape[0], batch.q_ids.device
    out = []
    for i, (ids, mask) in zip(range(0, n * k, size * k), _chunks(batch.n_ids, batch.n_mask, size * k)):
        rows = torch.arange(2 * n + i, 2 * n + i + ids.shape[0], device=dev)
        out.append(_Forward(rows, ids, mask, None if packer is None else packer(ids, mask)))
    return out


def _stack(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(b, Ta) and (b, Tb) right-padded -> (2b, max(Ta, Tb)), padded with 0 (masked)."""
    t = max(a.shape[1], b.shape[1])
    return torch.cat([F.pad(a, (0, t - a.shape[1])), F.pad(b, (0, t - b.shape[1]))])


def _assemble(forwards: list[_Forward], outs: list[torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The forwards' embeddings in the stacked order -> (n, D) queries and (n, D) documents (the hard negatives,
    if any, left out: ``_assemble_all``)."""
    q, d, _ = _assemble_all(forwards, outs, n)
    return q, d


def _assemble_all(forwards: list[_Forward], outs: list[torch.Tensor], n: int):
    """-> (n, D) queries, (n, D) documents, (n k, D) hard negatives or None."""
    order = torch.cat([f.rows for f in forwards])
    stacked = torch.cat(outs)[torch.argsort(order)]  # (2n + nk, D)
    return stacked[:n], stacked[n:2 * n], (stacked[2 * n:] if len(stacked) > 2 * n else None)


def step_shapes(batch, chunk_size: int | None, packing=False) -> list[tuple[int, int]]:
    """(rows, padded length) of every forward a training step runs (for FLOP accounting): padded, a sub-batch's
    texts; packed, what its kernel computes (workers/packing.py ``Packer.shapes``: the mask kernels' rows as
    ``layout`` lays them out, a flat kernel each text on its own)."""
    n = batch.q_ids.shape[0]
    size = n if chunk_size is None else min(chunk_size, n)
    k = getattr(batch, "hard_negatives", 0)
    negatives = [(ids.shape[0], ids.shape[1]) for ids, _ in _chunks(batch.n_ids, batch.n_mask, size * k)] if k else []
    packer = as_packer(packing)
    if packer is None:
        sides = ((batch.q_ids, batch.q_mask), (batch.d_ids, batch.d_mask))
        return [(ids.shape[0], ids.shape[1]) for side in sides for ids, _ in _chunks(*side, size)] + negatives
    shapes = []
    for i in range(0, n, size):
        shapes += packer.shapes(lengths_of(batch.q_mask[i:i + size]) + lengths_of(batch.d_mask[i:i + size]))
    for i in range(0, n * k, size * k) if k else ():  # the hard negatives' forwards, packed alone
        shapes += packer.shapes(lengths_of(batch.n_mask[i:i + size * k]))
    return shapes


def _whole(x: torch.Tensor) -> torch.Tensor:
    return x


def contrastive_backward(model, batch, temperature: float, chunk_size: int | None, autocast, *,
                         gather=None, backward=None, pooling: str = "mean", packing=False) -> float:
    """Loss of one contrastive batch; parameter gradients accumulated in .grad. Returns the loss value.

    ``chunk_size`` None or >= the batch: one pass. Smaller: the exact gradient cache.
    ``autocast``: a zero-argument context-manager factory (bf16 autocast or a null context).
    ``gather``: (b, D) embeddings of this rank's shard -> (B, D) of the whole batch, differentiable; None: the
    batch is whole here. ``backward``: back-propagates a scalar (DeepSpeed's ``engine.backward``); None:
    ``Tensor.backward``. ``pooling``: the trial's (``spec.pooling``; workers/pooling.py). ``packing``: each
    sub-batch as one forward of packed rows (workers/packing.py; the recipe decides with ``packing.packs``): True
    for rows under the block-diagonal mask, or a ``Packer`` naming the attention kernel (workers/attention.py).
    """
    gather = gather or _whole
    backward = backward or torch.Tensor.backward
    n = batch.q_ids.shape[0]
    if chunk_size is None or chunk_size >= n:
        forwards = _forwards(batch, n, packing)
        outs = []
        for f in forwards:  # a region per forward, as the gradient cache's and DeepSpeed's: each its own bf16 weight
            with autocast():  # copies, whose gradients meet in fp32 (one shared cached copy would sum them in bf16)
                outs.append(f.embed(model, pooling))
        q, d, neg = _assemble_all(forwards, outs, n)
        loss = info_nce(gather(q), gather(d), temperature, None if neg is None else gather(neg))
        backward(loss)
        return loss.item()

    forwards = _forwards(batch, chunk_size, packing)  # packed once: both passes run the same rows
    device = batch.q_ids.device
    outs, forks = [], []
    with torch.no_grad():
        for f in forwards:
            forks.append(_RngFork(device))
            with autocast():
                outs.append(f.embed(model, pooling))
    q, d, neg = (None if e is None else e.detach().requires_grad_() for e in _assemble_all(forwards, outs, n))
    loss = info_nce(gather(q), gather(d), temperature, None if neg is None else gather(neg))
    loss.backward()  # gradients w.r.t. the (local) embeddings only: (n, D) each; no parameter is reached
    grads = torch.cat([q.grad, d.grad, *([] if neg is None else [neg.grad])])  # stacked as the forwards' rows
    for f, fork in zip(forwards, forks):
        with fork.replay(), autocast():
            e = f.embed(model, pooling)
        backward((e * grads[f.rows]).sum())  # its gradient w.r.t. e is exactly the cached one: e.backward(g)
    return loss.item()


@torch.no_grad()
def eval_embeddings(model, batches, chunk_size: int | None, autocast, *, split=None,
                    pooling: str = "mean", packing=False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per held-out batch, its (B, D) query and (B, D) document embeddings, fp32, unit norm: one forward pass
    serves both the eval loss and the retrieval metrics (workers/retrieval.py).

    ``split``: batch -> (this rank's shard, gather) for data parallel (workers/distributed.py): every rank then
    holds the whole batch's embeddings; None: whole. ``packing``: as ``contrastive_backward``'s.
    """
    out = []
    for batch in batches:
        batch, gather = split(batch) if split else (batch, _whole)
        n = batch.q_ids.shape[0]
        forwards = _forwards(batch, min(chunk_size or n, n), packing)
        with autocast():
            q, d = _assemble(forwards, [f.embed(model, pooling) for f in forwards], n)
        out.append((gather(q).float(), gather(d).float()))
    return out


def mean_info_nce(pairs: list[tuple[torch.Tensor, torch.Tensor]], temperature: float) -> float:
    """The mean contrastive loss over batches of embeddings, weighted by pairs; negatives = the whole batch."""
    total = sum(info_nce(q, d, temperature).item() * q.shape[0] for q, d in pairs)
    return total / max(sum(q.shape[0] for q, _ in pairs), 1)


def eval_loss(model, batches, temperature: float, chunk_size: int | None, autocast, *, split=None,
              pooling: str = "mean", packing=False) -> float:
    """Mean contrastive loss over held-out batches (weighted by pairs); negatives = the whole batch."""
    return mean_info_nce(eval_embeddings(model, batches, chunk_size, autocast, split=split, pooling=pooling,
                                         packing=packing), temperature)
