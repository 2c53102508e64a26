"""Shared fixtures: a tiny GPT-NeoX checkpoint with a locally trained byte-level BPE tokenizer, and
BGE-format pair files (helpers in tests/support.py)."""
from __future__ import annotations

import shutil

import pytest

from raykit import RayEnv
from support import build_tiny_model, build_tokenizer, make_pairs, write_jsonl


@pytest.fixture
def ray_env():
    """A RayEnv (tests/raykit.py); teardown stops every process started under it and removes its temp dir."""
    env = RayEnv()
    yield env
    env.stop()
    shutil.rmtree(env.tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    write_jsonl(d / "eval.jsonl", make_pairs(64, seed=1))
    return write_jsonl(d / "train.jsonl", make_pairs(2000, seed=0))


@pytest.fixture(scope="session")
def eval_file(pairs_file):
    return str(pairs_file).replace("train.jsonl", "eval.jsonl")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A 4-layer, 64-wide GPT-NeoX with a 512-token BPE tokenizer, saved and reloaded from disk."""
    d = tmp_path_factory.mktemp("tiny-neox")
    texts = [p["query"] + " " + p["pos"][0] for p in make_pairs(3000, seed=7)]
    build_tokenizer(d, texts)
    return build_tiny_model(str(d))
