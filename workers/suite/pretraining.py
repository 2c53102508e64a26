"""Pretraining the mini suite: a byte-level BPE tokenizer trained on the stdlib corpus, one token order for every
model, and the causal-LM loop (AdamW, warmup + cosine, bf16 autocast on CPU)."""
from __future__ import annotations

import math
from typing import Iterable

from core.schedule import warmup_cosine
from workers.suite.models import MAX_POSITIONS, SPECIAL_TOKENS, SUITE, VOCAB_SIZE
from workers.suite.stdlib_pairs import iter_corpus_texts

SEQ_LEN = 128      # pretraining context (Pythia: 2048); the study truncates pairs to 75 tokens
BATCH_SEQS = 16    # 2,048 tokens per step (Pythia: 1,024 x 2,048)
EVAL_SEQS = 64     # held-out sequences for the initial and final loss
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


def pretrain_tokens(n_params: int, token_scale: float = 1.0) -> int:
    """Tokens to pretrain a model of ``n_params`` on, a whole number of batches (at least one)."""
    tokens = token_scale * min(MAX_TOKENS, max(MIN_TOKENS, TOKENS_PER_SQRT_PARAM * math.sqrt(n_params)))
    step = BATCH_SEQS * SEQ_LEN
    return max(1, round(tokens / step)) * step


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
    """The stdlib corpus (workers/suite/stdlib_pairs.iter_corpus_texts) in a fixed shuffled order, cut after about
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
