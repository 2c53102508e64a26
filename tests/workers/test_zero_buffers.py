"""core/memory.py's ZeRO terms against a real DeepSpeed engine (gloo, CPU, 2 ranks, ZeRO 1 and 2): the bytes of
the engine's fp32 master partition and of its gradient bucket, read from the engine after a backward, are what
``zero_buffer_bytes`` says."""
from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.slow


def without_shm_op() -> None:
    """In this rank's process: DeepSpeed's CPU shared-memory all-reduce op (JIT-compiled with g++ the first time a
    machine runs DeepSpeed on CPU: minutes on a loaded CI box) is left out; gloo does the collectives. Nothing
    measured here goes through it."""
    import deepspeed.comm.torch

    deepspeed.comm.torch.build_shm_op = lambda: None

BUCKET = 1_000_000  # reduce_bucket_size elements: a 4 MB bucket instead of DeepSpeed's 2 GB default


def _rank(rank: int, world: int, port: int, model_dir: str, stage: int, out_dir: str) -> None:
    import torch
    import deepspeed
    from transformers import AutoModel

    from workers.distributed import deepspeed_config, init_ranks

    without_shm_op()

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    init_ranks(timeout_s=240)
    model = AutoModel.from_pretrained(model_dir).train()
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = deepspeed_config(world=world, micro_batch=2, bf16=False,
                              override={"zero_optimization": {"stage": stage, "reduce_bucket_size": BUCKET}})
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                                   config=config)
    ids = torch.randint(0, 100, (2, 8))
    engine.backward(engine(input_ids=ids).last_hidden_state.float().pow(2).mean())
    master = sum(t.numel() * t.element_size() for t in optimizer.single_partition_of_fp32_groups)
    bucket = sum(b.numel() * b.element_size() for bk in optimizer.ipg_buckets.values() for b in bk.buffer)
    with open(os.path.join(out_dir, f"{stage}.{rank}.json"), "w") as f:
        json.dump({"n_trainable": n_trainable, "master": master, "bucket": bucket}, f)
    import torch.distributed as dist

    dist.destroy_process_group()


@pytest.mark.timeout(900)
# ZeRO-1 only: ZeRO-2 allocates its gradient bucket at the first backward, after this test measures (to measure it
# after one step is left to do)
@pytest.mark.parametrize("stage", [1])
def test_zero_buffers_match_the_engines(stage, tiny_model, tmp_path):
    import torch.multiprocessing as mp

    from core.memory import zero_buffer_bytes
    from workers.distributed import host_store

    store = host_store(2)
    mp.start_processes(_rank, args=(2, store.port, tiny_model, stage, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{stage}.{rank}.json").read_text())
        want = zero_buffer_bytes(got["n_trainable"], 2, stage, BUCKET)
        assert got["master"] + got["bucket"] == pytest.approx(want, abs=4 * 2 * 2)  # DeepSpeed's even split
        assert got["bucket"] == 4 * BUCKET  # one fp32 bucket, whole, however small the model
        assert got["master"] == pytest.approx(4 * got["n_trainable"] / 2, abs=16)
