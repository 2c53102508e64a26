"""FLOP accounting: pure arithmetic, no torch (the planner imports it without loading a model).

Two numbers per trial:
- ``flops``: the paper's convention (Ziarko et al. 2024, Sec. 3 / PAPER.md): cost per *real* token by
  method times the real (non-padding) tokens processed. N = non-embedding parameters (LoRA adapters
  included), N_tr = the trainable part of N.
- ``hardware_flops``: the matmul FLOPs actually executed, padded tokens, attention and recomputation
  (gradient checkpointing, the gradient cache's extra forward) included; it matches
  ``torch.utils.flop_counter.FlopCounterMode`` with eager attention (tests/workers/test_flops.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# shapes and parameter counts live in core/models.py; re-exported here, where the GPT-NeoX-only code found them
from core.models import (ModelShape, NeoxShape, lora_params, param_counts,  # noqa: F401 -- re-exports
                         trained_blocks)


def cost_per_token(method: str, n_params: int, n_trainable: int) -> float:
    """FLOP per real token, PAPER.md table (the paper's Sec. 3.2)."""
    if method == "full":
        return 6.0 * n_params
    if method == "freeze":
        return 2.0 * n_params + 4.0 * n_trainable
    if method in ("lora", "bias"):
        return 4.0 * n_params + 2.0 * n_trainable
    raise ValueError(f"unknown method {method!r}")


def tokens_for_budget(budget_flops: float, cost: float) -> int:
    """Largest whole number of tokens whose cost fits the budget (the plan, the worker and the recipe all call
    this one; the recipe passes arrays of costs)."""
    return budget_flops // cost if hasattr(cost, "__len__") else int(budget_flops // cost)


def planned_steps(tokens: int, tokens_per_pair: float, batch_size: int) -> tuple[float, int]:
    """(pairs, optimizer steps) that ``tokens`` real tokens buy at ``tokens_per_pair`` (the planner's measure)."""
    pairs = tokens / tokens_per_pair
    return pairs, int(pairs // batch_size)


def flops_for_tokens(tokens: int, cost: float) -> float:
    return float(tokens) * cost


def loss_matmul_flops(pairs: int, hidden: int, hard_negatives: int = 0) -> float:
    """The InfoNCE logits q @ d.T for one batch, and with ``hard_negatives`` k the queries against the batch's
    pairs x k negatives too: forward and its two gradients."""
    return 3 * 2.0 * pairs * pairs * (1 + hard_negatives) * hidden


def sequence_hardware_flops(
    shape: ModelShape,
    method: str,
    seq_len: int,
    *,
    lora_rank: int | None = None,
    trainable_fraction: float | None = None,
    lora_targets: tuple[str, ...] | None = None,
    checkpointing: bool = True,
    grad_cache: bool = False,
) -> float:
    """Matmul FLOPs executed for one padded sequence of ``seq_len`` tokens in one training step, any family.

    Per token, a Linear (in, out) costs 2·in·out forward; LoRA adds 2·r·(in + out); attention's QK^T and AV
    cost 2·T·heads·head_dim each (grouped-query K/V are repeated to every head before the product, so GQA
    saves projection FLOPs, not attention ones). A matmul's backward costs its forward once per operand that
    needs a gradient: activation gradients wherever the input needs one, weight gradients for trainable Linears
    (and LoRA adapters), per operand for QK^T and AV. Backward reaches every block above the first trainable
    one; in that first block the block's input needs no gradient (the frozen embedding or frozen blocks below),
    so the Linears reading it compute none unless a trainable norm sits in between. Checkpointing re-runs each
    reached block's forward, except the block's last matmul where nothing after it saved its output
    (non-reentrant checkpointing stops once every saved tensor is back; Gemma's and OLMo 2's norm after the MLP
    saves it); the gradient cache adds a no-grad forward of the whole model. Embedding lookups, norms, softmax,
    gating and pooling are not matmuls.
    """
    lins = shape.linears()
    targets = shape.check_lora_targets(lora_targets) if method == "lora" else ()
    rank = lora_rank if method == "lora" else 0
    lin = {name: 2.0 * a * b for name, (a, b, _) in lins.items()}  # per token
    ad = {name: 2.0 * rank * (a + b) if name in targets else 0.0 for name, (a, b, _) in lins.items()}
    attn = 2 * 2.0 * seq_len * shape.attn_width  # QK^T and AV, per token
    fwd = sum(lin.values()) + sum(ad.values()) + attn
    # the block's last matmul (dense_4h_to_h / down_proj; LoRA's B, r -> hidden, where that Linear is targeted)
    last_name = list(lins)[-1]
    last = 0.0 if shape.mlp_output_normed else (2.0 * rank * shape.hidden if ad[last_name] else lin[last_name])

    layers = shape.layers
    first = layers - trained_blocks(layers, trainable_fraction) if method == "freeze" else 0
    per_token = layers * fwd * (2 if grad_cache else 1)
    for layer in range(first, layers):
        act = sum(lin.values()) + sum(ad.values())  # activation gradients: every Linear and adapter once
        qkv = (True, True, True)  # whether Q, K, V need a gradient
        if layer == first and not _input_needs_grad(shape, method):
            for name in shape.input_linears():
                act -= lin[name] + (2.0 * rank * lins[name][0] if name in targets else 0.0)  # base and A
            qkv = _qkv_need_grad(shape, method, targets)
        q, k, v = qkv
        per_token += act + attn / 2 * (q + k + (q or k) + v)  # dQ, dK, d(probs), dV
        if checkpointing:
            per_token += fwd - last
        if method in ("full", "freeze"):
            per_token += sum(lin.values())  # weight gradients
        elif method == "lora":
            per_token += sum(ad.values())  # weight gradients of A and B
    return per_token * seq_len


def _input_needs_grad(shape: ModelShape, method: str) -> bool:
    """Whether, in the first block backward reaches, the Linears reading the block's input need its gradient:
    the embedding trains (full), or a trainable norm sits in between (freeze: its weight; bias: LayerNorm's
    bias, GPT-NeoX only). OLMo 2 has no norm there."""
    if method == "full":
        return True
    if method == "freeze":
        return shape.input_norm
    if method == "bias":
        return shape.input_norm and shape.block_norm_params()[1] > 0
    return False


def _qkv_need_grad(shape: ModelShape, method: str, targets: tuple[str, ...]) -> tuple[bool, bool, bool]:
    """In that first block, Q/K/V need a gradient only where their projection trains something."""
    if method != "lora":
        return True, True, True  # freeze trains the projections; bias: their biases (or the input's gradient)
    if shape.family in ("gpt_neox", "phi3"):
        fused = shape.input_linears()[0] in targets
        return fused, fused, fused
    return "q_proj" in targets, "k_proj" in targets, "v_proj" in targets
