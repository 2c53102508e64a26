"""Packing: a forward's texts laid end to end in rows, instead of each padded to the longest.

Random batches are the default (length buckets bias the in-batch negatives: benchmarks/README.md "Data"), and at
batch 128 / max length 75 about 64 % of a padded batch is padding. Packed, a forward runs the real tokens only:
each text keeps its own positions (``position_ids`` restart at 0 in every row) and ``attention_mask`` is None, from
which transformers (>= 4.53, masking_utils ``find_packed_sequence_indices``) builds a block-diagonal causal mask
for eager and SDPA attention (flash-attention 2 takes the varlen path). Every token then sees exactly what it
saw padded, so a text's hidden states equal the padded forward's up to float rounding, for every family in
``PACKED_FAMILIES`` (tests/workers/test_packing.py, fp32, atol 1e-5; sliding windows included: transformers
measures them on the remapped per-text positions).

The scheme (``layout``): best-fit decreasing into rows of ``capacity`` tokens = the forward's longest text. Eager
and SDPA attention with a dense mask cost L^2 per row of L tokens whatever the mask, so a row of k times the
longest text costs k times a padded row's attention per token; with rows no longer than the longest text every
row costs at most a padded row, the rows are fewer than the texts, and the tokens saved are all the padding but
the rows' tails (~1 % of the tokens run). Longer rows would save only those tails for up to k x the attention:
measured on this CPU, rows of 2x the longest text were slower than 1x (median, 4 cases), 4x slower still
(benchmarks/packing.py, benchmarks/README.md "Packing"; GPU unmeasured). Only the pairs of one sub-batch (the
gradient cache's ``chunk``) share rows, queries and documents together, so one forward serves both sides.

Flat rows (``pack_flat``): for the attention kernels that take cumulative sequence lengths (workers/attention.py:
varlen FlashAttention on CUDA, the per-text reference in tests) every text of the forward goes into one row, in
order, with ``cu_seqlens``; attention then costs each text its own square, so there is no capacity to choose and no
tail but the one a compiled model's bucket length adds (``bucket_length``). ``Packer`` says which way a trial packs.

Dropout (LoRA's ``lora_dropout``) draws other masks packed than padded: the same distribution, not the same
numbers; without dropout packed and padded steps agree to float rounding.
"""
from __future__ import annotations

import bisect
import functools
import math
import sys
from dataclasses import dataclass

import torch

from core.spec import BIDIRECTIONAL_FAMILIES, PACKINGS, attention_unsupported  # noqa: F401 (re-exported)
from workers.attention import BIDIRECTIONAL
from workers.pooling import assert_right_padded

# model_type -> packs: verified against the padded forward (tests/workers/test_packing.py), eager and SDPA
# (Gemma 2 has no SDPA in transformers 5: eager only). Gemma 2/3 and Mistral's sliding windows pack too.
PACKED_FAMILIES = ("gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo2", "phi3")


@dataclass(frozen=True)
class Layout:
    """Where each text of a forward goes: ``rows[r]`` the texts of row r, left to right (indices into the
    forward's texts); every row padded to ``length``, the longest row."""

    rows: tuple[tuple[int, ...], ...]
    length: int


@dataclass(frozen=True)
class Packed:
    """A forward's texts packed: what the model runs and how to read each text back."""

    input_ids: torch.Tensor  # (R, L) long; a row's tail after its last text: token 0, position 0
    position_ids: torch.Tensor  # (R, L) long: 0..n-1 within each text
    index: torch.Tensor  # (S, T) long: where token t of text s sits in the flattened (R * L) rows
    layout: Layout
    # flat kernels (workers/attention.py varlen, segments): one row of every text, where each text starts
    cu_seqlens: torch.Tensor | None = None  # (N + 1,) int32 offsets of the row's segments (texts, then the tail)
    max_length: int = 0  # the longest segment (or a fixed bound at least that long, for torch.compile)

    def model_kwargs(self) -> dict:
        """What the model's forward takes for these rows: ids, restarting positions, and for a flat kernel the
        segments' boundaries (no attention mask: the mask kernel builds the block-diagonal one from positions)."""
        out = {"input_ids": self.input_ids, "position_ids": self.position_ids}
        if self.cu_seqlens is not None:
            from workers.attention import flat_kwargs

            out |= flat_kwargs(self.cu_seqlens, self.max_length)
        return out


def unsupported(family: str) -> str | None:
    """Why a model of ``family`` (``config.model_type``) cannot pack here; None when it can."""
    if family not in PACKED_FAMILIES:
        return f"model_type {family!r} is not verified to pack (packed: {', '.join(PACKED_FAMILIES)})"
    from transformers import masking_utils

    if not hasattr(masking_utils, "find_packed_sequence_indices"):  # before it, eager/SDPA attended across texts
        return "this transformers builds no block-diagonal mask from position_ids (needs >= 4.53)"
    return None


# On a GPU, packing pays once the model's step outweighs laying out the rows (Python, per forward): measured on an
# H200 (benchmarks/gpu.py, benchmarks/README.md), real tokens/s packed / padded at batch 1024: pythia-160m (N = 85M)
# 0.85x, pythia-410m (N = 302M) 1.42x. "auto" packs there from this N on; on CPU at every size (1.6-3.2x).
GPU_PACK_FROM_PARAMS = 2e8
BUCKETS_PER_OCTAVE = 8  # compiled flat rows (``bucket_length``): at most 2^(1/8) - 1 = 9 % of a row is tail
BUCKET_FLOOR = 256  # tokens: the smallest bucket


def packs(switch: str, family: str, *, device_type: str = "cpu", n_params: int | None = None) -> bool:
    """The runtime switch (``spec.packing``) for a model of ``family``: 'off' never, 'on' always (an error where
    the family cannot), 'auto' wherever it can and pays: on CPU always, on a GPU from ``GPU_PACK_FROM_PARAMS``
    non-embedding parameters (``n_params``) on."""
    if switch not in PACKINGS:
        raise ValueError(f"packing: {switch!r} is not one of {', '.join(PACKINGS)}")
    if switch == "off":
        return False
    reason = unsupported(family)
    if reason and switch == "on":
        raise ValueError(f"packing 'on': {reason}")
    if switch == "auto" and device_type == "cuda" and (n_params or 0) < GPU_PACK_FROM_PARAMS:
        return False
    return reason is None


def layout(lengths: list[int], capacity: int | None = None) -> Layout:
    """Best-fit decreasing: texts longest first (ties: in order), each into the row with the least room that
    still holds it (ties: the first opened), else a new row. ``capacity``: a row's tokens, default the longest
    text. An empty text takes one token (its pad at position 0, as the padded forward runs it)."""
    sizes = [max(int(n), 1) for n in lengths]
    capacity = capacity or max(sizes, default=1)
    if max(sizes, default=0) > capacity:
        raise ValueError(f"layout: a text of {max(sizes)} tokens does not fit rows of {capacity}")
    rows: list[list[int]] = []
    room: list[list[int]] = [[] for _ in range(capacity + 1)]  # room[k]: the rows with k tokens free, sorted
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        n = sizes[i]
        free = next((k for k in range(n, capacity + 1) if room[k]), None)
        if free is None:
            rows.append([])
            r, free = len(rows) - 1, capacity
        else:
            r = room[free].pop(0)
        rows[r].append(i)
        bisect.insort(room[free - n], r)
    length = max((sum(sizes[i] for i in row) for row in rows), default=0)
    return Layout(tuple(tuple(row) for row in rows), length)


def lengths_of(mask: torch.Tensor) -> list[int]:
    """(S, T) right-padded mask -> each text's tokens (a host sync on GPU: one per forward)."""
    return mask.sum(dim=1).tolist()


def pack(ids: torch.Tensor, mask: torch.Tensor, capacity: int | None = None) -> Packed:
    """(S, T) right-padded token ids and mask -> the texts packed by ``layout``."""
    assert_right_padded(mask)
    sizes = [max(n, 1) for n in lengths_of(mask)]
    lay = layout(sizes, capacity)
    s, t = ids.shape
    start = [0] * s  # each text's first token in the flattened rows
    for r, row in enumerate(lay.rows):
        offset = r * lay.length
        for i in row:
            start[i], offset = offset, offset + sizes[i]
    start = torch.tensor(start, device=ids.device)  # (S,)
    pos = torch.arange(t, device=ids.device).expand(s, t)  # (S, T)
    index = start[:, None] + pos * mask.long()  # (S, T); padding points at the text's first token (weight 0)
    occupied = mask.bool() | (pos == 0)  # an empty text's pad at position 0 runs, as padded
    flat_ids = ids.new_zeros(len(lay.rows) * lay.length)
    flat_pos = torch.zeros_like(flat_ids)
    flat_ids[index[occupied]] = ids[occupied]
    flat_pos[index[occupied]] = pos[occupied]
    shape = (len(lay.rows), lay.length)
    return Packed(flat_ids.view(shape), flat_pos.view(shape), index, lay)


def _bucket(k: int, floor: int = BUCKET_FLOOR) -> int:
    return 64 * math.ceil(floor * 2 ** (k / BUCKETS_PER_OCTAVE) / 64)


def bucket_length(tokens: int) -> tuple[int, int]:
    """(the smallest bucket length >= ``tokens``, the bucket below it; 0 for the first): ``BUCKET_FLOOR`` x
    2^(k / ``BUCKETS_PER_OCTAVE``) rounded up to a multiple of 64, so that a compiled model sees a few fixed shapes
    instead of one per batch (torch.compile specialises on shapes)."""
    k = 0
    while _bucket(k) < tokens:
        k += 1
    return _bucket(k), (_bucket(k - 1) if k else 0)


def pack_flat(ids: torch.Tensor, mask: torch.Tensor, *, bucket: bool = False, max_text: int | None = None) -> Packed:
    """(S, T) right-padded token ids and mask -> one flat row of every text in order (positions restarting at 0),
    with ``cu_seqlens`` for a flat attention kernel (workers/attention.py). ``bucket``: the row padded to
    ``bucket_length`` for torch.compile, the tail cut into segments of at most ``max_text`` tokens (their count fixed
    by the bucket, empty ones allowed) and ``max_length`` = ``max_text`` whatever the batch, so every batch of a bucket
    has the same shapes."""
    assert_right_padded(mask)
    sizes = torch.clamp(mask.sum(dim=1), min=1)  # (S,) an empty text runs its pad at position 0, as padded
    s, t = ids.shape
    ends = sizes.cumsum(0)
    start = ends - sizes  # (S,)
    total = int(ends[-1]) if s else 0
    pos = torch.arange(t, device=ids.device).expand(s, t)  # (S, T)
    index = start[:, None] + pos * mask.long()  # (S, T); padding points at the text's first token (weight 0)
    occupied = mask.bool() | (pos == 0)
    longest = int(sizes.max()) if s else 1
    tail_cuts: list[int] = []
    length, max_length = total, longest
    if bucket:
        max_text = max_text or t
        length, below = bucket_length(total)
        pieces = math.ceil((length - below) / max_text)  # the longest tail this bucket can have, in pieces
        tail_cuts = [min(total + max_text * (k + 1), length) for k in range(pieces)]
        max_length = max(max_text, longest)
    flat_ids = ids.new_zeros(length)
    flat_pos = torch.zeros_like(flat_ids)
    flat_ids[index[occupied]] = ids[occupied]
    flat_pos[index[occupied]] = pos[occupied]
    cu = torch.cat([ends.new_zeros(1), ends, torch.tensor(tail_cuts, dtype=ends.dtype, device=ids.device)])
    if tail_cuts:  # the tail's positions restart per piece, as a text's would
        tail = torch.arange(total, length, device=ids.device)
        flat_pos[total:] = (tail - total) % max_text
    lay = Layout((tuple(range(s)),), length)
    return Packed(flat_ids.view(1, length), flat_pos.view(1, length), index, lay, cu.to(torch.int32), max_length)


def pack_for(ids: torch.Tensor, mask: torch.Tensor, kernel: str, *, bucket: bool = False,
             max_text: int | None = None) -> Packed:
    """The texts packed as ``kernel`` (workers/attention.py) reads them: one flat row with boundaries (varlen,
    segments), or rows of best-fit decreasing under a block-diagonal mask (flex, mask)."""
    from workers.attention import FLAT

    return pack_flat(ids, mask, bucket=bucket, max_text=max_text) if kernel in FLAT else pack(ids, mask)


@dataclass(frozen=True)
class Packer:
    """How a trial packs a forward's texts: the attention ``kernel`` (workers/attention.py) and, for a compiled
    model, flat rows padded to bucket lengths (``pack_flat``)."""

    kernel: str = "mask"
    bucket: bool = False
    max_text: int | None = None  # the longest text a trial runs (max length, + 1 for an appended EOS)

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> Packed:
        return pack_for(ids, mask, self.kernel, bucket=self.bucket, max_text=self.max_text)

    def shapes(self, lengths: list[int]) -> list[tuple[int, int]]:
        """(sequences, length) of what one forward computes for texts of ``lengths``, for the hardware FLOP count:
        a flat kernel each text's own square, (1, n) per text, and a bucket's tail as a sequence of its own
        tokens, (1, tail) per piece; the mask kernels each row's L x L whatever the mask (``layout``'s rows)."""
        from workers.attention import FLAT

        sizes = [max(int(n), 1) for n in lengths]
        if self.kernel not in FLAT:
            lay = layout(sizes)
            return [(len(lay.rows), lay.length)]
        out = [(1, n) for n in sizes]
        if self.bucket and sizes:
            max_text = self.max_text or max(sizes)
            tail = bucket_length(sum(sizes))[0] - sum(sizes)
            out += [(1, min(max_text, tail - k)) for k in range(0, tail, max_text)]
        return out


def as_packer(packing) -> Packer | None:
    """A step's ``packing`` argument: False/None padded, True the mask kernel (rows), a kernel's name, or a Packer."""
    if packing is None or packing is False:
        return None
    if packing is True:
        return Packer()
    return packing if isinstance(packing, Packer) else Packer(str(packing))


def unpack(hidden: torch.Tensor, packed: Packed) -> torch.Tensor:
    """(R, L, D) hidden states of the rows -> (S, T, D), each text's right-padded as the padded forward's (its
    padding holds the text's first token's state: pooling weighs padding 0, workers/pooling.py)."""
    return hidden.reshape(-1, hidden.shape[-1])[packed.index]


# --------------------------------------------------------------------------------------------------------
# Attention: the causal mask replaced (train.attention: bidirectional)
#
# transformers 5 builds each family's mask in its model's forward with masking_utils.create_causal_mask, whose
# ``or_mask_function`` is overlaid on the causal one (Gemma 3 uses it for image tokens). Overlaid with "every key",
# the causal part is gone while create_causal_mask still applies the padding mask (padded forwards) and the
# block-diagonal packed-sequence mask (packed forwards, from the restarting position_ids) after it: every token then
# attends to every real token of its own text, padded or packed alike, and no mask is left for SDPA to replace with
# is_causal. The families below build all their layers' masks with create_causal_mask; Gemma 2 / 3 have
# sliding-window layers (create_sliding_window_causal_mask: a bidirectional window is another model), and Phi-3 and
# Mistral choose their mask function per config (sliding window): their bidirectional cells are planned skipped.
# The flat kernels (workers/attention.py varlen, segments) build no mask: they read the same flag and drop causality.


def make_bidirectional(model):
    """``model`` (an AutoModel backbone, before PEFT wraps it) attends bidirectionally: its forward runs with the
    causal mask overlaid by "every key" (see above). Other models in the process are untouched: the family's
    create_causal_mask is wrapped once and overlays only inside a bidirectional model's forward."""
    family = model.config.model_type
    reason = attention_unsupported(family)
    if reason:
        raise ValueError(reason)
    from workers.st_bidirectional import overlay  # the exported folder's own copy overlays the same way

    overlay(sys.modules[type(model).__module__], BIDIRECTIONAL)  # transformers.models.<family>.modeling_<family>
    forward = model.forward

    @functools.wraps(forward)
    def bidirectional_forward(*args, **kwargs):
        token = BIDIRECTIONAL.set(True)
        try:
            return forward(*args, **kwargs)
        finally:
            BIDIRECTIONAL.reset(token)

    model.forward = bidirectional_forward
    return model
