"""Reading the data of a trial, without torch: BGE query/positive pairs, streamed and shuffled; their token counts.

The driver plans with these (``count_pairs``, ``load_eval_pairs``, ``measure_tokens_per_pair``) and must not
import torch or deepspeed to do so (tests/orchestrator/test_plan_imports.py): this module imports
pyarrow, ``core`` and the standard library, and, when it encodes, ``tokenizers`` (and
``transformers.PreTrainedTokenizerFast`` to load one), neither of which imports torch. The torch side (padding into tensors, batching, the background thread) is workers/pair_batches.py.

Data: BAAI BGE JSONL lines ``{"query": str, "pos": [str, ...], "neg": [...]}``; only ``pos[0]`` is used
(docs/study.md, "Training recipe"), and ``neg[:k]`` when a trial takes k hard negatives (``pair_with_negatives``). Parquet files with the same columns work too. A source is a
local path, a directory, a glob or an ``s3://`` / ``gs://`` URI, opened with ``fsio.resolve`` (the
project's one URI -> filesystem function: it refuses credentials in a URI, and through
``pyarrow.fs.FileSystem.from_uri`` honours ``AWS_ENDPOINT_URL_S3`` -- pyarrow 26, apache/arrow#49643 -- and
``?endpoint_override=...``). Files are streamed: JSONL line by line, Parquet by ``iter_batches``; ``.gz`` /
``.bz2`` / ``.zst`` / ``.lz4`` JSONL is decompressed on the fly.

The shuffle of one pass (``iter_pairs(seed=s)``), which random batches are cut from (workers/pair_batches.py):
1. ``rng = random.Random(s)``; the files, in sorted order, are shuffled with ``rng.shuffle``;
2. their pairs, read file after file, go through a buffer of ``shuffle_buffer`` pairs: the first fill it;
   each later pair replaces ``buf[j]``, ``j = rng.randrange(shuffle_buffer)``, which leaves; at the end the
   buffer is shuffled with ``rng.shuffle`` and leaves in that order.
Pass ``e`` of a trial with seed ``seed`` uses ``s = epoch_seed(seed, e)`` (sha256, the same in every process).
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import random
import re
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

import fsio as storage
from core.errors import UserError, one_line
from core.flops import padding_fraction

SHUFFLE_BUFFER = 16384  # pairs held for the streaming shuffle
MAX_BAD_FRACTION = 0.01  # above 1 % unusable lines a file is rejected
CHECK_EVERY = 1000  # lines between bad-fraction checks
_READ_CHUNK = 1 << 20  # bytes per JSONL read
_PARQUET_BATCH = 8192  # rows per Parquet record batch
_COMPRESSIONS = (".gz", ".bz2", ".zst", ".lz4")  # what pyarrow's compression="detect" understands
_JSONL = (".jsonl", ".json", ".ndjson")
_GLOB = re.compile(r"[*?\[]")


class DataError(UserError):
    """Unusable training or eval data; the message is one line naming the file and the problem."""


# --------------------------------------------------------------------------------------------------------
# Counters


@dataclass
class DataStats:
    """Live counters. Reading counters (lines, bad lines, pairs read) run ahead of the consumer by the prefetch
    queue; the yield counters (batches, pairs, tokens, epochs completed) follow what the consumer received."""
    lines_read: int = 0  # non-blank lines / rows read, bad ones included, over all passes
    bad_lines: int = 0
    pairs: int = 0  # pairs in the batches yielded
    epochs_completed: int = 0  # full passes over the data behind the batches yielded
    real_tokens: int = 0
    padded_tokens: int = 0
    first_bad: str | None = None  # "FILE line N: reason"
    pairs_read: int = 0  # usable pairs read
    short_negatives: int = 0  # usable pairs skipped for fewer hard negatives than the trial takes (train.negatives)
    batches: int = 0  # batches yielded (skipped ones excluded)

    @property
    def padding_fraction(self) -> float | None:
        """Padded-but-not-real tokens / padded tokens, over the batches yielded (None before any)."""
        return padding_fraction(self.real_tokens, self.padded_tokens)

    def reset(self) -> None:
        for name, value in DataStats().__dict__.items():
            setattr(self, name, value)


# --------------------------------------------------------------------------------------------------------
# Finding files


@dataclass(frozen=True)
class PairFile:
    fs: pafs.FileSystem
    path: str  # as the filesystem names it
    name: str  # as the user should read it in an error
    kind: str  # "jsonl" | "parquet"
    compressed: bool


def _kind(path: str) -> tuple[str | None, bool]:
    name = path.rsplit("/", 1)[-1].lower()
    compressed = name.endswith(_COMPRESSIONS)
    if compressed:
        name = name.rsplit(".", 1)[0]
    if name.endswith(_JSONL):
        return "jsonl", compressed
    if name.endswith(".parquet") and not compressed:
        return "parquet", False
    return None, compressed


def _glob_match(path: str, pattern: str) -> bool:
    """fnmatch per path component, so ``*`` does not cross a ``/``."""
    parts, pats = path.rstrip("/").split("/"), pattern.rstrip("/").split("/")
    return len(parts) == len(pats) and all(fnmatch.fnmatchcase(a, p) for a, p in zip(parts, pats))


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str, Callable[[str], str]]:
    """(filesystem, path inside it, path -> display name), through ``fsio.resolve``."""
    fs, path = storage.resolve(uri)  # StorageError (a UserError) for credentials or an unopenable store
    if storage.is_remote(uri):
        scheme = uri.split("://", 1)[0]
        return fs, path, lambda p: f"{scheme}://{p}"
    local = uri[len("file://"):] if uri.startswith("file://") else uri
    relative = not os.path.isabs(os.path.expanduser(local))
    return fs, path, (lambda p: os.path.relpath(p)) if relative else (lambda p: p)


def resolve_files(uri) -> list[PairFile]:
    """The files a URI names, in sorted order: a file, a directory (its data files) or a glob."""
    uri = str(uri)
    fs, path, show = _filesystem(uri)
    try:
        if _GLOB.search(path) and fs.get_file_info(path).type != pafs.FileType.File:
            parts = path.split("/")
            k = next(i for i, p in enumerate(parts) if _GLOB.search(p))
            base = "/".join(parts[:k]) or "/"
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=len(parts) - k > 1, allow_not_found=True))
            paths = sorted(i.path for i in infos if i.type == pafs.FileType.File and _glob_match(i.path, path))
            if not paths:
                raise DataError(f"{show(path)}: no file matches")
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise DataError(f"{show(path)}: no such file")
            if info.type == pafs.FileType.Directory:
                infos = fs.get_file_info(pafs.FileSelector(path))
                paths = sorted(i.path for i in infos if i.type == pafs.FileType.File and _kind(i.path)[0]
                               and not i.base_name.startswith((".", "_")))
                if not paths:
                    raise DataError(f"{show(path)}: directory holds no .jsonl or .parquet file")
            else:
                paths = [path]
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{show(path)}: cannot list: {one_line(e)}") from None
    sources = []
    for p in paths:
        kind, compressed = _kind(p)
        if kind is None:
            raise DataError(f"{show(p)}: unsupported file type (expected .jsonl[.gz] or .parquet)")
        sources.append(PairFile(fs, p, show(p), kind, compressed))
    return sources


def shown_uri(uri) -> str:
    """A URI as errors show it: without its query string (an endpoint override is noise there)."""
    uri = str(uri)
    return uri.split("?", 1)[0] if "://" in uri else uri


# --------------------------------------------------------------------------------------------------------
# Reading pairs


def query_and_positive(obj) -> tuple[str, str] | str:
    """(query, pos[0]) or the reason the record is unusable."""
    if not isinstance(obj, dict):
        return "not a JSON object"
    q, pos = obj.get("query"), obj.get("pos")
    if q is None:
        return "query missing or null"
    if not isinstance(q, str):
        return "query not a string"
    if not q.strip():
        return "query empty"
    if pos is None:
        return "pos missing or null"
    if not isinstance(pos, list):
        return "pos not a list"
    if not pos:
        return "pos empty"
    if not isinstance(pos[0], str):
        return "pos[0] not a string"
    if not pos[0].strip():
        return "pos[0] empty"
    return q, pos[0]


class ShortNegatives(str):
    """A usable pair with fewer hard negatives than asked: skipped and counted, not a bad line."""


def pair_with_negatives(obj, k: int) -> tuple | str:
    """(query, pos[0], neg[0], ..., neg[k-1]), the reason the record is unusable, or ShortNegatives. Pairs with
    fewer than k usable negatives are skipped (not padded with in-batch negatives): every pair then costs the same k + 2
    texts, so the planner's tokens per pair and the loss's columns are the same for every batch. The token cache
    (workers/token_cache.py) judges its records with this same function."""
    pair = query_and_positive(obj)
    if isinstance(pair, str) or k == 0:
        return pair
    neg = obj.get("neg")
    negs = [n for n in neg if isinstance(n, str) and n.strip()] if isinstance(neg, list) else []
    if len(negs) < k:
        return ShortNegatives(f"{len(negs)} of {k} hard negatives")
    return (*pair, *negs[:k])


class _FileCheck:
    """Per-file bad-line policy: above max_bad of the lines read (checked every CHECK_EVERY lines and at the
    end of the file) the file is rejected."""

    def __init__(self, src: PairFile, stats: DataStats, max_bad: float):
        self.src, self.stats, self.max_bad = src, stats, max_bad
        self.lines = self.bad = 0
        self.first: str | None = None
        self.unit = "rows" if src.kind == "parquet" else "lines"

    def good(self) -> None:
        self.lines += 1
        self.stats.lines_read += 1
        if self.lines % CHECK_EVERY == 0:
            self.check()

    def reject(self, line_no: int, reason: str) -> None:
        self.bad += 1
        self.stats.bad_lines += 1
        if self.first is None:
            self.first = f"line {line_no}: {reason}" if self.unit == "lines" else f"row {line_no}: {reason}"
        if self.stats.first_bad is None:
            self.stats.first_bad = f"{self.src.name} {self.first}"
        self.good()

    def check(self) -> None:
        if self.lines and self.bad / self.lines > self.max_bad:
            raise DataError(f"{self.src.name}: {self.bad} of {self.lines} {self.unit} unusable "
                            f"(> {self.max_bad * 100:g}%), first at {self.first}")


class BadLine(str):
    """A reason a line is unusable (distinguished from a parsed JSON string)."""


def _jsonl_records(src: PairFile) -> Iterator[tuple[int, object]]:
    """(line number, parsed object or BadLine reason) per non-blank line, streamed."""
    with src.fs.open_input_stream(src.path, compression="detect" if src.compressed else None) as f:
        yield from jsonl_lines(f)


def jsonl_lines(f, limit: int | None = None, tally: dict | None = None) -> Iterator[tuple[int, object]]:
    """(line number, parsed object or BadLine reason) per non-blank line of an open file, read in chunks; ``limit``:
    bytes to read at most (a shard's range: workers/token_cache.py); ``tally["lines"]``: the newline-ended lines
    read, set once the file is exhausted."""
    rest, line_no = b"", 0
    while limit is None or limit > 0:
        chunk = f.read(_READ_CHUNK if limit is None else min(_READ_CHUNK, limit))
        if not chunk:
            break
        if limit is not None:
            limit -= len(chunk)
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            line_no += 1
            if line.strip():
                yield line_no, _parse(line)
    if rest.strip():
        yield line_no + 1, _parse(rest)
    if tally is not None:
        tally["lines"] = line_no


def _parse(line: bytes):
    try:
        return json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return BadLine("invalid JSON")


def _parquet_records(src: PairFile) -> Iterator[tuple[int, object]]:
    with src.fs.open_input_file(src.path) as f:
        pf = pq.ParquetFile(f)
        missing = [c for c in ("query", "pos") if c not in pf.schema_arrow.names]
        if missing:
            raise DataError(f"{src.name}: no column {', '.join(missing)} (has: {', '.join(pf.schema_arrow.names)})")
        columns = ["query", "pos"] + (["neg"] if "neg" in pf.schema_arrow.names else [])
        row = 0
        for rb in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=columns):
            negs = rb.column("neg").to_pylist() if "neg" in columns else [None] * rb.num_rows
            for q, pos, neg in zip(rb.column("query").to_pylist(), rb.column("pos").to_pylist(), negs):
                row += 1
                yield row, {"query": q, "pos": pos, "neg": neg}


def _file_pairs(src: PairFile, stats: DataStats, max_bad: float, hard_negatives: int = 0) -> Iterator[tuple]:
    check = _FileCheck(src, stats, max_bad)
    records = _parquet_records(src) if src.kind == "parquet" else _jsonl_records(src)
    try:
        for line_no, obj in records:
            pair = obj if isinstance(obj, BadLine) else pair_with_negatives(obj, hard_negatives)
            if isinstance(pair, ShortNegatives):
                check.good()
                stats.short_negatives += 1
                continue
            if isinstance(pair, str):
                check.reject(line_no, pair)
                continue
            check.good()
            stats.pairs_read += 1
            yield pair
    except DataError:
        raise
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{src.name}: cannot read: {one_line(e)}") from None
    finally:
        records.close()
    check.check()


def _shuffled(items: Iterable, rng: random.Random, buffer: int) -> Iterator:
    """A streaming shuffle: a bounded buffer from which a random element leaves as each new one enters."""
    buf = []
    for item in items:
        if len(buf) < buffer:
            buf.append(item)
            continue
        j = rng.randrange(buffer)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of one pass; sha256 so it is the same in every process and Python version."""
    return int.from_bytes(hashlib.sha256(f"repurpose.data:{seed}:{epoch}".encode()).digest()[:8], "big")


def iter_pairs(uri, *, seed: int | None = None, stats: DataStats | None = None,
               shuffle_buffer: int = SHUFFLE_BUFFER, max_bad_fraction: float = MAX_BAD_FRACTION,
               hard_negatives: int = 0) -> Iterator[tuple[str, str]]:
    """Usable (query, pos[0]) pairs of one pass, in file order, or shuffled when a seed is given (file order,
    then a bounded shuffle buffer). Bad lines are skipped and counted in ``stats``; DataError when a file has
    too many or the source has no usable pair at all."""
    stats = DataStats() if stats is None else stats
    sources = resolve_files(uri)
    bad_before, lines_before, n = stats.bad_lines, stats.lines_read, 0
    if seed is None:
        pairs = (p for src in sources for p in _file_pairs(src, stats, max_bad_fraction, hard_negatives))
    else:
        rng = random.Random(seed)
        rng.shuffle(sources)
        pairs = _shuffled((p for src in sources for p in _file_pairs(src, stats, max_bad_fraction, hard_negatives)),
                          rng, shuffle_buffer)
    for pair in pairs:
        n += 1
        yield pair
    if n == 0:
        lines, bad = stats.lines_read - lines_before, stats.bad_lines - bad_before
        detail = f"{bad} of {lines} lines unusable, first: {stats.first_bad}" if lines else "empty"
        if hard_negatives and stats.short_negatives:
            detail += f"; {stats.short_negatives} pairs with fewer than {hard_negatives} hard negatives skipped"
        raise DataError(f"{shown_uri(uri)}: no usable pairs ({detail})")


def load_eval_pairs(uri, limit: int, *, max_bad_fraction: float = MAX_BAD_FRACTION,
                    hard_negatives: int = 0) -> list[tuple[str, str]]:
    """The first ``limit`` usable pairs in file order (fewer when the data holds fewer)."""
    if limit < 1:
        raise ValueError(f"limit: must be >= 1, got {limit}")
    out = []
    pairs = iter_pairs(uri, max_bad_fraction=max_bad_fraction, hard_negatives=hard_negatives)
    try:
        for pair in pairs:
            out.append(pair)
            if len(out) == limit:
                break
    finally:
        pairs.close()
    return out


def count_pairs(uri, *, max_bad_fraction: float = MAX_BAD_FRACTION, hard_negatives: int = 0) -> int:
    """Usable pairs in one pass (streamed); with ``hard_negatives`` k, those with at least k negatives."""
    return sum(1 for _ in iter_pairs(uri, max_bad_fraction=max_bad_fraction, hard_negatives=hard_negatives))


# --------------------------------------------------------------------------------------------------------
# Tokens


def make_encoder(tokenizer, max_length: int) -> Callable[[list[str]], list[list[int]]]:
    """texts -> token ids, truncated to max_length, no special tokens added.

    A fast tokenizer is cloned into a private ``tokenizers.Tokenizer`` whose ``encode_batch`` runs in Rust: the
    clone's truncation settings are its own, so the training thread may use the original concurrently (the HF
    wrapper re-sets truncation and padding on its shared backend at every call)."""
    from tokenizers import Tokenizer

    backend = tokenizer if isinstance(tokenizer, Tokenizer) else getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        clone = Tokenizer.from_str(backend.to_str())
        clone.no_padding()
        clone.enable_truncation(max_length)
        return lambda texts: [e.ids for e in clone.encode_batch(texts, add_special_tokens=False)]
    return lambda texts: tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length,
                                   return_attention_mask=False)["input_ids"]


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else EOS (the paper pads with EOS; Pythia has no pad token)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = getattr(tokenizer, "eos_token_id", None) if pad is None else pad
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an EOS token")
    return int(pad)


def load_tokenizer(name_or_path: str):
    """A model's fast tokenizer without torch (``AutoTokenizer`` imports it): ``PreTrainedTokenizerFast`` reads
    ``tokenizer.json`` and ``tokenizer_config.json`` (added tokens, EOS) from a directory or the hub. Its backend
    is the Rust tokenizer the trial's ``AutoTokenizer`` wraps, and ``make_encoder`` encodes with that backend and
    no special tokens in both, so the planner's counts equal the trial's (tests/workers/test_pair_files.py)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(name_or_path)


def with_query_instruction(pair: tuple, instruction: str) -> tuple:
    """The pair with ``instruction`` prepended to its query (never its documents), as text: the trial tokenises
    instruction + query as one text and truncates it to max_length, as sentence-transformers does with a prompt."""
    return (instruction + pair[0], *pair[1:]) if instruction else pair


def measure_tokens_per_pair(uri, tokenizer, max_length: int, sample: int = 1024, query_instruction: str = "",
                            hard_negatives: int = 0) -> float:
    """Mean truncated query + document tokens over the first ``sample`` usable pairs (file order), the query
    instruction and the ``hard_negatives`` documents of each pair counted."""
    pairs = [with_query_instruction(p, query_instruction)
             for p in load_eval_pairs(uri, sample, hard_negatives=hard_negatives)]
    encode = make_encoder(tokenizer, max_length)
    texts = [[p[i] for p in pairs] for i in range(2 + hard_negatives)]  # queries, documents, each negative
    return sum(sum(map(len, encode(side))) for side in texts) / len(pairs)


class Stopped(Exception):
    """Raised inside a producer's ``_batches`` when ``close`` asked it to stop."""


class BackgroundBatches:
    """A batch iterator fed by a producer thread, shared by PairStream (workers/pair_batches.py) and workers/token_cache.py's
    CachedPairs: the producer runs the subclass's ``_batches()`` (``(batch, passes done)`` pairs) into a bounded
    queue, the consumer yields them and counts them in ``self.stats``; an error in the producer is re-raised in the
    consumer. ``close`` stops the producer and waits for it (it checks at every pair and every queue put); a
    context manager."""

    _thread: threading.Thread | None
    _stop: threading.Event
    stats: DataStats

    def _batches(self):
        raise NotImplementedError

    def _passes_done(self) -> int:
        """What ``stats.epochs_completed`` says once the producer ran out."""
        raise NotImplementedError

    def _start(self, prefetch: int, name: str):
        """Starts the producer; returns the consumer's iterator."""
        self._queue = queue.Queue(maxsize=prefetch)
        self._thread = threading.Thread(target=self._produce, name=f"{name}-{id(self):x}", daemon=True)
        self._thread.start()
        return self._consume()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for item in self._batches():
                if not self._put(("batch", item)):
                    return
            self._put(("end", self._passes_done()))
        except Stopped:
            pass
        except BaseException as e:  # noqa: BLE001 -- re-raised in the consumer
            self._put(("error", e))

    def _consume(self):
        try:
            while True:
                try:
                    kind, item = self._queue.get(timeout=0.1)
                except queue.Empty:
                    if self._stop.is_set():
                        return
                    continue
                if kind == "error":
                    raise item
                if kind == "end":
                    self.stats.epochs_completed = item
                    return
                batch, epochs = item
                self._count(batch, epochs)
                yield batch
        finally:
            self.close()

    def _count(self, batch, epochs: int) -> None:
        s = self.stats
        s.batches, s.pairs, s.epochs_completed = s.batches + 1, s.pairs + len(batch), epochs
        s.real_tokens += batch.real_tokens
        s.padded_tokens += batch.padded_tokens

    def close(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
