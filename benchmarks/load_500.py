"""Load: N trivial trials (default 500) through our driver on the embedded Ray.

    python benchmarks/load_500.py [--trials 500] [--rows 3] [--json]

Each trial is a trivial trainable that emits the worker's events (``--rows`` metric rows, then its final event)
and trains nothing, so what is measured is the driver: Ray Tune, the store callback, the Recorder's flushes.
The sweep goes through the product's own path: ``ray_session`` (loopback, no dashboard) -> plan -> Recorder ->
``orchestrator.tuning.run_tuner(..., trainable=...)``. Reported: trials/s; the driver's peak RSS and its RSS
after the first ``--early`` and after all completions (growth per trial between the two); the store's bytes per
trial and per metric row (metric files + trials.parquet + grid.yaml); and whether every row is there exactly
once. With --json the last stdout line is one JSON object. tests/faults/test_load.py runs it with 100 trials.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
ROWS = 3  # metric rows per trial; set by --rows (the trainable below is pickled by value, this with it)


def trivial_trainable(config: dict) -> None:
    """A trial that trains nothing: ``rows`` metric rows, one event each, the last one final (as the worker)."""
    from ray import tune

    trial, rows = config["trial"], ROWS
    for step in range(1, rows + 1):
        tune.report(trivial_event(trial, step, rows))


def trivial_event(trial: dict, step: int, rows: int) -> dict:
    """The worker's event at ``step`` of ``rows`` as Tune's report carries it: one metric row; the last one done,
    with the trial's row."""
    from core.events import TrialEvent

    row = {"step": step, "tokens": 100 * step, "flops": 1.0 * step, "hardware_flops": 1.0 * step,
           "train_loss": 1.0 / step, "lr": 1e-4, "wall_s": 0.01 * step, "eval_loss": None, "tokens_per_s": 1e4}
    done = step == rows
    if done:
        row["eval_loss"] = 0.5
    event = TrialEvent(rows=(row,), done=done, step=step, tokens=row["tokens"], flops=row["flops"],
                       budget_flops=trial["spec"]["budget_flops"], train_loss=row["train_loss"],
                       trial={"tokens": row["tokens"], "steps": step, "flops": row["flops"],
                              "hardware_flops": row["flops"], "eval_loss": 0.5, "train_loss": row["train_loss"],
                              "wall_s": row["wall_s"], "reason": None, "n_params": 1, "n_trainable": 1}
                       if done else None)
    return event.to_dict()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's own peak RSS (VmHWM, per address space). Not getrusage's ru_maxrss: Linux keeps that across
    exec, so a driver started from a large process (a test runner's worker) would report its parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def make_fixture(root: str, n: int) -> dict:
    """A config-only model (planning reads no weights) and a one-line data file (planning counts nothing: the
    grid gives tokens per pair and the pair count)."""
    model = os.path.join(root, "model")
    os.makedirs(model, exist_ok=True)
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump({"model_type": "gpt_neox", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "intermediate_size": 256, "vocab_size": 512, "repurpose_pretrain_lr": 1e-3}, f)
    data = os.path.join(root, "train.jsonl")
    with open(data, "w") as f:
        f.write(json.dumps({"query": "q", "pos": ["p"], "neg": []}) + "\n")
    return {"name": "load", "models": [model], "methods": {"full": {}},
            "budgets": [1e11 * (1 + i / n) for i in range(n)], "data": {"train": data},
            "train": {"batch_size": 64, "max_length": 64},
            "plan": {"min_steps": 1, "tokens_per_pair": 40, "train_pairs": 10 ** 9},
            "resources": {"cpus_per_trial": 0.25}, "run": {"checkpoint_every_s": 1e9}}


def store_bytes(sweep_dir: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(sweep_dir) for f in files)


def run(n: int, rows: int, early: int, root: str) -> dict:
    from ray import tune

    from orchestrator.driver import merge_trials, ray_session
    from orchestrator.grid import parse_grid
    from orchestrator.plan import plan_grid
    from orchestrator.store import Recorder, Store
    from orchestrator.tuning import run_tuner

    grid = parse_grid(make_fixture(root, n), source="load grid")
    plan = plan_grid(grid)
    store = Store(os.path.join(root, "store"), grid.name)
    store.write_grid(grid.model_dump(mode="json", exclude_none=True))
    recorder = Recorder(store, merge_trials({}, plan))
    recorder.flush()
    samples: dict[str, tuple[int, int]] = {}  # 'early'/'end' -> (trials completed, RSS bytes)

    class Sampler(tune.Callback):
        """The driver's RSS after the first ``early`` completions and after all of them."""

        def on_trial_complete(self, iteration, trials, trial, **info):
            # results arrive in batches under load: `done` can jump past `early`, so sample the first time it is
            # reached or passed, and keep the count it was taken at
            done = sum(r["status"] == "completed" for r in recorder.trials.values())
            if done >= early and "early" not in samples:
                samples["early"] = (done, rss_bytes())
            if done == n:
                samples["end"] = (done, rss_bytes())

    todo = list(plan.runnable)
    assert len(todo) == n, f"{n - len(todo)} of {n} cells skipped by the planner"
    with ray_session(None):
        import ray

        nodes = [node["NodeManagerAddress"] for node in ray.nodes()]
        t0 = time.perf_counter()
        run_tuner(todo, recorder, grid, store, trainable=trivial_trainable, callbacks=[Sampler()])
        wall = time.perf_counter() - t0
    trials = store.read_trials()
    import pandas as pd

    metrics = pd.read_parquet(os.path.join(store.uri, "metrics"))
    completed = sum(r["status"] == "completed" for r in trials.values())
    total = store_bytes(store.uri)
    per_trial = total / n
    return {
        "trials": n, "completed": completed, "rows_per_trial": rows, "wall_s": round(wall, 2),
        "trials_per_s": round(n / wall, 2),
        "rows_exactly_once": bool(len(metrics) == n * rows and not metrics.duplicated(["trial_id", "step"]).any()),
        "peak_rss_mb": round(peak_rss_bytes() / 2 ** 20, 1),
        "rss_early_mb": round(samples["early"][1] / 2 ** 20, 1), "rss_end_mb": round(samples["end"][1] / 2 ** 20, 1),
        "rss_growth_kb_per_trial": round((samples["end"][1] - samples["early"][1]) / 1024
                                         / max(samples["end"][0] - samples["early"][0], 1), 1),
        "store_bytes": total, "store_bytes_per_trial": round(per_trial),
        "store_bytes_per_row": round(total / (n * rows)),
        "memory_rows_left": sum(len(v) for v in recorder._metrics.values()),
        "ray_nodes": nodes,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=500)
    p.add_argument("--rows", type=int, default=3, help="metric rows per trial")
    p.add_argument("--early", type=int, default=100, help="completions at the first RSS sample")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    global ROWS
    ROWS = args.rows
    with tempfile.TemporaryDirectory(prefix="load-") as root:
        result = run(args.trials, args.rows, min(args.early, args.trials), root)
    for k, v in result.items():
        print(f"{k:26} {v}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    return 0 if result["completed"] == args.trials and result["rows_exactly_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
