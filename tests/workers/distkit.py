"""Test-only helpers for data-parallel math in plain torch.distributed (what DeepSpeed does inside its engine):
the tests check workers/distributed.py's shard-and-gather against a single process with them."""
from __future__ import annotations

import torch.distributed as dist

from workers.distributed import shard
from workers.loss import contrastive_backward


def average_gradients(params) -> None:
    """The mean over ranks of each .grad (DeepSpeed and DDP do this themselves)."""
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def contrastive_backward_sharded(model, batch, temperature: float, chunk_size: int | None, autocast, *,
                                 backward=None) -> tuple[float, int]:
    """One global batch on this rank: (the global loss, real tokens this rank owns). Parameter gradients in .grad
    are this rank's share; their mean over ranks is the single-process gradient of the global loss (sharded: the
    gather's factor k; whole on every rank: k equal gradients)."""
    part, gather, owned = shard(batch, dist.get_rank(), dist.get_world_size())
    return contrastive_backward(model, part, temperature, chunk_size, autocast, gather=gather,
                                backward=backward), owned
