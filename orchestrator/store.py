"""The sweep store (docs/reference.md "The store"): ``<storage>/<sweep>/`` with ``grid.yaml``,
``trials.parquet`` and ``metrics/`` (one Parquet file per trial), plus ``checkpoints/`` (the trials' own,
safetensors + JSON). No pickle anywhere.

Exactly once: a trial's metric file always holds the trial's rows keyed by step, and every write replaces
the whole file atomically (``fsio.write_bytes``: temp + rename, or an object PUT). An event's
rows supersede the stored rows from their first step on, and the first event after a worker resumes
carries the whole history up to its checkpoint, so rows written past a checkpoint by a run that later
died are replaced, never duplicated, and rows not yet flushed when the driver died come back with the
history. ``pandas.read_parquet(<sweep>/metrics)`` therefore sees each ``(trial_id, step)`` once.

A store that cannot be written for a while (a full disk, a permission or bucket policy changed, a network
outage) costs nothing: the Recorder keeps every unwritten row in memory and writes it at the next flush; only
an outage longer than ``max_outage_s`` stops the sweep, with one line, and ``resume`` then finishes it (the
trials' checkpoints and the rows already written are its starting point; rows never written are recomputed).

``fault_point`` is a test-only hook (tests/faults/): named points where a test may SIGKILL the driver.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

import fsio as storage
from core.errors import one_line
from core.events import TrialEvent
from core.store import (GRID_FILE, LEASE_FILE, METRIC_COLUMNS, METRICS_DIR, TRIAL_COLUMNS, TRIALS_FILE,
                        StoreError, checkpoint_uri, metrics_uri, model_uri, sweep_uri)
from orchestrator.lease import LeaseLost

TRIALS_SCHEMA = storage.arrow_schema(TRIAL_COLUMNS)
METRICS_SCHEMA = storage.arrow_schema(METRIC_COLUMNS)


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML has it: the same safe subset


INTERRUPTED = "interrupted"  # the reason of a trial a SIGINT/SIGTERM stopped mid-run (status pending)

FAULT_ENV = "REPURPOSE_FAULT"
_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Test-only (tests/faults/): with ``REPURPOSE_FAULT=<name>:<n>`` in the environment, SIGKILLs this process
    the n-th time it passes the point ``name``; a no-op without the variable. The driver's points: ``report``
    (a worker event arrives, before it is recorded), ``mid_flush`` (metric files written, trials.parquet not
    yet), ``in_write`` (a store file's temp copy written, not yet renamed into place), ``after_complete``
    (a trial's completion is on disk)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or spec.partition(":")[0] != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == int(spec.partition(":")[2] or 1):
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _table_bytes(rows: list[dict], schema: pa.Schema) -> bytes:
    for r in rows:
        unknown = set(r) - set(schema.names)
        if unknown:  # a bug, not bad input: a misspelt key would become a silent null column
            raise ValueError(f"row keys that are not store columns: {', '.join(sorted(unknown))}")
    table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _read_rows(uri: str, columns=None) -> list[dict]:
    # A native Arrow file, not a Python file object (io.BytesIO): pyarrow's scan may drop the last reference
    # to a Python-backed file on one of its own threads, which then takes the GIL; at interpreter exit that
    # thread is killed inside C++ and the process aborts ("terminate called without an active exception").
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        if columns:  # a store written before a column existed: it reads as null
            present = [c for c in columns if c in parquet.schema_arrow.names]
            rows = parquet.read(columns=present).to_pylist()
            return [{c: r.get(c) for c in columns} for r in rows]
        return parquet.read().to_pylist()


class Store:
    """One sweep's directory. Cheap to build; every method does its own I/O."""

    def __init__(self, storage_uri: str, sweep: str):
        self.storage_uri = storage_uri
        self.sweep = sweep
        self.uri = sweep_uri(storage_uri, sweep)

    def checkpoint_uri(self, trial_id: str) -> str:
        return checkpoint_uri(self.uri, trial_id)

    def kept_weights_bytes(self) -> dict[str, int]:
        """{trial_id: bytes} of the completed trials' kept weights (`status` shows their total)."""
        return self._try(lambda: storage.kept_weights_bytes(self.uri), "read")

    def model_uri(self, trial_id: str) -> str:
        """Where a completed trial keeps its trained weights (``run.keep_weights``)."""
        return model_uri(self.uri, trial_id)

    def has_checkpoint(self, trial_id: str) -> bool:
        """The trial saved a checkpoint a resume continues from (workers/checkpoint.py names it in LATEST)."""
        return self._try(lambda: storage.exists(storage.join(self.checkpoint_uri(trial_id), "LATEST")), "read")

    def first_missing_dir(self) -> str | None:
        """Local stores: the outermost folder of the sweep's path that does not exist yet (None: the sweep's folder
        exists, or the store is remote)."""
        if storage.is_remote(self.uri):
            return None
        path, missing = storage.local_path(self.uri), None
        while not os.path.exists(path) and os.path.dirname(path) != path:
            path, missing = os.path.dirname(path), path
        return missing

    def remove_unused(self, created: str | None) -> None:
        """Removes ``created`` (``first_missing_dir`` before the lease was taken) when the run wrote nothing but
        the lease there: only the lease's lock file is left (the lease itself is released)."""
        if created is None or self.exists():
            return
        files = [os.path.join(d, f) for d, _, names in os.walk(created) for f in names]
        if all(os.path.basename(f) == f".{LEASE_FILE}.lock" for f in files):
            shutil.rmtree(created, ignore_errors=True)

    def acquire_lease(self, takeover: bool = False):
        """This driver's lease on the sweep (orchestrator/lease.py), its heartbeat started; ``LeaseHeld`` when a
        live driver holds it."""
        from orchestrator.lease import Lease

        return self._try(lambda: Lease.acquire(self.uri, self.sweep, takeover=takeover), "write").start()

    def check_location(self) -> None:
        """A local store must be able to become a directory: its nearest existing ancestor is one (checked
        before a sweep starts Ray; nothing is created). Object stores have no such thing to check."""
        if storage.is_remote(self.uri):
            return
        path = os.path.abspath(os.path.expanduser(self.uri.removeprefix("file://")))
        while not os.path.exists(path) and os.path.dirname(path) != path:
            path = os.path.dirname(path)
        if not os.path.isdir(path):
            raise StoreError(f"{self.uri}: cannot write the store ({path} is not a directory)")

    # --- grid ------------------------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self._try(lambda: storage.exists(storage.join(self.uri, GRID_FILE)), "read")

    def read_grid(self) -> dict:
        """{"grid": <the resolved grid, latest>, "history": [{"at": ..., "grid": ...}, ...]}."""
        if not self.exists():
            raise StoreError(f"{storage.redact(self.uri)}: no sweep named {self.sweep!r} in "
                             f"{storage.redact(self.storage_uri)}")
        where = storage.redact(storage.join(self.uri, GRID_FILE))
        data = self._try(lambda: storage.read_bytes(storage.join(self.uri, GRID_FILE)), "read")
        try:
            doc = yaml.load(data.decode(), Loader=_YAML_LOADER)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise StoreError(f"{where}: not readable YAML ({' '.join(str(e).split())[:200]})") from None
        if not isinstance(doc, dict):
            raise StoreError(f"{where}: must be a YAML mapping (grid, history, data)")
        doc.setdefault("history", [])
        return doc

    def write_grid(self, grid: dict, data: dict | None = None) -> None:
        """Records ``grid`` as the sweep's grid (earlier different grids stay in its history) and what the
        planner measured of its data (``train_pairs``, ``tokens_per_pair``: the recipe's data limit)."""
        doc = self.read_grid() if self.exists() else {"grid": None, "history": []}
        if doc.get("grid") != grid or doc.get("data") != data:
            if doc.get("grid") != grid:
                doc["history"].append({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "grid": grid})
            doc["grid"], doc["data"] = grid, data
            self._write(storage.join(self.uri, GRID_FILE), yaml.safe_dump(doc, sort_keys=False).encode())

    # --- trials ----------------------------------------------------------------------------------------------
    def read_trials(self, columns=None) -> dict[str, dict]:
        """trial_id -> row (``columns``: only these, trial_id among them; default all)."""
        uri = storage.join(self.uri, TRIALS_FILE)
        if not self._try(lambda: storage.exists(uri), "read"):
            return {}
        return {r["trial_id"]: r for r in self._try(lambda: _read_rows(uri, columns), "read")}

    def write_trials(self, trials: dict[str, dict]) -> None:
        self._write(storage.join(self.uri, TRIALS_FILE), _table_bytes(list(trials.values()), TRIALS_SCHEMA))

    # --- metrics ---------------------------------------------------------------------------------------------
    def _metrics_uri(self, trial_id: str) -> str:
        return metrics_uri(self.uri, trial_id)

    def read_metrics(self, trial_id: str) -> list[dict]:
        uri = self._metrics_uri(trial_id)
        if not self._try(lambda: storage.exists(uri), "read"):
            return []
        return self._try(lambda: _read_rows(uri), "read")

    def write_metrics(self, trial_id: str, rows: list[dict]) -> None:
        self._write(self._metrics_uri(trial_id), _table_bytes(sorted(rows, key=lambda r: r["step"]), METRICS_SCHEMA))

    def remove_temp_files(self) -> None:
        """Deletes the temp copies (``.tmp-*``) a killed driver left beside the store's files: readers skip
        them (pyarrow ignores dot files), but they would pile up. Only the driver's own files, never the
        checkpoints (workers write those)."""
        for folder in (self.uri, storage.join(self.uri, METRICS_DIR)):
            for name in self._try(lambda: storage.list_dir(folder), "read"):
                if name.startswith(".tmp-"):
                    self._try(lambda: storage.delete(storage.join(folder, name)), "write")

    def _write(self, uri: str, data: bytes) -> None:
        self._try(lambda: storage.write_bytes(uri, data, before_commit=lambda: fault_point("in_write")), "write")

    def _try(self, fn, verb: str):
        try:
            return fn()
        except StoreError:
            raise
        except (OSError, storage.StorageError, pa.ArrowException) as e:
            problem = storage.redact(one_line(e, 200))
            raise StoreError(f"{storage.redact(self.uri)}: cannot {verb} the store ({problem})") from None


class Recorder:
    """The driver's side of the store: trial rows and metric rows kept in memory for live trials, flushed
    every ``flush_every_s`` and on every trial's end. Memory holds only the rows of unfinished trials and of
    finished ones not yet written.

    Used alone, a Recorder flushes in the caller's thread (``on_event`` writes on a trial's end and every
    ``flush_every_s``). While a ``Flusher`` is attached (``run_tuner``: Tune's loop calls ``on_event``), those
    writes happen on the Flusher's thread instead: ``on_event`` only updates memory and asks for a flush, so a
    trial's report never waits on the store. A flush writes a snapshot taken under the lock (metric files first,
    then trials.parquet, so a row says ``completed`` only once its metrics are on disk); what changed while it
    wrote stays dirty for the next one, so rows coalesce and none is lost or written twice.

    A flush that fails keeps everything it could not write and is retried at the next flush (a warning
    line says so once per outage); when the store has refused writes for ``max_outage_s`` the flush raises
    the StoreError."""

    def __init__(self, store: Store, trials: dict[str, dict], flush_every_s: float = 5.0,
                 max_outage_s: float = 600.0, fence=None):
        self.store = store
        # Called before each flush; raises ``LeaseLost`` once another driver holds the sweep: from then on this
        # Recorder writes nothing (orchestrator/lease.py ``Lease.check``).
        self.fence = fence
        self.trials = trials  # trial_id -> row (TRIALS_SCHEMA)
        self.flush_every_s = flush_every_s
        self.max_outage_s = max_outage_s
        self.flusher: "Flusher | None" = None  # set while one is attached: writes happen on its thread
        self._lock = threading.RLock()  # memory: the rows and what is dirty
        self._flushing = threading.Lock()  # one flush at a time (the Flusher's, or a caller's)
        self._metrics: dict[str, dict[int, dict]] = {}  # trial_id -> step -> row, live trials only
        self._dirty_metrics: dict[str, int] = {}  # trial_id -> version of its rows not yet written
        self._version = 0
        self._finished: set[str] = set()  # trials whose rows leave memory once written
        self._completions: set[str] = set()  # trials completed in memory, not yet on disk
        self._last_flush = time.monotonic()
        self._outage_since: float | None = None  # monotonic time of the first failed flush of an outage

    def __getstate__(self) -> dict:  # Tune pickles its callbacks (the experiment state): no locks, no thread
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_flushing", "flusher")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.RLock(), _flushing=threading.Lock(), flusher=None)

    def set_status(self, trial_id: str, status: str, reason: str | None = None, **fields) -> None:
        with self._lock:
            row = self.trials[trial_id]
            row.update(fields, status=status, reason=reason, updated_at=time.time())

    def on_event(self, trial_id: str, event: TrialEvent) -> None:
        """A worker event (core/events.py): its rows, then the trial row's live values."""
        fault_point("report")
        rows = event.rows
        stored = None
        if event.restart or trial_id not in self._metrics:
            # The stored rows are needed only if this event's rows do not supersede them all (a restart's history,
            # or a run from step 1, does): so a trial starting while the store is unreachable costs nothing.
            supersedes_all = event.restart or (rows and min(r["step"] for r in rows) <= 1)
            stored = {} if supersedes_all else {r["step"]: r for r in self.store.read_metrics(trial_id)}
        with self._lock:
            if stored is not None:
                self._metrics[trial_id] = stored
                self._finished.discard(trial_id)
            live = self._metrics[trial_id]
            if rows:
                first = min(r["step"] for r in rows)
                for step in [s for s in live if s >= first]:
                    del live[step]  # superseded: a run past the checkpoint that died
                for r in rows:
                    live[r["step"]] = {**r, "sweep": self.store.sweep, "trial_id": trial_id}
                self._version += 1
                self._dirty_metrics[trial_id] = self._version
            row = self.trials[trial_id]
            if event.done:
                row.update(event.trial, status="completed", updated_at=time.time())
                self._finished.add(trial_id)
                self._completions.add(trial_id)
            else:
                live_keys = ("tokens", "flops", "train_loss", "node_id")
                fields = {k: getattr(event, k) for k in live_keys if getattr(event, k) is not None}
                row.update(fields, steps=event.step)
                if row["status"] != "running":
                    self.set_status(trial_id, "running")
        if event.done:
            self.flush_soon()
        else:
            self.maybe_flush()

    def flush_soon(self) -> None:
        """A trial ended (or failed): its row is written now, by the Flusher when one is attached."""
        if self.flusher is not None:
            self.flusher.wake()
        else:
            self.flush(tolerate=True)

    def maybe_flush(self) -> None:
        if self.flusher is None and time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush(tolerate=True)

    def flush(self, tolerate: bool = False) -> bool:
        """Writes the dirty metric files, then trials.parquet; True when all of it is on the store. A
        StoreError unless ``tolerate`` (then False; what failed stays to be written) and
        the outage is younger than ``max_outage_s``."""
        with self._flushing:
            with self._lock:  # the snapshot: what this flush writes, consistent across files
                self._last_flush = time.monotonic()
                metrics = {t: (v, list(self._metrics[t].values())) for t, v in sorted(self._dirty_metrics.items())}
                trials = {t: dict(r) for t, r in self.trials.items()}
                finished, completions = set(self._finished), set(self._completions)
            try:
                if self.fence is not None:
                    self.fence()
                for trial_id, (version, rows) in metrics.items():
                    self.store.write_metrics(trial_id, rows)
                    with self._lock:
                        if self._dirty_metrics.get(trial_id) == version:  # nothing newer came meanwhile
                            del self._dirty_metrics[trial_id]
                fault_point("mid_flush")
                # Trial rows go last: a row says `completed` only once its metrics are on disk.
                self.store.write_trials(trials)
            except LeaseLost:
                raise  # not an outage: never retried, never written
            except StoreError as e:
                now = time.monotonic()
                if self._outage_since is None:
                    self._outage_since = now
                    print(f"warning: {e}; keeping the rows in memory and retrying every {self.flush_every_s:g} s",
                          file=sys.stderr, flush=True)
                if not tolerate or now - self._outage_since >= self.max_outage_s:
                    raise StoreError(f"{e}; the store refused writes for {now - self._outage_since:.0f} s: the "
                                     f"sweep stops here, `repurpose resume {self.store.sweep}` finishes it") from None
                return False
            if self._outage_since is not None:
                print(f"the store is writable again after {time.monotonic() - self._outage_since:.0f} s; "
                      "every kept row is written", file=sys.stderr, flush=True)
                self._outage_since = None
            with self._lock:
                for trial_id in finished & self._finished:
                    if trial_id not in self._dirty_metrics:  # its last rows are on disk
                        self._metrics.pop(trial_id, None)
                        self._finished.discard(trial_id)
                self._completions -= completions
        if completions:
            fault_point("after_complete")
        return True

    def close(self, retry_every_s: float = 1.0) -> None:
        """The last flush: retried until it succeeds or the outage reaches ``max_outage_s`` (then raises)."""
        while not self.flush(tolerate=True):
            time.sleep(retry_every_s)


class Flusher:
    """Writes a Recorder's state on its own thread, beside Ray Tune's loop: every ``flush_every_s``, and at once
    when woken (a trial ended or failed; requests that come while a flush runs coalesce into the next one).

    A StoreError (the store refused writes past ``max_outage_s``, or ``LeaseLost``) ends the thread and is kept in
    ``error``: nothing more is written (a lost lease writes nothing ever again); Tune's stopper reads it. ``stop``
    ends the thread; the caller then makes the final flush itself (``Recorder.close``), in its own thread."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder
        self.error: StoreError | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-flusher", daemon=True)

    def __enter__(self) -> "Flusher":
        self.recorder.flusher = self
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join()
        self.recorder.flusher = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=self.recorder.flush_every_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.recorder.flush(tolerate=True)
            except StoreError as e:
                self.error = e
                return
