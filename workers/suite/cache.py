"""The mini suite in the user's cache: one directory per family under a key that hashes its definition, each
model written to a temporary directory and renamed into place (a half-built model is never listed); the demo's
stdlib pairs beside it."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Iterable

from core.hashing import json_hash
from core.models import PRETRAIN_LR_KEY, ModelShape
from workers.suite.models import SUITES, VOCAB_SIZE, SuiteError, SuiteModel
from workers.suite.pretraining import (BATCH_SEQS, BETAS, CHARS_PER_TOKEN, EPS, EVAL_SEQS, FINAL_LR_FRACTION,
                                       GRAD_CLIP, MAX_TOKENS, MIN_TOKENS, SEED, SEQ_LEN, TOKENS_PER_SQRT_PARAM,
                                       WARMUP_FRACTION, WEIGHT_DECAY, corpus_documents, pretrain, pretrain_tokens,
                                       suite_tokens, token_sequences, train_tokenizer)
from workers.suite.stdlib_pairs import PAIRS_VERSION, build_pairs

SUITE_VERSION = 1  # bump when training or saving changes: it is part of the cache key


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
    seqs = torch.load(seq_path, weights_only=True)  # our own int16 tensors: no pickle runs
    return AutoTokenizer.from_pretrained(tok_path), seqs["train"].long(), seqs["eval"].long()


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
    """The stdlib pairs (workers/suite/stdlib_pairs.py) in the cache, built once per Python version and pairs version.

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
