"""Sweeps on a real 2-node Ray cluster started with `ray start` on this machine (token auth on, as a multi-node
cluster should be; the head runs the job server), each through a documented command as written:

- README's remote-cluster command: ``repurpose submit GRID --address http://HEAD:8265 --storage DIR
  --shared-storage`` (the driver runs on the head as a Ray Job; its log streams here);
- deploy/README.md's ``ray job submit --address http://HEAD:8265 --working-dir DIR -- repurpose submit …``, then
  ``status``, ``fit`` and ``export`` here against the same store;
- Ctrl-C while the job's log streams: the job is stopped, its driver records the running trial ``interrupted``,
  and ``resume --address http://…`` finishes the sweep;
- a driver on a cluster node (``--address HOST:PORT``): trials on both nodes;
- what is refused (one line, exit 2, nothing written): ``ray://``, a local store with a remote address and no
  ``--shared-storage``, a wrong token.

One cluster for the module (CI has 2 cores). Job entrypoints run ``repurpose`` from the head's environment, which
the nodes inherit from ``ray start`` (PYTHONPATH: this checkout)."""
from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pandas as pd
import pyarrow.parquet as pq
import pytest

from raykit import REPO, RayEnv, ctrl_c_when, free_port, ray_start

pytestmark = pytest.mark.slow
JOB_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def cluster():
    """{"gcs", "http", "auth", "env"}: a head (with the job server) and a worker node, one CPU each; teardown stops
    exactly their processes."""
    ray_env = RayEnv()
    # Ray >= 2.52 token auth: the same RAY_AUTH_TOKEN on every node, the driver and the job client
    # (https://docs.ray.io/en/latest/ray-security/token-auth.html).
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env = {**ray_env.env, **auth}
    port, dashboard = free_port(), free_port()
    try:
        ray_start(["--head", "--port", str(port), "--temp-dir", ray_env.tmp, "--include-dashboard=true",
                   "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard)], env)
        # A worker node takes the head's temp dir (the session lives there); RAY_TMPDIR keeps anything else in ours.
        ray_start(["--address", f"127.0.0.1:{port}"], env)
        yield {"gcs": f"127.0.0.1:{port}", "http": f"http://127.0.0.1:{dashboard}", "auth": auth, "ray_env": ray_env}
    finally:
        ray_env.stop()


def trials_of(storage: str, sweep: str) -> dict[str, dict]:
    return {r["trial_id"]: r for r in pq.read_table(os.path.join(storage, sweep, "trials.parquet")).to_pylist()}


def check_completed_once(storage: str, sweep: str, n: int) -> dict[str, dict]:
    """Every trial completed, its metrics rows each step once from 1 to its steps, its FLOP within budget."""
    trials = trials_of(storage, sweep)
    assert len(trials) == n and all(t["status"] == "completed" for t in trials.values()), trials
    metrics = pd.read_parquet(os.path.join(storage, sweep, "metrics"))
    assert not metrics.duplicated(["trial_id", "step"]).any()
    for trial_id, t in trials.items():
        mine = metrics[metrics.trial_id == trial_id].sort_values("step")
        assert mine.step.tolist() == list(range(1, t["steps"] + 1)) and t["steps"] >= 3
        assert mine.flops.iloc[-1] == t["flops"] and 0 < t["flops"] <= t["budget_flops"]
        assert mine.eval_loss.iloc[-1] == t["eval_loss"] and 0 < t["eval_loss"] < 10
    return trials


def test_readme_command_runs_the_driver_as_a_ray_job(cluster, make_grid, tmp_path):
    """`repurpose submit GRID --address http://HEAD:8265 --storage DIR --shared-storage`, as README.md shows it: the
    grid travels with the job, the driver runs on the head, the token cache is built there with Ray Data, the
    job's lines stream here, exit 0."""
    env = cluster["ray_env"]
    grid = make_grid("viajob", methods={"bias": {}, "lora": {"rank": [4]}})
    storage = str(tmp_path / "store")
    proc = env.run(["submit", grid, "--address", cluster["http"], "--storage", storage, "--shared-storage"],
                   timeout=JOB_TIMEOUT_S, **cluster["auth"])
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert err.startswith("submitted job repurpose-viajob-") and "repurpose submit grid.yaml --storage" in err
    assert "sweep viajob: 2 trials, 0 already completed, 2 to run" in err  # the driver's lines, streamed
    assert "sweep viajob: 2 completed" in err.strip().splitlines()[-1]
    # the token cache: built by the job's driver on the cluster (Ray Data), where the trials read it
    assert "token cache" in err and "built in" in err
    (cache,) = os.listdir(os.path.join(storage, "_cache", "tokens"))
    assert os.path.exists(os.path.join(storage, "_cache", "tokens", cache, "manifest.json"))
    trials = check_completed_once(storage, "viajob", 2)
    assert {t["method"] for t in trials.values()} == {"bias", "lora"}
    assert not os.path.exists(os.path.join(storage, "viajob", "lease"))

    # Submitted again: nothing to run, the job says so and exits 0 (the store decides what is done).
    again = env.run(["submit", grid, "--address", cluster["http"], "--storage", storage, "--shared-storage"],
                    timeout=JOB_TIMEOUT_S, **cluster["auth"])
    assert again.returncode == 0 and "2 already completed, 0 to run" in again.stderr, again.stderr
    assert trials_of(storage, "viajob") == trials


def test_deploy_path_then_status_fit_export_here(cluster, make_grid, tmp_path):
    """deploy/README.md: `ray job submit --address http://HEAD:8265 --working-dir DIR -- repurpose submit
    grid.yaml --storage URI --shared-storage`; then status, fit and export on this side, no Ray."""
    env = cluster["ray_env"]
    grid_dir = tmp_path / "my-grid"
    grid_dir.mkdir()
    os.replace(make_grid("deployed", methods={"bias": {}, "lora": {"rank": [4]}}), grid_dir / "grid.yaml")
    storage = str(tmp_path / "store")
    proc = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", cluster["http"],
         "--working-dir", str(grid_dir), "--", "repurpose", "submit", "grid.yaml", "--storage", storage,
         "--shared-storage"], env={**env.env, **cluster["auth"]}, cwd=REPO, capture_output=True, text=True,
        timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "succeeded" in proc.stdout.lower(), proc.stdout
    trials = check_completed_once(storage, "deployed", 2)

    status = env.json(["status", "deployed", "--json", "--storage", storage])
    assert status["counts"]["completed"] == 2 and status["flops_spent"] == sum(t["flops"] for t in trials.values())
    fit = env.run(["fit", "deployed", "--storage", storage])
    assert fit.returncode == 0, fit.stderr
    assert os.path.exists(os.path.join(storage, "deployed", "analysis", "recipe.md"))
    best = min(trials.values(), key=lambda t: t["eval_loss"])
    out = tmp_path / "model"
    export = env.run(["export", "deployed", "--budget", str(best["budget_flops"]), "--out", str(out),
                      "--storage", storage])
    assert export.returncode == 0, export.stderr
    assert best["trial_id"] in export.stdout + export.stderr and (out / "modules.json").exists()


def test_ctrl_c_stops_the_job_and_resume_finishes(cluster, make_grid, tmp_path):
    """Ctrl-C while the job's log streams: the job is stopped (Ray sends its driver SIGTERM), the driver records
    the running trial `interrupted` and exits; the CLI prints the driver's line and exits 130. `resume` through
    the job server then finishes the sweep, each metrics row once."""
    env = cluster["ray_env"]
    grid = make_grid("jobintr", methods={"full": {}}, budgets=[1.5e10, 3.0e9],
                     run={"checkpoint_every_s": 0.3, "max_concurrent_trials": 1, "report_every_s": 0})
    storage = str(tmp_path / "store")
    log = tmp_path / "submit.log"
    cli = env.start(["submit", grid, "--address", cluster["http"], "--storage", storage, "--shared-storage"],
                    str(log), **cluster["auth"])
    rc = ctrl_c_when(cli, lambda: _checkpointed(os.path.join(storage, "jobintr")), timeout_s=JOB_TIMEOUT_S,
                     what="a running trial with a checkpoint", wait_s=300)
    out = log.read_text()
    assert rc == 130, out
    assert "stopping job repurpose-jobintr-" in out and "Traceback" not in out, out
    assert out.rstrip().splitlines()[-1].startswith("interrupted: "), out
    trials = trials_of(storage, "jobintr")
    assert [t["reason"] for t in trials.values()].count("interrupted") == 1, trials
    assert "running" not in {t["status"] for t in trials.values()}
    assert not os.path.exists(os.path.join(storage, "jobintr", "lease"))

    proc = env.run(["resume", "jobintr", "--address", cluster["http"], "--storage", storage, "--shared-storage"],
                   timeout=JOB_TIMEOUT_S, **cluster["auth"])
    assert proc.returncode == 0, proc.stderr
    check_completed_once(storage, "jobintr", 2)


def _checkpointed(sweep_dir: str) -> bool:
    root = os.path.join(sweep_dir, "checkpoints")
    return os.path.isdir(root) and any(os.path.exists(os.path.join(root, t, "LATEST")) for t in os.listdir(root))


def test_refused_before_anything_runs(cluster, make_grid, tmp_path):
    env = cluster["ray_env"]
    grid = make_grid("refused")
    host_port = cluster["http"].removeprefix("http://")
    for argv, start in [
        (["--address", f"ray://{host_port}", "--storage", str(tmp_path / "a"), "--shared-storage"],
         f"--address ray://{host_port}: Ray Client (ray://) is not supported"),
        (["--address", cluster["http"], "--storage", str(tmp_path / "b")],
         f"--storage {tmp_path / 'b'}: a local path with a remote cluster"),
        (["--address", cluster["gcs"], "--storage", str(tmp_path / "c")],
         f"--storage {tmp_path / 'c'}: a local path with a remote cluster"),
    ]:
        proc = env.run(["submit", grid, *argv], timeout=120, **cluster["auth"])
        assert proc.returncode == 2, proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith(start), line
    assert sorted(os.listdir(tmp_path)) == ["refused.yaml"]  # nothing written

    # A wrong token: the job server refuses, one line that says what to set, nothing submitted or written.
    bad = env.run(["submit", grid, "--address", cluster["http"], "--storage", str(tmp_path / "d"),
                   "--shared-storage"], timeout=180, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    assert bad.returncode == 2, bad.stderr
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith(f"--address {cluster['http']}: ") and "RAY_AUTH_TOKEN" in line, line
    assert not os.path.exists(tmp_path / "d")


def test_a_driver_on_a_node_runs_trials_on_both_nodes(cluster, make_grid, tmp_path):
    """`--address HOST:PORT` (the GCS: a driver on a cluster node, as inside a Ray Job) with a shared store."""
    env = cluster["ray_env"]
    grid = make_grid("cluster", methods={"bias": {}, "lora": {"rank": [4]}})
    storage = str(tmp_path / "store")
    proc = env.run(["submit", grid, "--storage", storage, "--address", cluster["gcs"], "--shared-storage"],
                   timeout=JOB_TIMEOUT_S, **cluster["auth"])
    assert proc.returncode == 0, proc.stderr
    rows = trials_of(storage, "cluster")
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows.values()), rows
    node_ids = {r["node_id"] for r in rows.values()}
    # one CPU per node and one CPU per trial: the two trials ran at once, one on each node
    assert len(node_ids) == 2 and all(n and len(n) == 56 for n in node_ids), node_ids

    # The cluster outlives the driver: `status` needs no Ray, and the nodes are still up (not shut down by it).
    status = env.json(["status", "cluster", "--json", "--storage", storage])
    assert status["counts"]["completed"] == 2
    assert any("raylet" in name for name in env.names())

    # A wrong token is refused with one line that says so, exit code 2, and nothing written.
    bad = env.run(["submit", grid, "--storage", str(tmp_path / "other"), "--address", cluster["gcs"],
                   "--shared-storage"], RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), timeout=180)
    assert bad.returncode == 2, bad.stderr
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith(f"--address {cluster['gcs']}: cannot start or reach Ray") and "RAY_AUTH_TOKEN" in line
    assert not os.path.exists(tmp_path / "other")
