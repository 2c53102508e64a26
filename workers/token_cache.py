"""The token cache: a trial's train and eval pairs tokenised once, read back as the very batches of the raw path.

Why: the raw path (workers/pair_batches.py) parses JSON and tokenises on one background thread, ~1M real
tokens/s here, while an H100 at 40 % MFU eats 400e12 / (6·N) tokens/s (56M for pythia-14m); and the ~50 trials
of a model, and the eight Pythia models (one tokenizer), would each tokenise the same pairs again.

Layout, ``<storage>/_cache/tokens/<key>/`` (core.store.CACHE_DIR):

    train/00000.parquet ...   shards: columns q_ids, d_ids, list<uint16> (uint32 when the vocabulary does not
                              fit), rows = the usable pairs of one byte range of one data file, in file order;
                              the shard's bad-line record in the Parquet key-value metadata; with hard negatives
                              (k > 0) also n_ids, list<list<uint16>>: each pair's k negatives' ids
    eval/00000.parquet ...    the same for the eval data (absent without it)
    manifest.json             written last: pairs, real tokens, bad lines, lines, the key's inputs, the shards

The key is a content hash (``cache_key``) of the data files' identity (path, size, mtime), the tokenizer's
tokenizer.json (sha256), max_length, the shard size and FORMAT_VERSION: same data and tokenizer -> the same key
(sweeps and the Pythia models share it); a changed file, tokenizer or max_length -> a new key. The texts' knobs
enter the key only when set (a query instruction; k hard negatives per pair), so the caches without them keep
their keys.

Hard negatives (``train.negatives: {hard: k}``): a cache of its own per k. Its train shards hold only the pairs with
at least k negatives, as the raw path keeps them (``pair_files.pair_with_negatives``: the others are skipped and
counted in ``short_negatives``, per shard and in the manifest), with ``neg[:k]`` tokenised in column n_ids; so the
pass order over its rows is the raw path's over its pairs. Its eval split has no negatives (evaluation ranks against
the in-batch documents only, as the raw path's does).

Building runs one Ray Data task (``build_shard``) per shard across the cluster's CPUs, driven from the driver's
side (orchestrator/cache_build.py, on the driver's Ray); this module plans the shards (``shard_plans``), builds one
(``build_shard``) and writes the manifest (``write_manifest``). Resumable: a shard is written whole under its final
name (temp + rename, fsio.write_bytes), a rebuild skips the shards present, the manifest comes last; shards are
deterministic, so a resumed cache is byte-identical to an uninterrupted one, and two builders of one key write
the same bytes. No torch.

Bad lines are judged by workers/pair_files.py's own functions (``_parse``, ``pair_with_negatives``) and the per-file policy
(> 1 % unusable rejects the file, checked every CHECK_EVERY lines and at its end) is replayed on the shards'
records, so the cache fails where the raw path fails, with the same message, and counts the same bad lines.

Reading (``CachedPairs``) yields the raw path's batches (``PairStream``, batching="random") for the same seed
and batch size: pass e is the same permutation of the pairs (pair_files.py, "The shuffle of one pass"), computed
from the seed and the per-file row counts alone (``pass_order``: Python's Mersenne Twister replayed in numpy),
so resuming at batch k reads no shard before it. No tokenizer on the training thread's path.
"""
from __future__ import annotations

import bisect
import itertools
import json
import math
import os
import queue
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import numpy as np

import fsio as storage
from core.errors import one_line
from core.hashing import content_hash, json_hash
from core.store import CACHE_DIR
from core.uris import join
from workers.pair_files import (CHECK_EVERY, MAX_BAD_FRACTION, SHUFFLE_BUFFER, BackgroundBatches, BadLine, DataError,
                                DataStats, PairFile, ShortNegatives, Stopped, epoch_seed, jsonl_lines, make_encoder,
                                pad_id_of, pair_with_negatives, resolve_files, shown_uri, with_query_instruction)

FORMAT_VERSION = 1
SHARD_BYTES = 64 << 20  # JSONL bytes per shard (a compressed file is one shard)
SHARD_ROWS = 131072  # Parquet input: rows per shard (whole row groups)
MANIFEST = "manifest.json"
SPLITS = ("train", "eval")
ENCODE_ROWS = 8192  # texts per encode_batch call in a build task
ORDER_CHUNK = 1 << 20  # pass_order: stream positions per vectorised step
# CachedPairs: bytes of shards kept in memory, least recently used out. A pair waits in the shuffle buffer s steps
# with probability exp(-s / 16384): at 14k rows a shard (benchmarks/cache.py), 8 shards held were re-read at
# nearly every batch (15k pairs/s); 1 GiB holds ~60 shards of 64 MB of JSONL, beyond any pair's wait.
HELD_BYTES = 1 << 30
PREFETCH = 4  # batches ready ahead of the training loop
_META = b"repurpose.shard"  # the shard's record in the Parquet footer's key-value metadata
# a test hook: seconds each build task sleeps before writing its shard (the interrupted-build test)
DELAY_ENV = "REPURPOSE_TOKEN_CACHE_TASK_DELAY_S"


# --------------------------------------------------------------------------------------------------------
# The key


def file_identity(uri) -> list[dict]:
    """Each data file's (path, size, mtime_ns), in sorted order; object stores report size and mtime the same."""
    out = []
    for src in resolve_files(uri):
        info = src.fs.get_file_info(src.path)
        mtime = info.mtime_ns if info.mtime_ns is not None else None
        out.append({"path": src.name if storage.is_remote(str(uri)) else src.path, "size": info.size,
                    "mtime_ns": mtime})
    return out


def tokenizer_sha256(name_or_path: str, tokenizer) -> str:
    """sha256 of the tokenizer's tokenizer.json: the local file, or the hub's copy in the HF cache; else of the
    serialised backend (what the build ships to its tasks)."""
    path = os.path.join(name_or_path, "tokenizer.json") if os.path.isdir(name_or_path) else None
    if path is None or not os.path.isfile(path):
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(name_or_path, "tokenizer.json")
            path = found if isinstance(found, str) else None
        except Exception:  # noqa: BLE001 -- not a hub name: fall back to the backend
            path = None
    if path is not None:
        with open(path, "rb") as f:
            return content_hash(f.read())
    return content_hash(_backend(tokenizer).to_str())


def cache_inputs(train_uri, eval_uri, tokenizer_hash: str, max_length: int, shard_bytes: int = SHARD_BYTES,
                 query_instruction: str = "", hard_negatives: int = 0) -> dict:
    """What the key hashes (and the manifest records). A query instruction changes the queries' tokens, k hard
    negatives add texts and drop the pairs with fewer: each is an input only when set, so the caches built before
    them keep their keys."""
    inputs = {"format": FORMAT_VERSION, "train": file_identity(train_uri),
              "eval": file_identity(eval_uri) if eval_uri else None, "tokenizer_sha256": tokenizer_hash,
              "max_length": int(max_length), "shard_bytes": int(shard_bytes), "shard_rows": SHARD_ROWS}
    if query_instruction:
        inputs["query_instruction"] = query_instruction
    if hard_negatives:
        inputs["hard_negatives"] = int(hard_negatives)
    return inputs


def cache_key(inputs: dict) -> str:
    return json_hash(inputs, hex_chars=24)


def cache_uri(storage_uri: str, key: str) -> str:
    return join(storage_uri, CACHE_DIR, "tokens", key)


def read_manifest(uri: str) -> dict | None:
    """The cache's manifest, or None while it is not (completely) built."""
    try:
        return json.loads(storage.read_bytes(join(uri, MANIFEST)))
    except (FileNotFoundError, OSError):
        return None


# --------------------------------------------------------------------------------------------------------
# Building: the plan (driver), the tasks (Ray Data), the manifest (driver)


def _backend(tokenizer):
    from tokenizers import Tokenizer

    return tokenizer if isinstance(tokenizer, Tokenizer) else tokenizer.backend_tokenizer


def _dtype(vocab: int) -> str:
    return "uint16" if vocab <= 1 << 16 else "uint32"


def _jsonl_ranges(src: PairFile, size: int, shard_bytes: int) -> list[tuple[int, int]]:
    """Byte ranges of about shard_bytes, each starting at a line's start (a compressed file: one range)."""
    if src.compressed or size <= shard_bytes:
        return [(0, size)]
    bounds = [0]
    with src.fs.open_input_file(src.path) as f:
        target = shard_bytes
        while target < size:
            f.seek(target - 1)
            pos = target - 1
            while True:  # the first newline at or after target - 1: the next range starts after it
                block = f.read(1 << 16)
                if not block:
                    pos = size
                    break
                i = block.find(b"\n")
                if i >= 0:
                    pos += i + 1
                    break
                pos += len(block)
            if pos >= size:
                break
            bounds.append(pos)
            target = pos + shard_bytes
    return list(zip(bounds, bounds[1:] + [size]))


def _parquet_ranges(src: PairFile) -> list[tuple[int, int, int]]:
    """(first row group, stop row group, rows before) of about SHARD_ROWS rows each."""
    import pyarrow.parquet as pq

    with src.fs.open_input_file(src.path) as f:
        meta = pq.ParquetFile(f).metadata
    out, start, rows, before = [], 0, 0, 0
    for g in range(meta.num_row_groups):
        rows += meta.row_group(g).num_rows
        if rows >= SHARD_ROWS or g == meta.num_row_groups - 1:
            out.append((start, g + 1, before))
            start, before, rows = g + 1, before + rows, 0
    return out or [(0, 0, 0)]


def plan_shards(split: str, uri: str, shard_bytes: int) -> list[dict]:
    """The split's build tasks, in file order (the shard index is the position in this list)."""
    tasks = []
    for file_index, src in enumerate(resolve_files(uri)):
        common = {"split": split, "uri": str(uri), "path": src.path, "name": src.name, "kind": src.kind,
                  "compressed": src.compressed, "file": file_index}
        try:
            if src.kind == "parquet":
                ranges = [(a, b, before) for a, b, before in _parquet_ranges(src)]
            else:
                size = src.fs.get_file_info(src.path).size
                ranges = [(a, b, 0) for a, b in _jsonl_ranges(src, size, shard_bytes)]
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 -- pyarrow / OS errors on listing or reading a footer
            raise DataError(f"{src.name}: cannot read: {one_line(e)}") from None
        for a, b, before in ranges:
            tasks.append({**common, "index": len(tasks), "start": a, "stop": b, "rows_before": before})
    return tasks


def _records(task: dict) -> Iterator[tuple[int, object]]:
    """(line or row number within the shard, parsed object or BadLine) of the shard's range, as pair_files.py reads."""
    fs, _ = storage.resolve(task["uri"])
    if task["kind"] == "parquet":
        import pyarrow.parquet as pq

        with fs.open_input_file(task["path"]) as f:
            pf = pq.ParquetFile(f)
            missing = [c for c in ("query", "pos") if c not in pf.schema_arrow.names]
            if missing:
                raise DataError(f"{task['name']}: no column {', '.join(missing)} "
                                f"(has: {', '.join(pf.schema_arrow.names)})")
            row = 0
            groups = list(range(task["start"], task["stop"]))
            columns = ["query", "pos"] + (["neg"] if "neg" in pf.schema_arrow.names else [])
            for rb in (pf.iter_batches(batch_size=8192, row_groups=groups, columns=columns) if groups else ()):
                negs = rb.column("neg").to_pylist() if "neg" in columns else [None] * rb.num_rows
                for q, pos, neg in zip(rb.column("query").to_pylist(), rb.column("pos").to_pylist(), negs):
                    row += 1
                    yield row, {"query": q, "pos": pos, "neg": neg}
        return
    if task["compressed"]:
        stream, left = fs.open_input_stream(task["path"], compression="detect"), None
    else:
        stream = fs.open_input_file(task["path"])
        stream.seek(task["start"])
        left = task["stop"] - task["start"]
    with stream as f:
        tally: dict = {}
        yield from jsonl_lines(f, left, tally)
        task["_physical"] = tally["lines"]  # newline-ended lines: the next shard's line numbers start after them


_TOKENIZERS: dict[str, object] = {}  # per worker process: tokenizer.json text -> its encoder's Tokenizer


def build_shard(task: dict, *, cache: str, tokenizer_json: str, max_length: int, dtype: str,
                query_instruction: str = "", hard_negatives: int = 0) -> dict:
    """One Ray Data task: read the range, keep the usable pairs, tokenise, write the shard whole. Returns
    {"split", "index", "record": the shard's JSON record, "error": "" or a DataError's one line}.
    ``hard_negatives`` k: the train split keeps the pairs with k negatives and their ids (eval: none)."""
    try:
        k = hard_negatives if task["split"] == "train" else 0
        record = _build_shard(task, cache, tokenizer_json, max_length, dtype, query_instruction, k)
        return {"split": task["split"], "index": task["index"], "record": json.dumps(record), "error": ""}
    except DataError as e:
        error = str(e)
    except Exception as e:  # noqa: BLE001 -- pyarrow / OS errors: the same words as pair_files.py's
        error = f"{task['name']}: cannot read: {one_line(e)}"
    return {"split": task["split"], "index": task["index"], "record": "", "error": error}


def _build_shard(task: dict, cache: str, tokenizer_json: str, max_length: int, dtype: str,
                 query_instruction: str = "", k: int = 0) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one task per CPU: no Rayon pool on top
    key = content_hash(tokenizer_json)
    if key not in _TOKENIZERS:
        from tokenizers import Tokenizer

        _TOKENIZERS[key] = Tokenizer.from_str(tokenizer_json)
    encode = make_encoder(_TOKENIZERS[key], max_length)
    lines = bad_count = short = 0
    bad: list[int] = []  # ordinals (1-based, non-blank lines / rows) of the unusable ones
    first_bad = None  # [line or row number within the shard, reason]
    names = ("q_ids", "d_ids") + (("n_ids",) if k else ())
    columns: dict[str, list] = {name: [] for name in names}
    pending: list[tuple] = []
    real = 0

    def flush():
        nonlocal real
        # the negatives pair by pair, k each (pair_batches.negatives_of's order)
        sides = (("q_ids", [p[0] for p in pending]), ("d_ids", [p[1] for p in pending]),
                 ("n_ids", [n for p in pending for n in p[2:]]))
        for name, texts in sides[:len(names)]:
            ids = encode(texts)
            lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lens.sum()))
            columns[name].append((lens, flat))
            real += int(lens.sum())
        pending.clear()

    for number, obj in _records(task):
        lines += 1
        pair = obj if isinstance(obj, BadLine) else pair_with_negatives(obj, k)
        if isinstance(pair, ShortNegatives):  # usable, too few negatives: skipped, not bad
            short += 1
            continue
        if isinstance(pair, str):
            bad_count += 1
            bad.append(lines)
            if first_bad is None:
                first_bad = [number, str(pair)]
            continue
        pending.append(with_query_instruction(pair, query_instruction))
        if len(pending) == ENCODE_ROWS:
            flush()
    if pending:
        flush()
    arrays = []
    for name in names:
        parts = columns[name]
        lens = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        flat = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, dtype)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        arrays.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)))
    rows = len(arrays[0])
    if k:  # row i: negatives i*k .. i*k + k - 1
        arrays[2] = pa.ListArray.from_arrays(pa.array(np.arange(0, rows * k + 1, k, dtype=np.int32)), arrays[2])
    record = {"index": task["index"], "file": task["file"], "rows": rows, "real_tokens": real, "lines": lines,
              "bad": bad, "first_bad": first_bad, "physical_lines": task.get("_physical", 0),
              "rows_before": task["rows_before"]}
    if k:
        record["short_negatives"] = short
    table = pa.table(arrays, names=list(names)).replace_schema_metadata({_META: json.dumps(record)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=1 << 20)
    delay = float(os.environ.get(DELAY_ENV) or 0)
    if delay:
        time.sleep(delay)
    storage.write_bytes(_shard_uri(cache, task["split"], task["index"]), sink.getvalue().to_pybytes())
    return record


def _shard_name(index: int) -> str:
    return f"{index:05d}.parquet"


def _shard_uri(cache: str, split: str, index: int) -> str:
    return join(cache, split, _shard_name(index))


def _present_record(cache: str, split: str, index: int) -> dict | None:
    """A shard already written (whole: it took its name last) -> its record, from the footer only."""
    import pyarrow.parquet as pq

    uri = _shard_uri(cache, split, index)
    fs, path = storage.resolve(uri)
    try:
        with fs.open_input_file(path) as f:
            meta = pq.read_schema(f).metadata or {}
        return json.loads(meta[_META])
    except (FileNotFoundError, OSError, KeyError, ValueError):
        return None


def _check_file(name: str, kind: str, records: list[dict], max_bad: float) -> str | None:
    """pair_files.py's per-file policy replayed on the file's shards: > max_bad unusable lines at any
    CHECK_EVERY-th line, or at the end, rejects the file with pair_files.py's message. Returns the first unusable
    line as pair_files.py names it (``line N: reason``), or None."""
    bad, lines, phys, first = [], 0, 0, None
    for r in records:
        bad += [lines + b for b in r["bad"]]
        if first is None and r["first_bad"]:
            first = (phys + r["first_bad"][0], r["first_bad"][1]) if kind != "parquet" else \
                (r["rows_before"] + r["first_bad"][0], r["first_bad"][1])
        lines += r["lines"]
        phys += r["physical_lines"]
    unit = "rows" if kind == "parquet" else "lines"
    where = f"{unit[:-1]} {first[0]}: {first[1]}" if first else None
    for m in [*range(CHECK_EVERY, lines + 1, CHECK_EVERY), lines]:
        n_bad = bisect.bisect_right(bad, m)
        if m and n_bad / m > max_bad:
            raise DataError(f"{name}: {n_bad} of {m} {unit} unusable (> {max_bad * 100:g}%), first at {where}")
    return where


def _split_summary(uri: str, tasks: list[dict], records: list[dict], max_bad: float, hard_negatives: int = 0) -> dict:
    """The split's manifest entry; ``hard_negatives`` k: the split's rows hold k negatives each (train only)."""
    files: list[dict] = []
    for t, r in zip(tasks, records):
        if not files or files[-1]["file"] != t["file"]:
            files.append({"file": t["file"], "name": t["name"], "kind": t["kind"], "records": []})
        files[-1]["records"].append(r)
    first_bad = None
    for f in files:
        where = _check_file(f["name"], f["kind"], f["records"], max_bad)
        if first_bad is None and where:
            first_bad = f"{f['name']} {where}"
    pairs = sum(r["rows"] for r in records)
    lines, bad = sum(r["lines"] for r in records), sum(len(r["bad"]) for r in records)
    short = sum(r.get("short_negatives", 0) for r in records)
    if pairs == 0:  # pair_files.iter_pairs's words
        detail = f"{bad} of {lines} lines unusable, first: {first_bad}" if lines else "empty"
        if short:
            detail += f"; {short} pairs with fewer than {hard_negatives} hard negatives skipped"
        raise DataError(f"{shown_uri(uri)}: no usable pairs ({detail})")
    file_rows = [sum(r["rows"] for r in f["records"]) for f in files]
    summary = {"pairs": pairs, "real_tokens": sum(r["real_tokens"] for r in records), "bad_lines": bad,
               "lines": lines, "first_bad": first_bad, "file_rows": file_rows, "files": [f["name"] for f in files],
               "shards": [{"name": _shard_name(r["index"]), "rows": r["rows"]} for r in records]}
    if hard_negatives:
        summary |= {"hard_negatives": hard_negatives, "short_negatives": short}
    return summary


def shard_plans(uri: str, splits: dict[str, str], shard_bytes: int) -> tuple[dict, dict, list[dict]]:
    """What a build of the cache at ``uri`` has to do: ({split: its shard tasks}, {(split, index): the record of a
    shard already written}, [the tasks still to run]). A rebuild skips the shards present (written whole)."""
    plans = {s: plan_shards(s, u, shard_bytes) for s, u in splits.items()}
    records: dict[tuple[str, int], dict] = {}
    todo = []
    for split, tasks in plans.items():
        for t in tasks:
            r = _present_record(uri, split, t["index"])
            if r is None:
                todo.append(t)
            else:
                records[split, t["index"]] = r
    return plans, records, todo


def task_kwargs(uri: str, inputs: dict, tokenizer) -> dict:
    """``build_shard``'s keyword arguments for the cache at ``uri``: the tokenizer travels as its JSON text."""
    backend = _backend(tokenizer)
    return dict(cache=uri, tokenizer_json=backend.to_str(), max_length=inputs["max_length"],
                dtype=_dtype(backend.get_vocab_size(with_added_tokens=True)),
                query_instruction=inputs.get("query_instruction", ""), hard_negatives=inputs.get("hard_negatives", 0))


def write_manifest(uri: str, inputs: dict, tokenizer, splits: dict[str, str], plans: dict,
                   records: dict[tuple[str, int], dict], max_bad_fraction: float = MAX_BAD_FRACTION) -> dict:
    """Once every shard is written: the per-file bad-line policy replayed, the temp files of killed writers removed,
    the manifest written last (it is what makes the cache exist); returns it."""
    manifest = {"format": FORMAT_VERSION, "key": uri.rstrip("/").rsplit("/", 1)[-1], "inputs": inputs,
                "dtype": task_kwargs(uri, inputs, tokenizer)["dtype"], "max_length": inputs["max_length"],
                "pad_id": pad_id_of(tokenizer), "eos_id": getattr(tokenizer, "eos_token_id", None),
                "shuffle_buffer": SHUFFLE_BUFFER,
                "splits": {s: _split_summary(u, plans[s], [records[s, t["index"]] for t in plans[s]],
                                             max_bad_fraction, inputs.get("hard_negatives", 0) if s == "train" else 0)
                           for s, u in splits.items()}}
    _remove_temps(uri, list(splits))
    storage.write_bytes(join(uri, MANIFEST), json.dumps(manifest, sort_keys=True, indent=1).encode())
    return manifest


def _remove_temps(uri: str, splits: list[str]) -> None:
    """Temp files of writers killed mid-write (fsio.write_bytes names them .tmp-*)."""
    for split in splits:
        for name in storage.list_dir(join(uri, split)):
            if name.startswith(".tmp-"):
                storage.delete(join(uri, split, name))


# --------------------------------------------------------------------------------------------------------
# The shuffle of one pass, from the seed and the row counts (pair_files.py, "The shuffle of one pass")


class _Randbelow:
    """``random.Random.randrange(n)`` drawn in bulk: CPython's ``_randbelow`` takes ``getrandbits(k)``,
    k = n.bit_length(), i.e. the top k bits of one 32-bit Mersenne Twister output (k <= 32), and rejects values
    >= n; numpy's MT19937 given the same state yields the same outputs (``random_raw``)."""

    def __init__(self, rng: random.Random, n: int):
        if n.bit_length() > 32:
            raise ValueError("n must be < 2**32")
        self.n, self.shift = n, 32 - n.bit_length()
        version, state, _ = rng.getstate()
        self.bitgen = np.random.MT19937()
        self.bitgen.state = {"bit_generator": "MT19937",
                             "state": {"key": np.array(state[:624], dtype=np.uint32), "pos": int(state[624])}}
        self.values = np.zeros(0, dtype=np.int64)  # accepted draws not yet taken
        self.ends = np.zeros(0, dtype=np.int64)  # for each, the raw outputs consumed up to and including it
        self.used = 0  # raw outputs generated
        self.taken_end = 0  # raw outputs behind the draws taken
        self.snapshot = (self.bitgen.state, 0)  # the generator's state before the oldest block still pending

    def take(self, count: int) -> np.ndarray:
        while len(self.values) < count:
            if len(self.values) == 0:
                self.snapshot = (self.bitgen.state, self.used)
            raw = self.bitgen.random_raw(2 * (count - len(self.values)) + 64) >> self.shift
            ok = np.flatnonzero(raw < self.n)
            self.values = np.concatenate([self.values, raw[ok].astype(np.int64)])
            self.ends = np.concatenate([self.ends, self.used + ok + 1])
            self.used += len(raw)
        out, self.values = self.values[:count], self.values[count:]
        if count:
            self.taken_end = int(self.ends[count - 1])
        self.ends = self.ends[count:]
        return out

    def python_state(self) -> tuple:
        """The state of a ``random.Random`` that had drawn exactly the values taken."""
        state, at = self.snapshot
        if self.taken_end < at:
            raise AssertionError("draws taken before the snapshot")  # cannot happen: snapshots move only forward
        bitgen = np.random.MT19937()
        bitgen.state = state
        bitgen.random_raw(self.taken_end - at)
        s = bitgen.state["state"]
        return 3, tuple(int(x) for x in s["key"]) + (int(s["pos"]),), None


def pass_order(seed: int, file_rows: list[int], buffer: int = SHUFFLE_BUFFER,
               chunk: int = ORDER_CHUNK) -> Iterator[np.ndarray]:
    """The row indices (into the split's rows, files in sorted order) of one shuffled pass, in chunks, exactly as
    ``pair_files.iter_pairs(seed=seed)`` orders the pairs: files shuffled, then the streaming buffer. Vectorised:
    an item leaving at stream position t is the one that entered its slot last before t."""
    rng = random.Random(seed)
    files = list(range(len(file_rows)))
    rng.shuffle(files)
    starts = np.concatenate([[0], np.cumsum(file_rows)])[:-1]
    sizes = np.array([file_rows[f] for f in files], dtype=np.int64)
    cum = np.concatenate([[0], np.cumsum(sizes)])  # stream position -> file: searchsorted
    firsts = starts[files] if files else np.zeros(0, np.int64)
    n = int(cum[-1])

    def stream(a: int, b: int) -> np.ndarray:
        t = np.arange(a, b, dtype=np.int64)
        k = np.searchsorted(cum, t, side="right") - 1
        return firsts[k] + (t - cum[k])

    slots = stream(0, min(buffer, n))
    if n <= buffer:
        rest = slots.tolist()
        rng.shuffle(rest)
        if rest:
            yield np.array(rest, dtype=np.int64)
        return
    draws = _Randbelow(rng, buffer)
    for a in range(buffer, n, chunk):
        b = min(a + chunk, n)
        items, js = stream(a, b), draws.take(b - a)
        order = np.argsort(js, kind="stable")  # positions grouped by slot, in stream order within a slot
        sj = js[order]
        same = np.concatenate([[False], sj[1:] == sj[:-1]])
        prev = np.full(len(js), -1, dtype=np.int64)
        prev[order[same]] = order[np.flatnonzero(same) - 1]
        out = np.where(prev >= 0, items[np.maximum(prev, 0)], slots[js])
        last = np.concatenate([sj[1:] != sj[:-1], [True]])  # the last entry into each slot this chunk
        slots[sj[last]] = items[order[last]]
        yield out
    rng.setstate(draws.python_state())
    rest = slots.tolist()
    rng.shuffle(rest)
    yield np.array(rest, dtype=np.int64)


# --------------------------------------------------------------------------------------------------------
# Reading


@dataclass
class _Shard:
    q_off: np.ndarray  # (rows + 1,) int64
    q_val: np.ndarray  # (tokens,) uint16 / uint32
    d_off: np.ndarray
    d_val: np.ndarray
    n_off: np.ndarray | None = None  # (rows * k + 1,): the negatives, pair i's at i*k .. i*k + k - 1; None: k = 0
    n_val: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        arrays = (self.q_off, self.q_val, self.d_off, self.d_val, self.n_off, self.n_val)
        return sum(a.nbytes for a in arrays if a is not None)


def _list_arrays(arr) -> tuple[np.ndarray, np.ndarray]:
    """(offsets from 0, values) of a list<int> array."""
    offsets = np.asarray(arr.offsets).astype(np.int64)
    return offsets - offsets[0], np.asarray(arr.values)[offsets[0]:]


def _read_shard(uri: str) -> _Shard:
    import pyarrow.parquet as pq

    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        table = pq.read_table(f)
    cols = []
    for name in ("q_ids", "d_ids"):
        cols += _list_arrays(table.column(name).combine_chunks())
    if "n_ids" in table.column_names:  # list<list<int>>: the pairs' negatives, flattened pair by pair
        cols += _list_arrays(table.column("n_ids").combine_chunks().flatten())
    return _Shard(*cols)


class _Rows:
    """A split's rows by global index, shards loaded on demand and kept (the most recently used, up to
    ``held_bytes``)."""

    def __init__(self, uri: str, split: dict, held_bytes: int = HELD_BYTES):
        self.uri, self.names = uri, [s["name"] for s in split["shards"]]
        self.starts = np.concatenate([[0], np.cumsum([s["rows"] for s in split["shards"]])])
        self.held_bytes, self.cache, self.bytes = held_bytes, OrderedDict(), 0

    def shard(self, i: int) -> _Shard:
        if i in self.cache:
            self.cache.move_to_end(i)
            return self.cache[i]
        sh = self.cache[i] = _read_shard(join(self.uri, self.names[i]))
        self.bytes += sh.nbytes
        while self.bytes > self.held_bytes and len(self.cache) > 1:
            self.bytes -= self.cache.popitem(last=False)[1].nbytes
        return sh

    def gather(self, rows: np.ndarray, side: str, k: int = 1) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """[(positions in ``rows``, their token-start offsets, lengths, values array)] per shard touched. Side "n":
        the rows' k negatives each, at positions i*k .. i*k + k - 1 of row i (``Batch.n_ids``'s layout)."""
        which = np.searchsorted(self.starts, rows, side="right") - 1
        out = []
        for s in np.unique(which):
            pos = np.flatnonzero(which == s)
            sh = self.shard(int(s))
            local = rows[pos] - self.starts[s]
            off, val = {"q": (sh.q_off, sh.q_val), "d": (sh.d_off, sh.d_val), "n": (sh.n_off, sh.n_val)}[side]
            if side == "n":  # each row -> its k negatives
                pos, local = ((x[:, None] * k + np.arange(k)).ravel() for x in (pos, local))
            out.append((pos, off[local], off[local + 1] - off[local], val))
        return out


def _ranges(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """The indices start[i] .. start[i] + lens[i] - 1 of every i, concatenated."""
    return np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(int(lens.sum()))


def _padded(parts, count: int, pad_id: int, eos: int | None, max_length: int):
    """(ids, mask) int64 (count, T), right-padded to the longest, as workers/pair_batches.py's ``_pad``; with ``eos``,
    each text cut to max_length - 1 tokens and the EOS appended (workers/pooling.py ``append_eos``: an EOS
    already last is not doubled)."""
    keep = np.zeros(count, np.int64)  # tokens of each text kept
    for pos, start, n, val in parts:
        if eos is not None:
            last = np.where(n > 0, val[np.maximum(start + n - 1, 0)], -1)
            n = np.minimum(n - ((n > 0) & (last == eos)), max_length - 1)
        keep[pos] = n
    first = np.cumsum(keep) - keep  # each row's first token in the row-major concatenation
    tokens = np.empty(int(keep.sum()), dtype=np.int64)
    for pos, start, _, val in parts:
        k = keep[pos]
        tokens[_ranges(first[pos], k)] = val[_ranges(start, k)]
    width = int(keep.max()) + (eos is not None)
    ids = np.full((count, width), pad_id, dtype=np.int64)  # (B, T)
    text = np.arange(width) < keep[:, None]  # (B, T): row-major order = each row's tokens in turn
    ids[text] = tokens
    if eos is None:
        return ids, text.astype(np.int64)
    ids[np.arange(count), keep] = eos
    return ids, (np.arange(width) < (keep + 1)[:, None]).astype(np.int64)


def collate_rows(rows_reader: _Rows, rows: np.ndarray, index: int, pad_id: int, eos: int | None, max_length: int,
                 negatives: int = 0):
    """The Batch of the given global rows, in that order (workers.pair_batches.collate's tensors); ``negatives``
    k: with the rows' k hard negatives each."""
    import torch

    from workers.pair_batches import Batch

    q_ids, q_mask = _padded(rows_reader.gather(rows, "q"), len(rows), pad_id, eos, max_length)
    d_ids, d_mask = _padded(rows_reader.gather(rows, "d"), len(rows), pad_id, eos, max_length)
    tensors = [torch.from_numpy(a) for a in (q_ids, q_mask, d_ids, d_mask)]
    real, padded = int(q_mask.sum() + d_mask.sum()), q_ids.size + d_ids.size
    if not negatives:
        return Batch(*tensors, index, real, padded)
    n_ids, n_mask = _padded(rows_reader.gather(rows, "n", negatives), len(rows) * negatives, pad_id, eos, max_length)
    return Batch(*tensors, index, real + int(n_mask.sum()), padded + n_ids.size, torch.from_numpy(n_ids),
                 torch.from_numpy(n_mask))


class CachedPairs(BackgroundBatches):
    """``PairStream``'s random batches from a token cache: the same pairs in the same order, padded the same, for
    the same seed and batch size (only ``batching="random"``: length buckets stay on the raw path).

    The pair sequence is the passes back to back (pass e: ``pass_order(epoch_seed(seed, e), ...)``), cut after
    ``max_epochs`` passes; batch k is pairs [k·B, (k+1)·B). ``skip_batches=k`` starts there: the order before it
    is computed (seed and row counts), no shard before it is read. ``pooling_eos``: the EOS id to append to
    every text (``pooling="last"``), None for none; ``pad_id`` None: the tokenizer's, from the manifest;
    ``shuffle_buffer`` None: pair_files.SHUFFLE_BUFFER, as the raw path's default. ``prefetch=0``: batches are made
    on the consumer's thread when asked for (no thread; ~3 ms per batch of 1024, benchmarks/cache.py).
    A cache built with k hard negatives yields them (``Batch.n_ids``) and counts the pairs it skipped for fewer in
    ``stats.short_negatives``, as PairStream(hard_negatives=k); ``hard_negatives`` given: the k the trial takes,
    checked against the cache's."""

    def __init__(self, cache_uri: str, batch_size: int, seed: int = 0, max_epochs: float = 1.0,
                 skip_batches: int = 0, pooling_eos: int | None = None, *, pad_id: int | None = None,
                 prefetch: int = PREFETCH, shuffle_buffer: int | None = None, hard_negatives: int | None = None):
        if batch_size < 1 or prefetch < 0:
            raise ValueError("batch_size must be >= 1, prefetch >= 0")
        if not max_epochs > 0 or skip_batches < 0:
            raise ValueError("max_epochs must be > 0 and skip_batches >= 0")
        manifest = read_manifest(cache_uri)
        if manifest is None:
            raise DataError(f"{cache_uri}: no token cache here (no {MANIFEST}: not built, or its build was "
                            "interrupted; run `repurpose prepare`)")
        self.uri, self.manifest = cache_uri, manifest
        self.split = manifest["splits"]["train"]
        self.negatives = int(self.split.get("hard_negatives", 0))
        if hard_negatives is not None and hard_negatives != self.negatives:
            raise DataError(f"{cache_uri}: token cache of {self.negatives} hard negatives per pair, the trial takes "
                            f"{hard_negatives}")
        self.batch_size, self.seed, self.skip_batches = batch_size, seed, skip_batches
        self.max_epochs = float(max_epochs)
        self.eos, self.max_length = pooling_eos, int(manifest["max_length"])
        self.pad_id = int(manifest["pad_id"] if pad_id is None else pad_id)
        # the raw path's buffer (PairStream's shuffle_buffer): the manifest's, SHUFFLE_BUFFER when built
        self.prefetch, self.buffer = prefetch, int(shuffle_buffer or manifest["shuffle_buffer"])
        self.stats = DataStats()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)

    # -- the sequence --

    def _positions(self) -> tuple[int, int, int]:
        """(pairs per pass n, whole passes, pairs in the sequence)."""
        n = self.split["pairs"]
        whole, frac = int(self.max_epochs), self.max_epochs - int(self.max_epochs)
        return n, whole, whole * n + (math.floor(frac * n) if frac > 0 else 0)

    def _count_read(self, passes: int, pairs_read: int) -> None:
        """pair_files.py's reading counters once ``passes`` passes have been (begun to be) read: the raw path reads
        every pass it touches, skipped batches included, and a fraction-only run reads one more to size it."""
        s, sp = self.stats, self.split
        s.bad_lines, s.lines_read, s.pairs_read = passes * sp["bad_lines"], passes * sp["lines"], pairs_read
        s.short_negatives = passes * sp.get("short_negatives", 0)
        s.first_bad = sp.get("first_bad")

    def _sequence(self, at: int) -> Iterator[np.ndarray]:
        """Row indices of the pair sequence from position ``at`` on, in chunks; the passes before are skipped
        without being computed, the part of the pass before ``at`` is computed but no shard is read."""
        n, whole, total = self._positions()
        extra = 1 if whole == 0 else 0
        epoch, offset = divmod(at, n)
        while epoch * n < total:
            limit = min(n, total - epoch * n)  # pairs of this pass in the sequence (the fraction pass: fewer)
            self._count_read(epoch + 1 + extra, epoch * n + offset)
            lo = 0
            for chunk in pass_order(epoch_seed(self.seed, epoch), self.split["file_rows"], self.buffer):
                hi = lo + len(chunk)
                a, b = max(lo, offset), min(hi, limit)
                if a < b:
                    yield chunk[a - lo:b - lo]
                lo = hi
                if lo >= limit:
                    break
            epoch, offset = epoch + 1, 0

    def _batches(self) -> Iterator[tuple[object, int]]:
        n, whole, total = self._positions()
        bsz = self.batch_size
        n_batches = total // bsz  # a partial last batch is dropped
        if n_batches == 0:
            raise DataError(f"{self.uri}: {n} usable pairs over {self.max_epochs:g} epochs do not fill one batch "
                            f"of {bsz}")
        rows = _Rows(join(self.uri, "train"), self.split)
        sequence, pending = self._sequence(self.skip_batches * bsz), np.zeros(0, np.int64)
        for k in range(self.skip_batches, n_batches):
            while len(pending) < bsz:
                pending = np.concatenate([pending, next(sequence)])
            if self._stop.is_set():
                raise Stopped
            batch_rows, pending = pending[:bsz], pending[bsz:]
            end = (k + 1) * bsz
            # passes completed when the raw producer drew this batch (PairStream._pairs: a pass counts as done
            # once the pair after its last is asked for); the fraction pass never counts
            done = min(whole, (end - 1) // n)
            yield collate_rows(rows, batch_rows, k, self.pad_id, self.eos, self.max_length, self.negatives), done
        n_passes = whole + (total > whole * n) + (1 if whole == 0 else 0)
        self._count_read(n_passes, total)

    def __iter__(self):
        if self._thread is not None:
            raise RuntimeError("CachedPairs: already iterating; close() it first")
        self.stats.reset()
        self._stop.clear()
        if self.prefetch == 0:
            return self._inline()
        return self._start(self.prefetch, "CachedPairs")

    def _passes_done(self) -> int:
        return int(self.max_epochs)

    def _inline(self):
        try:
            for batch, epochs in self._batches():
                self._count(batch, epochs)
                yield batch
            self.stats.epochs_completed = self._passes_done()
        except Stopped:
            return


def eval_batches(cache_uri: str, *, limit: int, batch_size: int, pooling_eos: int | None = None,
                 pad_id: int | None = None) -> list:
    """The first ``limit`` eval pairs (file order) as workers/steps.py's ``eval_batches`` cuts them (CPU tensors):
    batches of ``batch_size``, a last batch of fewer than 2 pairs dropped; [] when the cache has no eval split."""
    manifest = read_manifest(cache_uri)
    if manifest is None:
        raise DataError(f"{cache_uri}: no token cache here (no {MANIFEST})")
    split = manifest["splits"].get("eval")
    if split is None:
        return []
    pad = int(manifest["pad_id"] if pad_id is None else pad_id)
    rows, n = _Rows(join(cache_uri, "eval"), split), min(limit, split["pairs"])
    out = []
    for i in range(0, n, batch_size):
        chunk = np.arange(i, min(i + batch_size, n), dtype=np.int64)
        if len(chunk) < 2:
            break
        out.append(collate_rows(rows, chunk, i // batch_size, pad, pooling_eos, int(manifest["max_length"])))
    return out
