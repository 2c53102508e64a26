"""Launchers of multi-rank (DeepSpeed) trials inside one Ray Tune trial, next to the Tune adapter
(orchestrator/trainable.py) that calls them.

``run_ray_ranks`` runs in the trial's own process on a Ray worker: rank 0 there (it reports), ranks 1..k-1 as Ray
actors (``_RankActor``) in the trial's placement-group bundles, all on one node. Each rank runs
``workers.distributed.run_rank`` (process group, the DeepSpeed recipe, teardown). workers and torch are imported
only inside these functions, which run on workers: the driver imports this module without loading torch.

Rendezvous: rank 0's process hosts the store on a port the OS chose and keeps (``workers.distributed.host_store``)
and hands that port to the actors with their work: no port is chosen, freed and bound again later.

A failed or hung rank ends the trial (``RankWatcher``): a rank's process that dies or raises, or a rank whose step
counter stops moving for ``HEARTBEAT_STALE_S``, gets every actor rank killed and rank 0's process group aborted, so
rank 0 leaves its collective with an error and the trial fails with the watcher's reason — within about a minute,
where NCCL alone would have waited for the collective timeout.
"""
from __future__ import annotations

import os
import sys
import threading
import time

# A rank in its training loop whose step counter does not move for this long is stuck (a hung kernel or peer, a
# deadlock): a step of the largest planned trial (2.8B full fine-tuning, 1024 pairs over 8 A100s: ~1.8e15 FLOP at
# 40 % of 8 x 312 TFLOP/s) takes ~2 s, and an evaluation of the held-out pairs a few more. With the watcher's
# poll and the kills, a hung rank ends its trial in about 65 s.
HEARTBEAT_STALE_S = 60.0
POLL_S = 1.0
# After the watcher has killed the actor ranks and aborted the process group, rank 0 (this process) has this long
# to leave its step; a rank 0 stuck outside any collective is then ended with its process (Tune records the trial
# failed, and retries it as for a lost worker).
RANK0_GRACE_S = 30.0


class _RankActor:
    """Ranks 1..k-1 of a trial, each in its own Ray actor (process)."""

    def gpu_ids(self) -> list:
        import ray

        return [str(g) for g in ray.get_gpu_ids()]

    def run(self, spec: dict, rank: int, world: int, addr: str, port: int, checkpoint_uri, env: dict,
            trial_id: str | None = None) -> dict:
        from workers.distributed import run_rank

        env = dict(env)
        return run_rank(spec, rank, world, addr, port, checkpoint_uri=checkpoint_uri,
                        local_rank=int(env.pop("LOCAL_RANK", 0)), env=env, trial_id=trial_id)


def visible_gpus_env(gpu_ids: list[str]) -> dict:
    """CUDA_VISIBLE_DEVICES for a trial process: Ray sets it for an actor that asked for GPUs, and leaves it unset for
    one that asked for none — which would then see every GPU of its node and pile onto cuda:0. Empty: no GPU."""
    return {"CUDA_VISIBLE_DEVICES": ",".join(gpu_ids)}


def hide_unassigned_gpus() -> None:
    """In a trial process that Ray gave no GPU: no GPU visible (before anything initialises CUDA)."""
    import ray

    if not ray.get_gpu_ids():
        os.environ.update(visible_gpus_env([]))


class _Heartbeats:
    """Each rank's last heartbeat (workers.distributed.Heartbeat) read from the rendezvous store, and when it last
    changed by this process's clock (no clocks compared across processes)."""

    def __init__(self, addr: str, port: int, world: int):
        from workers.distributed import HEARTBEAT_KEY, connect_store

        self.store = connect_store(addr, port)
        self.keys = [HEARTBEAT_KEY.format(rank=r) for r in range(world)]
        self.seen: dict[int, tuple[str, float]] = {}

    def stuck(self, now: float) -> list[int]:
        """The ranks whose training step has not moved for HEARTBEAT_STALE_S. A hung rank's peers wait for it in
        their next collective, so they stop too: all of them are named."""
        stuck = []
        for rank, key in enumerate(self.keys):
            if not self.store.check([key]):
                continue
            value = self.store.get(key).decode()
            if self.seen.get(rank, ("", 0.0))[0] != value:
                self.seen[rank] = (value, now)
            elif value.startswith("train:") and now - self.seen[rank][1] > HEARTBEAT_STALE_S:
                stuck.append(rank)
        return stuck


class RankWatcher(threading.Thread):
    """Watches the actor ranks' results and every rank's heartbeat; on the first failure, records why, kills the
    actor ranks and aborts this process's process group (rank 0's pending collective then raises)."""

    def __init__(self, refs: list, actors: list, heartbeats: _Heartbeats):
        super().__init__(daemon=True)
        self.refs, self.actors, self.heartbeats = list(refs), actors, heartbeats
        self.failure: str | None = None
        self.rank0_done = threading.Event()

    def run(self) -> None:
        import ray

        pending = list(self.refs)
        while pending or not self.rank0_done.is_set():
            if pending:
                done, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
                for ref in done:
                    try:
                        ray.get(ref)
                    except Exception as e:  # noqa: BLE001 -- any rank's failure ends the trial
                        return self.fail(f"rank {self.refs.index(ref) + 1} failed: {_last_line(e)}")
            try:
                stuck = self.heartbeats.stuck(time.monotonic())
            except Exception:  # noqa: BLE001 -- the store went with rank 0's teardown: nothing left to watch
                stuck = []
            if stuck:
                return self.fail(f"no training step for {HEARTBEAT_STALE_S:g} s on rank(s) "
                                 f"{', '.join(map(str, stuck))} of {len(self.heartbeats.keys)}: a rank hung in its step")
            time.sleep(POLL_S)

    def fail(self, reason: str) -> None:
        import ray

        self.failure = reason
        for a in self.actors:
            ray.kill(a)
        _abort_process_group()
        if not self.rank0_done.wait(RANK0_GRACE_S):  # rank 0 itself is stuck outside any collective
            print(f"trial ended: {reason}; rank 0 did not stop within {RANK0_GRACE_S:g} s", file=sys.stderr,
                  flush=True)
            os._exit(1)


def _abort_process_group() -> None:
    """Aborts this process's default process group: a collective blocked on a dead or stuck peer returns with an
    error (NCCL would otherwise wait for its timeout; gloo also notices the killed peers' closed connections)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return
    try:
        dist.distributed_c10d._abort_process_group()
    except Exception:  # noqa: BLE001 -- a backend without abort: the killed peers' connections end its collective
        pass


def _last_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__


def run_ray_ranks(spec: dict, *, ranks: int, bundle: dict, report, checkpoint_uri: str | None,
                  trial_id: str | None = None) -> dict:
    """Inside a Tune trial whose placement group holds ``ranks`` bundles like ``bundle`` on one node (the trial's
    own process in bundle 0): rank 0 runs here and reports; ranks 1..k-1 are actors in bundles 1..k-1. The ranks
    see all the trial's GPUs, so NCCL sees its peers (as Ray Train does). A failed or hung rank ends the trial
    (``RankWatcher``); rank 0 then fails with the watcher's reason."""
    import ray
    import torch
    from ray.util import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from workers.distributed import host_store, run_rank

    pg = get_current_placement_group()
    actors = []
    for r in range(1, ranks):
        options = {"num_cpus": bundle.get("CPU", 0), "num_gpus": bundle.get("GPU", 0)}
        if pg is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r)
        actors.append(ray.remote(_RankActor).options(**options).remote())
    store = host_store(ranks)  # the rendezvous, on a port held from now on; its number goes to the actors
    addr, port = ray.util.get_node_ip_address(), store.port
    watcher = None
    try:
        own = [[str(g) for g in ray.get_gpu_ids()]] + ray.get([a.gpu_ids.remote() for a in actors])  # by rank
        env = visible_gpus_env(sorted({g for ids in own for g in ids}, key=lambda g: (len(g), g)))
        if not own[0]:
            env["DS_ACCELERATOR"] = "cpu"
        if not torch.cuda.is_initialized():  # else a reused trial actor set it before, for the same bundles
            os.environ.update(env)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")

        def local_rank(r: int, gpus: str) -> int:  # this rank's GPU among those it sees
            return gpus.split(",").index(own[r][0]) if own[r] else r

        refs = [a.run.remote(spec, r, ranks, addr, port, checkpoint_uri,
                             dict(env, LOCAL_RANK=str(local_rank(r, env["CUDA_VISIBLE_DEVICES"]))), trial_id)
                for r, a in enumerate(actors, 1)]
        watcher = RankWatcher(refs, actors, _Heartbeats(addr, port, ranks))
        watcher.start()
        try:
            row = run_rank(spec, 0, ranks, addr, port, checkpoint_uri=checkpoint_uri, report=report,
                           local_rank=local_rank(0, ",".join(visible)), store=store, trial_id=trial_id)
        except Exception as e:
            watcher.rank0_done.set()
            if watcher.failure:
                raise RuntimeError(watcher.failure) from e
            raise
        watcher.rank0_done.set()
        watcher.join()
        if watcher.failure:
            raise RuntimeError(watcher.failure)
        return row
    finally:
        if watcher is not None:
            watcher.rank0_done.set()
        for a in actors:
            ray.kill(a)
