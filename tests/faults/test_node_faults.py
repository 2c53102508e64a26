"""The worker node of a real 2-node cluster (`ray start`, token auth on, one CPU each) killed mid-trial: its raylet
and every process it started, SIGKILLed. The trial it ran is retried on the head once the head's own trial is done
and continues from its checkpoint (in the store, which both nodes reach). Rows exactly once, no completed trial
re-run, and `resume` afterwards has nothing to run."""
from __future__ import annotations

import os
import re
import secrets
import signal

import pytest

from faultkit import REPO, Counts, Snapshot, check, kill_all, read_metrics, under_way, wait_for
from raykit import free_port, ray_start

pytestmark = pytest.mark.slow

NODE = "REPURPOSE_TEST_NODE"  # marks the worker node's processes (they inherit the env of its `ray start`)
# The GCS declares a silent node dead after failure_threshold missed checks of period_ms (Ray defaults: 5 x 3 s).
FAST_HEALTH_CHECK = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                     "RAY_health_check_timeout_ms": "1000"}


def test_worker_node_killed_mid_trial(make_grid, ray_env, tmp_path, fault_table):
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}  # as on a real cluster
    env = {**ray_env.env, **auth, **FAST_HEALTH_CHECK}
    port = free_port()
    ray_start(["--head", "--port", str(port), "--temp-dir", ray_env.tmp, "--include-dashboard=false",
               "--dashboard-port", str(free_port())], env)
    ray_start(["--address", f"127.0.0.1:{port}"], {**env, NODE: "worker"})

    # batches of 4 pairs: 4x the steps of the fixture's 16 for the same tokens (the data hold ~4e10 FLOP of them),
    # so both trials are under way at once even on a loaded machine; with batches of 16 one trial could end
    # before the other, started later, wrote its first checkpoint
    grid = make_grid("node", methods={"bias": {}}, budgets=[3.0e10, 4.0e10], train={"batch_size": 4},
                     run={"checkpoint_every_s": 0.3, "max_failures": 3})
    storage = str(tmp_path / "store")
    sweep_dir = os.path.join(storage, "node")
    log_path = str(tmp_path / "submit.log")
    ray_env.env.update(auth)
    driver = ray_env.start(["submit", grid, "--storage", storage, "--address", f"127.0.0.1:{port}",
                             "--shared-storage"], log_path)
    try:
        # one trial per node (one CPU each); kill the worker node once both are under way with a checkpoint
        wait_for(lambda: len(under_way(sweep_dir)) == 2 and ray_env.trial_workers(**{NODE: "worker"}),
                 timeout_s=240, what="a trial under way on each node", alive=driver)
        at_kill = Snapshot.take(sweep_dir)
        saved = under_way(sweep_dir)
        kill_all(ray_env.pids(**{NODE: "worker"}), signal.SIGKILL)
        assert driver.wait(timeout=300) == 0, open(log_path).read()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    log = open(log_path).read()
    assert f'File "{REPO}/orchestrator' not in log and f'File "{REPO}/workers' not in log, log[-3000:]

    after_run = Snapshot.take(sweep_dir)
    resume = ray_env.run(["resume", "node", "--storage", storage, "--address", f"127.0.0.1:{port}",
                          "--shared-storage"])
    assert resume.returncode == 0 and "0 to run" in resume.stderr, resume.stderr
    final = Snapshot.take(sweep_dir)
    assert final.completed() == set(final.trials) and len(final.trials) == 2

    # The trial of the lost node was retried on the head (where the other trial ran) from its checkpoint.
    (moved,) = set(re.findall(r"Trial task failed for trial (\w+)", log))
    (stayed,) = set(saved) - {moved}
    assert final.trials[moved]["node_id"] == final.trials[stayed]["node_id"]
    rows = {r["step"]: r for r in read_metrics(sweep_dir) if r["trial_id"] == moved}
    for row in saved[moved]["rows"]:
        assert (rows[row["step"]]["wall_s"], rows[row["step"]]["train_loss"]) == (row["wall_s"], row["train_loss"])

    counts = check(final, at_kill) + Counts(rerun=check(final, after_run).rerun)
    fault_table.add("worker node killed (2-node cluster)", counts)
    assert (counts.lost, counts.duplicated, counts.rerun) == (0, 0, 0), counts
