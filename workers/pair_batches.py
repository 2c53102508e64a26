"""The torch side of a trial's data: shuffled pairs (workers/pair_files.py) tokenised, cut into batches, padded into
tensors on a background thread.

Reading -> shuffling -> tokenising -> batching -> padding, all deterministic given a seed, so a resumed trial
(``skip_batches=k``) sees exactly the batches an uninterrupted one would have seen from k on.

Batching (``PairStream(batching=...)``, the trial's ``TrialSpec.batching``):
- ``"random"`` (the default, the paper's): consecutive ``batch_size`` pairs of the shuffled pass
  (workers/pair_files.py, "The shuffle of one pass"), each side padded to its longest. The in-batch negatives of
  the contrastive loss are a random sample of the data.
- ``"length_buckets"`` (opt-in): pools of ``bucket_batches`` batches' worth of pairs sorted by length, cut into
  batches whose order is shuffled. Less padding (stdlib pairs, batch 128: 32 % against 64 %), but each batch
  holds pairs of similar length, so the negatives are no longer a random sample: ~0.1 nats worse eval loss on
  the mini suite (benchmarks/README.md "Data").

Reading, counting and token counts need no torch and live in workers/pair_files.py (the driver plans with them);
the names are re-exported here for the modules that imported them from workers.pair_batches.
"""
from __future__ import annotations

import itertools
import math
import queue
import random
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from core.spec import BATCHING
from workers.pair_files import (MAX_BAD_FRACTION, SHUFFLE_BUFFER, BackgroundBatches, DataError, DataStats, Stopped,
                                epoch_seed, iter_pairs, make_encoder, pad_id_of, resolve_files, shown_uri,
                                with_query_instruction)

BUCKET_BATCHES = 16  # length_buckets: batches' worth of pairs sorted together by length
PREFETCH = 4  # batches ready ahead of the training loop


@dataclass
class Batch:
    q_ids: torch.Tensor  # (B, Tq) long, right-padded with the pad id
    q_mask: torch.Tensor  # (B, Tq) long, 1 = real token
    d_ids: torch.Tensor  # (B, Td)
    d_mask: torch.Tensor  # (B, Td)
    index: int  # ordinal in the stream, 0-based, counting skipped batches
    real_tokens: int  # q_mask.sum() + d_mask.sum() (+ n_mask.sum())
    padded_tokens: int  # q_ids.numel() + d_ids.numel() (+ n_ids.numel())
    # hard negatives (train.negatives): (B * k, Tn), pair i's k negatives at rows i*k .. i*k + k - 1; None: none
    n_ids: torch.Tensor | None = None
    n_mask: torch.Tensor | None = None

    @property
    def hard_negatives(self) -> int:
        """k, the hard negatives per pair (0: in-batch negatives only)."""
        return 0 if self.n_ids is None else self.n_ids.shape[0] // self.q_ids.shape[0]

    def __len__(self) -> int:
        return self.q_ids.shape[0]

    def take(self, n: int) -> "Batch":
        """The first n pairs (a trial's last, partial step), trimmed to the longest kept sequence."""
        if not 0 < n <= len(self):
            raise ValueError(f"take: n must be in [1, {len(self)}], got {n}")
        tq, td = int(self.q_mask[:n].sum(1).max()), int(self.d_mask[:n].sum(1).max())
        q_ids, q_mask = self.q_ids[:n, :tq], self.q_mask[:n, :tq]
        d_ids, d_mask = self.d_ids[:n, :td], self.d_mask[:n, :td]
        n_ids = n_mask = None
        if self.n_ids is not None:  # the kept pairs' negatives
            k = self.hard_negatives
            tn = int(self.n_mask[:n * k].sum(1).max())
            n_ids, n_mask = self.n_ids[:n * k, :tn], self.n_mask[:n * k, :tn]
        return Batch(q_ids, q_mask, d_ids, d_mask, self.index,
                     int(q_mask.sum() + d_mask.sum() + (0 if n_mask is None else n_mask.sum())),
                     q_ids.numel() + d_ids.numel() + (0 if n_ids is None else n_ids.numel()), n_ids, n_mask)


# --------------------------------------------------------------------------------------------------------
# Padding


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest: ids (B, T) long, mask (B, T) long."""
    lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    mask = np.arange(lens.max()) < lens[:, None]  # (B, T); row-major order = concatenation order
    ids = np.full(mask.shape, pad_id, dtype=np.int64)
    ids[mask] = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lens.sum()))
    return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))


def collate(q: list[list[int]], d: list[list[int]], pad_id: int, index: int,
            negatives: list[list[int]] | None = None) -> Batch:
    """``negatives``: the pairs' hard negatives, pair by pair (k per pair), or None."""
    q_ids, q_mask = _pad(q, pad_id)
    d_ids, d_mask = _pad(d, pad_id)
    real = sum(map(len, q)) + sum(map(len, d))
    if not negatives:
        return Batch(q_ids, q_mask, d_ids, d_mask, index, real, q_ids.numel() + d_ids.numel())
    n_ids, n_mask = _pad(negatives, pad_id)
    return Batch(q_ids, q_mask, d_ids, d_mask, index, real + sum(map(len, negatives)),
                 q_ids.numel() + d_ids.numel() + n_ids.numel(), n_ids, n_mask)


def negatives_of(pairs: list[tuple]) -> list[str]:
    """The hard negatives of pairs read with ``hard_negatives`` k (records.iter_pairs), pair by pair."""
    return [text for p in pairs for text in p[2:]]


# --------------------------------------------------------------------------------------------------------
# The stream


class PairStream(BackgroundBatches):
    """Batches of tokenised pairs for one trial, produced on a background thread.

    The pair sequence is the passes over the data back to back (pass e shuffled with ``epoch_seed(seed, e)``),
    cut after ``max_epochs`` passes. ``batching="random"``: each batch is the next ``batch_size`` pairs of
    that sequence. ``batching="length_buckets"``: pools of ``bucket_batches`` batches' worth of pairs are sorted
    by length and cut into batches whose order is then shuffled. Only full batches are yielded: the last pairs
    that do not fill one are dropped. ``skip_batches=k`` regenerates the same sequence and starts at batch k
    (pairs wholly before it are not even tokenised)."""

    def __init__(self, uri, tokenizer, *, batch_size: int, max_length: int, seed: int = 0,
                 max_epochs: float = 1.0, skip_batches: int = 0, batching: str = "random",
                 bucket_batches: int = BUCKET_BATCHES, shuffle_buffer: int = SHUFFLE_BUFFER,
                 prefetch: int = PREFETCH, max_bad_fraction: float = MAX_BAD_FRACTION,
                 encode: Callable[[list[str]], list[list[int]]] | None = None, query_instruction: str = "",
                 hard_negatives: int = 0):
        if batch_size < 1 or max_length < 1 or bucket_batches < 1 or shuffle_buffer < 1 or prefetch < 1:
            raise ValueError("batch_size, max_length, bucket_batches, shuffle_buffer, prefetch: must be >= 1")
        if not max_epochs > 0 or skip_batches < 0:
            raise ValueError("max_epochs must be > 0 and skip_batches >= 0")
        if batching not in BATCHING:
            raise ValueError(f"batching: {batching!r} is not one of {', '.join(BATCHING)}")
        self.uri, self.batch_size, self.max_length, self.seed = str(uri), batch_size, max_length, seed
        self.batching = batching
        self.max_epochs, self.skip_batches, self.bucket_batches = float(max_epochs), skip_batches, bucket_batches
        self.shuffle_buffer, self.prefetch, self.max_bad_fraction = shuffle_buffer, prefetch, max_bad_fraction
        self.pad_id = pad_id_of(tokenizer)
        self.query_instruction = query_instruction  # prepended to every query (records.with_query_instruction)
        self.hard_negatives = hard_negatives  # k negatives per pair from the data's `neg` (fewer: the pair skipped)
        # texts -> ids; ``encode`` overrides the plain truncation (last-token pooling appends the EOS: workers/steps.py)
        self._encode = encode or make_encoder(tokenizer, max_length)
        resolve_files(self.uri)  # a missing file or bad glob fails here, not on the thread
        self.stats = DataStats()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._epochs_done = 0  # written by the producer

    # -- producer (background thread) --

    def _pairs(self) -> Iterator[tuple[str, str]]:
        """The pair sequence over all passes; sets _epochs_done as passes end."""
        whole, frac = int(self.max_epochs), self.max_epochs - int(self.max_epochs)
        per_epoch = None
        if whole == 0:  # a fraction of one pass: its size is needed first
            per_epoch = sum(1 for _ in self._pass(None))
        for epoch in range(whole + (frac > 0)):
            limit = None if epoch < whole else math.floor(frac * per_epoch)
            n = 0
            for pair in self._pass(epoch_seed(self.seed, epoch)):
                if n == limit:
                    break
                n += 1
                yield pair
            if limit is None:
                per_epoch, self._epochs_done = n, epoch + 1

    def _pass(self, seed: int | None) -> Iterator[tuple[str, str]]:
        pairs = iter_pairs(self.uri, seed=seed, stats=self.stats, shuffle_buffer=self.shuffle_buffer,
                           max_bad_fraction=self.max_bad_fraction, hard_negatives=self.hard_negatives)
        try:
            for pair in pairs:
                if self._stop.is_set():
                    raise Stopped
                yield with_query_instruction(pair, self.query_instruction)
        finally:
            pairs.close()

    def _batches(self) -> Iterator[tuple[Batch, int]]:
        """(batch, passes completed when its pairs were drawn) from batch skip_batches on."""
        batches = self._random() if self.batching == "random" else self._length_buckets()
        if (yield from batches) == 0:  # batches in the sequence, skipped ones included
            raise DataError(f"{shown_uri(self.uri)}: {self.stats.pairs_read} usable pairs over {self.max_epochs:g} epochs "
                            f"do not fill one batch of {self.batch_size}")

    def _random(self) -> Iterator[tuple[Batch, int]]:
        """The paper's batches: the next batch_size pairs of the shuffled sequence, as they come."""
        bsz, pairs = self.batch_size, self._pairs()
        skipped = sum(1 for _ in itertools.islice(pairs, self.skip_batches * bsz))  # resumed: not tokenised
        index = skipped // bsz
        while len(chunk := list(itertools.islice(pairs, bsz))) == bsz:  # a partial last batch is dropped
            q, d = self._encode([p[0] for p in chunk]), self._encode([p[1] for p in chunk])
            yield collate(q, d, self.pad_id, index, self._negatives(chunk)), self._epochs_done
            index += 1
        return index

    def _length_buckets(self) -> Iterator[tuple[Batch, int]]:
        """Opt-in: batches of similar-length pairs, cut from sorted pools of bucket_batches batches."""
        bsz, pool_size = self.batch_size, self.batch_size * self.bucket_batches
        rng = random.Random(epoch_seed(self.seed, -1))  # batch order within pools
        pairs, index = self._pairs(), 0
        while True:
            pool = list(itertools.islice(pairs, pool_size))
            pool = pool[: len(pool) // bsz * bsz]  # the very end of the data: a partial batch is dropped
            if not pool:
                break
            n_batches = len(pool) // bsz
            if index + n_batches <= self.skip_batches:  # all skipped: shuffle anyway to keep the rng in step
                rng.shuffle(list(range(n_batches)))
                index += n_batches
                continue
            q, d = self._encode([p[0] for p in pool]), self._encode([p[1] for p in pool])
            # by the longer side, then the total: each side is padded to its own longest, and the longer side
            # sets most of the padding (stdlib pairs, batch 128: 31 % padding against 40 % sorted by the total,
            # 64 % random batches). Stable: deterministic.
            order = sorted(range(len(pool)), key=lambda i: (max(len(q[i]), len(d[i])), len(q[i]) + len(d[i])))
            groups = [order[i:i + bsz] for i in range(0, len(pool), bsz)]
            rng.shuffle(groups)
            for g in groups:
                if index >= self.skip_batches:
                    yield (collate([q[i] for i in g], [d[i] for i in g], self.pad_id, index,
                                   self._negatives([pool[i] for i in g])), self._epochs_done)
                index += 1
        return index

    def _negatives(self, pairs: list[tuple]) -> list[list[int]] | None:
        return self._encode(negatives_of(pairs)) if self.hard_negatives else None

    # -- consumer --

    def __iter__(self) -> Iterator[Batch]:
        if self._thread is not None:
            raise RuntimeError("PairStream: already iterating; close() it first")
        self.stats.reset()
        self._stop.clear()
        self._epochs_done = 0
        return self._start(self.prefetch, "PairStream")

    def _passes_done(self) -> int:
        return self._epochs_done


