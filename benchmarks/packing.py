"""Packing: real tokens/s of the contrastive step, packed rows against padded random batches, same run.

    python benchmarks/packing.py [--quick] [--models mini-1.2m,70m] [--batches 128,256] [--factors 1,2,4]
                                 [--rounds 5] [--steps 2] [--threads 1] [--json]

The step is the trial's (workers/loss.py ``contrastive_backward`` + AdamW, bf16 autocast on CPU, eager attention
as workers/steps.py ``load`` picks it on CPU, full fine-tuning, no checkpointing), on random batches of the
stdlib pairs (workers/suite/cache.py ``demo_data``: real-ish lengths) tokenised with a BPE trained on them. Cases:
a demo-sized model (mini-pythia-1.2m's shape, max length 32 as the demo) and a Pythia-70m-shaped one (random
weights, max length 75), at batch 128 and 256. Variants, interleaved within each round so that load on the
shared machine hits all alike: padded, packed into rows of 1x the longest text (the default), 2x and 4x.
Prints per case the median and best over rounds of each packed variant's tokens/s divided by the padded one's
of the same round: only same-run ratios are figures here.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TAU = 0.025
# (name, hidden, layers, heads, max_length, vocab): mini-pythia-1.2m (workers/suite/models.py) at the demo's max length,
# and pythia-70m's shape (core/models.py PYTHIA_SHAPES)
MODELS = [("mini-1.2m", 128, 6, 4, 32, 4096), ("70m", 512, 6, 8, 75, 8192)]
FACTORS = (1, 2, 4)  # row capacity = factor x the forward's longest text


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def token_pairs(vocab: int, max_length: int, n: int = 8192, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """``n`` stdlib pairs as token ids, truncated to ``max_length`` (a BPE of ``vocab`` trained on them)."""
    from workers.suite.cache import demo_data
    from workers.suite.pretraining import train_tokenizer

    with open(demo_data()["train"]) as f:
        pairs = [json.loads(line) for _, line in zip(range(n), f)]
    texts = [t for p in pairs for t in (p["query"], p["pos"][0])]
    tok = train_tokenizer(texts, vocab_size=vocab)
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    pairs = [(ids[2 * i][:max_length], ids[2 * i + 1][:max_length]) for i in range(len(pairs))]
    random.Random(seed).shuffle(pairs)
    return pairs


def batches(pairs, batch: int, count: int, offset: int):
    from workers.pair_batches import collate

    out = []
    for k in range(count):
        chunk = pairs[(offset + k) * batch % len(pairs):][:batch]
        chunk = chunk if len(chunk) == batch else pairs[:batch]
        out.append(collate([q for q, _ in chunk], [d for _, d in chunk], 1, k))
    return out


def build(hidden: int, layers: int, heads: int, vocab: int):
    import torch
    from transformers import AutoModel, GPTNeoXConfig

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden, rotary_pct=0.25, max_position_embeddings=2048,
                        bos_token_id=0, eos_token_id=0, use_cache=False)
    return AutoModel.from_config(cfg, attn_implementation="eager").train()


@contextlib.contextmanager
def row_factor(factor: int | None):
    """Packs rows of ``factor`` x the longest text for the duration (the benchmark's only knob; the step packs
    at 1x)."""
    from workers import packing

    if factor in (None, 1):
        yield
        return
    original = packing.pack  # what the mask kernel's Packer calls (workers/packing.py pack_for)
    packing.pack = lambda ids, mask: original(ids, mask, capacity=factor * int(mask.sum(1).max()))
    try:
        yield
    finally:
        packing.pack = original


def timed_steps(model, optimizer, bs, packing: bool, factor: int | None) -> tuple[float, int]:
    """(seconds, real tokens) of the contrastive steps over ``bs``."""
    import torch

    from workers.loss import contrastive_backward

    autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    tokens, t0 = 0, time.perf_counter()
    with row_factor(factor):
        for b in bs:
            contrastive_backward(model, b, TAU, None, autocast, packing=packing)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += b.real_tokens
    return time.perf_counter() - t0, tokens


def run_case(name, hidden, layers, heads, max_length, vocab, batch, rounds, steps, pairs,
             factors=FACTORS) -> dict:
    import torch

    from workers.packing import layout, lengths_of

    model = build(hidden, layers, heads, vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    variants = [("padded", False, None)] + [(f"packed_{k}x", True, k) for k in factors]
    timed_steps(model, optimizer, batches(pairs, batch, 1, 0), False, None)  # warm-up: oneDNN primitives
    timed_steps(model, optimizer, batches(pairs, batch, 1, 0), True, 1)
    rates = {v: [] for v, _, _ in variants}
    for r in range(rounds):
        bs = batches(pairs, batch, steps, 1 + r * steps)
        for v, packing, factor in variants[r % 2:] + variants[:r % 2]:  # alternate who goes first
            secs, tokens = timed_steps(model, optimizer, bs, packing, factor)
            rates[v].append(tokens / secs)
    bs = batches(pairs, batch, 8, 1000)
    real = sum(b.real_tokens for b in bs)
    padded = sum(b.padded_tokens for b in bs)
    row_tokens = {}
    for k in factors:
        total = 0
        for b in bs:
            lengths = lengths_of(b.q_mask) + lengths_of(b.d_mask)
            lay = layout(lengths, k * max(lengths))
            total += len(lay.rows) * lay.length
        row_tokens[k] = total
    out = {"case": f"{name} b{batch} L{max_length}", "factors": factors, "padding_fraction": 1 - real / padded,
           "padded_tokens_per_s": statistics.median(rates["padded"])}
    for k in factors:
        ratios = [p / q for p, q in zip(rates[f"packed_{k}x"], rates["padded"])]
        out[f"packed_{k}x"] = {"median": statistics.median(ratios), "best": max(ratios), "rounds": ratios,
                               "row_tail_fraction": 1 - real / row_tokens[k],
                               "tokens_vs_padded": row_tokens[k] / padded}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 128 only, 3 rounds")
    ap.add_argument("--models", default=",".join(m[0] for m in MODELS))
    ap.add_argument("--batches", default="128,256")
    ap.add_argument("--factors", default=",".join(map(str, FACTORS)), help="row capacities, x the longest text")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else args.rounds
    factors = tuple(int(k) for k in args.factors.split(","))
    results = []
    for name, hidden, layers, heads, max_length, vocab in MODELS:
        if name not in args.models.split(","):
            continue
        log(f"tokenising pairs for {name} (vocab {vocab}, max length {max_length})")
        pairs = token_pairs(vocab, max_length)
        for batch in (128,) if args.quick else tuple(int(b) for b in args.batches.split(",")):
            log(f"{name}: batch {batch}, {rounds} rounds x {args.steps} steps per variant")
            results.append(run_case(name, hidden, layers, heads, max_length, vocab, batch, rounds, args.steps,
                                    pairs, factors))
            report([results[-1]])
    if args.json:
        print(json.dumps(results))
    return 0


def report(results) -> None:
    for r in results:
        print(f"{r['case']}: padding {r['padding_fraction']:.1%}, padded {r['padded_tokens_per_s']:,.0f} real tokens/s")
        for k in r["factors"]:
            p = r[f"packed_{k}x"]
            print(f"  packed rows {k}x longest: tokens/s vs padded median {p['median']:.2f}x best {p['best']:.2f}x "
                  f"(rounds {' '.join(f'{x:.2f}' for x in p['rounds'])}); rows' tail {p['row_tail_fraction']:.1%}, "
                  f"tokens run {p['tokens_vs_padded']:.2f}x padded", flush=True)


if __name__ == "__main__":
    sys.exit(main())
