"""`repurpose status` on a store of 10,000 trials (it should answer in under a second).

    python benchmarks/status_10k.py [--trials 10000] [--repeat 5] [--metrics] [--json]

Builds a synthetic store the way the driver writes one (``orchestrator.store.Store``): a grid of 1 model x 100
LoRA ranks x N/100 budgets, its ``trials.parquet`` with N rows in every status, and (``--metrics``) one metric
file per trial. Then times ``repurpose status NAME`` (text table) and ``status --json`` as a user runs them: a
fresh ``python -m orchestrator.cli`` process each time, interpreter start and imports included; and the same
call in-process (no start-up), to show where the time goes. Reports the median and the worst of ``--repeat``.
With --json the last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

STATUSES = ("completed", "completed", "completed", "running", "pending", "failed", "skipped")


def build_store(root: str, n: int, metrics: bool) -> tuple[str, str]:
    """(storage, sweep name) of a store with ``n`` trials."""
    from orchestrator.driver import initial_row
    from orchestrator.grid import parse_grid
    from orchestrator.plan import plan_grid
    from orchestrator.store import Store

    model = os.path.join(root, "model")
    os.makedirs(model)
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump({"model_type": "gpt_neox", "hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8,
                   "intermediate_size": 2048, "vocab_size": 50304, "repurpose_pretrain_lr": 1e-3}, f)
    data = os.path.join(root, "train.jsonl")
    with open(data, "w") as f:
        f.write(json.dumps({"query": "q", "pos": ["p"]}) + "\n")
    ranks = 100
    grid = parse_grid({"name": "big", "models": [model], "methods": {"lora": {"rank": list(range(1, ranks + 1))}},
                       "budgets": [1e15 * (1 + i / 10) for i in range(n // ranks)], "data": {"train": data},
                       "plan": {"min_steps": 1, "tokens_per_pair": 78, "train_pairs": 10 ** 9}}, source="big grid")
    plan = plan_grid(grid)
    assert len(plan.trials) == n, len(plan.trials)
    storage = os.path.join(root, "store")
    store = Store(storage, grid.name)
    store.write_grid(grid.model_dump(mode="json", exclude_none=True))
    trials = {}
    for i, t in enumerate(plan.trials):
        row = initial_row(grid.name, t)
        status = STATUSES[i % len(STATUSES)]
        row.update(status=status, reason="a reason" if status in ("failed", "skipped") else None)
        if status in ("completed", "running"):
            row.update(steps=100, tokens=10 ** 6, flops=t.budget_flops * 0.99, hardware_flops=t.budget_flops * 1.3,
                       train_loss=1.5, eval_loss=1.6 if status == "completed" else None, wall_s=120.0)
        trials[t.trial_id] = row
        if metrics and status == "completed":
            store.write_metrics(t.trial_id, [{"sweep": grid.name, "trial_id": t.trial_id, "step": s, "tokens": s,
                                              "flops": float(s), "train_loss": 1.0, "lr": 1e-4, "wall_s": float(s),
                                              "eval_loss": None, "tokens_per_s": 1.0} for s in range(1, 11)])
    store.write_trials(trials)
    return storage, grid.name


def time_cli(args: list[str], repeat: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": REPO}
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        out.append(time.perf_counter() - t0)
        assert proc.returncode == 0, proc.stderr
    return out


def time_in_process(args: list[str], repeat: int) -> list[float]:
    import contextlib
    import io

    from orchestrator import cli

    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli.main(args) == 0
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=10_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--metrics", action="store_true", help="also write one metric file per completed trial")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="status-") as root:
        t0 = time.perf_counter()
        storage, name = build_store(root, args.trials, args.metrics)
        build_s = time.perf_counter() - t0
        base = ["status", name, "--storage", storage]
        result = {"trials": args.trials, "build_s": round(build_s, 1),
                  "trials_parquet_bytes": os.path.getsize(os.path.join(storage, name, "trials.parquet"))}
        for label, cmd in (("table", base), ("json", [*base, "--json"])):
            cli_s = time_cli(cmd, args.repeat)
            inproc_s = time_in_process(cmd, args.repeat)
            result[f"cli_{label}_median_s"] = round(statistics.median(cli_s), 3)
            result[f"cli_{label}_max_s"] = round(max(cli_s), 3)
            result[f"in_process_{label}_median_s"] = round(statistics.median(inproc_s), 3)
    for k, v in result.items():
        print(f"{k:28} {v}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
