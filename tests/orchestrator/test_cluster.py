"""A sweep on a real 2-node Ray cluster started with `ray start` on this machine (token auth on, as a multi-node
cluster should be): the driver connects with --address and the trials run on both nodes."""
from __future__ import annotations

import os
import secrets

import pyarrow.parquet as pq
import pytest

from raykit import free_port, ray_start

pytestmark = pytest.mark.slow


@pytest.fixture
def two_node_cluster(ray_env):
    """(address, env): a head and a worker node, one CPU each; ray_env's teardown stops exactly their processes."""
    # Ray >= 2.52 token auth: the same RAY_AUTH_TOKEN on every node and in the driver
    # (https://docs.ray.io/en/latest/ray-security/token-auth.html).
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env = {**ray_env.env, **auth}
    port = free_port()
    ray_start(["--head", "--port", str(port), "--temp-dir", ray_env.tmp, "--include-dashboard=false",
               "--dashboard-port", str(free_port())], env)
    # A worker node takes the head's temp dir (the session lives there); RAY_TMPDIR keeps anything else in ours.
    ray_start(["--address", f"127.0.0.1:{port}"], env)
    return f"127.0.0.1:{port}", auth


def test_sweep_runs_on_both_nodes(make_grid, ray_env, two_node_cluster, tmp_path):
    address, auth = two_node_cluster
    grid = make_grid("cluster", methods={"bias": {}, "lora": {"rank": [4]}})
    storage = str(tmp_path / "store")

    proc = ray_env.run(["submit", grid, "--storage", storage, "--address", address], **auth)
    assert proc.returncode == 0, proc.stderr
    rows = pq.read_table(os.path.join(storage, "cluster", "trials.parquet")).to_pylist()
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows), rows
    assert all(r["flops"] <= r["budget_flops"] for r in rows)
    node_ids = {r["node_id"] for r in rows}
    # one CPU per node and one CPU per trial: the two trials ran at once, one on each node
    assert len(node_ids) == 2 and all(n and len(n) == 56 for n in node_ids), node_ids

    # The cluster outlives the driver: `status` needs no Ray, and the nodes are still up (not shut down by it).
    status = ray_env.json(["status", "cluster", "--json", "--storage", storage])
    assert status["counts"]["completed"] == 2
    assert any("raylet" in name for name in ray_env.names())

    # A wrong token is refused with one line that says so, exit code 2, and nothing written.
    bad = ray_env.run(["submit", grid, "--storage", str(tmp_path / "other"), "--address", address],
                      RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), timeout=180)
    assert bad.returncode == 2, bad.stderr
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith(f"--address {address}: cannot start or reach Ray") and "RAY_AUTH_TOKEN" in line
    assert not os.path.exists(tmp_path / "other")
