"""Faults the driver lives through: a trial's worker process SIGKILLed (Tune retries the trial, which
continues from its checkpoint), and the whole store made unwritable mid-run, then writable again (the driver keeps
the rows it could not write and writes them later; workers skip the checkpoints they cannot save). The sweep ends
complete by itself; `resume` after it has nothing to run. Rows exactly once, no completed trial re-run.

Unwritable, for real: we run as root, for whom permission bits stop nothing, so every directory of the store gets
the immutable attribute (``chattr +i``: nothing can be created, renamed or deleted in it, root included); as
another user, ``chmod a-w`` does the same. Where neither works the test is skipped, saying why.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time

import pytest

from faultkit import REPO, Counts, Snapshot, check, kill_all, read_metrics, under_way, wait_for

pytestmark = pytest.mark.slow

OUTAGE_S = 7.0  # longer than the Recorder's 5 s flush interval: periodic flushes fail, and so may a completion


def store_dirs(root: str) -> list[str]:
    return [d for d, _, _ in os.walk(root)]


def _chattr(flag: str, paths: list[str]) -> bool:
    if not paths:
        return True
    return subprocess.run(["chattr", flag, *paths], capture_output=True).returncode == 0


def freeze(paths: list[str]) -> None:
    if os.geteuid() == 0:
        assert _chattr("+i", paths), "chattr +i failed"
    else:
        for p in paths:
            os.chmod(p, 0o555)


def thaw(paths: list[str]) -> None:
    if os.geteuid() == 0:
        _chattr("-i", paths)
    else:
        for p in paths:
            os.chmod(p, 0o755)


def can_freeze() -> str | None:
    """None when freezing a directory stops writes into it here; else why not."""
    with tempfile.TemporaryDirectory() as d:
        try:
            freeze([d])
        except (AssertionError, FileNotFoundError) as e:
            return f"cannot make a directory unwritable here ({e})"
        try:
            with open(os.path.join(d, "x"), "w"):
                pass
            return "a frozen directory still takes writes here"
        except OSError:
            return None
        finally:
            thaw([d])


def test_worker_killed_and_store_unwritable_mid_run(make_grid, ray_env, tmp_path, fault_table):
    why = can_freeze()
    assert why is None, f"this fault needs a store directory that refuses writes: {why}"
    # batches of 4 pairs: 4x the fixture's steps for the same tokens, so the two concurrent trials overlap with a
    # checkpoint each even when one starts late on a loaded machine
    grid = make_grid("live", methods={"bias": {}, "lora": {"rank": [4]}}, budgets=[2.0e10, 3.0e10],
                     train={"batch_size": 4}, run={"checkpoint_every_s": 0.3, "max_concurrent_trials": 2})
    storage = str(tmp_path / "store")
    sweep_dir = os.path.join(storage, "live")
    log_path = str(tmp_path / "submit.log")
    driver = ray_env.start(["submit", grid, "--storage", storage], log_path)
    frozen: list[str] = []
    try:
        # 1. a trial's worker process, SIGKILLed mid-trial (Tune's FailureConfig retries it): once both
        # concurrent trials are under way with a checkpoint, whichever of the two workers dies had one
        wait_for(lambda: len(under_way(sweep_dir)) == 2 and len(ray_env.trial_workers()) == 2, timeout_s=240,
                 what="two trials under way with a checkpoint", alive=driver)
        at_kill = Snapshot.take(sweep_dir)
        saved = under_way(sweep_dir)
        kill_all(ray_env.trial_workers()[:1], signal.SIGKILL)

        # 2. the store unwritable for a while, once Tune has retried the trial
        wait_for(lambda: "Trial task failed for trial" in open(log_path).read(), timeout_s=120,
                 what="Tune to see the dead worker", alive=driver)
        before_outage = Snapshot.take(sweep_dir)
        frozen = store_dirs(storage)
        freeze(frozen)
        time.sleep(OUTAGE_S)
        thaw(frozen)
        frozen = []
        assert driver.wait(timeout=300) == 0, open(log_path).read()[-3000:]
    finally:
        thaw(frozen)
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    ray_env.stop()
    log = open(log_path).read()
    # Tune logs the dead worker's error (a Ray traceback) and retries; nothing of ours may have raised
    assert f'File "{REPO}/orchestrator' not in log and f'File "{REPO}/workers' not in log, log[-3000:]
    assert "cannot write the store" in log and "writable again" in log, log[-3000:]  # the outage happened
    (retried,) = set(re.findall(r"Trial task failed for trial (\w+)", log))
    assert retried in saved, (retried, set(saved))
    # it went on from its checkpoint: the rows up to it are those computed before the kill, not recomputed
    rows = {r["step"]: r for r in read_metrics(sweep_dir) if r["trial_id"] == retried}
    assert saved[retried]["rows"], saved[retried]
    for row in saved[retried]["rows"]:
        assert (rows[row["step"]]["wall_s"], rows[row["step"]]["train_loss"]) == (row["wall_s"], row["train_loss"])

    after_run = Snapshot.take(sweep_dir)
    resume = ray_env.run(["resume", "live", "--storage", storage])
    assert resume.returncode == 0 and "0 to run" in resume.stderr, resume.stderr
    final = Snapshot.take(sweep_dir)
    assert final.completed() == set(final.trials) and len(final.trials) == 4

    worker = check(final, at_kill, trial_ids=at_kill.unfinished() | at_kill.completed())
    worker += Counts(rerun=check(final, after_run).rerun)  # resume re-ran nothing
    outage = check(final, before_outage)
    fault_table.add("trial worker process SIGKILL", worker)
    fault_table.add("store unwritable for 7 s mid-run", outage)
    assert (worker.lost, worker.duplicated, worker.rerun) == (0, 0, 0), worker
    assert (outage.lost, outage.duplicated, outage.rerun) == (0, 0, 0), outage
