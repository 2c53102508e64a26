"""workers/pair_files.py: the reading and token counting the driver plans with, without torch, counting exactly
what the trial's tokenizer counts."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support import build_tokenizer, make_pairs, write_jsonl

from workers.pair_files import load_tokenizer, make_encoder, measure_tokens_per_pair, pad_id_of

HEAVY = ("torch", "deepspeed", "transformers.modeling_utils")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(d, [p["query"] + " " + p["pos"][0] for p in make_pairs(3000, seed=7)])
    return str(d)


def test_planner_tokenizer_counts_what_the_trials_counts(tokenizer_dir, pairs_file):
    # the trial: AutoTokenizer, pad = EOS (workers/trial.py _load); the planner: load_tokenizer, no torch
    from transformers import AutoTokenizer

    trial = AutoTokenizer.from_pretrained(tokenizer_dir)
    trial.pad_token = trial.eos_token
    planner = load_tokenizer(tokenizer_dir)
    texts = [t for p in make_pairs(500, seed=3) for t in (p["query"], p["pos"][0])] + ["", " spaced  out ", "é ✓"]
    for max_length in (4, 16, 75):
        assert make_encoder(planner, max_length)(texts) == make_encoder(trial, max_length)(texts)
        assert (measure_tokens_per_pair(pairs_file, planner, max_length, sample=300)
                == measure_tokens_per_pair(pairs_file, trial, max_length, sample=300))
    # and the HF call itself agrees (no special tokens, truncated): what the trial's slow path would do
    assert make_encoder(planner, 16)(texts[:50]) == trial(texts[:50], add_special_tokens=False, truncation=True,
                                                          max_length=16)["input_ids"]
    assert pad_id_of(planner) == pad_id_of(trial) == 0  # no pad token: EOS


def test_reading_and_counting_import_no_torch(tokenizer_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", make_pairs(50, seed=1))
    code = f"""
import json, sys
from workers.pair_files import count_pairs, load_eval_pairs, load_tokenizer, measure_tokens_per_pair
tok = load_tokenizer({tokenizer_dir!r})
tpp = measure_tokens_per_pair({data!r}, tok, 16, sample=20)
print(json.dumps([count_pairs({data!r}), len(load_eval_pairs({data!r}, 7)), tpp,
                  sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed')
                         or m == 'transformers.modeling_utils')]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    n, n_eval, tpp, heavy = json.loads(out.strip().splitlines()[-1])
    assert (n, n_eval, heavy) == (50, 7, []) and 2 < tpp <= 32


def test_a_uri_with_credentials_is_refused_before_any_io():
    # fsio.resolve, the project's one URI -> filesystem function (the reader's own lacked this check once)
    from core.uris import StorageError
    from workers.pair_files import count_pairs, iter_pairs

    for uri in ("s3://AKIAEXAMPLE:s3cr3t@bucket/train.jsonl", "s3://bucket/train.jsonl?secret_key=s3cr3t"):
        with pytest.raises(StorageError, match=r"credentials in a URI are refused") as e:
            count_pairs(uri)
        assert "s3cr3t" not in str(e.value) and "***" in str(e.value)
    with pytest.raises(StorageError) as e:
        list(iter_pairs("gs://user:s3cr3t@bucket/x.jsonl"))
    assert "s3cr3t" not in str(e.value)
