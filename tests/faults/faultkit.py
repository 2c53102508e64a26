"""What the fault tests share: our own processes (found by an environment marker, never by name), the CLI in a
subprocess, and the exactly-once check of a sweep store with the table it feeds.

The check (``StoreCheck``), at any moment of a sweep's life: no ``(trial_id, step)`` twice; every completed
trial has exactly its steps ``1..steps``, the last one agreeing with the trial row; a trial completed before a
run is byte for byte the same after it (its row and its metric file): never run again.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os

import pyarrow.parquet as pq

from raykit import (  # noqa: F401  (re-exported: the fault tests import them from here)
    REPO, RayEnv, cmdline_of, environ_of, kill_all, wait_for)


# --- the store -----------------------------------------------------------------------------------------------
def read_trials(sweep_dir: str) -> dict[str, dict]:
    """trials.parquet by trial_id ({} before the driver first wrote it). The driver replaces the file atomically
    (temp + rename), so a reader sees a whole file or none: any other error is a real defect and raises."""
    try:
        return {r["trial_id"]: r for r in pq.read_table(os.path.join(sweep_dir, "trials.parquet")).to_pylist()}
    except FileNotFoundError:
        return {}


def read_metrics(sweep_dir: str) -> list[dict]:
    """Every metric row, as ``pandas.read_parquet(<sweep>/metrics)`` would see them (temp dot-files skipped)."""
    path = os.path.join(sweep_dir, "metrics")
    if not os.path.isdir(path) or not [f for f in os.listdir(path) if not f.startswith(".")]:
        return []
    import pandas as pd

    return pd.read_parquet(path).to_dict("records")


def metric_files(sweep_dir: str) -> dict[str, bytes]:
    out = {}
    for path in glob.glob(os.path.join(sweep_dir, "metrics", "*.parquet")):
        with open(path, "rb") as f:
            out[os.path.basename(path).removesuffix(".parquet")] = f.read()
    return out


def checkpoint_dirs(sweep_dir: str, trial_id: str) -> list[str]:
    """The trial's complete-or-not checkpoint folders, oldest first."""
    return sorted(glob.glob(os.path.join(sweep_dir, "checkpoints", trial_id, "step-*")))


def latest_checkpoint(sweep_dir: str, trial_id: str) -> str | None:
    try:
        with open(os.path.join(sweep_dir, "checkpoints", trial_id, "LATEST")) as f:
            return os.path.join(sweep_dir, "checkpoints", trial_id, f.read().strip())
    except OSError:
        return None


def checkpoint_progress(path: str) -> dict:
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)["progress"]


def under_way(sweep_dir: str, min_step: int = 2) -> dict[str, dict]:
    """Trials with a mid-run checkpoint at ``min_step`` or later (read from the checkpoints, which workers write
    as they go, not from trials.parquet, which the driver rewrites only every few seconds): their progress."""
    out = {}
    for trial_id in os.listdir(os.path.join(sweep_dir, "checkpoints")) if os.path.isdir(
            os.path.join(sweep_dir, "checkpoints")) else []:
        path = latest_checkpoint(sweep_dir, trial_id)
        try:
            progress = checkpoint_progress(path) if path else None
        except (OSError, ValueError):  # being replaced
            continue
        if progress and not progress["done"] and progress["step"] >= min_step:
            out[trial_id] = progress
    return out


@dataclasses.dataclass
class Snapshot:
    """The store at one moment."""

    trials: dict[str, dict]
    rows: list[dict]
    files: dict[str, bytes]

    @classmethod
    def take(cls, sweep_dir: str) -> "Snapshot":
        return cls(read_trials(sweep_dir), read_metrics(sweep_dir), metric_files(sweep_dir))

    def completed(self) -> set[str]:
        return {k for k, r in self.trials.items() if r["status"] == "completed"}

    def unfinished(self) -> set[str]:
        return {k for k, r in self.trials.items() if r["status"] not in ("completed", "skipped")}


@dataclasses.dataclass
class Counts:
    lost: int = 0  # (trial_id, step) rows a completed trial should have and the store lacks
    duplicated: int = 0  # rows present more than once, or past a completed trial's last step
    rerun: int = 0  # trials completed before a run and changed by it

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(self.lost + other.lost, self.duplicated + other.duplicated, self.rerun + other.rerun)


def check(now: Snapshot, before: Snapshot | None = None, trial_ids: set[str] | None = None) -> Counts:
    """The exactly-once counts of the store ``now`` (over ``trial_ids``, default all), and the trials completed
    in ``before`` that ``now`` shows changed."""
    ids = set(now.trials) if trial_ids is None else trial_ids
    counts = Counts()
    seen: dict[tuple[str, int], int] = {}
    for r in now.rows:
        if r["trial_id"] in ids:
            seen[(r["trial_id"], r["step"])] = seen.get((r["trial_id"], r["step"]), 0) + 1
    counts.duplicated = sum(n - 1 for n in seen.values())
    for trial_id in ids & now.completed():
        t = now.trials[trial_id]
        steps = {s for (tid, s) in seen if tid == trial_id}
        expected = set(range(1, t["steps"] + 1))
        counts.lost += len(expected - steps)
        counts.duplicated += len(steps - expected)
        last = [r for r in now.rows if r["trial_id"] == trial_id and r["step"] == t["steps"]]
        if last and (last[0]["tokens"], last[0]["flops"]) != (t["tokens"], t["flops"]):
            counts.lost += 1  # the last row is not the trial's end: a row of the real end is missing
    if before is not None:
        for trial_id in before.completed() & ids:
            if now.trials.get(trial_id) != before.trials[trial_id] or \
                    now.files.get(trial_id) != before.files.get(trial_id):
                counts.rerun += 1
    return counts


# --- the table -----------------------------------------------------------------------------------------------
class FaultTable:
    """fault | runs | rows lost | rows duplicated | trials re-run; printed at the end of the session and
    written to ``path``."""

    HEADER = ("fault", "runs", "rows lost", "rows duplicated", "trials re-run")

    def __init__(self, path: str):
        self.path = path
        self.rows: dict[str, list] = {}

    def add(self, fault: str, counts: Counts, runs: int = 1) -> None:
        row = self.rows.setdefault(fault, [fault, 0, 0, 0, 0])
        row[1] += runs
        row[2] += counts.lost
        row[3] += counts.duplicated
        row[4] += counts.rerun
        self.write()

    def render(self) -> str:
        rows = [self.HEADER, *[tuple(str(x) for x in r) for r in self.rows.values()]]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.HEADER))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)

    def write(self) -> None:
        with open(self.path, "w") as f:
            f.write(self.render() + "\n")
        with open(self.path + ".json", "w") as f:
            json.dump([dict(zip(self.HEADER, r)) for r in self.rows.values()], f)
