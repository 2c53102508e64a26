"""Launchers of multi-rank (DeepSpeed) trials inside one Ray Tune trial, next to the Tune adapter
(orchestrator/trainable.py) that calls them.

``run_ray_ranks`` runs in the trial's own process on a Ray worker: rank 0 there (it reports), ranks 1..k-1 as Ray
actors (``_RankActor``) in the trial's placement-group bundles, all on one node. Each rank runs
``workers.distributed.run_rank`` (process group, the DeepSpeed recipe, teardown). workers and torch are imported
only inside these functions, which run on workers: the driver imports this module without loading torch.
"""
from __future__ import annotations

import os
import threading


class _RankActor:
    """Ranks 1..k-1 of a trial, each in its own Ray actor (process)."""

    def gpu_ids(self) -> list:
        import ray

        return [str(g) for g in ray.get_gpu_ids()]

    def run(self, spec: dict, rank: int, world: int, addr: str, port: int, checkpoint_uri, env: dict) -> dict:
        from workers.distributed import run_rank

        env = dict(env)
        return run_rank(spec, rank, world, addr, port, checkpoint_uri=checkpoint_uri,
                        local_rank=int(env.pop("LOCAL_RANK", 0)), env=env)


def run_ray_ranks(spec: dict, *, ranks: int, bundle: dict, report, checkpoint_uri: str | None) -> dict:
    """Inside a Tune trial whose placement group holds ``ranks`` bundles like ``bundle`` on one node (the trial's
    own process in bundle 0): rank 0 runs here and reports; ranks 1..k-1 are actors in bundles 1..k-1. The ranks
    see all the trial's GPUs, so NCCL sees its peers (as Ray Train does). A failed actor kills the others;
    rank 0 then fails with its error."""
    import ray
    import torch
    from ray.util import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from workers.distributed import free_port, run_rank

    pg = get_current_placement_group()
    actors = []
    for r in range(1, ranks):
        options = {"num_cpus": bundle.get("CPU", 0), "num_gpus": bundle.get("GPU", 0)}
        if pg is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r)
        actors.append(ray.remote(_RankActor).options(**options).remote())
    failure: list[str] = []
    try:
        own = [[str(g) for g in ray.get_gpu_ids()]] + ray.get([a.gpu_ids.remote() for a in actors])  # by rank
        env = {"CUDA_VISIBLE_DEVICES": ",".join(sorted({g for ids in own for g in ids}, key=lambda g: (len(g), g)))}
        if not own[0]:
            env = {"DS_ACCELERATOR": "cpu"}
        if not torch.cuda.is_initialized():  # else a reused trial actor set it before, for the same bundles
            os.environ.update(env)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")

        def local_rank(r: int, gpus: str) -> int:  # this rank's GPU among those it sees
            return gpus.split(",").index(own[r][0]) if own[r] else r

        addr, port = ray.util.get_node_ip_address(), free_port()
        refs = [a.run.remote(spec, r, ranks, addr, port, checkpoint_uri,
                             dict(env, LOCAL_RANK=str(local_rank(r, env.get("CUDA_VISIBLE_DEVICES", "")))))
                for r, a in enumerate(actors, 1)]

        def watch():  # the first actor to fail: remember why, and end the others so rank 0 stops waiting
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                try:
                    ray.get(done[0])
                except Exception as e:  # noqa: BLE001 -- any rank's failure ends the trial
                    failure.append(str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
                    for a in actors:
                        ray.kill(a)
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            row = run_rank(spec, 0, ranks, addr, port, checkpoint_uri=checkpoint_uri, report=report,
                           local_rank=local_rank(0, ",".join(visible)))
        except Exception as e:
            if failure:
                raise RuntimeError(f"a rank failed: {failure[0]}") from e
            raise
        watcher.join()
        if failure:
            raise RuntimeError(f"a rank failed: {failure[0]}")
        return row
    finally:
        for a in actors:
            ray.kill(a)
