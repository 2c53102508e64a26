"""A report's round trip while the store is slow: N concurrent trivial trials (default 64) through the driver's
real path, on a store whose every write takes ``--write-ms`` (default 100 ms, injected: an object store's PUT).

    python benchmarks/report_latency.py [--trials 64] [--reports 20] [--write-ms 100] [--mode both] [--json]

Each trial reports ``--reports`` events (one metric row each, the last one final, as the worker does) and times
``tune.report``: Ray Tune's function trainable blocks in ``report`` until the controller has taken the result, so
the round trip includes whatever the driver does with it in Tune's loop. The sweep runs through
``orchestrator.tuning.run_tuner`` with the real store callback and Recorder on the embedded Ray
(``ray_session``), twice: ``background`` (the product: the store's Flusher writes beside Tune's loop) and
``inline`` (the Flusher replaced by nothing: every flush runs in Tune's loop, as before the Flusher existed).
Printed per mode: the round trip's median and p95, and whether every trial is ``completed`` once with each of
its metric rows exactly once. Target: background median <= 50 ms. With --json the last stdout line is one JSON
object.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import load_500  # noqa: E402 -- the same config-only model, one-line data and events
from benchmarks.load_500 import make_fixture, trivial_event  # noqa: E402

os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
REPORTS = 20  # set by --reports (the trainable is pickled by value, these with it)
OUT = ""  # where each trial writes its round trips


def timed_trainable(config: dict) -> None:
    """A trial that trains nothing (load_500's events: one metric row each, the last final); each report timed."""
    import json as _json
    import time as _time

    from ray import tune

    trial, took = config["trial"], []
    for step in range(1, REPORTS + 1):
        event = trivial_event(trial, step, REPORTS)
        t0 = _time.perf_counter()
        tune.report(event)
        took.append(_time.perf_counter() - t0)
    with open(f"{OUT}/{trial['trial_id']}.json", "w") as f:
        _json.dump(took, f)


class _NoFlusher:
    """``inline`` mode: no Flusher attached, so the Recorder flushes in Tune's loop (the store callback's thread)."""

    error = None

    def __init__(self, recorder):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def slow_writes(write_s: float):
    """Every store write (metric files, trials.parquet, grid.yaml) takes ``write_s`` longer."""
    from orchestrator.store import Store

    real = Store._write

    def slow(self, uri, data):
        time.sleep(write_s)
        return real(self, uri, data)

    Store._write = slow


def run(mode: str, n: int, root: str) -> dict:
    import pandas as pd

    from orchestrator import tuning
    from orchestrator.driver import merge_trials
    from orchestrator.grid import parse_grid
    from orchestrator.plan import plan_grid
    from orchestrator.store import Flusher, Recorder, Store

    global OUT
    OUT = os.path.join(root, f"took-{mode}")
    os.makedirs(OUT)
    doc = make_fixture(os.path.join(root, mode), n)
    doc["resources"], doc["run"]["max_concurrent_trials"] = {"cpus_per_trial": 1.0}, n
    grid = parse_grid(doc, source="latency grid")
    plan = plan_grid(grid)
    store = Store(os.path.join(root, mode, "store"), grid.name)
    store.write_grid(grid.model_dump(mode="json", exclude_none=True))
    recorder = Recorder(store, merge_trials({}, plan))
    recorder.flush()
    tuning.Flusher = Flusher if mode == "background" else _NoFlusher
    t0 = time.perf_counter()
    tuning.run_tuner(list(plan.runnable), recorder, grid, store, trainable=timed_trainable)
    wall = time.perf_counter() - t0
    took = sorted(x for name in os.listdir(OUT) for x in json.load(open(os.path.join(OUT, name))))
    trials = store.read_trials()
    metrics = pd.read_parquet(os.path.join(store.uri, "metrics"))
    return {
        "mode": mode, "trials": n, "reports": len(took), "wall_s": round(wall, 1),
        "median_ms": round(1e3 * statistics.median(took), 1),
        "p95_ms": round(1e3 * took[int(0.95 * (len(took) - 1))], 1),
        "completed_once": sum(r["status"] == "completed" for r in trials.values()) == n == len(trials),
        "rows_exactly_once": bool(len(metrics) == n * REPORTS
                                  and not metrics.duplicated(["trial_id", "step"]).any()),
    }


def main(argv=None) -> int:
    global REPORTS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=64)
    p.add_argument("--reports", type=int, default=20, help="reports per trial")
    p.add_argument("--write-ms", type=float, default=100.0, help="added to every store write")
    p.add_argument("--mode", choices=("both", "background", "inline"), default="both")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    REPORTS = args.reports
    slow_writes(args.write_ms / 1e3)
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(load_500)  # the trials' workers need not import benchmarks/

    from orchestrator.driver import ray_session

    root = tempfile.mkdtemp(prefix="rplat")
    results = []
    try:
        # One logical CPU per trial: all of them run at once (they sleep in `report`, not on the cores).
        ray.init(num_cpus=args.trials, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
                 configure_logging=True, logging_level="WARNING")
        with ray_session(None):  # the initialised Ray: the driver's path from here
            for mode in (["background", "inline"] if args.mode == "both" else [args.mode]):
                r = run(mode, args.trials, root)
                results.append(r)
                print(f"{mode:>10}: {r['trials']} trials x {args.reports} reports, store writes +{args.write_ms:g} ms: "
                      f"report round trip median {r['median_ms']} ms, p95 {r['p95_ms']} ms; "
                      f"every trial completed once: {r['completed_once']}, rows exactly once: "
                      f"{r['rows_exactly_once']} ({r['wall_s']} s)", flush=True)
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(results))
    ok = all(r["completed_once"] and r["rows_exactly_once"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
