"""Mini model suites, pretrained here: small GPT-NeoX (Pythia) and Llama LMs and their data for an offline
`repurpose demo`.

The study repurposes *pretrained* LMs (docs/study.md: the Pythia suite). Without a network there is no hub, so
this module makes a suite on the spot, from text every Python carries (workers/pairs.py):

1. a byte-level BPE tokenizer (GPT-NeoX's special tokens: ``<|endoftext|>`` = 0, ``<|padding|>`` = 1),
   trained on the stdlib corpus with ``tokenizers``;
2. four GPT-NeoX models with Pythia's shape rules (intermediate = 4 * hidden, rotary on 25 % of each head,
   parallel residual, head dim 32 like pythia-14m/31m; the two largest have exactly pythia-14m's and
   pythia-31m's blocks, so the same non-embedding N), spanning 47x in N; and a second family (``family="llama"``),
   four Llama-architecture models (RMSNorm, SwiGLU MLP, full RoPE, grouped-query attention, no biases: the
   SmolLM2 / Llama 3.x block) of the same widths and depths, pretrained the same way on the same tokens;
3. causal-LM pretraining of each (AdamW, warmup + cosine, bf16 autocast on CPU), the same token order for
   all (as in Pythia), tokens growing with N;
4. ``save_pretrained`` of the backbone (``GPTNeoXModel``: what ``AutoModel`` loads, no LM head) with the
   tokenizer, and ``repurpose_pretrain_lr`` (workers/models.PRETRAIN_LR_KEY) in config.json so
   ``lr: auto`` works, plus the pretraining loss and tokens.

Everything lives in the user cache dir (``$REPURPOSE_CACHE`` or ``platformdirs.user_cache_dir("repurpose")``)
under ``suite/<key>``, one key per family, a hash of that family's definition and the code/data versions (a
content-addressed cache): a second ``build_suite`` finds the models and returns at once. Each model is
written to a temporary directory and renamed into place, so a half-built model is never listed.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Iterable

from core.errors import UserError
from core.hashing import json_hash
from core.models import PRETRAIN_LR_KEY, ModelShape
from core.schedule import warmup_cosine
from workers.pairs import PAIRS_VERSION, build_pairs, iter_corpus_texts

SUITE_VERSION = 1  # bump when training or saving changes: it is part of the cache key

VOCAB_SIZE = 4096  # Pythia pads a 50k BPE to 50304; a 10 MB corpus supports far fewer merges
SPECIAL_TOKENS = ("<|endoftext|>", "<|padding|>")  # ids 0 and 1, as in GPT-NeoX's tokenizer
SEQ_LEN = 128      # pretraining context (Pythia: 2048); the study truncates pairs to 75 tokens
BATCH_SEQS = 16    # 2,048 tokens per step (Pythia: 1,024 x 2,048)
EVAL_SEQS = 64     # held-out sequences for the initial and final loss
MAX_POSITIONS = 2048  # Pythia's; rotary has no position table, so this only bounds use, not size
SEED = 0

# Pythia (Biderman et al. 2023) optimiser: AdamW betas (0.9, 0.95), eps 1e-8, weight decay 0.01,
# gradient clipping 1.0, warmup then cosine decay to 10 % of the peak lr. Warmup here is 10 % of the steps
# (Pythia: 1 %), since these runs have hundreds of steps, not 143,000.
BETAS, EPS, WEIGHT_DECAY, GRAD_CLIP = (0.9, 0.95), 1e-8, 0.01, 1.0
WARMUP_FRACTION, FINAL_LR_FRACTION = 0.1, 0.1

# Tokens grow with N, but slower than Chinchilla's D ~ 20 N (Hoffmann et al. 2022): a 2-core laptop's few
# minutes allow ~1M tokens for the largest model (0.2 tokens per parameter), and D ~ N would then leave the
# smallest 1/47 of that, too little to learn more than unigram statistics. D ~ sqrt(N) keeps every model
# learning and the losses ordered by size; the cap bounds the build time.
# Measured (2 cores of an AMD EPYC with avx512_bf16, torch 2.13): a whole build takes 305 s (data 4 s; the
# models 8 / 16 / 107 / 171 s, the 1.2m one slowed by another process); held-out loss 8.3 -> 5.18 / 4.70 /
# 4.08 / 3.39 nats per token, the same on a rebuild. Other processes on the cores slow it many times over
# (two OpenMP threads fighting for one core: 25 min for the 4.7m model under a load of ~4).
TOKENS_PER_SQRT_PARAM = 512
MIN_TOKENS, MAX_TOKENS = 2**16, 2**20
CHARS_PER_TOKEN = 4  # corpus text taken per token needed (the tokenizer averages 3.5 on it): a margin


@dataclass(frozen=True)
class MiniPythia:
    """One model of the suite: its shape and pretraining lr."""

    hidden: int
    layers: int
    heads: int
    pretrain_lr: float

    def shape(self, vocab: int = VOCAB_SIZE) -> ModelShape:
        return ModelShape(hidden=self.hidden, layers=self.layers, heads=self.heads,
                         intermediate=4 * self.hidden, vocab=vocab, parallel_residual=True)

    @property
    def n_params(self) -> int:
        """Non-embedding parameters (docs/study.md's N; no embedding enters it, so the vocab does not matter)."""
        return self.shape().n_params()

    @property
    def name(self) -> str:
        return f"mini-pythia-{self.n_params / 1e6:.2g}m"

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
class MiniLlama:
    """One model of the Llama-architecture series: its shape and pretraining lr."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    pretrain_lr: float

    def shape(self, vocab: int = VOCAB_SIZE) -> ModelShape:
        return ModelShape.from_config(self.config(vocab).to_dict())

    @property
    def n_params(self) -> int:
        return self.shape().n_params()

    @property
    def name(self) -> str:
        return f"mini-llama-{self.n_params / 1e6:.2g}m"

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


def pretrain_tokens(n_params: int, token_scale: float = 1.0) -> int:
    """Tokens to pretrain a model of ``n_params`` on, a whole number of batches (at least one)."""
    tokens = token_scale * min(MAX_TOKENS, max(MIN_TOKENS, TOKENS_PER_SQRT_PARAM * math.sqrt(n_params)))
    step = BATCH_SEQS * SEQ_LEN
    return max(1, round(tokens / step)) * step


# -------------------------------------------------------------------------------------------- cache


def cache_root(cache_dir: str | None = None) -> str:
    if cache_dir:
        return os.path.abspath(os.path.expanduser(cache_dir))
    if os.environ.get("REPURPOSE_CACHE"):
        return os.path.abspath(os.path.expanduser(os.environ["REPURPOSE_CACHE"]))
    import platformdirs

    return platformdirs.user_cache_dir("repurpose")


def _python_version() -> str:
    # the corpus is the running Python's stdlib: another version is other data
    return "%d.%d.%d" % sys.version_info[:3]


def _series(family: str) -> tuple:
    if family not in SUITES:
        raise SuiteError(f"unknown suite family {family!r}; the suites are {', '.join(SUITES)}")
    return SUITES[family]


def suite_key(token_scale: float = 1.0, family: str = "pythia") -> str:
    """Hash of everything that defines a family's weights (not of which sizes were asked for). Pythia's
    definition is the one from before the Llama series existed (its cache stays valid); another family adds
    its name."""
    definition = {
        "suite": [asdict(m) for m in _series(family)], "suite_version": SUITE_VERSION, "pairs_version": PAIRS_VERSION,
        "python": _python_version(), "vocab": VOCAB_SIZE, "seq_len": SEQ_LEN, "batch_seqs": BATCH_SEQS,
        "eval_seqs": EVAL_SEQS, "seed": SEED, "token_scale": token_scale,
        "tokens": [TOKENS_PER_SQRT_PARAM, MIN_TOKENS, MAX_TOKENS, CHARS_PER_TOKEN],
        "optim": [BETAS, EPS, WEIGHT_DECAY, GRAD_CLIP, WARMUP_FRACTION, FINAL_LR_FRACTION],
    }
    if family != "pythia":
        definition["family"] = family
    return json_hash(definition, algorithm="sha1", hex_chars=12, compact=False)


def suite_dir(cache_dir: str | None = None, token_scale: float = 1.0, family: str = "pythia") -> str:
    return os.path.join(cache_root(cache_dir), "suite", suite_key(token_scale, family))


def _select(sizes: Iterable[str] | None, family: str = "pythia") -> list:
    """Models by name ('mini-pythia-0.1m') or size label ('0.1m'); None = the family's whole series."""
    series = _series(family)
    if sizes is None:
        return list(series)
    by_label = {m.name: m for m in series} | {m.name.removeprefix(f"mini-{family}-"): m for m in series}
    unknown = [s for s in sizes if s not in by_label]
    if unknown:
        raise SuiteError(f"unknown suite size(s) {unknown}; the {family} suite has {[m.name for m in series]}")
    wanted = {by_label[s] for s in sizes}
    return [m for m in series if m in wanted]


def _publish(tmp: str, final: str) -> None:
    """Rename a finished directory into place; if another process got there first, keep theirs."""
    os.chmod(tmp, 0o755)  # mkdtemp made it private; a cache entry is as readable as any other file
    try:
        os.rename(tmp, final)
    except OSError:
        if not os.path.isdir(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _replace(tmp: str, final: str) -> None:
    """``_publish``, moving an existing ``final`` (a forced rebuild) aside first and deleting it after."""
    if not os.path.isdir(final):
        return _publish(tmp, final)
    trash = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(final))
    os.rename(final, os.path.join(trash, "old"))
    _publish(tmp, final)
    shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE like GPT-NeoX's (no prefix space, no normalisation: decode(encode(t)) == t), as a
    ``PreTrainedTokenizerFast``. Like Pythia's it has no pad token: the fine-tuning worker pads with EOS."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    eos = SPECIAL_TOKENS[0]
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=eos, eos_token=eos, unk_token=eos,
                                   model_max_length=MAX_POSITIONS, clean_up_tokenization_spaces=False)


def suite_tokens(token_scale: float = 1.0) -> int:
    """Tokens the suite's data must hold: the largest model's pretraining tokens + the held-out sequences.
    Pythia's series sets it for every family, so all train on the same documents in the same order."""
    return max(pretrain_tokens(m.n_params, token_scale) for m in SUITE) + EVAL_SEQS * SEQ_LEN


def corpus_documents(tokens: int) -> list[str]:
    """The stdlib corpus (workers/pairs.iter_corpus_texts) in a fixed shuffled order, cut after about
    ``tokens`` tokens' worth of text (CHARS_PER_TOKEN): the whole suite trains on one prefix of one order."""
    import random

    docs = [t for t in iter_corpus_texts() if t.strip()]
    random.Random(SEED).shuffle(docs)
    chars = 0
    for i, doc in enumerate(docs):
        chars += len(doc)
        if chars >= tokens * CHARS_PER_TOKEN:
            return docs[: i + 1]
    return docs


def token_sequences(tokenizer, texts: list[str]):
    """(train, held-out) LongTensors of shape (n, SEQ_LEN): every text + EOS, concatenated, cut into
    sequences, shuffled with a fixed seed; the same for every model (Pythia trains all sizes on one order)."""
    import torch

    eos = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS[0])
    # the Rust tokenizer directly: whole source files exceed model_max_length, which is not an error here
    encoded = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    ids = [i for enc in encoded for i in enc.ids + [eos]]
    n = len(ids) // SEQ_LEN
    seqs = torch.tensor(ids[: n * SEQ_LEN], dtype=torch.long).view(n, SEQ_LEN)  # (n, T)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SEED))
    seqs = seqs[order]
    return seqs[EVAL_SEQS:], seqs[:EVAL_SEQS]


def _prepare_data(root: str, token_scale: float):
    """(tokenizer, train sequences, held-out sequences) of the suite in ``root``: trained and tokenised on
    its first build, then read back, so every model of a suite sees the same tokenizer and token order."""
    import torch
    from transformers import AutoTokenizer

    tok_path, seq_path = os.path.join(root, "tokenizer"), os.path.join(root, "sequences.pt")
    if not (os.path.isdir(tok_path) and os.path.isfile(seq_path)):
        docs = corpus_documents(suite_tokens(token_scale))
        if not os.path.isdir(tok_path):
            tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=root)
            train_tokenizer(docs).save_pretrained(tmp)
            _publish(tmp, tok_path)
        train, held = token_sequences(AutoTokenizer.from_pretrained(tok_path), docs)
        tmp = f"{seq_path}.tmp{os.getpid()}"
        torch.save({"train": train.to(torch.int16), "eval": held.to(torch.int16)}, tmp)  # vocab < 2**15
        os.replace(tmp, seq_path)
    seqs = torch.load(seq_path)
    return AutoTokenizer.from_pretrained(tok_path), seqs["train"].long(), seqs["eval"].long()


# --------------------------------------------------------------------------------------- pretraining


def _lr_factor(step: int, total: int) -> float:
    """Linear warmup over the first WARMUP_FRACTION of the steps, then cosine to FINAL_LR_FRACTION."""
    return warmup_cosine(step, step + 1, max(1, round(WARMUP_FRACTION * total)), total, FINAL_LR_FRACTION)


def heldout_loss(model, seqs) -> float:
    """Mean causal-LM loss (nats / token) over ``seqs`` (n, T), in fp32."""
    import torch

    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=b, labels=b).loss.item() for b in seqs.split(BATCH_SEQS)]
    model.train()
    return sum(losses) / len(losses)


def pretrain(spec, train_seqs, eval_seqs, tokens: int, progress=None):
    """Train a fresh causal LM of ``spec`` (MiniPythia or MiniLlama) on ``tokens`` tokens of ``train_seqs``
    (cycled if too few: only when ``token_scale`` asks for more than the whole corpus).

    Returns (model, initial held-out loss, final held-out loss). ``progress``: a rich Progress or None.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(spec.config())
    initial = heldout_loss(model, eval_seqs)
    steps = tokens // (BATCH_SEQS * SEQ_LEN)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]  # no decay on biases and norms
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}],
                            lr=spec.pretrain_lr, betas=BETAS, eps=EPS)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps))
    task = progress.add_task(f"pretrain {spec.name}", total=steps, loss=float("nan")) if progress else None
    n = train_seqs.shape[0]
    for step in range(steps):
        idx = torch.arange(step * BATCH_SEQS, (step + 1) * BATCH_SEQS) % n
        batch = train_seqs[idx]  # (B, T)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if task is not None:
            progress.update(task, advance=1, loss=loss.item())
    final = heldout_loss(model, eval_seqs)
    if task is not None:
        progress.update(task, loss=final)
    return model, initial, final


def _save(spec, model, tokenizer, out_dir: str, *, initial: float, final: float, tokens: int,
          train_s: float, key: str) -> None:
    """The backbone (GPTNeoXModel / LlamaModel: AutoModel loads it with no missing or unexpected weights) +
    tokenizer."""
    base = model.base_model
    base.config.architectures = [type(base).__name__]
    meta = {
        PRETRAIN_LR_KEY: spec.pretrain_lr, "repurpose_pretrain_loss": round(final, 5),
        "repurpose_initial_loss": round(initial, 5), "repurpose_pretrain_tokens": tokens,
        "repurpose_pretrain_seq_len": SEQ_LEN, "repurpose_train_s": round(train_s, 2),
        "repurpose_suite": key, "repurpose_name": spec.name,
    }
    for k, v in meta.items():
        setattr(base.config, k, v)
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar between the training bars
    try:
        base.save_pretrained(out_dir)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out_dir)


def _read_model(path: str) -> SuiteModel:
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    return SuiteModel(
        name=cfg["repurpose_name"], path=path, n_params=ModelShape.from_config(cfg).n_params(),
        pretrain_lr=float(cfg[PRETRAIN_LR_KEY]), pretrain_loss=float(cfg["repurpose_pretrain_loss"]),
        initial_loss=float(cfg["repurpose_initial_loss"]), pretrain_tokens=int(cfg["repurpose_pretrain_tokens"]),
        hidden=int(cfg["hidden_size"]), layers=int(cfg["num_hidden_layers"]),
        heads=int(cfg["num_attention_heads"]), train_s=float(cfg["repurpose_train_s"]),
        family=cfg.get("model_type", "gpt_neox"),
    )


def _progress(enabled: bool):
    from contextlib import nullcontext

    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn())


# ------------------------------------------------------------------------------------------------ API


def build_suite(cache_dir: str | None = None, force: bool = False, sizes: Iterable[str] | None = None,
                progress: bool = True, token_scale: float = 1.0, family: str = "pythia") -> list[SuiteModel]:
    """Build (or find) a family's suite models (``family``: pythia or llama); returns them smallest first.

    ``sizes``: names or labels ('0.1m') to build, default all. ``force``: retrain those models even if
    built (the suite's tokenizer and token order are kept: the other models were trained with them).
    ``token_scale``: multiplies every model's pretraining tokens (a different suite, under its own key).
    """
    if token_scale <= 0:
        raise SuiteError(f"token_scale must be > 0, got {token_scale}")
    specs = _select(sizes, family)
    key = suite_key(token_scale, family)
    root = suite_dir(cache_dir, token_scale, family)
    todo = [m for m in specs if force or not os.path.isfile(os.path.join(root, m.name, "config.json"))]
    if todo:
        os.makedirs(root, exist_ok=True)
        tokenizer, train_seqs, eval_seqs = _prepare_data(root, token_scale)
        with _progress(progress) as bars:
            for spec in todo:
                t0 = time.perf_counter()
                tokens = pretrain_tokens(spec.n_params, token_scale)
                model, initial, final = pretrain(spec, train_seqs, eval_seqs, tokens, bars)
                tmp = tempfile.mkdtemp(prefix=f".{spec.name}-", dir=root)
                _save(spec, model, tokenizer, tmp, initial=initial, final=final, tokens=tokens,
                      train_s=time.perf_counter() - t0, key=key)
                _replace(tmp, os.path.join(root, spec.name))
    return [_read_model(os.path.join(root, m.name)) for m in specs]


def list_suite(cache_dir: str | None = None, token_scale: float = 1.0, family: str = "pythia") -> list[SuiteModel]:
    """A family's suite models already built (smallest first); builds nothing."""
    root = suite_dir(cache_dir, token_scale, family)
    return [_read_model(os.path.join(root, m.name)) for m in _series(family)
            if os.path.isfile(os.path.join(root, m.name, "config.json"))]


def suite_paths(cache_dir: str | None = None, token_scale: float = 1.0, family: str = "pythia") -> dict[str, str]:
    """{name: checkpoint path} of a family's built models, smallest first."""
    return {m.name: m.path for m in list_suite(cache_dir, token_scale, family)}


def demo_data(cache_dir: str | None = None, eval_fraction: float = 0.05) -> dict:
    """The stdlib pairs (workers/pairs.py) in the cache, built once per Python version and pairs version.

    Returns build_pairs' dict: {"train": path, "eval": path, "n_train", "n_eval", "kinds", ...}.
    """
    key = json_hash([PAIRS_VERSION, _python_version(), eval_fraction], algorithm="sha1", hex_chars=12, compact=False)
    root = os.path.join(cache_root(cache_dir), "pairs")
    path = os.path.join(root, key)
    if not os.path.isfile(os.path.join(path, "pairs.json")):
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".pairs-", dir=root)
        build_pairs(tmp, eval_fraction=eval_fraction)
        _publish(tmp, path)
    with open(os.path.join(path, "pairs.json")) as f:
        info = json.load(f)
    return info | {"train": os.path.join(path, "train.jsonl"), "eval": os.path.join(path, "eval.jsonl")}


# ------------------------------------------------------------------------------------------------ CLI


def build_command(args) -> int:
    """`repurpose suite build [--out DIR]`: builds (or reuses) every model of both families and the demo's pairs."""
    data = demo_data(args.out)
    models = [m for family in SUITES for m in build_suite(args.out, family=family)]
    print(f"pairs: {data['n_train']:,} train, {data['n_eval']:,} eval -> {os.path.dirname(data['train'])}")
    print(_table(models))
    return 0


def list_command(args) -> int:
    """`repurpose suite list [--json]`: the models already built; builds nothing."""
    models = [m for family in SUITES for m in list_suite(getattr(args, "out", None), family=family)]
    if args.json:
        print(json.dumps([m.__dict__ for m in models]))
    elif not models:
        print(f"no suite models built under {suite_dir(getattr(args, 'out', None))} (`repurpose suite build`)")
    else:
        print(_table(models))
    return 0


def _table(models: list[SuiteModel]) -> str:
    return "\n".join(f"{m.name:<20} N={m.n_params:>10,}  layers {m.layers}  hidden {m.hidden}  "
                     f"pretrain loss {m.pretrain_loss:.2f}  {m.path}" for m in models)
