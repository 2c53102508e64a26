"""What a trial is given on a GPU cluster, checked on a real 2-node Ray cluster whose GPUs are fake
(``ray start --num-gpus N`` on a machine without any): Ray hands out GPU ids and CUDA_VISIBLE_DEVICES as it would on
GPU nodes, while the CPU build of torch never touches CUDA, so the trials train on CPU. Every trial process and
DeepSpeed rank records what it was given before it trains (workers/probe.py, ``REPURPOSE_PROBE`` set on the
nodes), and the test reads those records back:

- a DeepSpeed trial's 2 ranks: 2 distinct GPU ids of one node, RANK 0/1, LOCAL_RANK = the rank's place among the
  trial's GPUs, WORLD_SIZE 2, one MASTER_ADDR:MASTER_PORT (an address of the node);
- 0.25-GPU trials: one GPU id each, CUDA_VISIBLE_DEVICES naming exactly it, all four on the same id (Ray packs
  fractions onto the fullest GPU that fits: they share it);
- a trial planned without a GPU (``resources.gpus: 0``) on a node that has GPUs: CUDA_VISIBLE_DEVICES empty, no
  GPU id (Ray leaves the variable unset for such a trial, which would then see every GPU of its node).

The head holds no CPUs or GPUs, so every trial runs on the worker node (2 fake GPUs, 4 CPUs): the placement is
known and the assertions are exact. The sweeps run the way README.md's "a driver on a cluster node" does:
``repurpose submit GRID --address HOST:PORT --storage DIR --shared-storage`` (one machine: one filesystem)."""
from __future__ import annotations

import glob
import json
import os
import secrets
import socket

import pyarrow.parquet as pq
import pytest

from raykit import RayEnv, free_port, ray_start

pytestmark = pytest.mark.slow
SUBMIT_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def fake_gpu_cluster(tmp_path_factory):
    """{"gcs", "env", "auth", "probe"}: a head with nothing to run trials on and a worker with 2 fake GPUs."""
    ray_env = RayEnv()
    probe = str(tmp_path_factory.mktemp("probe"))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    # the nodes' environment reaches every trial process and rank: the probe, and DeepSpeed on CPU
    env = {**ray_env.env, **auth, "REPURPOSE_PROBE": probe, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    port = free_port()
    try:
        ray_start(["--head", "--port", str(port), "--temp-dir", ray_env.tmp, "--include-dashboard=false",
                   "--num-cpus", "0", "--num-gpus", "0"], env)
        ray_start(["--address", f"127.0.0.1:{port}", "--num-cpus", "4", "--num-gpus", "2"], env)
        yield {"gcs": f"127.0.0.1:{port}", "env": ray_env, "auth": auth, "probe": probe}
    finally:
        ray_env.stop()


def probes(folder: str, trial_id: str) -> list[dict]:
    """The records of a trial's processes (the last attempt's: one per rank)."""
    by_rank = {}
    for path in sorted(glob.glob(os.path.join(folder, f"{trial_id}.*.json")), key=os.path.getmtime):
        with open(path) as f:
            entry = json.load(f)
        by_rank[entry["rank"]] = entry
    return [by_rank[r] for r in sorted(by_rank)]


def submit(cluster, grid: str, storage: str) -> dict[str, dict]:
    proc = cluster["env"].run(["submit", grid, "--address", cluster["gcs"], "--storage", storage, "--shared-storage"],
                              timeout=SUBMIT_TIMEOUT_S, **cluster["auth"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = os.path.splitext(os.path.basename(grid))[0]
    rows = pq.read_table(os.path.join(storage, name, "trials.parquet")).to_pylist()
    assert rows and all(r["status"] == "completed" for r in rows), rows
    return {r["trial_id"]: r for r in rows}


def test_ranks_shares_and_gpu_less_trials_get_what_they_were_planned(fake_gpu_cluster, make_grid, tmp_path):
    probe = fake_gpu_cluster["probe"]
    # The tiny model: full fine-tuning (N_tr ~ 0.23M) crosses deepspeed_from_params and takes 2 GPUs under ZeRO;
    # bias and LoRA (N_tr up to ~65k at rank 16) stay below it and share a GPU at 0.25 each.
    grid = make_grid("fakegpu", methods={"full": {}, "bias": {}, "lora": {"rank": [4, 8, 16]}},
                     resources={"deepspeed_from_params": 1.5e5, "deepspeed_gpus": 2, "gpu_fraction": 0.25,
                                "gpu_fraction_below_params": 1.0e12, "cpus_per_trial": 1},
                     run={"token_cache": False})
    storage = str(tmp_path / "store")
    trials = submit(fake_gpu_cluster, grid, storage)
    assert len(trials) == 5

    full = [t for t in trials if trials[t]["method"] == "full"]
    assert len(full) == 1
    ranks = probes(probe, full[0])
    assert [r["rank"] for r in ranks] == [0, 1]
    assert len({r["node_id"] for r in ranks}) == 1  # one node (the placement group packs the trial)
    ids = [r["gpu_ids"] for r in ranks]
    assert all(len(i) == 1 for i in ids) and {i[0] for i in ids} == {"0", "1"}, ids  # distinct GPUs
    for r in ranks:
        env = r["env"]
        visible = env["CUDA_VISIBLE_DEVICES"].split(",")
        assert sorted(visible) == ["0", "1"]  # every rank sees the trial's GPUs (NCCL sees its peers)
        assert env["RANK"] == str(r["rank"]) and env["WORLD_SIZE"] == "2"
        assert visible[int(env["LOCAL_RANK"])] == r["gpu_ids"][0]  # LOCAL_RANK points at the rank's own GPU
    (addr, port), = {(r["env"]["MASTER_ADDR"], r["env"]["MASTER_PORT"]) for r in ranks}  # one rendezvous
    with socket.socket() as s:
        s.bind((addr, 0))  # an address of this node (the one Ray knows it by)
    assert int(port) > 0

    shared = [t for t in trials if trials[t]["method"] != "full"]
    assert len(shared) == 4
    records = [probes(probe, t) for t in shared]
    assert all(len(r) == 1 for r in records), ([len(r) for r in records], shared, sorted(os.listdir(probe)))
    records = [r[0] for r in records]
    for r in records:
        assert len(r["gpu_ids"]) == 1 and r["env"]["CUDA_VISIBLE_DEVICES"] == r["gpu_ids"][0], r
        assert r["env"]["WORLD_SIZE"] is None and r["device"] == "cpu"  # one process; CPU torch trains on CPU
    assert len({(r["node_id"], r["gpu_ids"][0]) for r in records}) == 1  # the four share one GPU



def test_a_trial_planned_without_a_gpu_sees_none_on_a_gpu_node(fake_gpu_cluster, make_grid, tmp_path):
    grid = make_grid("nogpu", methods={"bias": {}}, resources={"gpus": 0}, run={"token_cache": False})
    trials = submit(fake_gpu_cluster, grid, str(tmp_path / "store"))
    (trial_id,) = trials
    (record,) = probes(fake_gpu_cluster["probe"], trial_id)
    assert record["gpu_ids"] == [] and record["env"]["CUDA_VISIBLE_DEVICES"] == "" and record["device"] == "cpu"
