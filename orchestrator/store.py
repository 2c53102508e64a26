"""The sweep store (shared/CONTRACTS.md "The store"): ``<storage>/<sweep>/`` with ``grid.yaml``,
``trials.parquet`` and ``metrics/`` (one Parquet file per trial), plus ``checkpoints/`` (the trials' own,
safetensors + JSON). No pickle anywhere.

Exactly once: a trial's metric file always holds the trial's rows keyed by step, and every write replaces
the whole file atomically (``workers.storage.write_bytes``: temp + rename, or an object PUT). An event's
rows supersede the stored rows from their first step on, and the first event after a worker resumes
carries the whole history up to its checkpoint, so rows written past a checkpoint by a run that later
died are replaced, never duplicated, and rows not yet flushed when the driver died come back with the
history. ``pandas.read_parquet(<sweep>/metrics)`` therefore sees each ``(trial_id, step)`` once.
"""
from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from analysis.schema import GRID_FILE, METRICS_DIR, METRICS_SCHEMA, TRIALS_FILE, TRIALS_SCHEMA
from orchestrator.errors import UserError
from workers import storage


class StoreError(UserError):
    """The store cannot be used (unreadable, unwritable, unknown sweep); the message names it."""


def _table_bytes(rows: list[dict], schema: pa.Schema) -> bytes:
    table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _read_rows(uri: str) -> list[dict]:
    # A native Arrow file, not a Python file object (io.BytesIO): pyarrow's scan may drop the last reference
    # to a Python-backed file on one of its own threads, which then takes the GIL; at interpreter exit that
    # thread is killed inside C++ and the process aborts ("terminate called without an active exception").
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).read().to_pylist()


class Store:
    """One sweep's directory. Cheap to build; every method does its own I/O."""

    def __init__(self, storage_uri: str, sweep: str):
        self.storage_uri = storage_uri
        self.sweep = sweep
        self.uri = storage.join(storage_uri, sweep)

    def checkpoint_uri(self, trial_id: str) -> str:
        return storage.join(self.uri, "checkpoints", trial_id)

    # --- grid ------------------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self._try(lambda: storage.exists(storage.join(self.uri, GRID_FILE)), "read")

    def read_grid(self) -> dict:
        """{"grid": <the resolved grid, latest>, "history": [{"at": ..., "grid": ...}, ...]}."""
        if not self.exists():
            raise StoreError(f"{self.uri}: no sweep named {self.sweep!r} in {self.storage_uri}")
        text = self._try(lambda: storage.read_bytes(storage.join(self.uri, GRID_FILE)).decode(), "read")
        return yaml.safe_load(text)

    def write_grid(self, grid: dict, data: dict | None = None) -> None:
        """Records ``grid`` as the sweep's grid (earlier different grids stay in its history) and what the
        planner measured of its data (``train_pairs``, ``tokens_per_pair``: the recipe's data limit)."""
        doc = self.read_grid() if self.exists() else {"grid": None, "history": []}
        if doc["grid"] != grid or doc.get("data") != data:
            if doc["grid"] != grid:
                doc["history"].append({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "grid": grid})
            doc["grid"], doc["data"] = grid, data
            data = yaml.safe_dump(doc, sort_keys=False).encode()
            self._try(lambda: storage.write_bytes(storage.join(self.uri, GRID_FILE), data), "write")

    # --- trials ----------------------------------------------------------------------------------------------
    def read_trials(self) -> dict[str, dict]:
        uri = storage.join(self.uri, TRIALS_FILE)
        if not self._try(lambda: storage.exists(uri), "read"):
            return {}
        return {r["trial_id"]: r for r in self._try(lambda: _read_rows(uri), "read")}

    def write_trials(self, trials: dict[str, dict]) -> None:
        data = _table_bytes(list(trials.values()), TRIALS_SCHEMA)
        self._try(lambda: storage.write_bytes(storage.join(self.uri, TRIALS_FILE), data), "write")

    # --- metrics ---------------------------------------------------------------------------------------------
    def _metrics_uri(self, trial_id: str) -> str:
        return storage.join(self.uri, METRICS_DIR, f"{trial_id}.parquet")

    def read_metrics(self, trial_id: str) -> list[dict]:
        uri = self._metrics_uri(trial_id)
        if not self._try(lambda: storage.exists(uri), "read"):
            return []
        return self._try(lambda: _read_rows(uri), "read")

    def write_metrics(self, trial_id: str, rows: list[dict]) -> None:
        data = _table_bytes(sorted(rows, key=lambda r: r["step"]), METRICS_SCHEMA)
        self._try(lambda: storage.write_bytes(self._metrics_uri(trial_id), data), "write")

    def _try(self, fn, verb: str):
        try:
            return fn()
        except StoreError:
            raise
        except (OSError, storage.StorageError, pa.ArrowException) as e:
            raise StoreError(f"{self.uri}: cannot {verb} the store ({' '.join(str(e).split())[:200]})") from None


class Recorder:
    """The driver's side of the store: trial rows and metric rows kept in memory for live trials, flushed
    every ``flush_every_s`` and on every trial's end. Memory holds only the rows of unfinished trials."""

    def __init__(self, store: Store, trials: dict[str, dict], flush_every_s: float = 5.0):
        self.store = store
        self.trials = trials  # trial_id -> row (TRIALS_SCHEMA)
        self.flush_every_s = flush_every_s
        self._metrics: dict[str, dict[int, dict]] = {}  # trial_id -> step -> row, live trials only
        self._dirty_metrics: set[str] = set()
        self._last_flush = time.monotonic()

    def set_status(self, trial_id: str, status: str, reason: str | None = None, **fields) -> None:
        row = self.trials[trial_id]
        row.update(fields, status=status, reason=reason, updated_at=time.time())

    def on_event(self, trial_id: str, event: dict) -> None:
        """A worker event (workers/trial.py): its rows, then the trial row's live values."""
        rows = event.get("rows") or []
        if event.get("restart") or trial_id not in self._metrics:
            stored = {} if event.get("restart") else {r["step"]: r for r in self.store.read_metrics(trial_id)}
            self._metrics[trial_id] = stored
        live = self._metrics[trial_id]
        if rows:
            first = min(r["step"] for r in rows)
            for step in [s for s in live if s >= first]:
                del live[step]  # superseded: a run past the checkpoint that died
            for r in rows:
                live[r["step"]] = {**r, "sweep": self.store.sweep, "trial_id": trial_id}
            self._dirty_metrics.add(trial_id)
        row = self.trials[trial_id]
        if event.get("done"):
            row.update(event["trial"], status="completed", updated_at=time.time())
            self.flush()
            self._metrics.pop(trial_id, None)
        else:
            live_keys = ("tokens", "flops", "train_loss", "node_id")
            fields = {k: event[k] for k in live_keys if event.get(k) is not None}
            row.update(fields, steps=event.get("step"))
            if row["status"] != "running":
                self.set_status(trial_id, "running")
            self.maybe_flush()

    def maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        for trial_id in sorted(self._dirty_metrics):
            self.store.write_metrics(trial_id, list(self._metrics[trial_id].values()))
        self._dirty_metrics.clear()
        # Trial rows go last: a row says `completed` only once its metrics are on disk.
        self.store.write_trials(self.trials)
        self._last_flush = time.monotonic()
