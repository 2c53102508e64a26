"""The store off the report path (no Ray): with a Flusher attached, the Recorder's events return without waiting on
a slow store, the Flusher writes beside them (completions at once, the rest every flush_every_s), rows that arrive
during a flush stay dirty for the next one, every row lands exactly once, and a lost lease ends all writing."""
from __future__ import annotations

import os
import threading
import time

import pandas as pd
import pytest

from orchestrator.lease import LeaseLost
from orchestrator.store import Flusher, Recorder, Store
from test_store import event, metric, read_row, trial_row

WRITE_S = 0.3


def slow(store: Store, monkeypatch, writes: list):
    real = Store._write

    def write(self, uri, data):
        writes.append((threading.current_thread().name, os.path.basename(uri)))
        time.sleep(WRITE_S)
        return real(self, uri, data)

    monkeypatch.setattr(Store, "_write", write)


def test_events_do_not_wait_on_the_store_and_rows_land_once(tmp_path, monkeypatch):
    store = Store(str(tmp_path), "s")
    writes: list = []
    slow(store, monkeypatch, writes)
    rec = Recorder(store, {f"t{i}": trial_row(f"t{i}") for i in range(4)}, flush_every_s=0.2)
    took = []
    with Flusher(rec) as flusher:
        for step in range(1, 6):
            for i in range(4):
                t0 = time.perf_counter()
                final = {"steps": step, "eval_loss": 0.5} if step == 5 else None
                rec.on_event(f"t{i}", event([metric(step, eval_loss=0.5 if final else None)], done=step == 5,
                                            trial=final))
                took.append(time.perf_counter() - t0)
            time.sleep(0.05)
        # without the Flusher each completion (and each periodic flush) would write here: >= 5 writes of WRITE_S
        assert max(took) < WRITE_S / 2, max(took)
        deadline = time.monotonic() + 30
        while rec._dirty_metrics or rec._completions:  # the Flusher catches up by itself
            assert time.monotonic() < deadline, "the Flusher never wrote the completions"
            time.sleep(0.05)
    assert flusher.error is None and writes and {name for name, _ in writes} == {"store-flusher"}
    rec.close()
    m = pd.read_parquet(tmp_path / "s" / "metrics")
    assert not m.duplicated(["trial_id", "step"]).any()
    assert m.groupby("trial_id").step.apply(sorted).to_dict() == {f"t{i}": [1, 2, 3, 4, 5] for i in range(4)}
    assert all(read_row(tmp_path / "s", f"t{i}")["status"] == "completed" for i in range(4))
    assert rec._metrics == {}  # finished trials left memory once written


def test_rows_arriving_during_a_flush_are_written_by_the_next(tmp_path, monkeypatch):
    store = Store(str(tmp_path), "s")
    gate, entered = threading.Event(), threading.Event()
    real = Store.write_metrics

    def held(self, trial_id, rows):
        entered.set()
        gate.wait(10)
        return real(self, trial_id, rows)

    monkeypatch.setattr(Store, "write_metrics", held)
    rec = Recorder(store, {"t1": trial_row("t1")}, flush_every_s=3600)
    rec.on_event("t1", event([metric(1)]))
    flush = threading.Thread(target=rec.flush)
    flush.start()
    assert entered.wait(10)
    rec.on_event("t1", event([metric(2)]))  # arrives while step 1's snapshot is being written
    gate.set()
    flush.join()
    assert "t1" in rec._dirty_metrics  # the snapshot did not hold step 2: still dirty
    rec.flush()
    assert pd.read_parquet(tmp_path / "s" / "metrics").step.tolist() == [1, 2]


def test_a_lost_lease_ends_all_writing(tmp_path, monkeypatch):
    store = Store(str(tmp_path), "s")
    writes: list = []
    slow(store, monkeypatch, writes)
    lost = threading.Event()

    def fence():
        if lost.is_set():
            raise LeaseLost("sweep 's' was taken over by another driver")

    rec = Recorder(store, {"t1": trial_row("t1")}, flush_every_s=0.05, fence=fence)
    with Flusher(rec) as flusher:
        rec.on_event("t1", event([metric(1)]))
        while not writes:
            time.sleep(0.01)
        lost.set()
        deadline = time.monotonic() + 10
        while flusher.error is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        before = len(writes)
        rec.on_event("t1", event([metric(2)], done=True, trial={"steps": 2}))
        time.sleep(0.3)
    assert isinstance(flusher.error, LeaseLost) and len(writes) == before
    with pytest.raises(LeaseLost):
        rec.flush()
