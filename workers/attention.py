"""Attention for packed texts: each text attends only to itself, found from cumulative sequence lengths.

workers/packing.py lays a forward's texts end to end; this module says how attention keeps them apart. Four kernels,
chosen by device at runtime (``choose``):

- ``varlen``: PyTorch's own variable-length FlashAttention (``torch.nn.attention.varlen.varlen_attn``, CUDA only)
  over one flat sequence of every text, told where each text starts by ``cu_seqlens`` (N + 1 int32 offsets). It
  computes each text's own (causal) square and nothing across texts; no mask is built.
- ``flex``: transformers' FlexAttention with a document mask (built by transformers' masking_utils from the
  restarting ``position_ids``): a block-sparse kernel that skips the blocks between texts; on CUDA where the varlen
  kernel does not exist (older torch) or cannot run (Gemma 2's logit soft-cap).
- ``segments``: the reference: a loop over the texts, each text's attention in plain torch (scores, causal and
  sliding-window mask, soft-cap, softmax in fp32). Registered the same way as ``varlen`` and fed the same
  ``cu_seqlens``, so that the packing, the positions and the kwargs' way through every family's forward are
  tested on a CPU, where the CUDA kernel does not exist (tests/workers/test_attention.py).
- ``mask``: the model's own eager / SDPA attention over rows with transformers' block-diagonal 4D mask: what a CPU
  runs (eager attention is the CPU's fastest here, benchmarks/README.md), and the fallback everywhere.

``varlen`` and ``segments`` are registered in transformers' ``AttentionInterface`` (and as mask-free in its
``AttentionMaskInterface``, so no 4D mask is built for them); the model gets them through
``set_attn_implementation`` (``use``), and every forward passes ``cu_seq_lens_q`` / ``cu_seq_lens_k`` /
``max_length_q`` / ``max_length_k`` (transformers' FlashAttentionKwargs names), which each family's forward hands
down to its attention function untouched. Positions restart at 0 in every text, so RoPE (GPT-NeoX's partial rotary
included) rotates each text as the padded forward does.

A model that attends bidirectionally (train.attention; workers/packing.py ``make_bidirectional``) sets
``BIDIRECTIONAL`` around its forward: the flat kernels, which build no mask, then attend over each whole text.
"""
from __future__ import annotations

import contextvars
import math

import torch

VARLEN, FLEX, SEGMENTS, MASK = "varlen", "flex", "segments", "mask"
KERNELS = (VARLEN, FLEX, SEGMENTS, MASK)
# the names under which the flat-sequence kernels are registered in transformers' AttentionInterface
REGISTERED = {VARLEN: "repurpose_varlen", SEGMENTS: "repurpose_segments"}
FLAT = (VARLEN, SEGMENTS)  # kernels that take one flat sequence and cu_seqlens (the others: rows and a mask)
NO_VARLEN = ("gemma2",)  # Gemma 2 soft-caps its attention logits: varlen_attn has no soft-cap
# True inside the forward of a model that attends bidirectionally (train.attention; workers/packing.py
# ``make_bidirectional``): the mask kernels get "every key" overlaid on their mask, the flat kernels drop causality
BIDIRECTIONAL = contextvars.ContextVar("repurpose_bidirectional", default=False)


def varlen_kernel():
    """torch's varlen FlashAttention (``torch.nn.attention.varlen.varlen_attn``), None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def choose(device_type: str, family: str, *, bf16: bool = True, varlen_available: bool | None = None,
           flex_available: bool | None = None) -> str:
    """The kernel packed rows run with on ``device_type``: ``varlen`` on CUDA where torch has the kernel, the
    family has no soft-cap and the step runs in bf16 (flash kernels take 16-bit inputs); else ``flex`` on CUDA where
    FlexAttention exists; else ``mask`` (a CPU: eager attention over rows with the block-diagonal mask)."""
    if device_type != "cuda":
        return MASK
    varlen_available = varlen_kernel() is not None if varlen_available is None else varlen_available
    if varlen_available and bf16 and family not in NO_VARLEN:
        return VARLEN
    if flex_available is None:
        from transformers.utils import is_torch_flex_attn_available

        flex_available = is_torch_flex_attn_available()
    return FLEX if flex_available else MASK


def implementation(kernel: str, fallback: str) -> str:
    """The ``attn_implementation`` a model runs ``kernel`` with; ``fallback`` (the model's own: eager or sdpa) for
    ``mask``."""
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel {kernel!r} is not one of {', '.join(KERNELS)}")
    register()
    return {FLEX: "flex_attention", MASK: fallback}.get(kernel) or REGISTERED[kernel]


def use(model, kernel: str) -> None:
    """Switch ``model`` (a transformers model, or peft's wrapper around one) to ``kernel`` in place."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = base.config._attn_implementation
    fallback = current if current in ("eager", "sdpa") else "sdpa"
    target = implementation(kernel, fallback)
    if target != current:
        base.set_attn_implementation(target)


def flat_kwargs(cu_seqlens: torch.Tensor, max_length: int) -> dict:
    """The forward's kwargs that carry the texts' boundaries to a flat kernel (transformers' names)."""
    return {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens, "max_length_q": max_length,
            "max_length_k": max_length}


def _boundaries(kwargs: dict) -> tuple[torch.Tensor, int]:
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        raise ValueError("packed attention needs cu_seq_lens_q (workers/packing.py pack_flat): got none")
    return cu, int(kwargs.get("max_length_q"))


def _causal(module, is_causal) -> bool:
    """Whether a flat kernel masks the future: the layer's own say, unless its model attends bidirectionally."""
    return (module.is_causal if is_causal is None else is_causal) and not BIDIRECTIONAL.get()


def _window(sliding_window: int | None) -> tuple[int, int]:
    """transformers' sliding window of W: a token sees itself and the W - 1 before it (flash's left W - 1)."""
    return (sliding_window - 1, 0) if sliding_window else (-1, 0)


def varlen_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                   softcap=None, is_causal=None, **kwargs):
    """The AttentionInterface function for ``varlen``: (1, H, T, D) query, (1, Hkv, T, D) key and value of one flat
    sequence -> (1, T, H, D). Dropout is not supported (no family here uses attention dropout in training)."""
    if softcap:
        raise ValueError("varlen attention: the logit soft-cap is not supported (packing falls back to flex)")
    if dropout:
        raise ValueError("varlen attention: attention dropout is not supported")
    cu, longest = _boundaries(kwargs)
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, H, D)
    if q.dtype == torch.float32 and torch.is_autocast_enabled(q.device.type):  # RoPE may promote to fp32
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    causal = _causal(module, is_causal)
    window = _window(sliding_window) if causal else (-1, -1)
    out = varlen_kernel()(q, k, v, cu.to(torch.int32), cu.to(torch.int32), longest, longest, scale=scaling,
                          window_size=window, enable_gqa=q.shape[1] != k.shape[1])
    return out.unsqueeze(0), None  # (1, T, H, D)


def segments_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                     softcap=None, is_causal=None, **kwargs):
    """The AttentionInterface function for ``segments`` (the reference): the same inputs and output as
    ``varlen_forward``, each text's attention computed on its own as eager attention computes it."""
    cu, _ = _boundaries(kwargs)
    causal = _causal(module, is_causal)
    scale = scaling if scaling is not None else 1 / math.sqrt(query.shape[-1])
    groups = query.shape[1] // key.shape[1]
    outs = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        q = query[0, :, start:end]  # (H, t, D)
        k = key[0, :, start:end].repeat_interleave(groups, dim=0)  # GQA: each K/V head to its query heads
        v = value[0, :, start:end].repeat_interleave(groups, dim=0)
        scores = (q @ k.transpose(-1, -2)) * scale  # (H, t, t)
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        t = end - start
        i, j = torch.arange(t, device=q.device)[:, None], torch.arange(t, device=q.device)[None]
        allowed = (j <= i) if causal else torch.ones(t, t, dtype=torch.bool, device=q.device)
        if sliding_window and causal:
            allowed = allowed & (i - j < sliding_window)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
        outs.append(probs @ v)  # (H, t, D)
    return torch.cat(outs, dim=1).transpose(0, 1).unsqueeze(0), None  # (1, T, H, D)


_registered = False


def register() -> None:
    """Register ``varlen`` and ``segments`` with transformers (once per process): their attention functions, and
    no 4D mask for them (transformers' flash-attention mask function: None when nothing is padded)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(REGISTERED[VARLEN], varlen_forward)
    AttentionInterface.register(REGISTERED[SEGMENTS], segments_forward)
    for name in REGISTERED.values():
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, flash_attention_mask)
    _registered = True
