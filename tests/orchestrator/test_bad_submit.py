"""A submit that cannot run stops before Ray and before the store: exit 2, one line, nothing written. Checked in a
fresh interpreter, which also reports whether `ray` was ever imported."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBE = ("import sys\nfrom orchestrator import cli\nrc = cli.main(sys.argv[1:])\n"
         "print('RESULT', rc, 'ray' in sys.modules, 'torch' in sys.modules)")


def submit(tmp_path, grid: dict, env: dict | None = None):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    store = tmp_path / "store"
    proc = subprocess.run([sys.executable, "-c", PROBE, "submit", str(path), "--storage", str(store)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})
    rc, ray, torch = proc.stdout.split("RESULT")[1].split()
    return int(rc), ray == "True", torch == "True", proc.stderr, store


def model_without_tokenizer(tmp_path) -> str:
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "gpt_neox", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 256, "vocab_size": 512}))
    return str(d)


def test_unreachable_remote_data(tmp_path):
    grid = {"name": "bad", "models": [model_without_tokenizer(tmp_path)], "methods": {"full": {}},
            "budgets": [1e9], "train": {"lr": 1e-3}, "data": {"train": "s3://bucket/train.jsonl"}}
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}  # discard port: nothing listens
    rc, ray, torch, err, store = submit(tmp_path, grid, env)
    assert rc == 2 and not ray and not torch
    assert err.count("\n") == 1 and err.startswith("s3://bucket/train.jsonl: ") and "Traceback" not in err
    assert not store.exists()


def test_model_without_a_tokenizer(tmp_path, pairs_file):
    model = model_without_tokenizer(tmp_path)
    grid = {"name": "bad", "models": [model], "methods": {"full": {}}, "budgets": [1e9],
            "train": {"lr": 1e-3}, "data": {"train": str(pairs_file)}}
    rc, ray, torch, err, store = submit(tmp_path, grid)
    assert rc == 2 and not ray and not torch
    assert err.count("\n") == 1 and err.startswith(f"{model}: cannot load its tokenizer") and "Traceback" not in err
    assert not store.exists()
