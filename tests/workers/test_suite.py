"""The mini Pythia suite: its definition, the tokenizer, and a reduced real build (two smallest models,
a few dozen steps each) into a temporary cache."""
from __future__ import annotations

import inspect
import json
import math
import os
import time

import pytest

from workers.suite import cache as SC, models as SM, pretraining as SP, stdlib_pairs as SD
from core.models import ModelShape
from core.models import PRETRAIN_LR_KEY, auto_lr

TOKEN_SCALE = 0.12  # 9 and 17 steps of 2,048 tokens for the two smallest models
SMALLEST = [m.name for m in SM.SUITE[:2]]


# ------------------------------------------------------------------------------------------ definition


def test_suite_has_pythia_shapes_spanning_30x():
    ns = [m.n_params for m in SM.SUITE]
    assert len(SM.SUITE) >= 4 and ns == sorted(ns) and ns[-1] / ns[0] >= 30
    for m in SM.SUITE:
        assert m.hidden % m.heads == 0 and m.hidden // m.heads == 32  # pythia-14m/31m head dim
        cfg = m.config()
        assert cfg.intermediate_size == 4 * m.hidden and cfg.use_parallel_residual
        assert cfg.to_dict()["rope_parameters"]["partial_rotary_factor"] == 0.25
    assert len({m.name for m in SM.SUITE}) == len(SM.SUITE)
    assert SM.SUITE[2].n_params == 1_189_888 and SM.SUITE[3].n_params == 4_739_072  # pythia-14m, -31m (docs/study.md)


def test_pretrain_tokens_grow_with_n_in_whole_batches():
    tokens = [SP.pretrain_tokens(m.n_params) for m in SM.SUITE]
    assert tokens == sorted(tokens) and tokens[-1] > tokens[0]
    step = SP.BATCH_SEQS * SP.SEQ_LEN
    assert all(t % step == 0 for t in tokens)
    assert SP.pretrain_tokens(10**9) == SP.MAX_TOKENS and SP.pretrain_tokens(1) == SP.MIN_TOKENS
    assert SP.pretrain_tokens(1, token_scale=1e-9) == step


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    total = 100
    f = [SP._lr_factor(s, total) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))
    assert f[-1] == pytest.approx(SP.FINAL_LR_FRACTION, abs=0.01)


def test_cache_root_and_keys(monkeypatch, tmp_path):
    monkeypatch.setenv("REPURPOSE_CACHE", str(tmp_path))
    assert SC.cache_root() == str(tmp_path)
    assert SC.cache_root(str(tmp_path / "x")) == str(tmp_path / "x")
    assert SC.suite_key() == SC.suite_key(1.0) != SC.suite_key(0.5)
    assert SC.list_suite() == [] and SC.suite_paths() == {}
    with pytest.raises(SM.SuiteError, match="mini-pythia-0.1m"):
        SC.build_suite(sizes=["70m"])


# ------------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    t0 = time.perf_counter()
    models = SC.build_suite(cache_dir=cache, sizes=SMALLEST, progress=False, token_scale=TOKEN_SCALE)
    return cache, models, time.perf_counter() - t0


@pytest.mark.slow  # pretrains suite models / extracts the stdlib pairs
def test_tokenizer_round_trips_stdlib_docstrings(built):
    from transformers import AutoTokenizer

    _, models, _ = built
    tok = AutoTokenizer.from_pretrained(models[0].path)
    assert len(tok) == SM.VOCAB_SIZE
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 0 and tok.convert_tokens_to_ids("<|padding|>") == 1
    assert tok.eos_token_id == 0 and tok.pad_token is None  # as Pythia's: the trainer pads with EOS
    for text in (json.dumps.__doc__, inspect.cleandoc.__doc__, math.sqrt.__doc__, "naïve café — ≥ 0\t\n  x"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert len(tok("Return the square root of x.")["input_ids"]) < 12  # merges learned, not bytes


# ------------------------------------------------------------------------------------------ the build


@pytest.mark.slow  # pretrains suite models / extracts the stdlib pairs
def test_build_saves_loadable_pretrained_checkpoints(built):
    import torch
    from transformers import AutoModel

    cache, models, _ = built
    assert [m.name for m in models] == SMALLEST
    for m in models:
        model, info = AutoModel.from_pretrained(m.path, output_loading_info=True)
        assert type(model).__name__ == "GPTNeoXModel"
        assert not info["missing_keys"] and not info["unexpected_keys"]
        with open(os.path.join(m.path, "config.json")) as f:
            cfg = json.load(f)
        n_model = sum(p.numel() for name, p in model.named_parameters() if "emb" not in name)
        assert m.n_params == ModelShape.from_config(cfg).n_params() == n_model
        assert cfg[PRETRAIN_LR_KEY] == m.pretrain_lr and auto_lr(m.path) == pytest.approx(m.pretrain_lr / 10)
        assert m.pretrain_tokens == SP.pretrain_tokens(m.n_params, TOKEN_SCALE)
        # it learned: ~ln(4096) = 8.3 at initialisation, clearly lower after a few hundred thousand tokens
        assert m.initial_loss == pytest.approx(math.log(SM.VOCAB_SIZE), abs=0.3)
        assert m.pretrain_loss < m.initial_loss - 0.5
        out = model(input_ids=torch.tensor([[5, 6, 7]])).last_hidden_state
        assert out.shape == (1, 3, m.hidden) and torch.isfinite(out).all()
    assert SC.list_suite(cache, TOKEN_SCALE) == models
    assert list(SC.suite_paths(cache, TOKEN_SCALE)) == SMALLEST
    assert not [d for d in os.listdir(SC.suite_dir(cache, TOKEN_SCALE)) if d.startswith(".")]  # no temp dirs


@pytest.mark.slow  # pretrains suite models / extracts the stdlib pairs
def test_second_build_is_a_no_op_and_force_rebuilds(built, monkeypatch):
    cache, models, _ = built
    weights = os.path.join(models[0].path, "model.safetensors")
    before = os.stat(weights).st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("a built suite model was trained again")

    with monkeypatch.context() as m:  # a second build trains nothing and prepares no data (not: "is fast")
        m.setattr(SC, "pretrain", no_training)
        m.setattr(SC, "_prepare_data", no_training)
        again = SC.build_suite(cache_dir=cache, sizes=["0.1m"], progress=False, token_scale=TOKEN_SCALE)
    assert again == models[:1]
    assert os.stat(weights).st_mtime_ns == before
    forced = SC.build_suite(cache_dir=cache, sizes=["0.1m"], force=True, progress=True, token_scale=TOKEN_SCALE)
    assert os.stat(weights).st_mtime_ns != before
    assert forced[0].name == models[0].name and forced[0].pretrain_loss < forced[0].initial_loss


@pytest.mark.slow  # pretrains suite models / extracts the stdlib pairs
def test_demo_data_builds_pairs_once(tmp_path, monkeypatch):
    info = SC.demo_data(cache_dir=str(tmp_path))
    assert info["n_train"] > 5000 and os.path.isfile(info["train"]) and os.path.isfile(info["eval"])

    def no_build(*args, **kwargs):
        raise AssertionError("the pairs were built again")

    monkeypatch.setattr(SC, "build_pairs", no_build)
    assert SC.demo_data(cache_dir=str(tmp_path)) == info


# ------------------------------------------------------------------------------------ the Llama series


def test_llama_series_is_the_llama_block_at_the_pythia_widths():
    from core.models import ModelShape

    assert [m.n_params for m in SM.LLAMA_SUITE] == sorted(m.n_params for m in SM.LLAMA_SUITE)
    assert SM.LLAMA_SUITE[-1].n_params / SM.LLAMA_SUITE[0].n_params >= 30
    for mini, llama in zip(SM.SUITE, SM.LLAMA_SUITE):
        assert (llama.hidden, llama.layers, llama.heads) == (mini.hidden, mini.layers, mini.heads)
        cfg = llama.config().to_dict()
        shape = ModelShape.from_config(cfg)
        assert cfg["model_type"] == "llama" and cfg["hidden_act"] == "silu" and not cfg["attention_bias"]
        assert shape.bias_params() == 0 and shape.hd == 32 and llama.heads % llama.kv_heads == 0
        assert set(shape.default_lora_targets()) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"}
        assert llama.name.startswith("mini-llama-")


def test_pythia_cache_key_is_unchanged_by_the_second_family():
    """The Pythia suite's key hashes the definition it had before the Llama series (built suites stay valid)."""
    import hashlib

    definition = {
        "suite": [{"hidden": m.hidden, "layers": m.layers, "heads": m.heads, "pretrain_lr": m.pretrain_lr}
                  for m in SM.SUITE],
        "suite_version": SC.SUITE_VERSION, "pairs_version": SD.PAIRS_VERSION, "python": SC._python_version(),
        "vocab": SM.VOCAB_SIZE, "seq_len": SP.SEQ_LEN, "batch_seqs": SP.BATCH_SEQS, "eval_seqs": SP.EVAL_SEQS,
        "seed": SP.SEED, "token_scale": 1.0,
        "tokens": [SP.TOKENS_PER_SQRT_PARAM, SP.MIN_TOKENS, SP.MAX_TOKENS, SP.CHARS_PER_TOKEN],
        "optim": [SP.BETAS, SP.EPS, SP.WEIGHT_DECAY, SP.GRAD_CLIP, SP.WARMUP_FRACTION, SP.FINAL_LR_FRACTION],
    }
    assert SC.suite_key() == hashlib.sha1(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:12]
    assert SC.suite_key(family="llama") != SC.suite_key() and SC.suite_dir(family="llama") != SC.suite_dir()
    with pytest.raises(SM.SuiteError, match="mini-llama-"):
        SC.build_suite(sizes=["0.1m"], family="llama")
    with pytest.raises(SM.SuiteError, match="pythia, llama"):
        SC.build_suite(family="gemma")


@pytest.mark.slow  # pretrains suite models / extracts the stdlib pairs
def test_llama_build_saves_a_loadable_pretrained_llama(tmp_path):
    import torch
    from transformers import AutoModel

    from core.models import model_shape

    smallest = SM.LLAMA_SUITE[0]
    (m,) = SC.build_suite(cache_dir=str(tmp_path), sizes=[smallest.name], progress=False, token_scale=TOKEN_SCALE,
                         family="llama")
    model, info = AutoModel.from_pretrained(m.path, output_loading_info=True)
    assert type(model).__name__ == "LlamaModel" and not info["missing_keys"] and not info["unexpected_keys"]
    n_model = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    assert m.family == "llama" and m.n_params == model_shape(m.path).n_params() == n_model == smallest.n_params
    assert not [name for name, _ in model.named_parameters() if "bias" in name]
    assert auto_lr(m.path) == pytest.approx(smallest.pretrain_lr / 10)
    assert m.pretrain_loss < m.initial_loss - 0.5  # it learned
    out = model(input_ids=torch.tensor([[5, 6, 7]])).last_hidden_state
    assert out.shape == (1, 3, m.hidden) and torch.isfinite(out).all()
    assert SC.list_suite(str(tmp_path), TOKEN_SCALE, family="llama") == [m]
    assert SC.list_suite(str(tmp_path), TOKEN_SCALE) == []  # the families live apart
