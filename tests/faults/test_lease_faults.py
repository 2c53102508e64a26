"""A driver SIGKILLed while it holds the sweep's lease: a new driver is refused while the dead one's
heartbeat is fresh, takes the lease over once it is older than the dead driver's expiry (one line says so), and
finishes the sweep with no metric row lost or duplicated and no completed trial run again. Rows in the fault table.

The expiry comes from ``REPURPOSE_LEASE_EXPIRY_S`` (orchestrator/lease.py): the killed driver promised 15 s. A driver
killed on this very machine is taken over at once (its process is checkably gone: ``Holder.gone``), so the lease
is made to look like one from another machine — what a lost head node leaves — whose death only the expiry tells.
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from faultkit import Counts, Snapshot, check, wait_for

pytestmark = pytest.mark.slow
EXPIRY_S = 15.0


def lease_age_s(sweep_dir: str) -> float | None:
    try:
        with open(os.path.join(sweep_dir, "lease")) as f:
            return time.time() - json.load(f)["heartbeat_at"]
    except (OSError, ValueError, KeyError):
        return None


def as_from_elsewhere(path: str) -> None:
    """The lease as a driver on another machine would have left it, its last heartbeat just now."""
    with open(path) as f:
        doc = json.load(f)
    doc.update(host="lost-head-node", boot_id="", pidns="", heartbeat_at=time.time())
    with open(path + ".new", "w") as f:
        json.dump(doc, f)
    os.replace(path + ".new", path)


def test_killed_holder_is_taken_over_after_expiry(make_grid, ray_env, tmp_path, fault_table):
    name = "leasekill"
    grid = make_grid(name, methods={"full": {}}, budgets=[5.0e9, 1.5e10],
                     run={"checkpoint_every_s": 0.3, "max_concurrent_trials": 1, "report_every_s": 0})
    storage = str(tmp_path / "store")
    sweep_dir = os.path.join(storage, name)
    driver = ray_env.start(["submit", grid, "--storage", storage], str(tmp_path / "submit.log"),
                           REPURPOSE_LEASE_EXPIRY_S=str(EXPIRY_S))
    try:
        # a trial completed, the other under way: the kill strikes mid-sweep
        wait_for(lambda: Snapshot.take(sweep_dir).completed() and lease_age_s(sweep_dir) is not None,
                 timeout_s=240, what="a completed trial", alive=driver)
    finally:
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    ray_env.stop()
    before = Snapshot.take(sweep_dir)
    after_kill = check(before)

    age = lease_age_s(sweep_dir)
    assert age is not None and age < EXPIRY_S  # the dead driver's lease is still there, fresh
    as_from_elsewhere(os.path.join(sweep_dir, "lease"))
    # While the heartbeat is fresh a second driver is refused (planning takes seconds, the expiry is 15 s) ...
    early = ray_env.run(["resume", name, "--storage", storage], timeout=120)
    assert early.returncode == 2, early.stderr
    (line,) = early.stderr.strip().splitlines()
    assert "is being run by another driver, host lost-head-node pid " in line and " s ago" in line, line
    # ... and once it is older than the expiry, the next one takes over and finishes the sweep.
    wait_for(lambda: (lease_age_s(sweep_dir) or 0) > EXPIRY_S, timeout_s=60, what="the lease to expire")
    proc = ray_env.run(["resume", name, "--storage", storage])
    assert proc.returncode == 0, proc.stderr
    taken = f"taking over sweep {name}: host lost-head-node pid "
    assert taken in proc.stderr and "sent no heartbeat for" in proc.stderr, proc.stderr
    assert not os.path.exists(os.path.join(sweep_dir, "lease"))

    final = Snapshot.take(sweep_dir)
    assert final.completed() == set(final.trials), {k: r["status"] for k, r in final.trials.items()}
    end = check(final, before)
    counts = Counts(lost=after_kill.lost + end.lost, duplicated=after_kill.duplicated + end.duplicated,
                    rerun=end.rerun)
    fault_table.add("driver SIGKILL holding the lease, takeover after expiry", counts)
    assert (counts.lost, counts.duplicated, counts.rerun) == (0, 0, 0), counts
