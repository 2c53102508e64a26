"""Building the token cache (workers/token_cache.py) on the driver's Ray: one Ray Data task per shard across the
cluster's CPUs.

The build runs where the driver's Ray is: inside ``submit`` on the Ray the sweep runs on (a cluster, when the
driver is a Ray Job there), and for ``repurpose prepare`` on the one ``orchestrator.driver.ray_session`` starts or
connects to — the driver's one Ray start-up, so the embedded Ray is the same loopback-only one. The cache's key,
manifest, shard format, order and reader stay in workers/token_cache.py (the trial's side reads them).
"""
from __future__ import annotations

import json
import os
import logging
import sys
import time
from typing import Iterator

from workers import token_cache as tc
from workers.pair_files import MAX_BAD_FRACTION, DataError


def ensure(storage_uri: str, *, train_uri: str, eval_uri: str | None, tokenizer_path: str, max_length: int,
           shard_bytes: int = tc.SHARD_BYTES, max_bad_fraction: float = MAX_BAD_FRACTION, log=None,
           address: str | None = None, tokenizer=None, query_instruction: str = "",
           hard_negatives: int = 0) -> tuple[str, dict]:
    """(cache URI, manifest): the cache of (data, tokenizer, max_length), built if it is not there yet (on the
    initialised Ray, else ``ray_session(address)``: the cluster at ``address``, else an embedded local Ray).
    ``tokenizer``: the one at ``tokenizer_path`` if the caller has loaded it (``workers.pair_files.load_tokenizer``).
    ``query_instruction``: prepended to every query before tokenizing; ``hard_negatives`` k: the train split keeps
    the pairs with k negatives and their ids (workers/token_cache.py). Each, when set, is in the key: a cache of
    its own."""
    from workers.pair_files import load_tokenizer

    tokenizer = tokenizer or load_tokenizer(tokenizer_path)
    inputs = tc.cache_inputs(train_uri, eval_uri, tc.tokenizer_sha256(tokenizer_path, tokenizer), max_length,
                             shard_bytes, query_instruction, hard_negatives)
    uri = tc.cache_uri(storage_uri, tc.cache_key(inputs))
    manifest = tc.read_manifest(uri)
    if manifest is None:
        manifest = build(uri, inputs, tokenizer, train_uri=train_uri, eval_uri=eval_uri,
                         max_bad_fraction=max_bad_fraction, log=log, address=address)
    return uri, manifest


def build(uri: str, inputs: dict, tokenizer, *, train_uri: str, eval_uri: str | None,
          max_bad_fraction: float = MAX_BAD_FRACTION, log=None, address: str | None = None) -> dict:
    """Builds (or finishes) the cache at ``uri``; returns its manifest. One progress line per shard on ``log``
    (default: stderr); Ray Data's own progress bars are off."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    started = time.perf_counter()
    splits = {"train": train_uri, **({"eval": eval_uri} if eval_uri else {})}
    plans, records, todo = tc.shard_plans(uri, splits, inputs["shard_bytes"])
    total = sum(map(len, plans.values()))
    short = uri.rstrip("/").rsplit("/", 1)[-1][:12]
    if records:
        log(f"token cache {short}: {len(records)} of {total} shards already built, resuming")
    if todo:
        for out in run_tasks(todo, tc.task_kwargs(uri, inputs, tokenizer), address):
            if out["error"]:
                raise DataError(out["error"])
            rec = records[out["split"], out["index"]] = json.loads(out["record"])
            log(f"token cache {short}: shard {len(records)}/{total} ({out['split']} {out['index']:05d}.parquet: "
                f"{rec['rows']:,} pairs, {rec['real_tokens']:,} tokens, {len(rec['bad'])} bad lines)")
    manifest = tc.write_manifest(uri, inputs, tokenizer, splits, plans, records, max_bad_fraction)
    tr = manifest["splits"]["train"]
    log(f"token cache {short}: built in {time.perf_counter() - started:.1f} s: {tr['pairs']:,} train pairs, "
        f"{tr['real_tokens']:,} real tokens, {tr['bad_lines']} bad lines")
    return manifest


def run_tasks(tasks: list[dict], kwargs: dict, address: str | None = None) -> Iterator[dict]:
    """One Ray Data task per shard over the cluster's CPUs; results as they finish. On the initialised Ray, else
    on ``ray_session(address)`` (started, or connected, and shut down after)."""
    from orchestrator import driver  # the module, not the name: tests replace driver.ray_session

    quiet = logging.getLogger("ray.data")  # "Progress bars disabled", "execution finished": our lines say it
    level = quiet.level
    with driver.ray_session(address or os.environ.get("RAY_ADDRESS")):  # as the CLI's --address default
        import ray.data

        quiet.setLevel(logging.ERROR)
        ctx = ray.data.DataContext.get_current()
        # our one line per shard instead of Ray Data's bars and execution banners
        ctx.enable_progress_bars = False
        ctx.enable_operator_progress_bars = False
        ctx.print_on_execution_start = False
        ctx.verbose_stats_logs = False
        ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
        ds = ds.map(tc.build_shard, fn_kwargs=kwargs, num_cpus=1)
        try:
            yield from ds.iter_rows()
        finally:
            quiet.setLevel(level)
