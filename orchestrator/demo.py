"""`repurpose demo`: the whole study on a laptop, offline.

Builds (or reuses, cached) the stdlib pair data and the pretrained mini Pythia suite (workers/suite/),
plans and runs a small grid on an embedded local Ray — every method, two LoRA ranks, three budgets ×4
apart scaled to the suite — into the store, fits the frontier and prints the recipe table.
"""
from __future__ import annotations

import sys
import time

from orchestrator.driver import run_sweep
from orchestrator.grid import parse_grid
from orchestrator.store import Store

# The demo's grid, scaled to the mini suite (N from 0.1M to 1.2M). Measured on this 2-core machine
# (benchmarks/README.md, "Demo"): from the suite's checkpoints, every model first collapses its embeddings to
# one point (eval loss = ln(batch), chance) and needs 100-200 optimizer steps to grow discriminative
# directions again, whatever the lr; after that the loss falls steadily (0.1m, batch 32, lr 3e-3: 3.13 at
# 200 steps, 2.65 at 400, 1.76 at 1,300). So the demo buys steps: batch 32 (chance 3.47), up to 3 passes
# over the 14k pairs, one lr of 3e-3 for all (the paper's pretraining lr / 10 is tuned for thousands of
# steps; at 200 steps 3e-3 beat 1e-3 by 0.2 nats and matched 1e-2), and budgets x4 apart from ~100 steps
# of the smallest model. The top budget is where the data runs out for the smallest model (planned as
# skipped, like the paper's degenerate cells).
# Random batches (the paper's; length buckets biased the loss) pad every text to its batch's longest:
# ~60 % of the tokens a step computes are padding, and the demo's sweep at max_length 64 and budgets x4 apart
# took ~25 minutes here. Texts cut at 32 tokens pad far less (a 0.34m step 1.8x faster) and buy 30 % more steps
# per FLOP; budgets x2.5 apart keep the three-budget frontier within the demo's time.
DEMO_BUDGETS = (1e11, 2.5e11, 6.25e11)
DEMO_METHODS = {"full": {}, "freeze": {"trainable_fraction": [0.5]}, "bias": {}, "lora": {"rank": [8, 32]}}
DEMO_TRAIN = {"batch_size": 32, "max_length": 32, "lr": 3e-3,
              "gradient_checkpointing": False}  # the mini models fit memory; recomputing is 20 % of a step
DEMO_PLAN = {"min_steps": 12, "max_epochs": 2}
DEMO_MODELS = 3  # the smallest three of the suite (>= 3 models, the study's spread)
# --quick (CI): two smallest models pretrained on 5 % of the tokens, two methods, two budgets
QUICK = {"sizes": ("0.1m", "0.34m"), "token_scale": 0.05, "budgets": (1e11, 4e11),
         "methods": {"full": {}, "lora": {"rank": [8]}}}


def demo_grid(name: str, models: list[str], data: dict, *, budgets=DEMO_BUDGETS, methods=None) -> dict:
    return {
        "name": name,
        "models": models,
        "methods": methods or DEMO_METHODS,
        "budgets": list(budgets),
        "data": {"train": data["train"], "eval": data["eval"]},
        "train": DEMO_TRAIN,
        "plan": DEMO_PLAN,
        "run": {"checkpoint_every_s": 30, "eval_pairs": 1024},
    }


def run(args) -> int:
    from workers.export import quiet_model_loading
    from workers.suite.cache import build_suite, demo_data  # torch: the suite is built in this process, once
    from workers.suite.models import SUITES

    quiet_model_loading()

    started = time.perf_counter()
    family = getattr(args, "family", None) or "pythia"
    print(f"repurpose demo: building (or reusing) the offline pair data and the mini {family} suite", file=sys.stderr)
    quick = getattr(args, "quick", False)
    data = demo_data()
    series = SUITES[family]
    sizes = [series[i].name for i in range(len(QUICK["sizes"]))] if quick else [m.name for m in series[:DEMO_MODELS]]
    suite = build_suite(sizes=sizes, token_scale=QUICK["token_scale"] if quick else 1.0, family=family)
    models = [m.path for m in suite[:DEMO_MODELS]]
    for m in suite:
        print(f"  {m.name:<20} N={m.n_params:>9,}  pretrain loss {m.pretrain_loss:.2f}  {m.path}", file=sys.stderr)
    extra = {"budgets": QUICK["budgets"], "methods": QUICK["methods"]} if quick else {}
    grid = parse_grid(demo_grid(args.name, models, data, **extra), source="demo grid")
    store = Store(args.storage, grid.name)
    code = run_sweep(grid, store, args.address)
    print(f"sweep done in {time.perf_counter() - started:.0f} s; fitting", file=sys.stderr)
    return report(store) or code


def report(store: Store) -> int:
    """Fit, write figures and tables under <sweep>/analysis/, print the recipe table."""
    from analysis.report import write_fit_outputs

    out = f"{store.uri}/analysis"
    summary = write_fit_outputs(store.uri, out)
    with open(summary["files"]["recipe_md"]) as f:
        print(f.read())
    print(f"figures and tables: {out}", file=sys.stderr)
    return 0
