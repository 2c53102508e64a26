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

METHODS = ("full", "freeze", "bias", "lora")
LORA_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


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
    """Largest whole number of tokens whose cost fits the budget."""
    return int(budget_flops // cost)


def flops_for_tokens(tokens: int, cost: float) -> float:
    return float(tokens) * cost


def trained_blocks(n_layers: int, trainable_fraction: float) -> int:
    """freeze: the last ceil(f * L) blocks train (1e-9 guards 0.3 * 10 = 3.0000000000000004)."""
    return max(1, min(n_layers, math.ceil(trainable_fraction * n_layers - 1e-9)))


@dataclass(frozen=True)
class NeoxShape:
    """The dimensions of a GPT-NeoX model that FLOP and parameter counts need."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    parallel_residual: bool = True

    @classmethod
    def from_config(cls, cfg: dict) -> "NeoxShape":
        if cfg.get("model_type", "gpt_neox") != "gpt_neox":
            raise ValueError(f"model_type {cfg.get('model_type')!r} is not gpt_neox")
        return cls(
            hidden=int(cfg["hidden_size"]),
            layers=int(cfg["num_hidden_layers"]),
            heads=int(cfg["num_attention_heads"]),
            intermediate=int(cfg.get("intermediate_size") or 4 * cfg["hidden_size"]),
            vocab=int(cfg["vocab_size"]),
            parallel_residual=bool(cfg.get("use_parallel_residual", True)),
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each Linear of one block, by module name."""
        d, i = self.hidden, self.intermediate
        return {"query_key_value": (d, 3 * d), "dense": (d, d), "dense_h_to_4h": (d, i), "dense_4h_to_h": (i, d)}

    def block_params(self) -> int:
        # 4 Linears with bias + 2 LayerNorms (weight, bias)
        return sum(a * b + b for a, b in self.linears().values()) + 4 * self.hidden

    def block_bias_params(self) -> int:
        return sum(b for _, b in self.linears().values()) + 2 * self.hidden

    def n_params(self) -> int:
        """Non-embedding parameters: the blocks and the final LayerNorm (Pythia's published N)."""
        return self.layers * self.block_params() + 2 * self.hidden


def lora_params(shape: NeoxShape, rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """peft adds A (r x in) and B (out x r) to every targeted Linear of every block."""
    return shape.layers * sum(rank * (a + b) for name, (a, b) in shape.linears().items() if name in targets)


def param_counts(
    shape: NeoxShape,
    method: str,
    lora_rank: int | None = None,
    trainable_fraction: float | None = None,
    lora_targets: tuple[str, ...] = LORA_TARGETS,
) -> tuple[int, int]:
    """(N, N_tr): non-embedding parameters and their trainable part, as the trial will have them."""
    n = shape.n_params()
    if method == "full":
        return n, n
    if method == "freeze":
        k = trained_blocks(shape.layers, trainable_fraction)
        return n, k * shape.block_params() + 2 * shape.hidden  # + final LayerNorm
    if method == "bias":
        return n, shape.layers * shape.block_bias_params() + shape.hidden  # + final LayerNorm bias
    if method == "lora":
        extra = lora_params(shape, lora_rank, lora_targets)
        return n + extra, extra
    raise ValueError(f"unknown method {method!r}")


def loss_matmul_flops(pairs: int, hidden: int) -> float:
    """The InfoNCE logits q @ d.T for one batch: forward and its two gradients."""
    return 3 * 2.0 * pairs * pairs * hidden


def sequence_hardware_flops(
    shape: NeoxShape,
    method: str,
    seq_len: int,
    *,
    lora_rank: int | None = None,
    trainable_fraction: float | None = None,
    lora_targets: tuple[str, ...] = LORA_TARGETS,
    checkpointing: bool = True,
    grad_cache: bool = False,
) -> float:
    """Matmul FLOPs executed for one padded sequence of ``seq_len`` tokens in one training step.

    A matmul's backward costs its forward once per operand that needs a gradient: activation gradients
    wherever the input needs one, weight gradients for trainable Linears (and LoRA adapters), both for
    the attention products QK^T and AV. Backward reaches every block above the first trainable one.
    Checkpointing re-runs each reached block's forward except its last matmul (non-reentrant
    checkpointing stops recomputing once every saved tensor is back); the gradient cache adds a no-grad
    forward of the whole model. Embedding lookups, norms, softmax and pooling are not matmuls.
    """
    rank = lora_rank if method == "lora" else 0
    lin = {name: 2.0 * a * b for name, (a, b) in shape.linears().items()}  # per token
    ad = {name: 2.0 * rank * (a + b) if name in lora_targets else 0.0 for name, (a, b) in shape.linears().items()}
    attn = 2 * 2.0 * seq_len * shape.hidden  # QK^T and AV, per token
    fwd = sum(lin.values()) + sum(ad.values()) + attn
    last = ad["dense_4h_to_h"] / 2 if ad["dense_4h_to_h"] else lin["dense_4h_to_h"]  # lora_B or the base matmul

    layers = shape.layers
    first = layers - trained_blocks(layers, trainable_fraction) if method == "freeze" else 0
    per_token = layers * fwd * (2 if grad_cache else 1)
    for layer in range(first, layers):
        per_token += fwd + attn  # activation gradients: every matmul once, attention's second operand too
        if checkpointing:
            per_token += fwd - last
        if method in ("full", "freeze"):
            per_token += sum(lin.values())  # weight gradients
        elif method == "lora":
            per_token += sum(ad.values()) / 2 + sum(ad.values()) / 2  # weight grads of A and B
            if layer == 0:
                # the frozen embedding through frozen LayerNorms: qkv's and h_to_4h's inputs need no
                # gradient, so neither their base matmuls nor their A matrices compute one
                for name in ("query_key_value", "dense_h_to_4h"):
                    a, _ = shape.linears()[name]
                    per_token -= lin[name] + (2.0 * rank * a if name in lora_targets else 0.0)
    return per_token * seq_len
