"""The store and the Recorder by hand (no Ray): exactly-once metric rows through restarts, supersession and the
final re-send; contract schemas; atomic rewrites; grid history; one-line StoreErrors."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pandas as pd
import pyarrow.parquet as pq
import pytest

from analysis.schema import METRICS_COLUMNS, TRIALS_COLUMNS, TRIALS_SCHEMA
from core.events import TrialEvent
from orchestrator.store import Recorder, Store, StoreError

def trial_row(trial_id: str, method: str = "full", **fields) -> dict:
    row = {"sweep": "s", "trial_id": trial_id, "model": "m", "method": method,
           "lora_rank": 8 if method == "lora" else None, "trainable_fraction": None, "budget_flops": 1e9,
           "n_params": 100, "n_trainable": 10, "status": "pending", "reason": None, "tokens": 0, "steps": 0,
           "flops": 0.0, "hardware_flops": 0.0, "eval_loss": None, "train_loss": None, "wall_s": 0.0,
           "updated_at": 0.0}
    return row | fields


def metric(step: int, run: str = "a", eval_loss: float | None = None) -> dict:
    """A worker's metric row; ``run`` tags which (re)run computed it (through wall_s)."""
    return {"step": step, "tokens": 10 * step, "flops": 1e6 * step, "hardware_flops": 2e6 * step,
            "train_loss": 1.0 / step, "lr": 1e-3, "wall_s": step + (0.5 if run == "b" else 0.0),
            "eval_loss": eval_loss, "tokens_per_s": 100.0}


def event(rows: list[dict], *, restart: bool = False, done: bool = False, trial: dict | None = None) -> TrialEvent:
    """What tuning._StoreCallback hands the Recorder."""
    last = rows[-1] if rows else {"step": 0, "tokens": 0, "flops": 0.0, "train_loss": None}
    return TrialEvent(rows=rows, restart=restart, step=last["step"], tokens=last["tokens"], flops=last["flops"],
                      train_loss=last["train_loss"], trial=trial, done=done)


def stored(sweep_dir) -> pd.DataFrame:
    return pd.read_parquet(os.path.join(sweep_dir, "metrics")).sort_values(["trial_id", "step"])


def test_recorder_exactly_once(tmp_path):
    store = Store(str(tmp_path), "s")
    sweep_dir = tmp_path / "s"
    rec = Recorder(store, {"t1": trial_row("t1"), "t2": trial_row("t2", "lora")}, flush_every_s=3600)
    rec.set_status("t1", "running")

    rec.on_event("t1", event([metric(1), metric(2)]))
    rec.on_event("t1", event([metric(3), metric(4)]))  # a run that goes on past its checkpoint (step 2) ...
    rec.on_event("t2", event([metric(1)]))
    rec.flush()
    m = stored(sweep_dir)
    assert m.groupby("trial_id").step.apply(list).to_dict() == {"t1": [1, 2, 3, 4], "t2": [1]}
    assert read_row(sweep_dir, "t1")["status"] == "running" and read_row(sweep_dir, "t1")["steps"] == 4

    # ... and dies. The retry resumes from step 2: its first event carries the whole history up to the
    # checkpoint, then its own step 3. Rows 3 and 4 of the dead run are gone, not duplicated.
    rec.on_event("t1", event([metric(1), metric(2), metric(3, "b")], restart=True))
    rec.flush()
    t1 = stored(sweep_dir).query("trial_id == 't1'")
    assert t1.step.tolist() == [1, 2, 3] and t1.wall_s.tolist() == [1.0, 2.0, 3.5]

    # Rows supersede the stored ones from their first step on (no restart flag needed).
    rec.on_event("t1", event([metric(4, "b"), metric(5, "b")]))
    rec.on_event("t1", event([metric(5), metric(6)]))
    rec.flush()
    t1 = stored(sweep_dir).query("trial_id == 't1'")
    assert t1.step.tolist() == [1, 2, 3, 4, 5, 6] and t1.wall_s.tolist() == [1.0, 2.0, 3.5, 4.5, 5.0, 6.0]

    # The driver restarts: a new Recorder picks the stored history up on the trial's first event.
    rec = Recorder(store, store.read_trials(), flush_every_s=3600)
    rec.on_event("t1", event([metric(7)]))
    # The final event re-sends the last row, now with eval_loss, and the trial row.
    final = {"tokens": 70, "steps": 7, "flops": 7e6, "hardware_flops": 1.4e7, "eval_loss": 0.25,
             "train_loss": 1 / 7, "wall_s": 7.0, "reason": None, "n_params": 100, "n_trainable": 10}
    rec.on_event("t1", event([metric(7, eval_loss=0.25)], done=True, trial=final))  # flushes itself

    m = stored(sweep_dir)
    assert not m.duplicated(["trial_id", "step"]).any()
    t1 = m.query("trial_id == 't1'")
    assert t1.step.tolist() == list(range(1, 8))
    assert t1.eval_loss.iloc[-1] == 0.25 and t1.eval_loss.iloc[:-1].isna().all()
    assert set(m.sweep) == {"s"} and list(m.columns[:len(METRICS_COLUMNS)]) == list(METRICS_COLUMNS)
    row = read_row(sweep_dir, "t1")
    assert row["status"] == "completed" and row["steps"] == 7 and row["eval_loss"] == 0.25
    assert row["updated_at"] > 0
    assert "t1" not in rec._metrics  # a finished trial's rows leave memory
    t2 = read_row(sweep_dir, "t2")  # untouched by the other trial's events
    assert (t2["status"], t2["steps"]) == ("running", 1) and m.query("trial_id == 't2'").step.tolist() == [1]


def test_a_done_trial_reported_again_replaces_its_history(tmp_path):
    """A trial that finished while the driver was dead reports `done` again with its whole history."""
    store = Store(str(tmp_path), "s")
    rec = Recorder(store, {"t1": trial_row("t1")}, flush_every_s=3600)
    rec.on_event("t1", event([metric(1), metric(2), metric(3)]))
    rec.flush()
    rec = Recorder(store, store.read_trials(), flush_every_s=3600)
    history = [metric(1), metric(2), metric(3), metric(4, eval_loss=0.5)]
    rec.on_event("t1", event(history, restart=True, done=True, trial={"steps": 4, "eval_loss": 0.5}))
    t1 = stored(tmp_path / "s")
    assert t1.step.tolist() == [1, 2, 3, 4] and t1.eval_loss.tolist()[-1] == 0.5
    assert read_row(tmp_path / "s", "t1")["status"] == "completed"


def read_row(sweep_dir, trial_id: str) -> dict:
    rows = pq.read_table(os.path.join(sweep_dir, "trials.parquet")).to_pylist()
    return next(r for r in rows if r["trial_id"] == trial_id)


def test_schemas_are_the_contract(tmp_path, contract):
    contract_trials, contract_metrics = contract
    store = Store(str(tmp_path), "s")
    rec = Recorder(store, {"t1": trial_row("t1"), "t2": trial_row("t2", "lora")})
    rec.on_event("t1", event([metric(1)]))
    rec.flush()
    trials = pq.read_schema(tmp_path / "s" / "trials.parquet")
    assert trials.names == list(TRIALS_COLUMNS)
    assert [trials.field(c).type for c in trials.names] == [TRIALS_SCHEMA.field(c).type for c in trials.names]
    assert {c: trials.field(c).type for c in trials.names[:len(contract_trials)]} == contract_trials
    metrics = pq.read_schema(tmp_path / "s" / "metrics" / "t1.parquet")
    assert {c: metrics.field(c).type for c in metrics.names[:len(contract_metrics)]} == contract_metrics
    df = pd.read_parquet(tmp_path / "s" / "trials.parquet")
    assert df.set_index("trial_id").lora_rank.to_dict()["t2"] == 8
    assert math.isnan(df.set_index("trial_id").lora_rank.to_dict()["t1"])  # null, not 0


def test_rewrites_are_atomic(tmp_path, monkeypatch):
    store = Store(str(tmp_path), "s")
    rec = Recorder(store, {"t1": trial_row("t1")}, flush_every_s=3600)
    for step in range(1, 6):
        rec.on_event("t1", event([metric(step)]))
        rec.flush()
    names = sorted(os.listdir(tmp_path / "s")) + sorted(os.listdir(tmp_path / "s" / "metrics"))
    assert names == ["metrics", "trials.parquet", "t1.parquet"]  # no temp file left behind

    # A write that dies before its rename leaves the previous file whole; readers skip the stray temp file.
    def die(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", die)
    rec.on_event("t1", event([metric(6)]))
    with pytest.raises(StoreError, match="cannot write the store"):
        rec.flush()
    monkeypatch.undo()
    assert stored(tmp_path / "s").step.tolist() == [1, 2, 3, 4, 5]
    assert read_row(tmp_path / "s", "t1")["steps"] == 5
    rec.flush()  # the next flush writes what the failed one could not
    assert stored(tmp_path / "s").step.tolist() == [1, 2, 3, 4, 5, 6]


def test_grid_history_kept(tmp_path):
    store = Store(str(tmp_path), "s")
    assert not store.exists()
    g1 = {"name": "s", "budgets": [1e9]}
    g2 = {"name": "s", "budgets": [1e9, 2e9]}
    store.write_grid(g1)
    store.write_grid(g1)  # the same grid again: no new history entry
    assert [h["grid"] for h in store.read_grid()["history"]] == [g1]
    store.write_grid(g2)
    doc = Store(str(tmp_path), "s").read_grid()
    assert doc["grid"] == g2 and [h["grid"] for h in doc["history"]] == [g1, g2]
    assert all(h["at"].endswith("Z") for h in doc["history"])
    with open(tmp_path / "s" / "grid.yaml") as f:
        assert "!!python" not in f.read()  # plain YAML: no pickle-like tags


def test_unknown_sweep_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match=r"no sweep named 'nope'") as e:
        Store(str(tmp_path), "nope").read_grid()
    assert str(tmp_path) in str(e.value)


def test_unwritable_store_is_one_line_naming_the_path(tmp_path):
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        base = str(locked)
    else:  # root ignores directory modes: a path under a regular file can never be a directory
        (tmp_path / "a-file").write_text("not a directory")
        base = str(tmp_path / "a-file" / "sub")
    try:
        store = Store(base, "s")
        with pytest.raises(StoreError) as e:
            Recorder(store, {"t1": trial_row("t1")}).flush()
        message = str(e.value)
        assert "\n" not in message and message.startswith(os.path.join(base, "s") + ":")
        assert "cannot write the store" in message
    finally:
        if os.geteuid() != 0:
            (tmp_path / "locked").chmod(0o700)


def test_unknown_scheme_is_one_line_naming_the_uri():
    store = Store("ftp://x", "s")
    for action in (store.read_trials, store.exists, lambda: store.write_trials({})):
        with pytest.raises(StoreError) as e:
            action()
        message = str(e.value)
        assert "\n" not in message and message.startswith("ftp://x/s:") and "unsupported storage scheme" in message


def test_status_never_aborts_the_process(tmp_path):
    """Regression: the store read Parquet through a Python file object (io.BytesIO); a pyarrow thread could drop
    the last reference to it while the interpreter exited, and the process aborted (exit -6, "terminate
    called without an active exception") in most `repurpose status` runs. Now: five clean exits in a row."""
    config = {"model_type": "gpt_neox", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
              "intermediate_size": 256, "vocab_size": 512, "repurpose_pretrain_lr": 1e-3}
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(config))
    (tmp_path / "train.jsonl").write_text(json.dumps({"query": "q", "pos": ["d"]}) + "\n")
    grid = {"name": "s", "models": [str(tmp_path / "tiny")], "methods": {"full": {}},
            "budgets": [1e9], "data": {"train": str(tmp_path / "train.jsonl")}, "base_dir": str(tmp_path)}
    store = Store(str(tmp_path / "store"), "s")
    store.write_grid(grid)
    rec = Recorder(store, {f"t{i}": trial_row(f"t{i}") for i in range(8)})
    for i in range(8):
        rec.on_event(f"t{i}", event([metric(1), metric(2)]))
    rec.flush()
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = [sys.executable, "-m", "orchestrator.cli", "status", "s", "--json", "--storage", str(tmp_path / "store")]
    for _ in range(5):
        proc = subprocess.run(args, cwd=repo, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["counts"]["running"] == 8


def test_supersession_drops_a_stale_tail(tmp_path):
    """Rows supersede the stored ones from their first step on, also without a restart flag: a run that resumed
    from step 2 and reports 3 and 4 removes the dead run's 5 and 6 (a stale tail would duplicate history)."""
    store = Store(str(tmp_path), "s")
    rec = Recorder(store, {"t1": trial_row("t1")}, flush_every_s=3600)
    rec.on_event("t1", event([metric(s) for s in range(1, 7)]))
    rec.flush()
    rec = Recorder(store, store.read_trials(), flush_every_s=3600)  # a new driver: history comes from the store
    rec.on_event("t1", event([metric(3, "b"), metric(4, "b")]))
    rec.flush()
    t1 = stored(tmp_path / "s")
    assert t1.step.tolist() == [1, 2, 3, 4] and t1.wall_s.tolist() == [1.0, 2.0, 3.5, 4.5]


def test_completion_is_written_only_after_its_metrics(tmp_path, monkeypatch):
    """The done event's flush writes the metric file first and trials.parquet last: when the metric write fails,
    the stored row must not say `completed` (a resume would then skip the trial and its last rows would be lost);
    once the store takes writes again, the kept rows and the completion land together, each step once."""
    store = Store(str(tmp_path), "s")
    rec = Recorder(store, {"t1": trial_row("t1")}, flush_every_s=3600)
    rec.on_event("t1", event([metric(1), metric(2)]))
    rec.flush()
    real = Store.write_metrics

    def refuse(self, trial_id, rows):
        raise StoreError("store refuses the metric write")

    monkeypatch.setattr(Store, "write_metrics", refuse)
    final = {"steps": 3, "eval_loss": 0.5, "tokens": 30, "flops": 3e6}
    rec.on_event("t1", event([metric(3, eval_loss=0.5)], done=True, trial=final))
    assert read_row(tmp_path / "s", "t1")["status"] != "completed"
    assert stored(tmp_path / "s").step.tolist() == [1, 2]
    monkeypatch.setattr(Store, "write_metrics", real)
    rec.close()
    assert read_row(tmp_path / "s", "t1")["status"] == "completed"
    assert stored(tmp_path / "s").step.tolist() == [1, 2, 3]


def test_a_misspelt_row_key_is_refused(tmp_path):
    """Rows are dicts: a key that is not a store column would silently become a null column; the writer refuses."""
    store = Store(str(tmp_path), "s")
    with pytest.raises(ValueError, match="evel_loss"):
        store.write_trials({"t1": trial_row("t1", evel_loss=0.3)})
    with pytest.raises(ValueError, match="tokens_per_sec"):
        store.write_metrics("t1", [metric(1) | {"tokens_per_sec": 3.0}])
