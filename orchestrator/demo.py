"""`repurpose demo`: the whole study on a laptop, offline.

Builds (or reuses, cached) the stdlib pair data and the pretrained mini Pythia suite (workers/suite.py),
plans and runs a small grid on an embedded local Ray — every method, two LoRA ranks, three budgets ×4
apart scaled to the suite — into the store, fits the frontier and prints the recipe table.
"""
from __future__ import annotations

import sys
import time

from orchestrator.driver import run_sweep
from orchestrator.grid import parse_grid
from orchestrator.store import Store

# The demo's grid, scaled to the mini suite (N from 0.1M to 4.7M): a batch of 64 pairs keeps >= 10 optimizer
# steps at the smallest budget for the larger models, and the top budget is where the data runs out for the
# smallest ones (planned as skipped, like the paper's degenerate cells).
DEMO_BUDGETS = (1.25e11, 5.0e11, 2.0e12)
DEMO_METHODS = {"full": {}, "freeze": {"trainable_fraction": [0.5]}, "bias": {}, "lora": {"rank": [8, 32]}}
DEMO_TRAIN = {"batch_size": 64, "max_length": 64}
DEMO_MODELS = 3  # the smallest three of the suite (>= 3 models, the study's spread)
# --quick (CI): two smallest models pretrained on 5 % of the tokens, two methods, two budgets
QUICK = {"sizes": ("0.1m", "0.34m"), "token_scale": 0.05, "budgets": (4e10, 1.6e11),
         "methods": {"full": {}, "lora": {"rank": [8]}}}


def demo_grid(name: str, models: list[str], data: dict, *, budgets=DEMO_BUDGETS, methods=None) -> dict:
    return {
        "name": name,
        "models": models,
        "methods": methods or DEMO_METHODS,
        "budgets": list(budgets),
        "data": {"train": data["train"], "eval": data["eval"]},
        "train": DEMO_TRAIN,
        "plan": {"min_steps": 10, "max_epochs": 1},
        "run": {"checkpoint_every_s": 30, "eval_pairs": 1024},
    }


def run(args) -> int:
    from workers.suite import build_suite, demo_data  # torch: the suite is built in this process, once

    started = time.perf_counter()
    print("repurpose demo: building (or reusing) the offline pair data and the mini Pythia suite", file=sys.stderr)
    quick = getattr(args, "quick", False)
    data = demo_data()
    from workers.suite import SUITE

    suite = (build_suite(sizes=QUICK["sizes"], token_scale=QUICK["token_scale"]) if quick
             else build_suite(sizes=[m.name for m in SUITE[:DEMO_MODELS]]))  # only the models the grid uses
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
