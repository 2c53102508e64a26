"""What is known about a model before its weights load: its family's shape, N and N_tr, pretraining lr. No torch.

A model is any HF decoder checkpoint ``AutoModel`` loads, of a supported family (``model_type``): GPT-NeoX
(Pythia), Llama (SmolLM2, TinyLlama, Llama 3.x), Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 (text), OLMo 2,
Phi-3. ``ModelShape.from_config`` turns a config.json into the dimensions the parameter and FLOP arithmetic
needs (core/flops.py); no weights are read. HF names of the built-in tables (the Pythia suite, Qwen3, SmolLM2,
Llama 3.2) resolve offline; local paths (and other HF names, on a machine that reaches the hub) from their
config.json.

N is the paper's: every parameter but the input embedding (an embedding model loads no LM head, tied or not).
``n_params`` equals a count of ``named_parameters()`` minus the input embedding for every family
(tests/workers/test_families.py).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

from core.errors import UserError


class ModelConfigError(UserError):
    """A model reference that cannot be resolved or is not supported; the message names the model and the problem."""


# GPT-NeoX's Linears, the authors' LoRA targets (docs/study.md; they also adapted embed_in, left out here)
LORA_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


# --- shapes -------------------------------------------------------------------------------------------------
# model_type -> how its decoder block is built (transformers 5's modeling_<family>.py):
#   gpt_neox: LayerNorm (weight, bias) before attention and MLP, fused query_key_value, GELU MLP, all Linears
#             biased (attention ones per config.attention_bias), parallel residual (Pythia)
#   llama, mistral, qwen2, qwen3: RMSNorm before attention and MLP, q/k/v/o, SwiGLU gate/up/down; biases per
#             attention_bias / mlp_bias (llama), none (mistral), q/k/v only (qwen2); qwen3 adds per-head RMSNorm
#             q_norm/k_norm (head_dim each)
#   gemma2, gemma3_text: four RMSNorms per block (pre/post attention, pre/post feed-forward), GeGLU gate/up/down,
#             head_dim independent of hidden/heads, tied embeddings; gemma3_text adds per-head q_norm/k_norm
#   olmo2:    no pre-norms: RMSNorm after attention and after the MLP, q_norm/k_norm over the whole q/k projection
#   phi3:     RMSNorm x2, fused qkv_proj and gate_up_proj, no biases
FAMILIES = ("gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo2", "phi3")
_POST_NORM_AFTER_MLP = ("gemma2", "gemma3_text", "olmo2")  # a norm reads the MLP's output (see core/flops.py)


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a decoder that parameter and FLOP counts need. The defaults are GPT-NeoX's (so
    ``ModelShape(hidden=..., layers=..., heads=..., intermediate=..., vocab=...)`` is a Pythia shape)."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    parallel_residual: bool = True
    family: str = "gpt_neox"
    kv_heads: int | None = None  # grouped-query attention; None: = heads
    head_dim: int | None = None  # None: hidden // heads
    attention_bias: bool = True  # biases on the attention Linears (qwen2: q/k/v only)
    mlp_bias: bool = True

    @classmethod
    def from_config(cls, cfg: dict, model: str | None = None) -> "ModelShape":
        """A config.json (dict) -> its shape; an unsupported ``model_type`` is a ModelConfigError naming
        ``model`` (or the config) and the type."""
        family = cfg.get("model_type", "gpt_neox")
        if family not in FAMILIES:
            raise ModelConfigError(f"{model or 'model'}: model_type {family!r} is not supported "
                                   f"(supported: {', '.join(FAMILIES)})")
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            common = dict(hidden=hidden, layers=int(cfg["num_hidden_layers"]), heads=heads,
                          vocab=int(cfg["vocab_size"]), family=family)
            if family == "gpt_neox":
                return cls(**common, intermediate=int(cfg.get("intermediate_size") or 4 * hidden),
                           parallel_residual=bool(cfg.get("use_parallel_residual", True)),
                           attention_bias=bool(cfg.get("attention_bias", True)))
            return cls(**common, intermediate=int(cfg["intermediate_size"]), parallel_residual=False,
                       kv_heads=int(cfg.get("num_key_value_heads") or heads),
                       head_dim=int(cfg.get("head_dim") or hidden // heads),
                       attention_bias=_attention_bias(family, cfg),
                       mlp_bias=family == "llama" and bool(cfg.get("mlp_bias", False)))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelConfigError(f"{model or 'model'}: {family} config without a usable {e}") from None

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def kv(self) -> int:
        return self.kv_heads or self.heads

    @property
    def attn_width(self) -> int:
        """heads x head_dim: the width of Q and of the attention output (= hidden for GPT-NeoX, not for Qwen3)."""
        return self.heads * self.hd

    def linears(self) -> dict[str, tuple[int, int, bool]]:
        """(in, out, has bias) of each Linear of one block, by module name, in forward order."""
        d, i, q, kv = self.hidden, self.intermediate, self.attn_width, self.kv * self.hd
        ab, mb = self.attention_bias, self.mlp_bias
        if self.family == "gpt_neox":
            return {"query_key_value": (d, 3 * d, ab), "dense": (d, d, ab),
                    "dense_h_to_4h": (d, i, mb), "dense_4h_to_h": (i, d, mb)}
        if self.family == "phi3":
            return {"qkv_proj": (d, q + 2 * kv, False), "o_proj": (q, d, False),
                    "gate_up_proj": (d, 2 * i, False), "down_proj": (i, d, False)}
        return {"q_proj": (d, q, ab), "k_proj": (d, kv, ab), "v_proj": (d, kv, ab),
                "o_proj": (q, d, ab and self.family != "qwen2"),
                "gate_proj": (d, i, mb), "up_proj": (d, i, mb), "down_proj": (i, d, mb)}

    def block_norm_params(self) -> tuple[int, int]:
        """(weights, biases) of one block's norms."""
        d, hd = self.hidden, self.hd
        if self.family == "gpt_neox":
            return 2 * d, 2 * d  # two LayerNorms
        if self.family in ("gemma2", "gemma3_text"):
            return 4 * d + (2 * hd if self.family == "gemma3_text" else 0), 0
        if self.family == "qwen3":
            return 2 * d + 2 * hd, 0
        if self.family == "olmo2":
            return 2 * d + self.attn_width + self.kv * hd, 0
        return 2 * d, 0  # llama, mistral, qwen2, phi3: RMSNorm before attention and MLP

    def final_norm_params(self) -> tuple[int, int]:
        return (self.hidden, self.hidden) if self.family == "gpt_neox" else (self.hidden, 0)

    def block_params(self) -> int:
        return sum(a * b + (b if bias else 0) for a, b, bias in self.linears().values()) + sum(self.block_norm_params())

    def block_bias_params(self) -> int:
        return sum(b for _, b, bias in self.linears().values() if bias) + self.block_norm_params()[1]

    def bias_params(self) -> int:
        """Every ``*bias*`` parameter: what method ``bias`` trains (0: the method does not apply)."""
        return self.layers * self.block_bias_params() + self.final_norm_params()[1]

    def n_params(self) -> int:
        """Non-embedding parameters: the blocks and the final norm (Pythia's published N)."""
        return self.layers * self.block_params() + sum(self.final_norm_params())

    def default_lora_targets(self) -> tuple[str, ...]:
        """Every Linear inside the decoder blocks (for GPT-NeoX the paper's four, core.spec.LORA_TARGETS)."""
        return tuple(self.linears())

    def input_linears(self) -> tuple[str, ...]:
        """The Linears that read the block's input (through the pre-norm, or directly: OLMo 2)."""
        if self.family == "gpt_neox":
            return ("query_key_value", "dense_h_to_4h") if self.parallel_residual else ("query_key_value",)
        return ("qkv_proj",) if self.family == "phi3" else ("q_proj", "k_proj", "v_proj")

    @property
    def input_norm(self) -> bool:
        """A norm (with parameters) sits between the block's input and its input Linears."""
        return self.family != "olmo2"

    @property
    def mlp_output_normed(self) -> bool:
        """A norm reads the MLP's output (Gemma 2/3, OLMo 2): it saves that tensor for backward."""
        return self.family in _POST_NORM_AFTER_MLP

    def check_lora_targets(self, targets, model: str | None = None) -> tuple[str, ...]:
        """``targets`` checked against this family's Linears. None, or the spec's default (GPT-NeoX's four,
        core.spec.LORA_TARGETS, fixed before other families existed) on another family: the family's default."""
        if targets is None or (self.family != "gpt_neox" and tuple(targets) == LORA_TARGETS):
            return self.default_lora_targets()
        unknown = [t for t in targets if t not in self.linears()]
        if unknown:
            raise ModelConfigError(f"{model or 'model'}: LoRA targets {unknown} are not Linears of a {self.family} "
                                   f"block (it has {', '.join(self.linears())})")
        return tuple(targets)


def _attention_bias(family: str, cfg: dict) -> bool:
    if family == "qwen2":
        return True  # q/k/v always biased (modeling_qwen2.py), o_proj never
    if family in ("mistral", "phi3"):
        return False
    return bool(cfg.get("attention_bias", False))


def trained_blocks(n_layers: int, trainable_fraction: float) -> int:
    """freeze: the last ceil(f * L) blocks train (1e-9 guards 0.3 * 10 = 3.0000000000000004)."""
    return max(1, min(n_layers, math.ceil(trainable_fraction * n_layers - 1e-9)))


def lora_params(shape: ModelShape, rank: int, targets: tuple[str, ...] | None = None) -> int:
    """peft adds A (r x in) and B (out x r) to every targeted Linear of every block."""
    targets = shape.check_lora_targets(targets)
    return shape.layers * sum(rank * (a + b) for name, (a, b, _) in shape.linears().items() if name in targets)


# --- built-in tables: plan offline ----------------------------------------------------------------------------
# Pythia (Biderman et al. 2023, Table 1 / the HF configs): hidden, layers, heads; intermediate = 4*hidden,
# vocab padded to 50304. Non-embedding N from these equals docs/study.md's counts (tests/workers/test_flops.py).
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
# Pythia pretraining learning rates (docs/study.md); the study fine-tunes at a tenth of them.
PYTHIA_PRETRAIN_LR = {
    "14m": 1e-3, "31m": 1e-3, "70m": 1e-3, "160m": 6e-4,
    "410m": 3e-4, "1b": 3e-4, "1.4b": 2e-4, "2.8b": 1.6e-4,
}


def _decoder(model_type, hidden, layers, heads, kv_heads, head_dim, intermediate, vocab, tied):
    return {"model_type": model_type, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
            "intermediate_size": intermediate, "vocab_size": vocab, "tie_word_embeddings": tied,
            "attention_bias": False, "mlp_bias": False}


# Other families' configs, the values of each model card's config.json (huggingface.co/<name>/blob/main/config.json):
# model_type, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, intermediate_size,
# vocab_size, tie_word_embeddings (attention_bias and mlp_bias false in all). The -Base / -Instruct variants share
# their model's shape. Their pretraining lrs are not in the model cards or reports (Qwen3 technical report,
# arXiv:2505.09388; Llama 3.2 model card) -- SmolLM2's paper (arXiv:2502.02737) describes its schedule, but the
# numbers could not be checked here -- so `lr: auto` asks for train.lr on them rather than guess.
BUILTIN_CONFIGS = {
    "Qwen/Qwen3-0.6B": _decoder("qwen3", 1024, 28, 16, 8, 128, 3072, 151936, True),
    "Qwen/Qwen3-1.7B": _decoder("qwen3", 2048, 28, 16, 8, 128, 6144, 151936, True),
    "Qwen/Qwen3-4B": _decoder("qwen3", 2560, 36, 32, 8, 128, 9728, 151936, True),
    "HuggingFaceTB/SmolLM2-135M": _decoder("llama", 576, 30, 9, 3, 64, 1536, 49152, True),
    "HuggingFaceTB/SmolLM2-360M": _decoder("llama", 960, 32, 15, 5, 64, 2560, 49152, True),
    "HuggingFaceTB/SmolLM2-1.7B": _decoder("llama", 2048, 24, 32, 32, 64, 8192, 49152, True),
    "meta-llama/Llama-3.2-1B": _decoder("llama", 2048, 16, 32, 8, 64, 8192, 128256, True),
    "meta-llama/Llama-3.2-3B": _decoder("llama", 3072, 28, 24, 8, 128, 8192, 128256, True),
}
_BUILTIN = {k.lower(): k for k in BUILTIN_CONFIGS}
_VARIANT = re.compile(r"-(base|instruct)$", re.IGNORECASE)

FINETUNE_LR_DIVISOR = 10.0
_PYTHIA_NAME = re.compile(r"pythia-(\d+(?:\.\d+)?[mb])(?:-deduped)?(?:$|[-_/])", re.IGNORECASE)
# The key a local checkpoint's config.json carries for its pretraining lr (the offline mini suite sets it).
PRETRAIN_LR_KEY = "repurpose_pretrain_lr"


def pythia_size(name: str) -> str | None:
    m = _PYTHIA_NAME.search(name.rstrip("/") + "/")
    return m.group(1).lower() if m else None


def builtin_name(name: str) -> str | None:
    """The built-in table's entry for a hub name (``Qwen/Qwen3-0.6B-Base`` -> ``Qwen/Qwen3-0.6B``), or None."""
    return _BUILTIN.get(_VARIANT.sub("", name.rstrip("/")).lower())


def read_config(model: str) -> dict:
    """config.json of a local checkpoint directory, or a built-in table's entry for hub names."""
    path = os.path.join(model, "config.json")
    if os.path.isdir(model):
        if not os.path.isfile(path):
            raise ModelConfigError(f"{model}: no config.json in the model directory")
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ModelConfigError(f"{path}: unreadable config ({e})") from None
    hub_name = "/" in model and not os.path.exists(model) and not model.startswith((".", "/", "~"))
    size = pythia_size(model)
    if hub_name and size in PYTHIA_SHAPES:
        d, layers, heads = PYTHIA_SHAPES[size]
        return {
            "model_type": "gpt_neox", "hidden_size": d, "num_hidden_layers": layers,
            "num_attention_heads": heads, "intermediate_size": 4 * d, "vocab_size": 50304,
            "use_parallel_residual": True, PRETRAIN_LR_KEY: PYTHIA_PRETRAIN_LR[size],
        }
    if hub_name and builtin_name(model):
        return dict(BUILTIN_CONFIGS[builtin_name(model)])
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


def model_shape(model: str, config: dict | None = None) -> ModelShape:
    """The shape of ``model`` (its config read unless given); unsupported families are a ModelConfigError."""
    return ModelShape.from_config(config if config is not None else read_config(model), model)


def model_family(model: str, config: dict | None = None) -> str:
    """The model's ``model_type`` (the store's ``family`` column)."""
    return model_shape(model, config).family


def pretrain_lr(model: str, config: dict | None = None) -> float | None:
    """The model's pretraining lr: its config's metadata, else the Pythia table by name; None: not known."""
    cfg = config if config is not None else read_config(model)
    if PRETRAIN_LR_KEY in cfg:
        return float(cfg[PRETRAIN_LR_KEY])
    size = pythia_size(model)
    if size and cfg.get("model_type", "gpt_neox") == "gpt_neox":
        return PYTHIA_PRETRAIN_LR.get(size)
    return None


def auto_lr(model: str, config: dict | None = None) -> float:
    """lr `auto` = pretraining lr / 10 (docs/study.md, the authors' recipe)."""
    lr = pretrain_lr(model, config)
    if lr is None:
        cfg = config if config is not None else read_config(model)
        raise ModelConfigError(
            f"{model}: lr 'auto' needs the pretraining lr, which is not public for this "
            f"{cfg.get('model_type', 'gpt_neox')} model (known: Pythia names, or '{PRETRAIN_LR_KEY}' in "
            "config.json); set train.lr"
        )
    return lr / FINETUNE_LR_DIVISOR
