"""Fine-tuning methods differ only in which parameters train: one ``select_trainable``.

- full: everything.
- freeze: the input embedding and the first L - ceil(f*L) blocks frozen; the last blocks and the final
  LayerNorm train (PAPER.md, "Grid").
- bias: every parameter named ``*bias*`` (the LayerNorm biases included).
- lora: peft LoRA on query_key_value, dense, dense_h_to_4h, dense_4h_to_h (the authors' targets; they
  also adapted embed_in), alpha = peft's default unless given.
"""
from __future__ import annotations

from core.flops import trained_blocks


def select_trainable(model, method: str, *, lora_rank=None, trainable_fraction=None, lora_alpha=None,
                     lora_dropout=0.0, lora_targets=None):
    """Sets requires_grad per the method; returns the model to train (a peft wrapper for LoRA)."""
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        kwargs = {} if lora_alpha is None else {"lora_alpha": lora_alpha}
        config = LoraConfig(r=lora_rank, lora_dropout=lora_dropout, target_modules=list(lora_targets),
                            bias="none", **kwargs)
        return get_peft_model(model, config)  # freezes the base model, adapters train
    for name, p in model.named_parameters():
        p.requires_grad_(_trains(name, method, model.config.num_hidden_layers, trainable_fraction))
    return model


def _trains(name: str, method: str, n_layers: int, trainable_fraction) -> bool:
    if method == "full":
        return True
    if method == "bias":
        return "bias" in name
    if method == "freeze":
        first_trained = n_layers - trained_blocks(n_layers, trainable_fraction)
        if name.startswith("layers."):
            return int(name.split(".")[1]) >= first_trained
        return not name.startswith("embed_in")
    raise ValueError(f"unknown method {method!r}")


def count_params(model) -> tuple[int, int]:
    """(N, N_tr): non-embedding parameters (names without 'emb'; LoRA adapters count) and the trainable part."""
    n = n_tr = 0
    for name, p in model.named_parameters():
        if "emb" in name:
            continue
        n += p.numel()
        if p.requires_grad:
            n_tr += p.numel()
    return n, n_tr
