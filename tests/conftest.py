"""Shared fixtures: a tiny GPT-NeoX checkpoint with a locally trained byte-level BPE tokenizer, BGE-format pair
files, and S3 (one moto server for the session; helpers in tests/support.py)."""
from __future__ import annotations

import shutil

import pytest

from raykit import RayEnv
from support import MotoS3, build_tiny_model, build_tokenizer, make_pairs, write_jsonl


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


@pytest.fixture(scope="session")
def moto_server():
    """The session's one moto S3 server (tests/support.py MotoS3); tests take ``moto_s3``, which empties it."""
    pytest.importorskip("moto.server")
    pytest.importorskip("boto3")
    server = MotoS3()
    yield server
    server.stop()


@pytest.fixture
def moto_s3(moto_server, monkeypatch):
    """S3 for one test: the session's moto server emptied, with one bucket ``bucket``, and this process's
    environment pointing at it (``moto_s3.env()`` is the same for a subprocess)."""
    moto_server.reset("bucket")
    for k, v in moto_server.env().items():
        monkeypatch.setenv(k, v)
    return moto_server
