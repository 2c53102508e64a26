"""Ctrl-C and SIGTERM during a real `repurpose submit`: the first signal stops the sweep cleanly —
exit 130 / 143, one line saying what `resume` continues, the stopped trials `pending` (reason `interrupted`), no
`failed` row, no Ray Tune restore advice — and `resume` then ends where an uninterrupted run ends (trials, flops,
tokens, eval_loss). A second Ctrl-C exits at once and the sweep still resumes.

The trials keep their last *periodic* checkpoint (``run.checkpoint_every_s``): Tune's stop saves nothing, and the
trial side knows nothing of the driver. SIGINT goes to the driver's process group, as a terminal's Ctrl-C does
(Ray's own processes block SIGINT: ray/_private/services.py); SIGTERM to the driver process, as `kill PID` does.
"""
from __future__ import annotations

import json
import os
import re
import signal
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raykit import wait_for
from support import clean_run

LINE = re.compile(r"^interrupted: (\d+) trials saved at their last checkpoint, (\d+) pending; "
                  r"`repurpose resume (\S+)` continues$")


def read_trials(sweep_dir) -> dict[str, dict]:
    try:
        return {r["trial_id"]: r for r in pq.read_table(os.path.join(sweep_dir, "trials.parquet")).to_pylist()}
    except (FileNotFoundError, pa.ArrowInvalid, OSError):
        return {}


def running_with_checkpoint(sweep_dir) -> bool:
    """A trial is under way past step 2 with a checkpoint to continue from (read from the checkpoints, which the
    workers write as they go; trials.parquet is rewritten only every few seconds)."""
    root = os.path.join(sweep_dir, "checkpoints")
    for trial_id in os.listdir(root) if os.path.isdir(root) else []:
        try:
            with open(os.path.join(root, trial_id, "LATEST")) as f:
                with open(os.path.join(root, trial_id, f.read().strip(), "state.json")) as g:
                    progress = json.load(g)["progress"]
        except (OSError, ValueError):  # none yet, or being replaced
            continue
        if not progress["done"] and progress["step"] >= 2:
            return True
    return False


def interrupt_grid(make_grid, name):
    # One at a time, the first several seconds long (report every step, checkpoint every 0.3 s): the signal lands
    # with a trial running past its first checkpoint and one not yet started.
    return make_grid(name, methods={"full": {}}, budgets=[1.5e10, 3.0e9],
                     run={"checkpoint_every_s": 0.3, "max_concurrent_trials": 1, "report_every_s": 0})


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_cleanly_and_resume_ends_as_uninterrupted(sig, make_grid, ray_env, tmp_path):
    name = f"intr-{sig.name.lower()}"
    grid = interrupt_grid(make_grid, name)
    storage = str(tmp_path / "store")
    sweep_dir = os.path.join(storage, name)
    log = tmp_path / "submit.log"
    driver = ray_env.start(["submit", grid, "--storage", storage], str(log))
    try:
        wait_for(lambda: running_with_checkpoint(sweep_dir), timeout_s=240, what="a running trial with a checkpoint",
                 alive=driver)
        # Ctrl-C goes to the terminal's process group (the driver leads its own: raykit.start; Ray's processes
        # block SIGINT); SIGTERM to the driver process, as `kill PID` or a pod's stop sends it (a SIGTERM to the
        # whole group would also end the embedded Ray's GCS and raylet, which do not block it).
        (os.killpg if sig == signal.SIGINT else os.kill)(driver.pid, sig)
        rc = driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    out = log.read_text()
    assert rc == 128 + sig, out
    assert "Traceback" not in out and "Tuner.restore" not in out and "failed " not in out, out
    lines = [ln for ln in out.splitlines() if ln.startswith("interrupted")]
    assert len(lines) == 1 and out.rstrip().splitlines()[-1] == lines[0], out
    saved, pending, resume_name = LINE.match(lines[0]).groups()
    assert resume_name == name

    trials = read_trials(sweep_dir)
    statuses = [r["status"] for r in trials.values()]
    assert "failed" not in statuses and "running" not in statuses, trials
    stopped = [k for k, r in trials.items() if r["reason"] == "interrupted"]
    assert stopped and all(trials[k]["status"] == "pending" for k in stopped)
    assert int(saved) == sum(os.path.exists(os.path.join(sweep_dir, "checkpoints", k, "LATEST")) for k in stopped)
    assert int(saved) >= 1 and int(saved) + int(pending) == statuses.count("pending"), (lines, statuses)
    assert not os.path.exists(os.path.join(sweep_dir, "lease"))  # released: resume needs no wait
    ray_env.stop()

    proc = ray_env.run(["resume", name, "--storage", storage])
    assert proc.returncode == 0, proc.stderr
    done = read_trials(sweep_dir)
    assert all(r["status"] == "completed" for r in done.values()), done
    import pandas as pd

    metrics = pd.read_parquet(os.path.join(sweep_dir, "metrics"))
    assert not metrics.duplicated(["trial_id", "step"]).any()
    for trial_id, t in done.items():
        assert sorted(metrics[metrics.trial_id == trial_id].step) == list(range(1, t["steps"] + 1))
    for trial_id in stopped:  # continued from its checkpoint, it ends where a run never stopped ends
        t = done[trial_id]
        clean = clean_run(grid, trial_id)
        assert (t["steps"], t["tokens"], t["flops"]) == (clean["steps"], clean["tokens"], clean["flops"]), trial_id
        assert t["eval_loss"] == pytest.approx(clean["eval_loss"], rel=1e-3), trial_id


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once_and_the_sweep_resumes(make_grid, ray_env, tmp_path):
    grid = interrupt_grid(make_grid, "intr-twice")
    storage = str(tmp_path / "store")
    sweep_dir = os.path.join(storage, "intr-twice")
    log = tmp_path / "submit.log"
    driver = ray_env.start(["submit", grid, "--storage", storage], str(log))
    try:
        wait_for(lambda: running_with_checkpoint(sweep_dir), timeout_s=240, what="a running trial with a checkpoint",
                 alive=driver)
        os.killpg(driver.pid, signal.SIGINT)
        time.sleep(0.3)  # a second press, not one signal twice (the kernel would merge them)
        os.killpg(driver.pid, signal.SIGINT)
        rc = driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    out = log.read_text()
    assert rc == 130, out
    assert "interrupted again: exiting now" in out and "Traceback" not in out and "Tuner.restore" not in out, out
    assert not os.path.exists(os.path.join(sweep_dir, "lease"))
    ray_env.stop()

    proc = ray_env.run(["resume", "intr-twice", "--storage", storage])
    assert proc.returncode == 0, proc.stderr
    assert "taking over" not in proc.stderr  # the lease was released, not left to expire
    assert all(r["status"] == "completed" for r in read_trials(sweep_dir).values())
