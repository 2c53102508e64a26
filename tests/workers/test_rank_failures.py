"""Multi-rank trials end, and start, as they should (gloo ranks on CPU):

- a rank that dies (SIGKILL) or hangs (sleeps for good inside its step, alive) ends its Ray trial as failed with
  a reason that says which, well within 2 minutes, and the other ranks' processes are gone
  (orchestrator/launchers.py's watcher; the fault from workers/distributed.py's REPURPOSE_RANK_FAULT hook);
- several multi-rank trials started at once all rendezvous: each trial's store holds its own port from the
  moment it exists (workers/distributed.py ``host_store``), nothing picks a free port to bind later.
"""
from __future__ import annotations

import glob
import json
import os
import tempfile
import time

import pytest

from core.spec import TrialSpec

pytestmark = pytest.mark.slow


def without_shm_op() -> None:
    """In this rank's process: DeepSpeed's CPU shared-memory all-reduce op (JIT-compiled with g++ the first time a
    machine runs DeepSpeed on CPU: minutes on a loaded CI box) is left out; gloo does the collectives. Nothing
    measured here goes through it."""
    import deepspeed.comm.torch

    deepspeed.comm.torch.build_shm_op = lambda: None

LIMIT_S = 120.0  # what the product promises: a failed or hung rank ends its trial within 2 minutes


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray_dir = tempfile.mkdtemp(prefix="rp-rk-", dir="/tmp")  # unix socket paths must stay short
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             _temp_dir=ray_dir)
    yield ray
    ray.shutdown()


def spec_for(tiny_model, pairs_file) -> dict:
    # ~11 steps of 16 pairs (tests/workers/test_distributed.py's budget): the fault comes at step 2
    return TrialSpec(model=tiny_model, method="full", budget_flops=6.5e9, train_data=str(pairs_file), batch_size=16,
                     precision="fp32", num_threads=1, chunk_size=4, report_every_s=0.0).to_dict()


def run_faulty_trial(ray, spec: dict, fault: str, probe_dir: str) -> tuple[str, float]:
    """A 2-rank trial whose trial process is a Ray task (rank 0 there, rank 1 an actor, as inside Tune), with
    ``fault`` injected; (its error, seconds until it ended)."""
    from orchestrator.launchers import run_ray_ranks

    env = {"DS_ACCELERATOR": "cpu", "REPURPOSE_RANK_FAULT": fault, "REPURPOSE_PROBE": probe_dir,
           "OMP_NUM_THREADS": "1"}

    @ray.remote(num_cpus=1, max_retries=0)
    def trial(spec):
        return run_ray_ranks(spec, ranks=2, bundle={"CPU": 1}, report=None, checkpoint_uri=None, trial_id="t")

    started = time.monotonic()
    with pytest.raises(Exception) as failed:
        ray.get(trial.options(runtime_env={"env_vars": env}).remote(spec), timeout=LIMIT_S + 60)
    return str(failed.value), time.monotonic() - started


def rank_pids(probe_dir: str) -> dict[int, int]:
    out = {}
    for path in glob.glob(os.path.join(probe_dir, "t.*.json")):
        with open(path) as f:
            entry = json.load(f)
        out[entry["rank"]] = entry["pid"]
    return out


def gone(pid: int, within_s: float = 15.0) -> bool:
    until = time.monotonic() + within_s
    while time.monotonic() < until:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.5)
    return False


@pytest.mark.timeout(400)
@pytest.mark.parametrize("fault,reason", [
    ("1:die:2", "rank 1 failed"),
    # rank 1 sleeps inside step 2; rank 0 waits for it in the step's collective: neither steps again
    ("1:hang:2", "no training step for 60 s on rank(s) 0, 1 of 2: a rank hung in its step"),
])
def test_a_failed_or_hung_rank_ends_its_trial(ray_cluster, tiny_model, pairs_file, tmp_path, fault, reason):
    probe_dir = str(tmp_path / "probe")
    error, took_s = run_faulty_trial(ray_cluster, spec_for(tiny_model, pairs_file), fault, probe_dir)
    assert reason in error, error
    assert took_s < LIMIT_S, f"the trial took {took_s:.0f} s to end"
    pids = rank_pids(probe_dir)
    assert set(pids) == {0, 1}
    assert gone(pids[1]), "rank 1's process is still alive"


def _rendezvous(index: int, world: int, port: int, out_dir: str) -> None:
    """One rank: connects to its trial's store, joins the process group, all-reduces its rank + 1."""
    import torch
    import torch.distributed as dist

    from workers.distributed import init_ranks

    without_shm_op()

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(index % world),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(index % world), DS_ACCELERATOR="cpu")
    ranks, beat = init_ranks(timeout_s=120)
    total = torch.tensor([ranks.rank + 1.0])
    dist.all_reduce(total)
    with open(os.path.join(out_dir, f"{port}.{ranks.rank}"), "w") as f:
        f.write(str(float(total)))
    dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_multi_rank_trials_started_together_all_rendezvous(tmp_path):
    """Four 2-rank trials, all 8 ranks started at once: each joins its own trial's group (sums 1 + 2 = 3)."""
    import torch.multiprocessing as mp

    from workers.distributed import host_store

    trials, world = 4, 2
    stores = [host_store(world) for _ in range(trials)]
    ports = [s.port for s in stores]
    assert len(set(ports)) == trials
    procs = [mp.get_context("spawn").Process(target=_rendezvous, args=(i, world, ports[i // world], str(tmp_path)))
             for i in range(trials * world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    for port in ports:
        assert [(tmp_path / f"{port}.{r}").read_text() for r in range(world)] == ["3.0", "3.0"]
