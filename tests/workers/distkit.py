"""Test-only helpers for data-parallel math in plain torch.distributed (what DeepSpeed does inside its engine):
the tests check workers/distributed.py's shard-and-gather against a single process with them, and what DeepSpeed
reduces gradients in (``watch_reductions``)."""
from __future__ import annotations

import torch
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


class EngineAutocast(torch.nn.Module):
    """``model`` with each forward under bf16 autocast (CPU) and nothing around it: what DeepSpeed's torch_autocast
    runs (deepspeed/runtime/engine.py, forward: autocast_if_enabled). A one-device trial differs by bf16 rounding:
    its one autocast region spans the query and the document forward, which then share autocast's cached bf16
    copy of each weight and sum their gradients of it in bf16 (workers/loss.py, contrastive_backward)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(**inputs)


# every torch.distributed collective that sums: what DeepSpeed reduces gradients with (ZeRO 1/2: all_reduce; ZeRO 3:
# reduce_scatter_tensor, whose input is the whole bucket)
REDUCTIONS = ("all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor",
              "_reduce_scatter_base")


def watch_reductions() -> list[tuple[torch.dtype, int]]:
    """From now on in this process (a spawned rank: for good), (dtype, elements) of what each torch.distributed
    reduction sums (the call's largest tensor: a reduce-scatter's input), appended to the list returned. Call it
    before deepspeed.init_distributed: DeepSpeed's torch backend keeps the reduce-scatter function it finds then
    (deepspeed/comm/torch.py, TorchBackend.__init__)."""
    seen: list[tuple[torch.dtype, int]] = []

    def watched(reduce):
        def call(*args, **kwargs):
            tensors = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, list) else [a])
                       if torch.is_tensor(t)]
            biggest = max(tensors, key=lambda t: t.numel())
            seen.append((biggest.dtype, biggest.numel()))
            return reduce(*args, **kwargs)
        return call

    for name in REDUCTIONS:
        if hasattr(dist, name):
            setattr(dist, name, watched(getattr(dist, name)))
    return seen
