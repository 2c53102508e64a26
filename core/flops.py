"""FLOP accounting: pure arithmetic, no torch (the planner imports it without loading a model).

Two numbers per trial:
- ``flops``: the paper's convention (Ziarko et al. 2024, Sec. 3; docs/study.md): cost per *real* token by
  method (core/methods.py) times the real (non-padding) tokens processed. N = non-embedding parameters (LoRA adapters
  included), N_tr = the trainable part of N.
- ``hardware_flops``: the matmul FLOPs actually executed, padded tokens, attention and recomputation
  (gradient checkpointing, the gradient cache's extra forward) included; it matches
  ``torch.utils.flop_counter.FlopCounterMode`` with eager attention (tests/workers/test_flops.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from core import methods
from core.models import ModelShape


def cost_per_token(method: str, n_params, n_trainable):
    """FLOP per real token of ``method`` (its record's convention, docs/study.md); elementwise on arrays."""
    return methods.get(method).cost_per_token(n_params, n_trainable)


def tokens_for_budget(budget_flops: float, cost: float) -> int:
    """Largest whole number of tokens whose cost fits the budget (the plan, the worker and the recipe all call
    this one; the recipe passes arrays of costs)."""
    return budget_flops // cost if hasattr(cost, "__len__") else int(budget_flops // cost)


def planned_steps(tokens: int, tokens_per_pair: float, batch_size: int) -> tuple[float, int]:
    """(pairs, optimizer steps) that ``tokens`` real tokens buy at ``tokens_per_pair`` (the planner's measure)."""
    pairs = tokens / tokens_per_pair
    return pairs, int(pairs // batch_size)


def padding_fraction(real_tokens: int, padded_tokens: int) -> float | None:
    """Padding's share of the tokens processed: 1 - real / padded. None when nothing was processed (a fraction of
    nothing is undefined, and the store's column is null for such a trial, not a claim of no padding)."""
    return 1.0 - real_tokens / padded_tokens if padded_tokens else None


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
    record = methods.get(method)
    lins = shape.linears()
    targets = shape.check_lora_targets(lora_targets) if record.adapters else ()
    rank = lora_rank if record.adapters else 0
    lin = {name: 2.0 * a * b for name, (a, b, _) in lins.items()}  # per token
    ad = {name: 2.0 * rank * (a + b) if name in targets else 0.0 for name, (a, b, _) in lins.items()}
    attn = 2 * 2.0 * seq_len * shape.attn_width  # QK^T and AV, per token
    fwd = sum(lin.values()) + sum(ad.values()) + attn
    # the block's last matmul (dense_4h_to_h / down_proj; LoRA's B, r -> hidden, where that Linear is targeted)
    last_name = list(lins)[-1]
    last = 0.0 if shape.mlp_output_normed else (2.0 * rank * shape.hidden if ad[last_name] else lin[last_name])

    layers = shape.layers
    first = record.first_trained_block(layers, trainable_fraction)
    per_token = layers * fwd * (2 if grad_cache else 1)
    for layer in range(first, layers):
        act = sum(lin.values()) + sum(ad.values())  # activation gradients: every Linear and adapter once
        qkv = (True, True, True)  # whether Q, K, V need a gradient
        if layer == first and not record.input_needs_grad(shape):
            for name in shape.input_linears():
                act -= lin[name] + (2.0 * rank * lins[name][0] if name in targets else 0.0)  # base and A
            qkv = _qkv_need_grad(shape, record, targets)
        q, k, v = qkv
        per_token += act + attn / 2 * (q + k + (q or k) + v)  # dQ, dK, d(probs), dV
        if checkpointing:
            per_token += fwd - last
        if record.weight_grads == "linears":
            per_token += sum(lin.values())  # weight gradients
        elif record.weight_grads == "adapters":
            per_token += sum(ad.values())  # weight gradients of A and B
    return per_token * seq_len


def _qkv_need_grad(shape: ModelShape, record: methods.Method, targets: tuple[str, ...]) -> tuple[bool, bool, bool]:
    """In that first block, Q/K/V need a gradient only where their projection trains something (the first block's
    input needs none: ``Method.input_needs_grad``; OLMo 2 has no norm there)."""
    if not record.adapters:
        return True, True, True  # freeze trains the projections; bias: their biases (or the input's gradient)
    if shape.family in ("gpt_neox", "phi3"):
        fused = shape.input_linears()[0] in targets
        return fused, fused, fused
    return "q_proj" in targets, "k_proj" in targets, "v_proj" in targets
