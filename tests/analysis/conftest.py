"""Fixtures for the analysis tests: synthetic stores (storegen.py) and an S3 emulator (moto) on 127.0.0.1."""
from __future__ import annotations

import os
import socket
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # `import storegen` whatever pytest's import mode

import storegen  # noqa: E402


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on a free local port; yields its endpoint URL. Skips if moto[server] is missing."""
    server_mod = pytest.importorskip("moto.server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Credentials and endpoint in the environment, as pyarrow's S3FileSystem.from_uri reads them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    return s3_server


@pytest.fixture
def small_store(tmp_path):
    """Full fine-tuning only, 4 models x 3 budgets: enough for every fit, quick to fit."""
    trials = storegen.make_trials(slices={"full": (None,)}, models=tuple(storegen.PYTHIA)[:4],
                                  budgets=storegen.BUDGETS[:3], seed=3)
    return storegen.write_store(tmp_path, trials)
