"""A DeepSpeed trial's checkpoint: whole tensors out of ZeRO's partitions, and back into them.

The project's pickle-free format (workers/checkpoint.py: safetensors and JSON, the previous one kept as
fallback), in the trial's checkpoint folder as a one-device trial's. It holds whole tensors, not ZeRO's
partitions: each trainable parameter's fp32 master value and AdamW moments, gathered one parameter at a time
through DeepSpeed's full-state API (``deepspeed.utils.safe_get_full_*``: collectives, every rank in the same
order), with AdamW's step count (its bias correction), the Progress and every rank's RNG; rank 0 writes them.
Frozen weights are not saved: the model gives them again. On resume rank 0 alone reads the checkpoint (``read``:
past a damaged one, the one before it) and sends the others its JSON state, then each tensor in turn as every
rank sets its own partitions from it (``restore``): the master and the moments, and the module's copy the next
forward reads (ZeRO 1/2: whole on every rank; ZeRO 3: gathered, set and partitioned again). So every rank resumes
from the step rank 0 read, storage is read once, and a checkpoint does not depend on the ZeRO stage or the
number of ranks that wrote it (tests/workers/test_distributed.py restores across stages: bitwise with torch's
AdamW, to float rounding with offload's DeepSpeedCPUAdam, which recomputes beta^t on resume). The cost: while
saving, rank 0 holds three copies of the trainable tensors (value, two moments) in host memory; while restoring,
rank 0 holds what it read (each tensor let go once sent), the other ranks one whole tensor at a time.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.distributed as dist

from workers import checkpoint, steps

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")  # the state names of torch.optim.AdamW and DeepSpeedCPUAdam


def barrier() -> None:
    """Every rank waits for every other. On NCCL on this rank's own GPU: torch otherwise guesses the device and says
    so on every rank ("barrier(): using the device under current context"), library noise seen on an H200."""
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters a checkpoint holds (frozen ones come from the model again), in the module's order: the same
    on every rank, which ZeRO-3's gathers need."""
    return [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]


def save(engine, uri: str | None, progress: steps.Progress, started: float, rank: int, device) -> None:
    """Each trainable parameter's full fp32 value and AdamW moments, AdamW's step count, the Progress and every
    rank's RNG; rank 0 writes. The full tensors come from DeepSpeed's full-state API (deepspeed/utils/
    tensor_fragment.py): an all-reduce (ZeRO 1/2) or all-gather (ZeRO 3) each, so every rank calls it."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if not uri:
        return
    tensors = {}
    for name, p in trainable(engine):
        full = {"param": safe_get_full_fp32_param(p)} | {k: safe_get_full_optimizer_state(p, k) for k in ADAM_MOMENTS}
        if rank == 0:
            tensors |= {f"{key}.{name}": value.cpu() for key, value in full.items()}
    rng = _gather_rng(device)
    if rank == 0:
        tensors |= {f"rng.{name}": states for name, states in rng.items()}
        steps.save_checkpoint(uri, progress, started, tensors, {"adam_step": adam_step(engine)})
    barrier()  # no rank trains on (or is killed) before the checkpoint is complete


@dataclass
class Restored:
    """A checkpoint as rank 0 read it, on every rank: its JSON state, and its tensors' names, shapes and dtypes;
    the tensors themselves stay with rank 0 (``held``) until ``take`` sends them."""
    state: dict
    meta: dict[str, tuple[list[int], str]]  # name -> (shape, torch dtype name)
    held: dict[str, torch.Tensor] | None  # rank 0's tensors; None on the others
    device: torch.device  # where a tensor travels: the rank's device (nccl sends CUDA tensors only)

    def take(self, name: str) -> torch.Tensor:
        """Rank 0's tensor ``name``, on every rank's device: a broadcast, so every rank takes the same names in the
        same order. Rank 0 lets go of its copy."""
        shape, dtype = self.meta[name]
        if self.held is not None:
            tensor = self.held.pop(name).to(self.device).contiguous()
        else:
            tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
        dist.broadcast(tensor, src=0)
        return tensor


def read(uri: str | None, rank: int, device) -> tuple[Restored | None, list[str]]:
    """The trial's newest readable checkpoint (workers/checkpoint.py's ``load``; None: there is none) and the
    damaged ones passed over, read by rank 0 alone: every rank gets rank 0's answer, so all resume from the same
    step, and no other rank touches storage. Its tensors follow one at a time (``Restored.take``)."""
    tensors = None
    if rank == 0:
        skipped: list[str] = []
        try:
            loaded = checkpoint.load(uri, skipped=skipped)
        except Exception as e:  # the others wait for the header: tell them, then fail
            _broadcast_json({"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}, device)
            raise
        tensors, state = loaded if loaded is not None else ({}, None)
        meta = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in tensors.items()}
        header = _broadcast_json({"state": state, "meta": meta, "skipped": skipped}, device)
    else:
        header = _broadcast_json(None, device)
        if "error" in header:
            raise RuntimeError(f"rank 0 could not read the trial's checkpoints: {header['error']}")
    if header["state"] is None:
        return None, header["skipped"]
    meta = {k: (shape, dtype) for k, (shape, dtype) in header["meta"].items()}
    return Restored(header["state"], meta, tensors, torch.device(device)), header["skipped"]


def _broadcast_json(obj, device):
    """Rank 0's JSON-able ``obj`` on every rank (the others pass None): its UTF-8 bytes, their count first. JSON,
    not broadcast_object_list's pickle: nothing a checkpoint holds is ever unpickled (workers/checkpoint.py)."""
    data = json.dumps(obj).encode() if dist.get_rank() == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if data else
              torch.empty(int(size), dtype=torch.uint8, device=device))
    dist.broadcast(buffer, src=0)
    return json.loads(buffer.cpu().numpy().tobytes())


def restore(engine, restored: Restored, rank: int) -> steps.Progress:
    """Sets this rank's partitions from a checkpoint ``save`` wrote (of any number of ranks and ZeRO stage: its
    tensors are whole), parameter by parameter as ``restored`` sends them; returns its Progress. Every rank calls
    it: the sends and ZeRO-3's gathers are collectives."""
    state = restored.state
    if "adam_step" not in state:
        raise ValueError("the trial's checkpoint has no AdamW step count: not written by a DeepSpeed trial")
    params = trainable(engine)
    # checked on every rank before the first send (the names are rank 0's, on every rank): a rank that raised
    # half-way would leave the others waiting on a broadcast
    missing = [key for name, _ in params for key in (f"{k}.{name}" for k in ("param", *ADAM_MOMENTS))
               if key not in restored.meta]
    if missing:
        raise ValueError(f"the trial's checkpoint lacks {len(missing)} tensors of this model, e.g. {missing[:3]}")
    _start_adam(engine, state["adam_step"])
    for name, p in params:
        value = restored.take(f"param.{name}")
        _set_full_state(p, value, {k: restored.take(f"{k}.{name}") for k in ADAM_MOMENTS})
    _set_rng({k.removeprefix("rng."): restored.take(k) for k in sorted(restored.meta) if k.startswith("rng.")}, rank)
    return steps.Progress.from_state(state)


def adam_step(engine) -> int:
    """AdamW's step count (its bias correction): in the state of each flat fp32 partition the ZeRO optimizer
    steps (``engine.optimizer.optimizer``, the trial's AdamW)."""
    counts = {int(s["step"]) for s in engine.optimizer.optimizer.state.values()}
    if len(counts) != 1:
        raise RuntimeError(f"AdamW's partitions have step counts {sorted(counts)}, not one")
    return counts.pop()


def _start_adam(engine, step: int) -> None:
    """AdamW's state for each flat fp32 partition, zero moments at ``step``, as its first step would create it: a
    fresh engine has none, and the full-state API only sets state that exists."""
    base = engine.optimizer.optimizer
    # the state's keys: ZeRO 3 hands its flat partitions to AdamW one at a time (stage3.py, _optimizer_step), ZeRO
    # 1/2 keeps them in AdamW's param groups
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    for flat in flats if flats is not None else [p for group in base.param_groups for p in group["params"]]:
        # torch's AdamW counts in a float32 tensor (torch/optim/adam.py, _init_group); DeepSpeedCPUAdam in an int
        count = torch.tensor(float(step)) if isinstance(base, torch.optim.AdamW) else step
        base.state[flat] = {"step": count, "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO 1/2 points each parameter at its fragments of the moments after the first step
        link()  # (stage_1_and_2.py, _optimizer_step): now, on the state above, which AdamW then updates in place


def _set_full_state(p, value: torch.Tensor, moments: dict[str, torch.Tensor]) -> None:
    """One parameter's full fp32 value and AdamW moments into this rank's partitions: the optimizer's fp32 master
    and moments, and the module's own copy, which the next forward reads."""
    import deepspeed
    from deepspeed import utils

    if hasattr(p, "ds_id"):  # ZeRO 3: the module's copy is partitioned too
        # the local API, on slices cut here: safe_set_full_* slices the full tensor without ZeRO's padding, which
        # fails on the last rank when the ranks do not divide the parameter's size
        utils.safe_set_local_fp32_param(p, _zero3_slice(p, value))
        for key, moment in moments.items():
            utils.safe_set_local_optimizer_state(p, _zero3_slice(p, moment), key)
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):  # gathered, set, partitioned again
            p.data.copy_(value)
    else:  # ZeRO 1/2: master and moments partitioned, the module's copy whole on every rank
        utils.safe_set_full_fp32_param(p, value)
        for key, moment in moments.items():
            utils.safe_set_full_optimizer_state(p, moment, key)
        p.data.copy_(value)


def _zero3_slice(p, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of a ZeRO-3 parameter: the ranks' equal parts of the flat tensor, the last zero-padded
    (deepspeed/runtime/zero/partition_parameters.py, _partition_param)."""
    n = p.ds_tensor.ds_numel
    part = full.flatten()[n * dist.get_rank(group=p.ds_process_group):][:n]
    return torch.cat([part, part.new_zeros(n - part.numel())])


def _gather_rng(device) -> dict:
    """Every rank's RNG states (dropout), stacked by rank: rank r resumes with its own."""
    out = {}
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    for name, state in states.items():
        mine = state.to(device)
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, mine)
        out[name] = torch.stack(parts).cpu()
    return out


def _set_rng(rng: dict, rank: int) -> None:
    if rank >= rng["cpu"].shape[0]:
        return  # resumed on more ranks than saved: the new ones keep fresh RNG
    # a copy on the CPU: a row of the stacked states is a view at an offset, which set_rng_state does not honour
    # (segfault), and it takes a CPU tensor (the states may have travelled on the GPU)
    torch.set_rng_state(rng["cpu"][rank].to("cpu", copy=True))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"][rank].to("cpu", copy=True))
