"""The token cache with hard negatives (``train.negatives: {hard: k}``): its key (k in it only when set), and its
batches, which must be the raw path's (PairStream(hard_negatives=k)): the same pairs in the same order, the same
negatives rows, the same pairs skipped for fewer than k negatives and counted the same.

The build runs its shard tasks in this process (cache_build.run_tasks replaced): the Ray Data side is the one the
other cache tests cover, and these stay quick."""
from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator import cache_build
from support import make_pairs, write_jsonl
from workers import token_cache as tc
from workers.pair_batches import PairStream
from workers.pair_files import DataError, load_tokenizer, make_encoder
from workers.pooling import with_eos

K = 2
SHARD_BYTES = 8_000  # several shards per JSONL file


def _with_negatives(pairs: list[dict], seed: int) -> list[dict]:
    """0 to 4 negatives per pair, some of them unusable (empty, not a string): they do not count towards k."""
    rng = random.Random(seed)
    for i, p in enumerate(pairs):
        negs = [f"the {rng.choice(['lamp', 'river', 'stone'])} is not it {i} {j}" for j in range(rng.randint(0, 4))]
        if rng.random() < 0.2:
            negs.insert(rng.randint(0, len(negs)), rng.choice(["", "  ", 7, None]))
        p["neg"] = negs
    return pairs


def _usable_negatives(p: dict) -> int:
    return sum(isinstance(n, str) and bool(n.strip()) for n in p.get("neg") or [])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two JSONL files (one with a bad line and a pair without `neg`) and a Parquet file with a `neg` column; the
    pairs with fewer than K usable negatives counted by hand from the records written."""
    d = tmp_path_factory.mktemp("negdata")
    a = _with_negatives(make_pairs(300, seed=21), 1)
    b = _with_negatives(make_pairs(400, seed=22), 2)
    del b[10]["neg"]
    lines = [json.dumps(p) for p in b]
    lines.insert(50, "{not json")
    write_jsonl(d / "a.jsonl", a)
    write_jsonl(d / "b.jsonl", lines)
    c = _with_negatives(make_pairs(200, seed=23), 3)
    pq.write_table(pa.table({"query": [r["query"] for r in c], "pos": [r["pos"] for r in c],
                             "neg": [[n if isinstance(n, str) else "" for n in r["neg"]] for r in c]}),
                   d / "c.parquet", row_group_size=50)
    for r in c:  # as written: a non-string negative became ""
        r["neg"] = [n if isinstance(n, str) else "" for n in r["neg"]]
    short = sum(_usable_negatives(p) < K for p in a + b + c)
    return {"uri": str(d), "short": short, "pairs": len(a) + len(b) + len(c) - short, "lines": 901, "a": a}


def _build(storage: str, data_uri: str, model: str, eval_uri=None, k: int = K) -> tuple[str, dict]:
    return cache_build.ensure(storage, train_uri=data_uri, eval_uri=eval_uri, tokenizer_path=model, max_length=24,
                              shard_bytes=SHARD_BYTES, log=lambda line: None, hard_negatives=k)


@pytest.fixture(scope="module")
def built(tmp_path_factory, data, tiny_model, eval_file):
    patch = pytest.MonkeyPatch()
    patch.setattr(cache_build, "run_tasks", lambda tasks, kwargs, address=None: (tc.build_shard(t, **kwargs)
                                                                                  for t in tasks))
    root = tmp_path_factory.mktemp("negcache")
    try:
        uri, manifest = _build(str(root / "store"), data["uri"], tiny_model, eval_file)
        plain_uri, plain = _build(str(root / "store"), data["uri"], tiny_model, eval_file, k=0)
    finally:
        patch.undo()
    return {"uri": uri, "manifest": manifest, "plain_uri": plain_uri, "plain": plain}


def _same(a, b) -> None:
    assert a.index == b.index and a.real_tokens == b.real_tokens and a.padded_tokens == b.padded_tokens
    assert a.hard_negatives == b.hard_negatives == K
    for name in ("q_ids", "q_mask", "d_ids", "d_mask", "n_ids", "n_mask"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype == torch.int64 and torch.equal(x, y), name


def test_key_holds_k_only_when_set(tmp_path, data, tiny_model):
    tok = load_tokenizer(tiny_model)
    sha = tc.tokenizer_sha256(tiny_model, tok)
    plain = tc.cache_inputs(data["uri"], None, sha, 24)
    assert "hard_negatives" not in plain and plain == tc.cache_inputs(data["uri"], None, sha, 24, hard_negatives=0)
    keys = {tc.cache_key(tc.cache_inputs(data["uri"], None, sha, 24, hard_negatives=k)) for k in (0, 1, 2)}
    assert len(keys) == 3


def test_manifest_counts_the_pairs_kept_and_skipped(built, data):
    m, plain = built["manifest"], built["plain"]
    train = m["splits"]["train"]
    assert m["inputs"]["hard_negatives"] == K and train["hard_negatives"] == K
    assert (train["pairs"], train["short_negatives"], train["bad_lines"], train["lines"]) == \
        (data["pairs"], data["short"], 1, data["lines"])
    assert len(train["shards"]) > 3
    assert "hard_negatives" not in plain["inputs"] and "short_negatives" not in plain["splits"]["train"]
    assert plain["splits"]["train"]["pairs"] == data["pairs"] + data["short"]
    # eval has no negatives: the same rows as the plain cache's
    assert m["splits"]["eval"]["pairs"] == plain["splits"]["eval"]["pairs"] == 64
    assert "short_negatives" not in m["splits"]["eval"]
    table = pq.read_table(f"{built['uri']}/train/00000.parquet")
    assert table.column_names == ["q_ids", "d_ids", "n_ids"]
    assert {len(row) for row in table.column("n_ids").to_pylist()} == {K}
    assert pq.read_table(f"{built['plain_uri']}/train/00000.parquet").column_names == ["q_ids", "d_ids"]


@pytest.mark.parametrize("batch_size,seed,epochs,buffer,last", [(32, 0, 1.0, None, False), (50, 3, 2.5, 40, False),
                                                                (64, 1, 0.6, None, True)])
def test_batches_equal_the_raw_path(built, data, tiny_model, batch_size, seed, epochs, buffer, last):
    """Every batch (ids, masks, the negatives' rows), and the reading counters, over passes and fractions of
    passes; with last-token pooling's EOS appended to every text, negatives included."""
    tok = load_tokenizer(tiny_model)
    eos = tok.eos_token_id if last else None
    encode = with_eos(make_encoder(tok, 24), eos, 24) if last else None
    raw = PairStream(data["uri"], tok, batch_size=batch_size, max_length=24, seed=seed, max_epochs=epochs,
                     shuffle_buffer=buffer or tc.SHUFFLE_BUFFER, hard_negatives=K, encode=encode)
    cached = tc.CachedPairs(built["uri"], batch_size, seed, epochs, pooling_eos=eos, shuffle_buffer=buffer,
                            hard_negatives=K)
    raw_batches, cached_batches = list(raw), list(cached)
    assert len(raw_batches) == len(cached_batches) == int(epochs * data["pairs"]) // batch_size
    for a, b in zip(raw_batches, cached_batches):
        _same(a, b)
    for name in ("pairs", "real_tokens", "padded_tokens", "epochs_completed"):
        assert getattr(cached.stats, name) == getattr(raw.stats, name), name
    # every pass touched is counted whole (a fraction-only run reads one pass more to size it); the raw reader
    # reads a whole pass where its buffer holds all the pairs, and stops partway through a last, partial pass
    # with a small buffer: there its reading counters are less
    passes = int(epochs) + (epochs != int(epochs)) + (epochs < 1)
    assert cached.stats.short_negatives == passes * data["short"] and cached.stats.bad_lines == passes
    if buffer is None:
        for name in ("bad_lines", "lines_read", "short_negatives"):
            assert getattr(cached.stats, name) == getattr(raw.stats, name), name
    # a resume at batch k: the same batches from k on
    k = len(raw_batches) // 2 + 1
    resumed = list(tc.CachedPairs(built["uri"], batch_size, seed, epochs, skip_batches=k, pooling_eos=eos,
                                  shuffle_buffer=buffer))
    assert [b.index for b in resumed] == list(range(k, len(raw_batches)))
    for a, b in zip(raw_batches[k:], resumed):
        _same(a, b)


def test_eval_batches_have_no_negatives(built):
    got, plain = (tc.eval_batches(u, limit=40, batch_size=16) for u in (built["uri"], built["plain_uri"]))
    assert [len(b) for b in got] == [16, 16, 8]
    for a, b in zip(got, plain):
        assert a.n_ids is None and torch.equal(a.q_ids, b.q_ids) and torch.equal(a.d_ids, b.d_ids)


def test_a_trial_with_another_k_refuses_the_cache(built):
    with pytest.raises(DataError, match="token cache of 2 hard negatives per pair, the trial takes 1"):
        tc.CachedPairs(built["uri"], 16, hard_negatives=1)
    with pytest.raises(DataError, match="token cache of 0 hard negatives per pair, the trial takes 2"):
        tc.CachedPairs(built["plain_uri"], 16, hard_negatives=K)


def test_a_hard_negative_trial_streams_from_its_cache(built, data, tiny_model):
    """workers/steps.py ``train_stream``: a trial with a token cache and k negatives reads the cache (its batches
    carry the k negatives), not the raw data."""
    from core.spec import TrialSpec
    from workers.steps import train_stream

    spec = TrialSpec(tiny_model, "full", 1e9, data["uri"], batch_size=16, max_length=24, hard_negatives=K,
                     token_cache=built["uri"])
    stream = train_stream(spec, load_tokenizer(tiny_model))
    assert isinstance(stream, tc.CachedPairs)
    first = next(iter(stream))
    stream.close()
    assert first.hard_negatives == K and first.n_ids.shape[0] == 16 * K


def test_the_planners_tokens_per_pair_count_the_negatives(built, data, tiny_model):
    """pair_files.measure_tokens_per_pair (the planner's): the query, the positive and the first K usable negatives
    of each pair that has K, counted here text by text from the records written; over the whole data it is the
    cache's real tokens per pair."""
    from workers.pair_files import measure_tokens_per_pair

    tok = load_tokenizer(tiny_model)
    count = lambda text: len(tok(text, add_special_tokens=False, truncation=True, max_length=24)["input_ids"])
    kept = [p for p in data["a"] if _usable_negatives(p) >= K]
    negs = [[n for n in p["neg"] if isinstance(n, str) and n.strip()][:K] for p in kept]
    hand = sum(count(p["query"]) + count(p["pos"][0]) + sum(map(count, n)) for p, n in zip(kept, negs)) / len(kept)
    a_file = f"{data['uri']}/a.jsonl"
    assert measure_tokens_per_pair(a_file, tok, 24, sample=10_000, hard_negatives=K) == pytest.approx(hand, rel=1e-12)
    assert measure_tokens_per_pair(a_file, tok, 24, sample=10_000) < hand  # without them: fewer
    train = built["manifest"]["splits"]["train"]
    assert measure_tokens_per_pair(data["uri"], tok, 24, sample=10_000, hard_negatives=K) == \
        pytest.approx(train["real_tokens"] / train["pairs"], rel=1e-12)
