"""Token cache vs raw path: pairs/s and real tokens/s delivered to a training loop that does nothing else.

    python benchmarks/cache.py [--copies 14] [--epochs 2] [--json]

Data: the demo's stdlib pairs (workers/suite/cache.py ``demo_data``) in ``--copies`` files, a byte-level BPE trained on
them (vocab 8192, as benchmarks/run.py), batch 1024, max length 75, seed 0, one torch thread (the trial process's
core; the raw path's tokenizer runs in Rust on its background thread, the cache's gather in numpy on its own).
Both streams run in the same process, one after the other, so their ratio is the figure (the machine is shared).
The cache is built first with Ray Data on this machine's CPUs (its build time is printed, not part of the ratio).

The table sets the cache's delivered real tokens/s beside what an H100 SXM at 40 % MFU consumes when training
full fine-tuning of each Pythia size: 0.4 x 989e12 / (6 N) tokens/s (N non-embedding, core/models.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

PYTHIA = ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b")
TARGET_RATIO, TARGET_TOKENS_PER_S = 20.0, 20e6
ROUNDS = 3


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_data(root: str, copies: int) -> tuple[str, str]:
    """(data dir with ``copies`` copies of the demo's train pairs, tokenizer dir: benchmarks/run.py's fixture)."""
    from benchmarks.run import prepare

    fixture = prepare(root)
    data = os.path.join(root, "data")
    os.makedirs(data)
    for i in range(copies):
        shutil.copy(fixture["train"], os.path.join(data, f"part-{i:03d}.jsonl"))
    return data, fixture["tokenizer"]


def consume(stream, max_s: float) -> dict:
    """Iterates the stream (no work per batch) until it ends or max_s passes; counts what it delivered."""
    pairs = tokens = batches = 0
    t0 = time.perf_counter()
    for batch in stream:
        pairs += len(batch)
        tokens += batch.real_tokens
        batches += 1
        if time.perf_counter() - t0 > max_s:
            break
    stream.close()
    wall = time.perf_counter() - t0
    return {"batches": batches, "pairs": pairs, "real_tokens": tokens, "wall_s": wall,
            "pairs_per_s": pairs / wall, "tokens_per_s": tokens / wall}


def median(rounds: list[dict], path: str) -> dict:
    """The round whose ``path`` was at its median pairs/s."""
    return sorted((r[path] for r in rounds), key=lambda x: x["pairs_per_s"])[len(rounds) // 2]


def h100_consumption(mfu: float = 0.40, peak: float = 989e12) -> dict[str, float]:
    """Pythia size -> real tokens/s an H100 SXM consumes at ``mfu`` in full fine-tuning (6 N FLOP per token)."""
    from core.models import model_shape

    return {s: mfu * peak / (6 * model_shape(f"EleutherAI/pythia-{s}").n_params()) for s in PYTHIA}


def run(copies: int, epochs: float, raw_s: float, batch: int, max_length: int) -> dict:
    import torch

    from workers import token_cache
    from workers.pair_batches import PairStream
    from workers.pair_files import load_tokenizer

    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="rpcache")
    try:
        data, tok_dir = make_data(root, copies)
        t0 = time.perf_counter()
        from orchestrator import cache_build

        uri, manifest = cache_build.ensure(os.path.join(root, "store"), train_uri=data, eval_uri=None,
                                           tokenizer_path=tok_dir, max_length=max_length, log=log)
        build_s = time.perf_counter() - t0
        split = manifest["splits"]["train"]
        log(f"cache built: {split['pairs']:,} pairs in {build_s:.1f} s (Ray Data, {os.cpu_count()} CPUs)")
        tokenizer = load_tokenizer(tok_dir)

        def raw_stream():
            return PairStream(data, tokenizer, batch_size=batch, max_length=max_length, seed=0)

        consume(raw_stream(), 2.0)  # warm-up: imports, first allocations, the page cache
        consume(token_cache.CachedPairs(uri, batch, 0, 0.2), 1e9)
        rounds = []
        for r in range(ROUNDS):  # interleaved: a load spike hits both paths of a round
            raw = consume(raw_stream(), raw_s)
            cached = consume(token_cache.CachedPairs(uri, batch, 0, epochs), 1e9)
            inline = consume(token_cache.CachedPairs(uri, batch, 0, epochs, prefetch=0), 1e9)
            rounds.append({"raw": raw, "cached": cached, "inline": inline,
                           "ratio": cached["pairs_per_s"] / raw["pairs_per_s"]})
            log(f"round {r}: raw {raw['pairs_per_s']:,.0f} pairs/s ({raw['tokens_per_s'] / 1e6:.2f}M tokens/s); "
                f"cached {cached['pairs_per_s']:,.0f} ({cached['tokens_per_s'] / 1e6:.2f}M), inline "
                f"{inline['pairs_per_s']:,.0f} ({inline['tokens_per_s'] / 1e6:.2f}M): {rounds[-1]['ratio']:.1f}x")
        t0 = time.perf_counter()
        stream = token_cache.CachedPairs(uri, batch, 0, epochs, skip_batches=cached["batches"] - 1)
        resumed = next(iter(stream))
        seek_s = time.perf_counter() - t0
        stream.close()
        assert resumed.index == cached["batches"] - 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"pairs": split["pairs"], "real_tokens_per_pass": split["real_tokens"], "build_s": build_s,
            "rounds": rounds, "raw": median(rounds, "raw"), "cached": median(rounds, "cached"),
            "inline": median(rounds, "inline"), "ratio_pairs_per_s": sorted(r["ratio"] for r in rounds)[ROUNDS // 2],
            "seek_last_batch_s": seek_s, "threads": 1, "batch_size": batch, "max_length": max_length,
            "copies": copies, "epochs": epochs, "h100_tokens_per_s": h100_consumption()}


def table(out: dict) -> str:
    c = out["cached"]["tokens_per_s"]
    lines = ["| Pythia | H100 @ 40 % MFU consumes | cache delivers (1 core) | cache / need |", "|---|---|---|---|"]
    for size, need in out["h100_tokens_per_s"].items():
        lines.append(f"| {size} | {need / 1e6:.2f}M tokens/s | {c / 1e6:.1f}M tokens/s | {c / need:.1f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copies", type=int, default=14)
    ap.add_argument("--epochs", type=float, default=2.0, help="passes read from the cache")
    ap.add_argument("--raw-s", type=float, default=20.0, help="seconds of the raw stream measured")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--max-length", type=int, default=75)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from workers.export import quiet_model_loading

    quiet_model_loading()  # as the CLI: no library noise the user did not ask for
    out = run(args.copies, args.epochs, args.raw_s, args.batch, args.max_length)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    r, c, i = out["raw"], out["cached"], out["inline"]
    print(f"{out['pairs']:,} pairs ({out['copies']} files), batch {out['batch_size']}, max length "
          f"{out['max_length']}, 1 torch thread; cache built in {out['build_s']:.1f} s")
    print(f"raw:    {r['pairs_per_s']:>12,.0f} pairs/s  {r['tokens_per_s'] / 1e6:6.2f}M real tokens/s")
    print(f"cached: {c['pairs_per_s']:>12,.0f} pairs/s  {c['tokens_per_s'] / 1e6:6.2f}M real tokens/s (thread)")
    print(f"inline: {i['pairs_per_s']:>12,.0f} pairs/s  {i['tokens_per_s'] / 1e6:6.2f}M real tokens/s (prefetch=0)")
    print(f"ratio:  {out['ratio_pairs_per_s']:.1f}x median of {ROUNDS} rounds (target >= {TARGET_RATIO:g}x); "
          f"cached tokens/s target >= "
          f"{TARGET_TOKENS_PER_S / 1e6:g}M; seek to the last batch: {out['seek_last_batch_s']:.2f} s")
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
