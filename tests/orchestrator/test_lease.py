"""One driver per sweep: the lease (orchestrator/lease.py) on a local store and on S3 (moto).

Unit cases: a held lease refuses a second driver with one line naming the holder and its heartbeat's age; an
expired one is taken over (one line); ``--takeover`` forces it; the loser of a takeover is fenced: its Recorder
writes nothing more. Many threads racing for a fresh lease: exactly one wins. End to end: two `repurpose submit`
of one sweep started together: exactly one runs it, the other exits 2 with the holder line and writes nothing,
and every trial runs once.
"""
from __future__ import annotations

import io
import json
import os
import socket
import threading
import time

import pyarrow.parquet as pq
import pytest

import fsio as storage
from orchestrator.lease import EXPIRY_ENV, Holder, Lease, LeaseHeld, LeaseLost
from orchestrator.store import Recorder, Store
from support import FakeClock


# --- stores --------------------------------------------------------------------------------------------------
@pytest.fixture(params=["local", "s3"])
def sweep_uri(request, tmp_path, monkeypatch):
    if request.param == "local":
        return str(tmp_path / "store" / "sw")
    request.getfixturevalue("moto_s3")  # the environment points at it
    return f"s3://bucket/{request.node.name.replace('[', '-').rstrip(']')}/sw"


def stored(sweep_uri) -> Holder:
    return Holder.parse(storage.read_versioned(storage.join(sweep_uri, "lease"))[0])


# --- the lease -----------------------------------------------------------------------------------------------
def test_conditional_writes(sweep_uri):
    uri = storage.join(sweep_uri, "x")
    assert storage.create_exclusive(uri, b"a") and not storage.create_exclusive(uri, b"b")
    data, v1 = storage.read_versioned(uri)
    assert data == b"a"
    assert storage.replace_if(uri, b"c", v1) and not storage.replace_if(uri, b"d", v1)  # v1 is stale now
    data, v2 = storage.read_versioned(uri)
    assert data == b"c" and not storage.delete_if(uri, v1) and storage.delete_if(uri, v2)
    assert storage.read_versioned(uri) is None and not storage.replace_if(uri, b"e", v2)


def test_held_lease_refuses_a_second_driver(sweep_uri):
    clock = FakeClock()
    first = Lease.acquire(sweep_uri, "sw", expiry_s=30, clock=clock)
    try:
        clock.advance(1.1)
        with pytest.raises(LeaseHeld) as e:
            Lease.acquire(sweep_uri, "sw", expiry_s=30, clock=clock)
        line = e.value.one_line()
        assert f"host {socket.gethostname()} pid {os.getpid()}" in line and "heartbeat 1 s ago" in line, line
        assert "--takeover" in line and stored(sweep_uri).token == first.holder.token
    finally:
        first.release()
    assert storage.read_versioned(storage.join(sweep_uri, "lease")) is None  # released
    Lease.acquire(sweep_uri, "sw", expiry_s=30).release()  # and free again


def test_expired_lease_is_taken_over_and_the_loser_is_fenced(sweep_uri, tmp_path):
    clock = FakeClock()
    dead = Lease.acquire(sweep_uri, "sw", expiry_s=5, clock=clock)  # no heartbeat thread: a driver that died
    recorder = Recorder(Store(sweep_uri.rsplit("/", 1)[0], "sw"), {}, fence=dead.check)
    assert recorder.flush()  # still ours: writes
    clock.advance(4.9)
    with pytest.raises(LeaseHeld):  # not expired yet
        Lease.acquire(sweep_uri, "sw", expiry_s=30, clock=clock)
    clock.advance(2.1)
    out = io.StringIO()
    new = Lease.acquire(sweep_uri, "sw", expiry_s=30, out=out, clock=clock)
    try:
        assert out.getvalue().startswith("taking over sweep sw: host ") and "sent no heartbeat for 7 s (expiry 5 s)" \
            in out.getvalue(), out.getvalue()
        assert stored(sweep_uri).token == new.holder.token
        trials_uri = storage.join(sweep_uri, "trials.parquet")
        before = storage.read_bytes(trials_uri)
        recorder.trials["t"] = {"trial_id": "t", "status": "running"}
        with pytest.raises(LeaseLost, match="lost its lease on sweep 'sw' .*taken over by host"):
            recorder.flush(tolerate=True)  # not an outage to ride out: refused
        with pytest.raises(LeaseLost):
            recorder.close()
        assert storage.read_bytes(trials_uri) == before  # nothing written after the takeover
        dead.release()  # the loser's release leaves the new holder's lease alone
        assert stored(sweep_uri).token == new.holder.token
    finally:
        new.release()


def test_takeover_flag_forces_a_fresh_lease_and_the_heartbeat_notices(sweep_uri):
    clock = FakeClock()
    first = Lease.acquire(sweep_uri, "sw", expiry_s=1.2, clock=clock)  # the thread would renew every 0.2 s
    try:
        clock.advance(0.5)
        assert first.beat()  # one heartbeat round: renewed
        assert stored(sweep_uri).heartbeat_at == first.holder.started_at + 0.5
        out = io.StringIO()
        second = Lease.acquire(sweep_uri, "sw", takeover=True, expiry_s=30, out=out, clock=clock)
        assert "--takeover from host" in out.getvalue() and "heartbeat 0 s ago" in out.getvalue()
        first.start()  # the heartbeat thread's next round sees the takeover
        deadline = time.monotonic() + 5
        while not first.lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.lost and "taken over" in first.lost  # the heartbeat thread saw it: Tune's stopper polls this
        assert stored(sweep_uri).token == second.holder.token  # and did not write over it
        second.release()
    finally:
        first.release()


def test_a_holder_gone_from_this_machine_is_taken_over_at_once(tmp_path):
    """A driver killed here (its pid no longer exists on this host, boot and pid namespace) is not waited for."""
    import subprocess
    import sys

    sweep_uri = str(tmp_path / "gone")
    code = ("import os, sys; from orchestrator.lease import Lease; "
            f"Lease.acquire({sweep_uri!r}, 'gone', expiry_s=600); os._exit(0)")  # dies holding it
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(
        os.path.dirname(os.path.abspath(__file__)))))
    dead = stored(sweep_uri)
    assert dead.pid != os.getpid() and dead.gone()
    out = io.StringIO()
    Lease.acquire(sweep_uri, "gone", expiry_s=30, out=out).release()
    assert f"host {dead.host} pid {dead.pid}" in out.getvalue() and "is gone" in out.getvalue(), out.getvalue()
    assert not Holder.new("gone", 30).gone()  # this process, alive


def test_racing_drivers_exactly_one_wins(tmp_path):
    sweep_uri = str(tmp_path / "race")
    results: list = []
    barrier = threading.Barrier(8)

    def race():
        barrier.wait()
        try:
            results.append(Lease.acquire(sweep_uri, "race", expiry_s=30, out=io.StringIO()))
        except LeaseHeld as e:
            results.append(e)

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if isinstance(r, Lease)]
    assert len(winners) == 1 and len(results) == 8
    assert stored(sweep_uri).token == winners[0].holder.token


def test_bad_expiry_env_is_bad_input(monkeypatch, tmp_path):
    monkeypatch.setenv(EXPIRY_ENV, "soon")
    with pytest.raises(Exception, match=f"{EXPIRY_ENV}='soon': must be a positive number"):
        Lease.acquire(str(tmp_path / "s"), "s")


# --- two concurrent submits ----------------------------------------------------------------------------------
def _submit_pair(ray_env, grid, storage_uri, tmp_path, **env):
    procs = [ray_env.start(["submit", grid, "--storage", storage_uri], str(tmp_path / f"submit{i}.log"), **env)
             for i in range(2)]
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return codes, [(tmp_path / f"submit{i}.log").read_text() for i in range(2)]


def _check_one_ran(codes, logs, name):
    assert sorted(codes) == [0, 2], (codes, logs)
    winner, loser = (logs[0], logs[1]) if codes[0] == 0 else (logs[1], logs[0])
    lines = [ln for ln in loser.splitlines() if ln.strip() and "WARNING" not in ln]
    assert len(lines) == 1, loser
    assert f"sweep '{name}' is being run by another driver, host {socket.gethostname()} pid " in lines[0]
    assert "heartbeat " in lines[0] and " s ago" in lines[0] and "Traceback" not in loser
    assert "to run" not in loser  # it planned, found the lease, and stopped: no Ray, no write
    assert "2 to run" in winner, winner


@pytest.mark.slow
def test_two_concurrent_submits_local(make_grid, ray_env, tmp_path):
    grid = make_grid("twice", budgets=[3.0e9, 4.0e9])
    storage_dir = str(tmp_path / "store")
    codes, logs = _submit_pair(ray_env, grid, storage_dir, tmp_path)
    _check_one_ran(codes, logs, "twice")
    sweep_dir = os.path.join(storage_dir, "twice")
    trials = {r["trial_id"]: r for r in pq.read_table(os.path.join(sweep_dir, "trials.parquet")).to_pylist()}
    assert len(trials) == 2 and all(r["status"] == "completed" for r in trials.values())
    import pandas as pd

    metrics = pd.read_parquet(os.path.join(sweep_dir, "metrics"))
    assert not metrics.duplicated(["trial_id", "step"]).any()
    for trial_id, t in trials.items():  # run once: one run from step 1, no restart, one done marker
        assert sorted(metrics[metrics.trial_id == trial_id].step) == list(range(1, t["steps"] + 1))
        state = json.load(open(os.path.join(sweep_dir, "checkpoints", trial_id,
                                            open(os.path.join(sweep_dir, "checkpoints", trial_id, "LATEST")).read()
                                            .strip(), "state.json")))
        assert state["progress"]["done"] and state["progress"]["step"] == t["steps"]
    assert not os.path.exists(os.path.join(sweep_dir, "lease"))  # released at the end


@pytest.mark.slow
def test_two_concurrent_submits_s3(make_grid, ray_env, moto_s3, tmp_path):
    import pyarrow.fs as pafs

    grid = make_grid("twice3", budgets=[3.0e9, 4.0e9])
    codes, logs = _submit_pair(ray_env, grid, "s3://bucket/pair", tmp_path, **moto_s3.env())
    _check_one_ran(codes, logs, "twice3")
    fs = pafs.S3FileSystem(endpoint_override=moto_s3.endpoint, region="us-east-1", access_key="testing",
                           secret_key="testing", scheme="http")
    trials = pq.read_table("bucket/pair/twice3/trials.parquet", filesystem=fs).to_pylist()
    assert len(trials) == 2 and all(r["status"] == "completed" for r in trials)
    metrics = pq.read_table("bucket/pair/twice3/metrics", filesystem=fs).to_pandas()
    assert not metrics.duplicated(["trial_id", "step"]).any()
    for t in trials:
        assert sorted(metrics[metrics.trial_id == t["trial_id"]].step) == list(range(1, t["steps"] + 1))
    assert fs.get_file_info("bucket/pair/twice3/lease").type == pafs.FileType.NotFound


def test_bad_input_after_the_lease_leaves_no_store(make_grid, tmp_path, monkeypatch):
    """Ray refusing --address is found after the lease is taken: the lease (and the folders it made) go again."""
    import contextlib

    from core.errors import UserError
    from orchestrator import driver
    from orchestrator.grid import load_grid
    from orchestrator.store import Store

    @contextlib.contextmanager
    def refused(address):
        raise UserError(f"--address {address}: cannot start or reach Ray (refused)")
        yield  # pragma: no cover

    monkeypatch.setattr(driver, "ray_session", refused)
    with pytest.raises(UserError, match="cannot start or reach Ray"):
        driver.run_sweep(load_grid(make_grid("fresh")), Store(str(tmp_path / "other"), "fresh"), "127.0.0.1:1")
    assert not os.path.exists(tmp_path / "other")
