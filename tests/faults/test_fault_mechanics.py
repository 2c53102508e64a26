"""The mechanics the fault tests rely on, by hand and fast (no Ray): a damaged checkpoint falls back to the one
before it (or to none) and says so; the Recorder keeps what an unwritable store refused and writes it later, and
gives up with one line only after ``max_outage_s``; the kill hook is a no-op unless armed; a killed driver's temp
copies are cleaned up."""
from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from faultkit import REPO
from core.events import TrialEvent
from orchestrator.store import Recorder, Store, StoreError, fault_point
from workers import checkpoint


# --- checkpoints ---------------------------------------------------------------------------------------------
def save(uri: str, step: int, **kw) -> None:
    checkpoint.save(uri, step, {"w": torch.full((4,), float(step))}, {"progress": {"step": step}}, **kw)


def test_the_previous_checkpoint_is_kept_and_a_damaged_latest_falls_back_to_it(tmp_path):
    uri = str(tmp_path / "ckpt")
    for step in (2, 4, 6):
        save(uri, step)
    assert sorted(os.listdir(uri)) == ["LATEST", "step-00000004", "step-00000006"]  # newest and the one before

    with open(os.path.join(uri, "step-00000006", "tensors.safetensors"), "r+b") as f:
        f.truncate(10)
    skipped: list[str] = []
    tensors, state = checkpoint.load(uri, skipped=skipped)
    assert state["progress"]["step"] == 4 and tensors["w"].tolist() == [4.0] * 4
    assert len(skipped) == 1 and skipped[0].startswith("checkpoint step-00000006 unreadable (SafetensorError")

    os.remove(os.path.join(uri, "step-00000004", "state.json"))  # the older one lost too: nothing to load
    skipped.clear()
    assert checkpoint.load(uri, skipped=skipped) is None and len(skipped) == 2
    assert checkpoint.load(str(tmp_path / "none")) is None


def test_a_garbled_latest_pointer_and_a_second_save_at_one_step(tmp_path):
    uri = str(tmp_path / "ckpt")
    save(uri, 3)
    save(uri, 3, keep_previous=False)  # the done marker at the last checkpoint's step: a new folder
    assert sorted(os.listdir(uri)) == ["LATEST", "step-00000003.1"]
    save(uri, 5)
    with open(os.path.join(uri, "LATEST"), "wb") as f:
        f.write(b"\xff\xfe")  # not a name
    assert checkpoint.load(uri)[1]["progress"]["step"] == 5  # newest complete folder
    with open(os.path.join(uri, "LATEST"), "w") as f:
        f.write("step-00000099")  # names a folder that is gone
    assert checkpoint.load(uri)[1]["progress"]["step"] == 5


# --- the Recorder through an unwritable store ----------------------------------------------------------------
def trial_row(trial_id: str) -> dict:
    return {"sweep": "s", "trial_id": trial_id, "model": "m", "method": "full", "lora_rank": None,
            "trainable_fraction": None, "budget_flops": 1e9, "n_params": 100, "n_trainable": 10, "status": "pending",
            "reason": None, "tokens": 0, "steps": 0, "flops": 0.0, "hardware_flops": 0.0, "eval_loss": None,
            "train_loss": None, "wall_s": 0.0, "updated_at": 0.0}


def rows(*steps: int) -> list[dict]:
    return [{"step": s, "tokens": 10 * s, "flops": 1e6 * s, "hardware_flops": 1e6 * s, "train_loss": 1.0 / s,
             "lr": 1e-3, "wall_s": float(s), "eval_loss": None, "tokens_per_s": 1.0} for s in steps]


def event(steps, done=False) -> TrialEvent:
    r = rows(*steps)
    return TrialEvent(rows=r, step=steps[-1], tokens=r[-1]["tokens"], flops=r[-1]["flops"], train_loss=0.5, done=done,
                      trial={"steps": steps[-1], "tokens": r[-1]["tokens"], "flops": r[-1]["flops"]} if done else None)


class Outage:
    """Makes a Store's writes and metric reads fail while ``on`` (as an unreachable bucket would: a StoreError)."""

    def __init__(self, store: Store, monkeypatch):
        self.on = False
        for name in ("write_metrics", "write_trials", "read_metrics"):
            real = getattr(store, name)

            def failing(*args, _real=real, **kwargs):
                if self.on:
                    raise StoreError(f"{store.uri}: cannot write the store ([Errno 1] Operation not permitted)")
                return _real(*args, **kwargs)

            monkeypatch.setattr(store, name, failing)


def test_an_unwritable_store_costs_no_row(tmp_path, monkeypatch, capsys):
    store = Store(str(tmp_path), "s")
    outage = Outage(store, monkeypatch)
    rec = Recorder(store, {t: trial_row(t) for t in "abc"}, flush_every_s=0.0, max_outage_s=3600)
    rec.on_event("a", event([1, 2]))
    outage.on = True
    rec.on_event("a", event([3, 4]))  # the periodic flush fails: kept
    rec.on_event("b", event([1, 2, 3], done=True))  # a trial ends during the outage: its rows stay in memory
    rec.on_event("c", event([1]))  # a trial starts during the outage: from step 1 it needs no stored rows
    assert "b" in rec._metrics and rec.trials["b"]["status"] == "completed"
    assert not os.path.exists(tmp_path / "s" / "metrics" / "b.parquet")
    outage.on = False
    rec.on_event("a", event([5], done=True))  # writable again: everything kept is written
    m = pd.read_parquet(tmp_path / "s" / "metrics")
    assert m.groupby("trial_id").step.apply(sorted).to_dict() == {"a": [1, 2, 3, 4, 5], "b": [1, 2, 3], "c": [1]}
    assert set(rec._metrics) == {"c"}  # finished trials leave memory once written
    trials = pd.read_parquet(tmp_path / "s" / "trials.parquet").set_index("trial_id")
    assert trials.status.to_dict() == {"a": "completed", "b": "completed", "c": "running"}
    err = capsys.readouterr().err
    assert err.count("cannot write the store") == 1 and "writable again" in err  # one warning per outage


def test_an_outage_past_its_limit_stops_with_one_line(tmp_path, monkeypatch):
    store = Store(str(tmp_path), "s")
    outage = Outage(store, monkeypatch)
    rec = Recorder(store, {"a": trial_row("a")}, flush_every_s=0.0, max_outage_s=0.0)
    outage.on = True
    with pytest.raises(StoreError) as e:
        rec.on_event("a", event([1]))
    assert "\n" not in str(e.value) and "repurpose resume s" in str(e.value)
    with pytest.raises(StoreError):
        rec.close(retry_every_s=0.0)


# --- the kill hook and what a killed driver leaves -------------------------------------------------------------
def test_fault_point_is_a_no_op_unless_armed(monkeypatch):
    monkeypatch.delenv("REPURPOSE_FAULT", raising=False)
    for _ in range(3):
        fault_point("report")
    monkeypatch.setenv("REPURPOSE_FAULT", "mid_flush:1")
    fault_point("report")  # another point: nothing


def test_fault_point_kills_its_process_at_the_nth_pass():
    code = ("import sys; from orchestrator.store import fault_point\n"
            "for i in range(1, 6):\n    print(i, flush=True); fault_point('report')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO, "REPURPOSE_FAULT": "report:3"}, timeout=60)
    assert proc.returncode == -9 and proc.stdout.split() == ["1", "2", "3"]


def test_temp_copies_of_a_killed_driver_are_removed(tmp_path):
    store = Store(str(tmp_path), "s")
    store.write_trials({"a": trial_row("a")})
    store.write_metrics("a", [{**r, "sweep": "s", "trial_id": "a"} for r in rows(1)])
    for folder in (tmp_path / "s", tmp_path / "s" / "metrics"):
        (folder / ".tmp-0123-x.parquet").write_bytes(b"half")
    store.remove_temp_files()
    assert sorted(os.listdir(tmp_path / "s")) == ["metrics", "trials.parquet"]
    assert os.listdir(tmp_path / "s" / "metrics") == ["a.parquet"]
