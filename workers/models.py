"""What is known about a model before its weights load: shape, N, pretraining lr. No torch here.

HF names of the Pythia suite resolve from the table below (so a grid plans offline); local paths
(and any other HF name, on a machine that reaches the hub) from their config.json.
"""
from __future__ import annotations

import json
import os
import re

from workers.flops import NeoxShape

# Pythia (Biderman et al. 2023, Table 1 / the HF configs): hidden, layers, heads; intermediate = 4*hidden,
# vocab padded to 50304. Non-embedding N from these equals PAPER.md's counts (tests/workers/test_flops.py).
PYTHIA_SHAPES = {
    "14m": (128, 6, 4),
    "31m": (256, 6, 8),
    "70m": (512, 6, 8),
    "160m": (768, 12, 12),
    "410m": (1024, 24, 16),
    "1b": (2048, 16, 8),
    "1.4b": (2048, 24, 16),
    "2.8b": (2560, 32, 32),
}
# Pythia pretraining learning rates (PAPER.md); the study fine-tunes at a tenth of them.
PYTHIA_PRETRAIN_LR = {
    "14m": 1e-3, "31m": 1e-3, "70m": 1e-3, "160m": 6e-4,
    "410m": 3e-4, "1b": 3e-4, "1.4b": 2e-4, "2.8b": 1.6e-4,
}
FINETUNE_LR_DIVISOR = 10.0
_PYTHIA_NAME = re.compile(r"pythia-(\d+(?:\.\d+)?[mb])(?:-deduped)?(?:$|[-_/])", re.IGNORECASE)
# The key a local checkpoint's config.json carries for its pretraining lr (the offline mini suite sets it).
PRETRAIN_LR_KEY = "repurpose_pretrain_lr"


class ModelConfigError(ValueError):
    """A model reference that cannot be resolved; the message names the model and the problem."""


def pythia_size(name: str) -> str | None:
    m = _PYTHIA_NAME.search(name.rstrip("/") + "/")
    return m.group(1).lower() if m else None


def read_config(model: str) -> dict:
    """config.json of a local checkpoint directory, or the built-in Pythia table for hub names."""
    path = os.path.join(model, "config.json")
    if os.path.isdir(model):
        if not os.path.isfile(path):
            raise ModelConfigError(f"{model}: no config.json in the model directory")
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ModelConfigError(f"{path}: unreadable config ({e})") from None
    size = pythia_size(model)
    if size in PYTHIA_SHAPES and "/" in model and not os.path.exists(model):
        d, layers, heads = PYTHIA_SHAPES[size]
        return {
            "model_type": "gpt_neox", "hidden_size": d, "num_hidden_layers": layers,
            "num_attention_heads": heads, "intermediate_size": 4 * d, "vocab_size": 50304,
            "use_parallel_residual": True, PRETRAIN_LR_KEY: PYTHIA_PRETRAIN_LR[size],
        }
    if os.path.exists(model) or model.startswith((".", "/", "~")):
        raise ModelConfigError(f"{model}: model path is not a checkpoint directory")
    return _hub_config(model)


def _hub_config(name: str) -> dict:
    try:
        from huggingface_hub import hf_hub_download

        with open(hf_hub_download(name, "config.json")) as f:
            return json.load(f)
    except Exception as e:  # offline, unknown repo, ...: one clear line for the user
        raise ModelConfigError(f"{name}: cannot read the model's config.json ({type(e).__name__})") from None


def model_shape(model: str) -> NeoxShape:
    try:
        return NeoxShape.from_config(read_config(model))
    except (KeyError, ValueError) as e:
        if isinstance(e, ModelConfigError):
            raise
        raise ModelConfigError(f"{model}: not a GPT-NeoX config ({e})") from None


def pretrain_lr(model: str, config: dict | None = None) -> float | None:
    """The model's pretraining lr: its config's metadata, else the Pythia table by name."""
    cfg = config if config is not None else read_config(model)
    if PRETRAIN_LR_KEY in cfg:
        return float(cfg[PRETRAIN_LR_KEY])
    size = pythia_size(model)
    return PYTHIA_PRETRAIN_LR.get(size) if size else None


def auto_lr(model: str, config: dict | None = None) -> float:
    """lr `auto` = pretraining lr / 10 (PAPER.md, the authors' recipe)."""
    lr = pretrain_lr(model, config)
    if lr is None:
        raise ModelConfigError(
            f"{model}: lr 'auto' needs a Pythia model name or '{PRETRAIN_LR_KEY}' in its config.json; set train.lr"
        )
    return lr / FINETUNE_LR_DIVISOR
