"""Peak RSS of a trial process running demo trials back to back, as a reused Ray actor does (demo actors
reached 4-6 GB for models of <= 1.2M parameters).

    python benchmarks/memory.py [--trials 6] [--budget 3e11] [--variants default,malloc,malloc+onednn] [--json]

Each variant is a child process with its own environment (1 intra-op thread, as Ray gives a 1-CPU actor) that
runs ``workers.trial.run_trial`` on the demo's cells (batch 32, max length 64, lr 3e-3, eval on 1,024 pairs;
suite-shaped 0.1m / 0.34m / 1.2m models, randomly initialised: memory does not depend on the weights' values)
over the stdlib pairs (workers/suite/cache.py ``demo_data``), and reports its RSS after each trial and its peak
(sampled every 20 ms). Python's own allocations are traced too (tracemalloc): if they stay flat while RSS
grows, the growth is native (allocator, oneDNN), not objects the trial keeps.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# glibc: at most 2 malloc arenas (default 8 x cores; the data thread, the tokenizer's Rust threads and torch's
# allocate in their own) and a fixed mmap threshold of 128 KiB (the default threshold rises to 32 MiB after the
# first large free, so activation-sized blocks then come from the heap and fragment it) -- mallopt(3).
MALLOC = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072"}
VARIANTS = {
    "default": {},
    "malloc": MALLOC,
    # oneDNN (bf16 matmuls on CPU) caches a JIT-compiled primitive per shape; random batches have many padded
    # lengths. Capacity 0 disables the cache (oneDNN docs, "Primitive Cache").
    "malloc+onednn": MALLOC | {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"},
}
METHODS = (("full", {}), ("lora", {"lora_rank": 8}), ("freeze", {"trainable_fraction": 0.5}), ("bias", {}))


def prepare(root: str) -> dict:
    """The demo's pairs, the suite's tokenizer trained on them and the demo's three model shapes."""
    import torch
    from transformers import AutoModel

    from workers.suite.cache import demo_data
    from workers.suite.models import SUITE, VOCAB_SIZE
    from workers.suite.pretraining import train_tokenizer

    data = demo_data()
    tok_dir = os.path.join(root, "tokenizer")
    texts = []
    with open(data["train"]) as f:
        for line in f:
            p = json.loads(line)
            texts += [p["query"], p["pos"][0]]
    train_tokenizer(texts, vocab_size=VOCAB_SIZE).save_pretrained(tok_dir)
    models = []
    for m in SUITE[:3]:
        path = os.path.join(root, m.name)
        torch.manual_seed(0)
        AutoModel.from_config(m.config()).save_pretrained(path)
        for name in os.listdir(tok_dir):
            shutil.copy(os.path.join(tok_dir, name), path)
        models.append(path)
    return {"train": data["train"], "eval": data["eval"], "models": models}


def child(fixture: dict, trials: int, budget: float) -> None:
    """Runs in the variant's process: trials back to back, one JSON line per trial."""
    import threading
    import time
    import tracemalloc

    import psutil

    proc, peak = psutil.Process(), [0]

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    from core.spec import TrialSpec
    from workers.trial import run_trial

    tracemalloc.start()
    cells = [(m, method, kw) for m in fixture["models"] for method, kw in METHODS]
    for i in range(trials):
        model, method, kw = cells[i % len(cells)]
        spec = TrialSpec(model=model, method=method, budget_flops=budget, train_data=fixture["train"],
                         eval_data=fixture["eval"], batch_size=32, max_length=64, lr=3e-3, eval_pairs=1024,
                         max_epochs=3, gradient_checkpointing=False, **kw)
        row = run_trial(spec)
        print(json.dumps({"trial": i, "model": os.path.basename(model), "method": method, "steps": row["steps"],
                          "rss_mb": proc.memory_info().rss / 2**20, "peak_mb": peak[0] / 2**20,
                          "python_mb": tracemalloc.get_traced_memory()[0] / 2**20}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--budget", type=float, default=3e11)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from workers.export import quiet_model_loading

    quiet_model_loading()  # as the CLI (children inherit the environment): no library noise
    if args.child:
        child(json.loads(args.child), args.trials, args.budget)
        return
    root = tempfile.mkdtemp(prefix="repurpose-memory-")
    try:
        fixture = prepare(root)
        results = {}
        for name in args.variants.split(","):
            env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT} | VARIANTS[name]
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(fixture), "--trials",
                                  str(args.trials), "--budget", str(args.budget)], env=env, capture_output=True,
                                 text=True, check=True).stdout
            results[name] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            if not args.json:
                rows = results[name]
                after = " ".join(f"{r['rss_mb']:.0f}" for r in rows)
                print(f"{name:>14}: RSS after each trial (MB) {after}; peak {rows[-1]['peak_mb']:.0f} MB; "
                      f"Python-allocated {rows[-1]['python_mb']:.1f} MB", flush=True)
        if args.json:
            print(json.dumps(results))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
