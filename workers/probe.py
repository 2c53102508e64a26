"""Test-only: what a trial process was given, recorded where a test can read it. With ``REPURPOSE_PROBE=<dir>`` in
the environment of a trial's processes (a test sets it on the ``ray start`` of its cluster), each trial process and
each DeepSpeed rank writes ``<dir>/<trial_id>.<rank>.<pid>.json`` before it trains: the device environment
(CUDA_VISIBLE_DEVICES, RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), Ray's GPU ids and node, and the
device it chose. It reads nothing of CUDA itself (tests/orchestrator/test_fake_gpu_cluster.py runs it on fake
GPUs); a no-op without the variable, like tests/faults' ``REPURPOSE_FAULT``.
"""
from __future__ import annotations

import json
import os

PROBE_ENV = "REPURPOSE_PROBE"
ENV_KEYS = ("CUDA_VISIBLE_DEVICES", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def record(*, rank: int = 0, trial_id: str | None = None, device: str | None = None) -> None:
    folder = os.environ.get(PROBE_ENV)
    if not folder:
        return
    import ray

    context = ray.get_runtime_context() if ray.is_initialized() else None
    trial_id = trial_id or f"port{os.environ.get('MASTER_PORT')}"
    entry = {"trial_id": trial_id, "rank": rank, "pid": os.getpid(), "device": device,
             "env": {k: os.environ.get(k) for k in ENV_KEYS},
             "gpu_ids": [str(g) for g in ray.get_gpu_ids()] if context else None,
             "node_id": context.get_node_id() if context else None}
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{trial_id}.{rank}.{os.getpid()}.json")
    with open(f"{path}.tmp", "w") as f:
        json.dump(entry, f)
    os.replace(f"{path}.tmp", path)
