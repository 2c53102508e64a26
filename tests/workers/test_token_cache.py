"""The token cache (workers/token_cache.py): its key, its build with Ray Data (in-process, interrupted and resumed,
on a 2-node cluster), and its reader, which must yield the raw path's batches exactly."""
from __future__ import annotations

import dataclasses

import json
import os
import random
import secrets
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raykit import REPO, RayEnv, free_port, ray_start, wait_for
from support import make_pairs, write_jsonl
from workers import token_cache as tc
from orchestrator import cache_build
from workers.pair_batches import PairStream, collate
from workers.pooling import with_eos
from workers.pair_files import (DataError, DataStats, _shuffled, count_pairs, iter_pairs, load_eval_pairs,
                             load_tokenizer, make_encoder, pad_id_of)

SHARD_BYTES = 20_000  # several shards per file


def _dataset(d) -> str:
    """Three files: clean JSONL, JSONL with blank and unusable lines (< 1 %), and Parquet."""
    d.mkdir(exist_ok=True)
    write_jsonl(d / "a.jsonl", make_pairs(700, seed=11))
    lines = [json.dumps(p) for p in make_pairs(1200, seed=12)]
    lines[5], lines[900] = "{not json", json.dumps({"query": "q", "pos": []})
    lines.insert(300, "")
    write_jsonl(d / "b.jsonl", lines)
    rows = make_pairs(500, seed=13)
    pq.write_table(pa.table({"query": [r["query"] for r in rows], "pos": [r["pos"] for r in rows]}),
                   d / "c.parquet", row_group_size=100)
    return str(d)


@pytest.fixture(scope="module")
def local_ray():
    """One in-process local Ray for the module's builds (a build reuses an initialised Ray)."""
    import ray

    env = RayEnv()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=env.tmp,
             _node_ip_address="127.0.0.1", configure_logging=True, logging_level="WARNING")
    yield
    ray.shutdown()
    env.stop()


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model, local_ray, eval_file):
    root = tmp_path_factory.mktemp("cache")
    data = _dataset(root / "data")
    lines: list[str] = []
    uri, manifest = cache_build.ensure(str(root / "store"), train_uri=data, eval_uri=eval_file, tokenizer_path=tiny_model,
                              max_length=24, shard_bytes=SHARD_BYTES, log=lines.append)
    return {"uri": uri, "manifest": manifest, "data": data, "log": lines, "root": root}


def _same(a, b) -> None:
    assert a.index == b.index and a.real_tokens == b.real_tokens and a.padded_tokens == b.padded_tokens
    for k in ("q_ids", "q_mask", "d_ids", "d_mask"):
        x, y = getattr(a, k), getattr(b, k)
        assert x.dtype == y.dtype == torch.int64 and torch.equal(x, y), k


# --- the shuffle ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed,rows,buffer,chunk", [(0, [10], 16, 4), (1, [100, 3, 50], 7, 5),
                                                    (2, [1000, 0, 999], 16, 64), (3, [40000, 9000], 16384, 1 << 20),
                                                    (4, [5000], 1000, 333)])
def test_pass_order_is_records_shuffle(seed, rows, buffer, chunk):
    """The vectorised pass order equals pair_files.py's shuffle (file shuffle, then the streaming buffer) on the
    same seed, for any chunking."""
    rng = random.Random(seed)
    starts = np.concatenate([[0], np.cumsum(rows)])
    files = list(range(len(rows)))
    rng.shuffle(files)
    expected = list(_shuffled((i for f in files for i in range(starts[f], starts[f + 1])), rng, buffer))
    assert np.concatenate(list(tc.pass_order(seed, rows, buffer, chunk))).tolist() == expected


# --- the key -------------------------------------------------------------------------------------------------
def test_key_changes_with_data_tokenizer_and_max_length(tmp_path, tiny_model):
    data = _dataset(tmp_path / "data")
    tok = load_tokenizer(tiny_model)
    sha = tc.tokenizer_sha256(tiny_model, tok)
    key = tc.cache_key(tc.cache_inputs(data, None, sha, 24))
    assert key == tc.cache_key(tc.cache_inputs(data, None, tc.tokenizer_sha256(tiny_model, tok), 24))
    assert key != tc.cache_key(tc.cache_inputs(data, None, sha, 25))
    assert key != tc.cache_key(tc.cache_inputs(data, None, "0" * 64, 24))
    os.utime(os.path.join(data, "a.jsonl"), ns=(1, 1))  # same bytes, touched
    assert key != (touched := tc.cache_key(tc.cache_inputs(data, None, sha, 24)))
    with open(os.path.join(data, "a.jsonl"), "a") as f:
        f.write(json.dumps(make_pairs(1, seed=99)[0]) + "\n")
    assert touched != tc.cache_key(tc.cache_inputs(data, None, sha, 24))


# --- what the build holds -------------------------------------------------------------------------------------
@pytest.mark.slow  # starts Ray (the cache build)
def test_manifest_counts_what_the_raw_path_reads(built, tiny_model, eval_file):
    m, data = built["manifest"], built["data"]
    stats = DataStats()
    pairs = list(iter_pairs(data, stats=stats))
    encode = make_encoder(load_tokenizer(tiny_model), 24)
    train = m["splits"]["train"]
    assert train["pairs"] == len(pairs) == count_pairs(data) == 2398
    assert train["bad_lines"] == stats.bad_lines == 2 and train["lines"] == stats.lines_read
    assert train["first_bad"] == stats.first_bad
    assert train["real_tokens"] == sum(map(len, encode([p[0] for p in pairs]))) + sum(
        map(len, encode([p[1] for p in pairs])))
    assert len(train["shards"]) > 3 and m["dtype"] == "uint16" and m["pad_id"] == 0
    assert m["splits"]["eval"]["pairs"] == 64
    assert [ln for ln in built["log"] if "shard" in ln] and "built in" in built["log"][-1]
    # the shards hold the pairs in file order, tokenised
    rows = tc._Rows(os.path.join(built["uri"], "train"), train)
    batch = tc.collate_rows(rows, np.arange(len(pairs)), 0, 0, None, 24)
    ref = collate(encode([p[0] for p in pairs]), encode([p[1] for p in pairs]), 0, 0)
    _same(batch, ref)


@pytest.mark.slow  # starts Ray (the cache build)
def test_reuse_builds_nothing(built, tiny_model, eval_file):
    lines: list[str] = []
    uri, manifest = cache_build.ensure(str(built["root"] / "store"), train_uri=built["data"], eval_uri=eval_file,
                              tokenizer_path=tiny_model, max_length=24, shard_bytes=SHARD_BYTES, log=lines.append)
    assert uri == built["uri"] and manifest == built["manifest"] and lines == []


@pytest.mark.slow  # starts Ray (the cache build)
@pytest.mark.parametrize("batch_size,seed,epochs,buffer", [(64, 0, 1.0, None), (100, 3, 2.5, None),
                                                           (1000, 1, 0.6, None), (48, 2, 1.5, 50)])
def test_batches_equal_the_raw_path(built, tiny_model, batch_size, seed, epochs, buffer):
    """Every batch, over passes and fractions of passes; with the default buffer (larger than the data: a full
    shuffle) and a small one (the streaming shuffle proper)."""
    tok = load_tokenizer(tiny_model)
    raw = PairStream(built["data"], tok, batch_size=batch_size, max_length=24, seed=seed, max_epochs=epochs,
                     shuffle_buffer=buffer or tc.SHUFFLE_BUFFER)
    cached = tc.CachedPairs(built["uri"], batch_size, seed, epochs, shuffle_buffer=buffer)
    raw_batches, cached_batches = list(raw), list(cached)
    assert len(raw_batches) == len(cached_batches) > 0
    for a, b in zip(raw_batches, cached_batches):
        _same(a, b)
    assert cached.stats.epochs_completed == raw.stats.epochs_completed
    assert (cached.stats.pairs, cached.stats.real_tokens) == (raw.stats.pairs, raw.stats.real_tokens)
    assert cached.stats.bad_lines == raw.stats.bad_lines
    # a resume at batch k: the same batches from k on, no earlier batch built
    k = len(raw_batches) // 2 + 1
    resumed = list(tc.CachedPairs(built["uri"], batch_size, seed, epochs, skip_batches=k, shuffle_buffer=buffer))
    assert [b.index for b in resumed] == list(range(k, len(raw_batches)))
    for a, b in zip(raw_batches[k:], resumed):
        _same(a, b)


@pytest.mark.slow  # starts Ray (the cache build)
def test_resume_reads_no_earlier_shard(built, monkeypatch):
    """Seeking to a late batch reads only the shards its pairs come from (a streaming shuffle: a small buffer, so
    a batch's pairs come from a few neighbouring shards)."""
    read: list[str] = []
    real = tc._read_shard
    monkeypatch.setattr(tc, "_read_shard", lambda uri: read.append(uri) or real(uri))
    stream = tc.CachedPairs(built["uri"], 50, 0, 1.0, skip_batches=40, shuffle_buffer=20, prefetch=1)
    first = next(iter(stream))
    stream.close()
    assert first.index == 40 and 0 < len(set(read)) <= 6 < len(built["manifest"]["splits"]["train"]["shards"])


@pytest.mark.slow  # starts Ray (the cache build)
def test_last_pooling_appends_eos_as_the_raw_encoder(built, tiny_model):
    tok = load_tokenizer(tiny_model)
    eos = tok.eos_token_id
    encode = with_eos(make_encoder(tok, 24), eos, 24)
    pairs = list(iter_pairs(built["data"], seed=tc.epoch_seed(5, 0)))[:32]
    ref = collate(encode([p[0] for p in pairs]), encode([p[1] for p in pairs]), pad_id_of(tok), 0)
    got = next(iter(tc.CachedPairs(built["uri"], 32, 5, 1.0, pooling_eos=eos)))
    _same(got, ref)


@pytest.mark.slow  # starts Ray (the cache build)
def test_eval_batches_equal_the_raw_eval(built, tiny_model, eval_file):
    tok = load_tokenizer(tiny_model)
    encode, pad = make_encoder(tok, 24), pad_id_of(tok)
    pairs = load_eval_pairs(eval_file, 50)
    got = tc.eval_batches(built["uri"], limit=50, batch_size=16)
    assert [len(b) for b in got] == [16, 16, 16, 2]  # a last batch of 2 pairs is kept, of 1 dropped
    assert [len(b) for b in tc.eval_batches(built["uri"], limit=49, batch_size=16)] == [16, 16, 16]
    expected = [collate(encode([p[0] for p in pairs[i:i + 16]]), encode([p[1] for p in pairs[i:i + 16]]), pad,
                        i // 16) for i in range(0, 50, 16)]
    for a, b in zip(got, expected):
        _same(a, b)


@pytest.mark.slow  # starts Ray (the cache build)
def test_a_rejected_file_fails_the_build_as_the_raw_path(tmp_path, tiny_model, local_ray):
    lines = [json.dumps(p) for p in make_pairs(1500, seed=3)]
    for i in range(0, 40):  # 40 unusable lines in the first 1,000: rejected at line 1,000 (> 1 %)
        lines[i * 20 + 7] = "[1, 2]"
    data = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as raw:
        count_pairs(data)
    with pytest.raises(DataError) as cached:
        cache_build.ensure(str(tmp_path / "store"), train_uri=data, eval_uri=None, tokenizer_path=tiny_model, max_length=24,
                  shard_bytes=SHARD_BYTES, log=lambda line: None)
    assert str(cached.value) == str(raw.value)
    tokens = tmp_path / "store" / "_cache" / "tokens"
    assert not list(tokens.glob("*/manifest.json"))


# --- interrupted, and on a cluster: in subprocesses ----------------------------------------------------------
_CHILD = """
import json, sys
from workers import token_cache as tc
from orchestrator import cache_build
uri, manifest = cache_build.ensure(sys.argv[1], train_uri=sys.argv[2], eval_uri=None, tokenizer_path=sys.argv[3],
                          max_length=24, shard_bytes=int(sys.argv[4]))
print(json.dumps({"uri": uri, "torch": "torch" in sys.modules}))
"""


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), root)] = f.read()
    return out


def _child(env: RayEnv, store: str, data: str, model: str, **extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _CHILD, store, data, model, str(SHARD_BYTES)],
                            env={**env.env, **extra}, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


@pytest.mark.slow  # starts Ray (the cache build)
def test_interrupted_build_resumes_byte_identical(tmp_path, tiny_model, built):
    """SIGKILL the building process once its first shard appears; a rebuild keeps the shards written, builds the
    rest, and the cache equals, byte for byte, the one built in one go (the module's). Building imports no
    torch."""
    env = RayEnv()
    store = str(tmp_path / "store")
    try:
        data = built["data"]
        proc = _child(env, store, data, tiny_model, **{tc.DELAY_ENV: "1.5"})
        tokens = os.path.join(store, "_cache", "tokens")

        def shards():
            if not os.path.isdir(tokens):
                return []
            return [n for k in os.listdir(tokens) for n in os.listdir(os.path.join(tokens, k, "train"))
                    if n.endswith(".parquet")] if all(
                os.path.isdir(os.path.join(tokens, k, "train")) for k in os.listdir(tokens)) else []

        wait_for(shards, timeout_s=120, what="the first shard", alive=proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        env.stop()  # the build's Ray too
        key = os.listdir(tokens)[0]
        partial = len(shards())
        total = len(built["manifest"]["splits"]["train"]["shards"])
        assert 0 < partial < total and not os.path.exists(os.path.join(tokens, key, "manifest.json"))
        proc = _child(env, store, data, tiny_model)
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        assert f"{partial} of {total} shards already built" in err and not json.loads(out)["torch"]
        # the module's build had an eval split: compare the train shards, and the manifests' train split
        resumed, whole = _files(os.path.join(tokens, key)), _files(built["uri"])
        assert {k: v for k, v in resumed.items() if k.startswith("train/")} == \
            {k: v for k, v in whole.items() if k.startswith("train/")}
        assert json.loads(resumed["manifest.json"])["splits"]["train"] == built["manifest"]["splits"]["train"]
        assert not [k for k in resumed if ".tmp-" in k]
    finally:
        env.stop()


@pytest.mark.slow
def test_two_node_cluster_build_equals_in_process(tmp_path, tiny_model, built, ray_env):
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env = {**ray_env.env, **auth}
    port = free_port()
    ray_start(["--head", "--port", str(port), "--temp-dir", ray_env.tmp, "--include-dashboard=false",
               "--dashboard-port", str(free_port())], env)
    ray_start(["--address", f"127.0.0.1:{port}"], env)
    store = str(tmp_path / "store")
    proc = subprocess.run([sys.executable, "-c", _CHILD, store, built["data"], tiny_model, str(SHARD_BYTES)],
                          env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    uri = json.loads(proc.stdout.strip().splitlines()[-1])["uri"]
    got, whole = _files(uri), _files(built["uri"])
    assert {k: v for k, v in got.items() if k.startswith("train/")} == \
        {k: v for k, v in whole.items() if k.startswith("train/")}


# --- `repurpose prepare` ------------------------------------------------------------------------------------
@pytest.mark.slow  # starts Ray (the cache build)
def test_prepare_builds_then_reuses(tmp_path, tiny_model, pairs_file, eval_file, ray_env):
    """The grid's one cache (one tokenizer) built by the CLI on an embedded Ray, then reused with no Ray."""
    import yaml

    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"name": "prep", "models": [tiny_model], "methods": {"bias": {}},
                                    "budgets": [5.0e9], "data": {"train": pairs_file, "eval": eval_file},
                                    "train": {"batch_size": 16, "max_length": 24}}))
    store = str(tmp_path / "store")
    first = ray_env.run(["prepare", str(grid), "--storage", store, "--json"])
    assert first.returncode == 0, first.stderr
    (cache,) = json.loads(first.stdout)["caches"]
    assert cache["built"] and cache["pairs"] == 2000 and cache["models"] == [tiny_model]
    assert "shard 1/2" in first.stderr and "built in" in first.stderr  # one train shard, one eval shard
    again = ray_env.run(["prepare", str(grid), "--storage", store])
    assert again.returncode == 0 and again.stdout.startswith(f"{cache['uri']}  reused: 2,000 pairs"), again.stderr
    bad = ray_env.run(["prepare", str(tmp_path / "missing.yaml"), "--storage", store])
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # starts Ray (the cache build)
def test_a_trial_from_the_cache_equals_one_from_the_raw_data(built, tiny_model, eval_file):
    """The trial's data path (workers/steps.py train_stream / eval_batches): with ``token_cache`` set it reads the
    cache, and trains and evaluates exactly as from the raw files (same batches: same tokens, FLOP, losses)."""
    import torch

    from core.spec import TrialSpec
    from workers.trial import run_trial

    torch.set_num_threads(1)
    spec = TrialSpec(model=tiny_model, method="full", budget_flops=4e9, train_data=built["data"],
                     eval_data=eval_file, batch_size=8, max_length=24, precision="fp32", eval_pairs=24,
                     num_threads=1)
    raw = run_trial(spec)
    cached = run_trial(dataclasses.replace(spec, token_cache=built["uri"]))
    for key in ("tokens", "steps", "flops", "hardware_flops", "train_loss", "eval_loss", "ndcg_at_10"):
        assert cached[key] == raw[key], key
