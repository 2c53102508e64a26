"""Fine-tuning methods differ only in which parameters train: one selection per method (``SELECTIONS``, keyed by the
record's name in core/methods.py, which holds everything else about a method), for every family.

- full: everything.
- freeze: the input embedding and the first L - ceil(f*L) decoder blocks frozen; the last blocks and the final
  norm train (docs/study.md, "Grid"). The blocks are found from the model (``decoder_blocks``: its ModuleList of
  ``num_hidden_layers`` blocks), not by a name pattern.
- bias: every parameter named ``*bias*`` (GPT-NeoX's LayerNorm biases included). A model without any (Llama,
  Qwen3, Gemma, OLMo 2, Phi-3) cannot use it: the planner skips those cells (orchestrator/plan.py), and here it
  is an error rather than a run that trains nothing.
- lora: peft LoRA on every Linear inside the decoder blocks by default (core.models.ModelShape.default_lora_targets:
  GPT-NeoX's query_key_value, dense, dense_h_to_4h, dense_4h_to_h -- the authors' targets; they also adapted
  embed_in -- Llama's q/k/v/o/gate/up/down_proj, Phi-3's qkv_proj/o_proj/gate_up_proj/down_proj), or the grid's
  targets; alpha = peft's default unless given.
"""
from __future__ import annotations

import warnings

from core import methods
from core.models import ModelShape, trained_blocks


def select_trainable(model, method: str, *, lora_rank=None, trainable_fraction=None, lora_alpha=None,
                     lora_dropout=0.0, lora_targets=None):
    """Sets requires_grad per the method; returns the model to train (a peft wrapper for adapters)."""
    record = methods.get(method)
    if method not in SELECTIONS:
        raise ValueError(f"method {method}: no worker-side selection of its trainable parameters")
    hparams = {"lora_rank": lora_rank, "trainable_fraction": trainable_fraction}
    if record.adapters:
        return SELECTIONS[method](model, rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, targets=lora_targets)
    trains = SELECTIONS[method](model, hparams.get(record.hparam))
    for p in model.parameters():
        p.requires_grad_(id(p) in trains)
    return model


def _full(model, _hparam) -> set[int]:
    return {id(p) for p in model.parameters()}


def _bias(model, _hparam) -> set[int]:
    trains = {id(p) for name, p in model.named_parameters() if "bias" in name}
    if not trains:
        raise ValueError(f"method bias: the {model.config.model_type} model has no bias parameters")
    return trains


def _lora(model, *, rank, alpha, dropout, targets):
    from peft import LoraConfig

    targets = ModelShape.from_config(model.config.to_dict()).check_lora_targets(targets)
    kwargs = {} if alpha is None else {"lora_alpha": alpha}
    config = LoraConfig(r=rank, lora_dropout=dropout, target_modules=list(targets), bias="none", **kwargs)
    return peft_model(model, config)  # freezes the base model, adapters train


def _freeze_trained(model, trainable_fraction: float) -> set[int]:
    """ids of the parameters freeze trains: the last ceil(f * L) blocks and whatever is neither a block nor the
    input embedding (the final norm)."""
    blocks = decoder_blocks(model)
    k = trained_blocks(len(blocks), trainable_fraction)
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    embedding = {id(p) for p in model.get_input_embeddings().parameters()}
    trained = {id(p) for block in blocks[len(blocks) - k:] for p in block.parameters()}
    return trained | {id(p) for p in model.parameters() if id(p) not in in_blocks | embedding}


# A method's selection, by its record's name (core.methods): the ids of the parameters that train, or, for a method
# that trains adapters, the wrapped model.
SELECTIONS = {"full": _full, "freeze": _freeze_trained, "bias": _bias, "lora": _lora}


def decoder_blocks(model):
    """The model's decoder blocks: the outermost ModuleList with ``config.num_hidden_layers`` entries (``layers``
    in every supported family)."""
    import torch

    n = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"no ModuleList of {n} decoder blocks in {type(model).__name__}")


def count_params(model) -> tuple[int, int]:
    """(N, N_tr): non-embedding parameters (all but the input embedding; LoRA adapters count) and the
    trainable part."""
    embedding = {id(p) for p in model.get_input_embeddings().parameters()}
    n = n_tr = 0
    for p in model.parameters():
        if id(p) in embedding:
            continue
        n += p.numel()
        if p.requires_grad:
            n_tr += p.numel()
    return n, n_tr


def peft_model(model, config):
    """``peft.get_peft_model`` without its library noise: peft 0.21 reads transformers 5's deprecated
    ``is_gradient_checkpointing`` alias (a FutureWarning the user did not ask for)."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)
