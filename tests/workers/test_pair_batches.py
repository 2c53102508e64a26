"""workers/pair_batches.py (and the reading it re-exports from workers/pair_files.py) on real files in tmp_path: formats,
shuffling, random batches (the default) and length buckets (the opt-in), resumption, epochs, bad lines, the
background thread and an s3:// source served by moto."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from scipy.stats import spearmanr
from support import build_tokenizer, make_pairs, write_jsonl

from workers.pair_batches import Batch, PairStream
from workers.pair_files import DataError, DataStats, count_pairs, iter_pairs, load_eval_pairs, measure_tokens_per_pair


class CharTokenizer:
    """One token per character (its code point), so lengths can be checked by hand. No pad token: EOS (0)
    pads. Exercises the slow-tokenizer path of make_encoder."""
    pad_token_id = None
    eos_token_id = 0

    def __call__(self, texts, *, add_special_tokens, truncation, max_length, return_attention_mask):
        assert not add_special_tokens and truncation
        return {"input_ids": [[ord(c) for c in t][:max_length] for t in texts]}


class BoomTokenizer(CharTokenizer):
    def __call__(self, texts, **kw):
        raise RuntimeError("boom in the tokenizer")


def rows(pairs) -> list[tuple[str, str]]:
    return [(p["query"], p["pos"][0]) for p in pairs]


def write_parquet(path, pairs) -> str:
    pq.write_table(pa.table({"query": [p["query"] for p in pairs], "pos": [p["pos"] for p in pairs],
                             "neg": [p.get("neg", []) for p in pairs]}), path, row_group_size=300)
    return str(path)


def simple(n: int, prefix: str = "q") -> list[dict]:
    """Pairs whose text is their number, for counting by hand."""
    return [{"query": f"{prefix}{i}", "pos": [f"d{i}"], "neg": []} for i in range(n)]


def collect(stream) -> list[Batch]:
    with stream:
        return list(stream)


def same_batches(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(
        x.index == y.index and all(torch.equal(getattr(x, f), getattr(y, f)) for f in ("q_ids", "q_mask", "d_ids",
                                                                                        "d_mask"))
        for x, y in zip(a, b))


def decode(ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    return ["".join(map(chr, r[m.bool()].tolist())) for r, m in zip(ids, mask)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """tiny_model's tokenizer, without building the model (0.1 s instead of 5 s)."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    build_tokenizer(d, [p["query"] + " " + p["pos"][0] for p in make_pairs(3000, seed=7)])
    tok = AutoTokenizer.from_pretrained(d)
    tok.pad_token = tok.eos_token  # as the worker does
    return tok


# ---------------------------------------------------------------------------------------------- formats


def test_jsonl_parquet_gzip_give_the_same_pairs(tmp_path):
    pairs = make_pairs(700, seed=3)
    j = write_jsonl(tmp_path / "a.jsonl", pairs)
    p = write_parquet(tmp_path / "a.parquet", pairs)
    g = tmp_path / "a.jsonl.gz"
    g.write_bytes(gzip.compress(open(j, "rb").read()))
    assert list(iter_pairs(j)) == list(iter_pairs(p)) == list(iter_pairs(str(g))) == rows(pairs)
    shuffled = list(iter_pairs(j, seed=5, shuffle_buffer=100))
    assert shuffled == list(iter_pairs(p, seed=5, shuffle_buffer=100))
    assert shuffled != rows(pairs) and sorted(shuffled) == sorted(rows(pairs))
    assert count_pairs(p) == 700


def test_glob_and_directory_in_sorted_file_order(tmp_path, monkeypatch):
    a, b = simple(5, "a"), simple(3, "b")
    write_jsonl(tmp_path / "part-1.jsonl", b)
    write_jsonl(tmp_path / "part-0.jsonl", a)
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "part-2.jsonl", simple(2, "c"))  # * does not cross '/'
    (tmp_path / "README.md").write_text("not data")
    assert list(iter_pairs(str(tmp_path / "*.jsonl"))) == rows(a) + rows(b)
    assert list(iter_pairs(tmp_path)) == rows(a) + rows(b)  # a directory: its data files
    assert count_pairs(str(tmp_path / "*" / "*.jsonl")) == 2
    monkeypatch.chdir(tmp_path)
    assert count_pairs("part-*.jsonl") == 8  # relative globs too


def test_eval_pairs_and_measure(tmp_path):
    f = write_jsonl(tmp_path / "e.jsonl", [{"query": "ab", "pos": ["cdef", "x"]}, "not json"] + simple(300))
    assert load_eval_pairs(f, 3) == [("ab", "cdef"), ("q0", "d0"), ("q1", "d1")]
    assert len(load_eval_pairs(f, 10_000)) == 301
    # chars, truncated at 3: (2 + 3) + (2 + 2) + (2 + 2) = 13 tokens over 3 pairs
    assert measure_tokens_per_pair(f, CharTokenizer(), max_length=3, sample=3) == pytest.approx(13 / 3)


# ---------------------------------------------------------------------------------------------- batches


def test_padding_masks_truncation_and_buckets_by_hand(tmp_path):
    # lengths (q, d): a (1, 1), bbbbbbb (7→5, 5), c (1, 1), ddddd (5, 5); shuffle_buffer=1 keeps file order
    f = write_jsonl(tmp_path / "t.jsonl", [{"query": "a", "pos": ["A"]}, {"query": "bbbbbbb", "pos": ["BBBBB"]},
                                            {"query": "c", "pos": ["C"]}, {"query": "ddddd", "pos": ["DDDDDDDD"]}])
    kw = dict(batch_size=2, max_length=5, shuffle_buffer=1)
    plain = PairStream(f, CharTokenizer(), **kw)  # random batches: the stream's pairs as they come
    batches = collect(plain)
    assert [decode(b.q_ids, b.q_mask) for b in batches] == [["a", "bbbbb"], ["c", "ddddd"]]  # truncated to 5
    b0 = batches[0]
    assert b0.q_ids.tolist() == [[97, 0, 0, 0, 0], [98] * 5]  # right padding with EOS (0)
    assert b0.q_mask.tolist() == [[1, 0, 0, 0, 0], [1] * 5]
    assert b0.d_mask.tolist() == [[1, 0, 0, 0, 0], [1] * 5]
    assert (b0.real_tokens, b0.padded_tokens) == (12, 20)
    # random batches: 2 batches × (10 + 10) padded, 2 × 12 real -> 16/40 padding
    assert (plain.stats.real_tokens, plain.stats.padded_tokens) == (24, 40)
    assert plain.stats.padding_fraction == pytest.approx(0.4)
    assert (plain.stats.pairs, plain.stats.batches, plain.stats.epochs_completed) == (4, 2, 1)

    bucketed = PairStream(f, CharTokenizer(), batching="length_buckets", bucket_batches=2, **kw)
    got = sorted((decode(b.q_ids, b.q_mask) for b in collect(bucketed)))
    assert got == [["a", "c"], ["bbbbb", "ddddd"]]  # sorted by length: no padding at all
    assert (bucketed.stats.real_tokens, bucketed.stats.padded_tokens) == (24, 24)
    assert bucketed.stats.padding_fraction == 0.0

    part = b0.take(1)  # re-trimmed to the longest kept pair
    assert part.q_ids.tolist() == [[97]] and part.d_ids.tolist() == [[65]]
    assert (part.index, part.real_tokens, part.padded_tokens, len(part)) == (0, 2, 2, 1)


def test_real_tokenizer_truncation_and_padding(pairs_file, tokenizer):
    stream = PairStream(pairs_file, tokenizer, batch_size=64, max_length=12, seed=1)
    batches = collect(stream)
    assert len(batches) == 2000 // 64 and [b.index for b in batches] == list(range(31))
    expect = {tuple(ids) for ids in tokenizer([q for q, _ in iter_pairs(pairs_file)], add_special_tokens=False,
                                              truncation=True, max_length=12)["input_ids"]}
    eos = tokenizer.eos_token_id
    for b in batches:
        assert b.q_ids.shape[1] <= 12 and b.d_ids.shape[1] <= 12 and b.d_mask.sum(1).max() == 12  # docs truncated
        for ids, mask in ((b.q_ids, b.q_mask), (b.d_ids, b.d_mask)):
            lens = mask.sum(1)
            assert torch.equal(mask, (torch.arange(mask.shape[1]) < lens[:, None]).long())  # right padding
            assert (ids[mask == 0] == eos).all() and lens.max() == ids.shape[1]  # padded to the longest
        assert b.real_tokens == int(b.q_mask.sum() + b.d_mask.sum())
        assert b.padded_tokens == b.q_ids.numel() + b.d_ids.numel()
        assert {tuple(r[m.bool()].tolist()) for r, m in zip(b.q_ids, b.q_mask)} <= expect
    assert stream.stats.pairs == 31 * 64 and stream.stats.epochs_completed == 1


def test_length_buckets_cut_padding(pairs_file, tokenizer):
    kw = dict(batch_size=32, max_length=75, seed=0, max_epochs=0.5)
    plain, bucketed = (PairStream(pairs_file, tokenizer, batching=b, **kw) for b in ("random", "length_buckets"))
    collect(plain), collect(bucketed)
    assert plain.stats.real_tokens == bucketed.stats.real_tokens  # the same pairs
    assert bucketed.stats.padding_fraction < plain.stats.padding_fraction / 2


def test_same_seed_same_batches_other_seed_different(pairs_file, tokenizer):
    kw = dict(batch_size=50, max_length=20, max_epochs=0.5)
    a, b = (collect(PairStream(pairs_file, tokenizer, seed=7, **kw)) for _ in range(2))
    c = collect(PairStream(pairs_file, tokenizer, seed=8, **kw))
    assert len(a) == 20 and same_batches(a, b)
    assert not same_batches(a, c)


@pytest.mark.parametrize("batching", ["random", "length_buckets"])
def test_skip_batches_resumes_the_same_sequence(pairs_file, tokenizer, batching):
    kw = dict(batch_size=40, max_length=16, seed=3, batching=batching, bucket_batches=4, max_epochs=1.5)
    full = collect(PairStream(pairs_file, tokenizer, **kw))
    assert len(full) == 3000 // 40
    for k in (1, 4, 37, 75):  # inside a pool, at a pool edge, past an epoch, at the end
        rest = collect(stream := PairStream(pairs_file, tokenizer, skip_batches=k, **kw))
        assert same_batches(rest, full[k:]) and stream.stats.batches == 75 - k


# ---------------------------------------------------------------------------------------------- epochs


@pytest.mark.parametrize("epochs, n_batches, done", [(2.0, 41, 2), (1.0, 20, 1), (0.5, 10, 0), (1.5, 30, 1)])
def test_max_epochs(tmp_path, epochs, n_batches, done):
    # 205 pairs, batches of 10: whole passes run back to back and only the very last partial batch is
    # dropped (2 × 205 = 410 → 41); a fraction f of a pass is ⌊f·205⌋ pairs (0.5 → 102 → 10 batches).
    f = write_jsonl(tmp_path / "e.jsonl", simple(205))
    stream = PairStream(f, CharTokenizer(), batch_size=10, max_length=8, max_epochs=epochs)
    batches = collect(stream)
    assert len(batches) == n_batches
    assert (stream.stats.pairs, stream.stats.epochs_completed) == (10 * n_batches, done)
    queries = [q for b in batches for q in decode(b.q_ids, b.q_mask)]
    if epochs == 2.0:
        assert sorted(queries[:200]) != sorted(queries[200:400])  # batch 20 holds both passes' edges ...
        assert all(queries.count(f"q{i}") <= 2 for i in range(205))  # ... but no pair appears more than twice
        assert len(set(queries)) >= 200
    elif epochs <= 1:
        assert len(set(queries)) == len(queries)  # within a pass every pair once
    else:
        assert all(queries.count(f"q{i}") <= 2 for i in range(205)) and len(set(queries)) == 205


def test_epochs_are_shuffled_differently(tmp_path):
    f = write_jsonl(tmp_path / "e.jsonl", simple(100))
    batches = collect(PairStream(f, CharTokenizer(), batch_size=10, max_length=8, max_epochs=2))
    first = [q for b in batches[:10] for q in decode(b.q_ids, b.q_mask)]
    second = [q for b in batches[10:] for q in decode(b.q_ids, b.q_mask)]
    assert sorted(first) == sorted(second) == sorted(f"q{i}" for i in range(100)) and first != second


def test_too_little_data_for_one_batch(tmp_path):
    f = write_jsonl(tmp_path / "small.jsonl", simple(5))
    with pytest.raises(DataError, match="5 usable pairs over 1 epochs do not fill one batch of 8"):
        collect(PairStream(f, CharTokenizer(), batch_size=8, max_length=8))


# ---------------------------------------------------------------------------------------------- bad data

BAD = [("{not json", "invalid JSON"), ("[1, 2]", "not a JSON object"), ('{"pos": ["d"]}', "query missing"),
       ('{"query": "", "pos": ["d"]}', "query empty"), ('{"query": 3, "pos": ["d"]}', "query not a string"),
       ('{"query": "q"}', "pos missing"), ('{"query": "q", "pos": []}', "pos empty"),
       ('{"query": "q", "pos": "d"}', "pos not a list"), ('{"query": "q", "pos": [""]}', r"pos\[0\] empty"),
       ('{"query": "q", "pos": [null]}', r"pos\[0\] not a string"), (b"\xff\xfe", "invalid JSON")]


@pytest.mark.parametrize("line, reason", BAD)
def test_each_kind_of_bad_line_is_skipped_and_counted(tmp_path, line, reason):
    path = tmp_path / "b.jsonl"
    good = [json.dumps(p).encode() for p in simple(150)]
    path.write_bytes(b"\n".join(good[:20] + [line if isinstance(line, bytes) else line.encode()] + good[20:]))
    stats = DataStats()
    assert len(list(iter_pairs(str(path), stats=stats))) == 150  # 1 of 151: below 1 %
    assert (stats.bad_lines, stats.lines_read, stats.pairs_read) == (1, 151, 150)
    assert stats.first_bad.startswith(f"{path} line 21: ") and re.search(reason, stats.first_bad)


def test_blank_lines_and_missing_final_newline_are_fine(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text('{"query": "a", "pos": ["b"]}\n\n  \n{"query": "c", "pos": ["d"]}')
    assert list(iter_pairs(str(path))) == [("a", "b"), ("c", "d")]


def test_bad_lines_below_one_percent_in_a_stream(tmp_path, tokenizer):
    lines = [json.dumps(p) for p in make_pairs(2000, seed=2)]
    for i in range(10, 2000, 200):  # 10 bad of 2010: 0.5 %, and at most 5 in each 1000
        lines.insert(i, "{oops")
    f = write_jsonl(tmp_path / "t.jsonl", lines)
    stream = PairStream(f, tokenizer, batch_size=100, max_length=16)
    assert len(collect(stream)) == 20
    assert (stream.stats.bad_lines, stream.stats.lines_read) == (10, 2010)


def test_above_one_percent_raises_naming_the_file(tmp_path, monkeypatch):
    lines = [json.dumps(p) for p in simple(3000)]
    for i in (11, 30, 50, 70, 90, 110, 130, 150, 170, 190, 210):  # 11 bad in the first 1000 lines: 1.1 %
        lines.insert(i, '{"query": "q", "pos": []}')
    monkeypatch.chdir(tmp_path)
    write_jsonl("train.jsonl", lines)
    with pytest.raises(DataError) as e:  # raised at line 1000 although the whole file is only 0.37 % bad
        count_pairs("train.jsonl")
    assert str(e.value) == "train.jsonl: 11 of 1000 lines unusable (> 1%), first at line 12: pos empty"


def test_small_file_checked_at_its_end(tmp_path):
    f = write_jsonl(tmp_path / "s.jsonl", simple(98) + ["{x", "{y"])  # 2 of 100: checked at end of file
    with pytest.raises(DataError, match=r"s\.jsonl: 2 of 100 lines unusable \(> 1%\), first at line 99: invalid"):
        load_eval_pairs(f, 1000)


def test_all_bad_empty_missing_and_unsupported(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", ["nope"] * 5)
    with pytest.raises(DataError, match=r"bad\.jsonl: 5 of 5 lines unusable"):
        count_pairs(bad)
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match=r"empty\.jsonl: no usable pairs \(empty\)"):
        count_pairs(empty)
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        PairStream(str(tmp_path / "missing.jsonl"), CharTokenizer(), batch_size=2, max_length=4)
    with pytest.raises(DataError, match=r"nothing-\*\.jsonl: no file matches"):
        count_pairs(str(tmp_path / "nothing-*.jsonl"))
    (tmp_path / "pairs.csv").write_text("query,pos\n")
    with pytest.raises(DataError, match=r"pairs\.csv: unsupported file type"):
        count_pairs(str(tmp_path / "pairs.csv"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"broken\.parquet: cannot read"):
        count_pairs(str(tmp_path / "broken.parquet"))
    assert issubclass(DataError, ValueError)


def test_parquet_nulls_counted_and_missing_column(tmp_path):
    table = pa.table({"query": ["a", None, "c", ""] + [f"q{i}" for i in range(400)],
                      "pos": [["b"], ["x"], None, ["y"]] + [[f"d{i}"] for i in range(400)]})
    pq.write_table(table, tmp_path / "n.parquet")
    stats = DataStats()
    assert list(iter_pairs(str(tmp_path / "n.parquet"), stats=stats))[:2] == [("a", "b"), ("q0", "d0")]
    assert stats.bad_lines == 3 and stats.first_bad.endswith("n.parquet row 2: query missing or null")
    pq.write_table(pa.table({"query": ["a"], "positive": ["b"]}), tmp_path / "m.parquet")
    with pytest.raises(DataError, match=r"m\.parquet: no column pos \(has: query, positive\)"):
        count_pairs(str(tmp_path / "m.parquet"))


# ---------------------------------------------------------------------------------------------- the thread


def data_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("PairStream-") and t.is_alive()]


def test_thread_exceptions_surface_in_the_consumer(tmp_path, pairs_file):
    with pytest.raises(RuntimeError, match="boom in the tokenizer"):
        collect(PairStream(pairs_file, BoomTokenizer(), batch_size=8, max_length=8))
    lines = [json.dumps(p) for p in simple(1500)] + ["{bad"] * 20  # fine for 1000 lines, bad at the end
    f = write_jsonl(tmp_path / "late.jsonl", lines)
    stream = PairStream(f, CharTokenizer(), batch_size=10, max_length=8, shuffle_buffer=10)
    got = []
    with pytest.raises(DataError, match=r"late\.jsonl: 20 of 1520 lines unusable"):
        for b in stream:
            got.append(b)
    assert len(got) > 0  # batches flowed before the reader reached the bad tail
    assert not data_threads()


def test_early_close_stops_the_thread(pairs_file, tokenizer):
    stream = PairStream(pairs_file, tokenizer, batch_size=16, max_length=16, max_epochs=50, prefetch=2)
    for b in stream:  # the generator closes when the loop breaks
        assert b.index == 0
        break
    assert not data_threads() and stream._thread is None
    it = iter(PairStream(pairs_file, tokenizer, batch_size=16, max_length=16, max_epochs=50))
    next(it)
    it.close()
    assert not data_threads()
    with PairStream(pairs_file, tokenizer, batch_size=16, max_length=16, max_epochs=50) as s:
        first = next(iter(s))
    assert not data_threads() and first.index == 0
    again = next(iter(s))  # a closed stream can be iterated again, from the start
    s.close()
    assert same_batches([first], [again]) and not data_threads()


# ---------------------------------------------------------------------------------------------- s3 (moto)


def test_s3_uri_reads_the_same_pairs(moto_s3, pairs_file, tmp_path, tokenizer):
    s3 = moto_s3.client()
    raw = open(pairs_file, "rb").read()
    for key, body in (("d/train-0.jsonl", raw), ("d/train-1.jsonl.gz", gzip.compress(raw)),
                      ("p/train.parquet", open(write_parquet(tmp_path / "t.parquet", make_pairs(2000)), "rb").read())):
        s3.put_object(Bucket="bucket", Key=key, Body=body)
    local = list(iter_pairs(pairs_file))
    assert list(iter_pairs("s3://bucket/d/*.jsonl*")) == local + local  # glob, .gz, AWS_ENDPOINT_URL_S3
    assert list(iter_pairs("s3://bucket/p/train.parquet")) == local
    os.environ.pop("AWS_ENDPOINT_URL_S3")
    uri = f"s3://bucket/d/train-0.jsonl?endpoint_override={moto_s3.endpoint}"  # or the endpoint in the URI
    kw = dict(batch_size=64, max_length=16, seed=4, max_epochs=0.5)
    assert same_batches(collect(PairStream(uri, tokenizer, **kw)), collect(PairStream(pairs_file, tokenizer, **kw)))
    with pytest.raises(DataError, match=r"s3://bucket/d/none\.jsonl: no such file"):
        count_pairs(f"s3://bucket/d/none.jsonl?endpoint_override={moto_s3.endpoint}")


# ---------------------------------------------------------------------------------------------- random batches
# The paper's batches are a random sample of the data, padded to their longest (docs/study.md "Training recipe");
# length buckets (the opt-in) are not, and cost ~0.1 nats of eval loss.


def reference_sequence(files: list[str], seed: int, epochs: int, buffer: int) -> list[tuple[str, str]]:
    """The pair sequence written again from its definition (workers/pair_files.py, "The shuffle of one pass"), not
    by calling the code: per pass e, rng = Random(sha256("repurpose.data:{seed}:{e}")[:8]); the sorted files
    shuffled with rng; their pairs through a buffer (fill; then each new pair replaces buf[randrange(size)],
    which leaves; at the end the buffer is shuffled and leaves in order); passes back to back."""
    out = []
    for epoch in range(epochs):
        digest = hashlib.sha256(f"repurpose.data:{seed}:{epoch}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        order = sorted(files)
        rng.shuffle(order)
        buf = []
        for path in order:
            for line in open(path):
                obj = json.loads(line)
                if len(buf) < buffer:
                    buf.append((obj["query"], obj["pos"][0]))
                    continue
                j = rng.randrange(buffer)
                out.append(buf[j])
                buf[j] = (obj["query"], obj["pos"][0])
        rng.shuffle(buf)
        out += buf
    return out


def test_random_batches_are_the_documented_shuffle_cut_in_order(tmp_path):
    pairs = make_pairs(1300, seed=5)
    files = [write_jsonl(tmp_path / "part-0.jsonl", pairs[:700]), write_jsonl(tmp_path / "part-1.jsonl", pairs[700:])]
    stream = PairStream(tmp_path, CharTokenizer(), batch_size=32, max_length=512, seed=11, max_epochs=2,
                        shuffle_buffer=300)  # smaller than a pass: the buffer's replacement path runs
    got = [list(zip(decode(b.q_ids, b.q_mask), decode(b.d_ids, b.d_mask))) for b in collect(stream)]
    ref = reference_sequence(files, seed=11, epochs=2, buffer=300)
    n = len(ref) // 32  # 2600 pairs: 81 full batches, the last 8 pairs dropped
    assert got == [ref[i * 32:(i + 1) * 32] for i in range(n)]  # same pairs, same batches, same order
    assert stream.stats.padding_fraction == pytest.approx(
        1 - sum(len(q) + len(d) for q, d in ref[:n * 32])
        / sum(32 * (max(len(q) for q, _ in b) + max(len(d) for _, d in b)) for b in got))  # padded to the longest


def length_statistics(batches: list[Batch]) -> tuple[float, float, float]:
    """(Spearman rho of stream position vs pair length over all pairs, mean within-batch rho, eta^2: the share
    of the length variance between batches). Length = the longer side, what bucketing sorts by."""
    lengths = [torch.maximum(b.q_mask.sum(1), b.d_mask.sum(1)).double() for b in batches]
    flat = torch.cat(lengths)
    rho = spearmanr(range(len(flat)), flat).statistic
    within = sum(spearmanr(range(len(x)), x).statistic for x in lengths) / len(lengths)
    between = sum(len(x) * (x.mean() - flat.mean()) ** 2 for x in lengths)
    return float(rho), float(within), float(between / ((flat - flat.mean()) ** 2).sum())


def test_random_batches_are_not_ordered_or_grouped_by_length(tmp_path):
    # The worst case for a streaming shuffle: a file sorted by length (rho = 1 in file order). With a buffer that
    # holds the pass, the order is a uniform permutation, independent of length, so:
    # - rho(position, length) ~ N(0, 1/(n-1)) under that null: sd 0.022 for n = 2000 pairs; |rho| < 0.1 is 4.5 sd.
    # - within a batch of 40 the same null gives sd 0.16 per batch, 0.023 for the mean of 50 batches: |mean| < 0.1.
    # - eta^2 (between-batch share of variance) for k random batches of n pairs has mean (k-1)/(n-1) = 0.025
    #   (49/1999), sd about 0.007 here; < 0.06 is 5 sd. Buckets sort each pool, so their eta^2 is near 1 and each
    #   batch is in ascending order (within rho near 1; ties in length keep it below 1).
    # The seed is fixed, so the outcome is too: these bounds say why almost every seed passes, not a flaky test.
    pairs = sorted(make_pairs(2000, seed=9), key=lambda p: (len(p["pos"][0]), len(p["query"])))
    f = write_jsonl(tmp_path / "sorted.jsonl", pairs)
    kw = dict(batch_size=40, max_length=512, seed=4, shuffle_buffer=4096)
    rho, within, eta2 = length_statistics(collect(PairStream(f, CharTokenizer(), **kw)))
    assert abs(rho) < 0.1 and abs(within) < 0.1 and eta2 < 0.06
    rho, within, eta2 = length_statistics(collect(PairStream(f, CharTokenizer(), batching="length_buckets", **kw)))
    assert within > 0.9 and eta2 > 0.9
    file_order, _, _ = length_statistics(collect(PairStream(f, CharTokenizer(), **kw | {"shuffle_buffer": 1})))
    assert file_order > 0.99  # the statistic sees the order when there is one


def test_batching_is_checked():
    with pytest.raises(ValueError, match="batching: 'sorted' is not one of random, length_buckets"):
        PairStream("unused.jsonl", CharTokenizer(), batch_size=2, max_length=4, batching="sorted")
