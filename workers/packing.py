"""Packing: a forward's texts laid end to end in rows, instead of each padded to the longest (issue #16).

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

Dropout (LoRA's ``lora_dropout``) draws other masks packed than padded: the same distribution, not the same
numbers; without dropout packed and padded steps agree to float rounding.
"""
from __future__ import annotations

import bisect
import contextvars
import functools
import sys
from dataclasses import dataclass

import torch

from core.spec import BIDIRECTIONAL_FAMILIES, PACKINGS, attention_unsupported  # noqa: F401 (re-exported)
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
_BIDIRECTIONAL = contextvars.ContextVar("repurpose_bidirectional", default=False)


def _every_key(batch_idx, head_idx, q_idx, kv_idx):
    return kv_idx >= 0


def make_bidirectional(model):
    """``model`` (an AutoModel backbone, before PEFT wraps it) attends bidirectionally: its forward runs with the
    causal mask overlaid by "every key" (see above). Other models in the process are untouched: the family's
    create_causal_mask is wrapped once and overlays only inside a bidirectional model's forward."""
    family = model.config.model_type
    reason = attention_unsupported(family)
    if reason:
        raise ValueError(reason)
    module = sys.modules[type(model).__module__]  # transformers.models.<family>.modeling_<family>
    if not getattr(module.create_causal_mask, "repurpose_bidirectional", False):
        module.create_causal_mask = _overlaid(module.create_causal_mask)
    forward = model.forward

    @functools.wraps(forward)
    def bidirectional_forward(*args, **kwargs):
        token = _BIDIRECTIONAL.set(True)
        try:
            return forward(*args, **kwargs)
        finally:
            _BIDIRECTIONAL.reset(token)

    model.forward = bidirectional_forward
    return model


def _overlaid(create_causal_mask):
    @functools.wraps(create_causal_mask)
    def create_mask(*args, **kwargs):
        if _BIDIRECTIONAL.get():
            from transformers.masking_utils import or_masks

            extra = kwargs.get("or_mask_function")
            kwargs["or_mask_function"] = _every_key if extra is None else or_masks(extra, _every_key)
        return create_causal_mask(*args, **kwargs)

    create_mask.repurpose_bidirectional = True
    return create_mask
