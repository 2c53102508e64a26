"""The mini suite's models: the GPT-NeoX (Pythia-shaped) and Llama-architecture series, their configs, and what
a built model records (``SuiteModel``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from core.errors import UserError
from core.models import ModelShape

VOCAB_SIZE = 4096  # Pythia pads a 50k BPE to 50304; a 10 MB corpus supports far fewer merges
SPECIAL_TOKENS = ("<|endoftext|>", "<|padding|>")  # ids 0 and 1, as in GPT-NeoX's tokenizer
MAX_POSITIONS = 2048  # Pythia's; rotary has no position table, so this only bounds use, not size


@dataclass(frozen=True)
class _MiniModel:
    """A mini model's width, depth, heads and pretraining lr, and what follows from its shape: N and the name it is
    published under."""

    prefix: ClassVar[str]
    hidden: int
    layers: int
    heads: int
    pretrain_lr: float

    def shape(self, vocab: int = VOCAB_SIZE) -> ModelShape:
        raise NotImplementedError

    @property
    def n_params(self) -> int:
        """Non-embedding parameters (docs/study.md's N; no embedding enters it, so the vocab does not matter)."""
        return self.shape().n_params()

    @property
    def name(self) -> str:
        return f"{self.prefix}-{self.n_params / 1e6:.2g}m"


@dataclass(frozen=True)
class MiniPythia(_MiniModel):
    """One model of the suite: its shape and pretraining lr."""

    prefix: ClassVar[str] = "mini-pythia"

    def shape(self, vocab: int = VOCAB_SIZE) -> ModelShape:
        return ModelShape(hidden=self.hidden, layers=self.layers, heads=self.heads,
                         intermediate=4 * self.hidden, vocab=vocab, parallel_residual=True)

    def config(self, vocab: int = VOCAB_SIZE):
        from transformers import GPTNeoXConfig

        return GPTNeoXConfig(
            vocab_size=vocab, hidden_size=self.hidden, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, intermediate_size=4 * self.hidden, rotary_pct=0.25,
            rotary_emb_base=10000, max_position_embeddings=MAX_POSITIONS, use_parallel_residual=True,
            hidden_act="gelu", layer_norm_eps=1e-5, initializer_range=0.02, tie_word_embeddings=False,
            hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=0, eos_token_id=0,
        )


# Head dim 32 (pythia-14m and -31m). lr: Pythia's 1e-3 (its smallest models) is tuned for 143,000 steps of
# 2M tokens; these runs have 80-512 steps of 2,048 tokens, and a scan at the suite's token counts preferred
# higher rates (held-out loss: 0.1m 5.75 / 5.44 at 3e-3 / 5e-3; 0.34m 5.10 / 4.93 at 2e-3 / 3e-3;
# 1.2m 4.81 / 4.50 / 4.39 at 1e-3 / 2e-3 / 3e-3; 4.7m, at 300k tokens, 4.91 / 4.70 / 4.68), falling with
# width as in Pythia's table.
SUITE: tuple[MiniPythia, ...] = (
    MiniPythia(hidden=64, layers=2, heads=2, pretrain_lr=5e-3),   # N = 100,096
    MiniPythia(hidden=96, layers=3, heads=3, pretrain_lr=3e-3),   # N = 335,712
    MiniPythia(hidden=128, layers=6, heads=4, pretrain_lr=3e-3),  # N = 1,189,888 (pythia-14m's blocks)
    MiniPythia(hidden=256, layers=6, heads=8, pretrain_lr=2e-3),  # N = 4,739,072 (pythia-31m's blocks)
)


@dataclass(frozen=True)
class MiniLlama(_MiniModel):
    """One model of the Llama-architecture series: its shape and pretraining lr."""

    prefix: ClassVar[str] = "mini-llama"

    kv_heads: int
    intermediate: int

    def shape(self, vocab: int = VOCAB_SIZE) -> ModelShape:
        return ModelShape.from_config(self.config(vocab).to_dict())

    def config(self, vocab: int = VOCAB_SIZE):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab, hidden_size=self.hidden, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, intermediate_size=self.intermediate,
            hidden_act="silu", max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5, rope_theta=10000.0,
            attention_bias=False, mlp_bias=False, initializer_range=0.02, tie_word_embeddings=False,
            attention_dropout=0.0, bos_token_id=0, eos_token_id=0,
        )


# The Pythia minis' widths, depths and head dim 32, in the Llama block: SwiGLU's intermediate ~ 8/3 * hidden
# rounded up to a multiple of 16 (Llama's rule, keeping the MLP's parameters ~ Pythia's 4 * hidden GELU MLP's
# two-thirds), grouped-query attention with half the heads for K/V where heads are even (SmolLM2-360M: 15/5;
# Llama 3.2: 32/8). lr: the Pythia minis' at the same width (not scanned for this family).
LLAMA_SUITE: tuple[MiniLlama, ...] = (
    MiniLlama(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=176, pretrain_lr=5e-3),   # N = 92,480
    MiniLlama(hidden=96, layers=3, heads=3, kv_heads=3, intermediate=256, pretrain_lr=3e-3),   # N = 332,448
    MiniLlama(hidden=128, layers=6, heads=4, kv_heads=2, intermediate=352, pretrain_lr=3e-3),  # N = 1,107,584
    MiniLlama(hidden=256, layers=6, heads=8, kv_heads=4, intermediate=688, pretrain_lr=2e-3),  # N = 4,353,280
)
SUITES = {"pythia": SUITE, "llama": LLAMA_SUITE}  # family -> its series, smallest first


@dataclass(frozen=True)
class SuiteModel:
    """A built model of the suite, as its config.json describes it."""

    name: str
    path: str
    n_params: int
    pretrain_lr: float
    pretrain_loss: float   # held-out causal-LM loss after pretraining (nats / token)
    initial_loss: float    # the same loss at initialisation (~ ln(vocab))
    pretrain_tokens: int
    hidden: int
    layers: int
    heads: int
    train_s: float
    family: str = "gpt_neox"  # model_type


class SuiteError(UserError):
    """A bad suite request (an unknown size); the message lists what exists."""
