"""Data-parallel trials: one contrastive batch over k ranks, DeepSpeed ZeRO, launched inside one Tune trial.

Three parts, top to bottom:

1. The math (plain ``torch.distributed``). Every rank reads the same seeded stream, so it holds the same global
   batch; it embeds only its shard (``shard``), and ``gather_rows`` all-gathers the shards' embeddings with
   gradient, so every query still sees all negatives of the global batch (in-batch InfoNCE is not separable
   over shards: tests/workers/test_loss.py). Every rank then computes the same global loss L. The gather's
   backward all-reduces the gradient of the gathered rows and keeps this rank's slice: d(sum over ranks of
   L)/dx = k * dL/dx. Averaging parameter gradients over the k ranks (DeepSpeed and DDP do; ``average_gradients``
   in plain torch) removes the k: the update is the single-process gradient of the global loss (checked to
   float tolerance, tests/workers/test_distributed.py). The exact gradient cache (workers/loss.py) works
   unchanged on top: it gathers the cached embeddings, gets dL/d(local embeddings) through the same backward and
   re-embeds the shard chunk by chunk, one ``engine.backward`` of the surrogate (e * g).sum() per chunk. A batch
   that does not split evenly (a trial's last, budget-cut step; a last eval batch) is computed whole on every
   rank: exact too, and every rank runs the same forwards, which ZeRO-3 needs (its parameter gathers are
   collectives).

2. The DeepSpeed recipe, ``run_deepspeed_trial``: workers/trial.py copied and modified (STYLE.md: one recipe per
   path, no shared base class). Config: ZeRO 2 by default; stage 3 or CPU optimizer offload through
   ``TrialSpec.deepspeed_config`` (a JSON object merged over the default). That field is a runtime knob, not
   part of the trial's identity: stage, offload and buckets move tensors, not results (ZeRO 2 and 3 with and
   without offload give the single-process losses), and the keys that would change results (optimizer,
   schedule, batch sizes, clipping, precision: spec.DEEPSPEED_TRIAL_KEYS) are the trial's and rejected in an
   override. Precision: DeepSpeed's ``torch_autocast`` (bf16 matmuls over fp32 weights and fp32 AdamW), what a
   single-GPU trial runs, so a trial's result does not depend on how many GPUs it got. FLOP: each rank counts
   the real tokens of its shard, summed over ranks by one all-reduce per step (and checked against the global
   batch: ranks out of step raise); the budget is global. Metrics: rank 0 reports, once per event.
   Checkpoints: the project's pickle-free format (workers/checkpoint.py: safetensors and JSON, the previous one
   kept as fallback), in the trial's checkpoint folder as a single-process trial's. They hold whole tensors, not
   ZeRO's partitions: each trainable parameter's fp32 master value and AdamW moments, gathered one parameter at a
   time through DeepSpeed's full-state API (``deepspeed.utils.safe_get_full_*``: collectives, every rank in the
   same order), with AdamW's step count (its bias correction), the Progress and every rank's RNG; rank 0 writes
   them. Frozen weights are not saved: the model gives them again. On resume every rank reads the checkpoint and
   sets its own partitions: the master and the moments, and the module's copy the next forward reads (ZeRO 1/2:
   whole on every rank; ZeRO 3: gathered, set and partitioned again). So a checkpoint does not depend on the ZeRO
   stage or the number of ranks that wrote it (tests/workers/test_distributed.py restores across stages: bitwise
   with torch's AdamW, to float rounding with offload's DeepSpeedCPUAdam, which recomputes beta^t on resume). The
   cost: while saving, rank 0 holds three copies of the trainable tensors (value, two moments) in host memory;
   while restoring, every rank does. A finished trial's done marker replaces the checkpoints.

3. Launchers: ``run_local`` (k processes on this machine, gloo on CPU: tests, CPU-only runs) and
   ``run_ray_ranks`` (inside a Tune trial: rank 0 in the trial's own process, which reports; ranks 1..k-1 as Ray
   actors in the trial's placement-group bundles, all on one node).
"""
from __future__ import annotations

import contextlib
import os
import queue
import socket
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from core import storage
from core.flops import NeoxShape
from core.spec import DeepSpeedConfigError, TrialSpec, parse_deepspeed_override  # noqa: F401 (re-exported)
from workers import checkpoint, steps, zero_checkpoint
from workers.data import Batch
from workers.loss import contrastive_backward

# --------------------------------------------------------------------------------------------------------
# 1. The math: one contrastive batch over k ranks


def shard(batch: Batch, rank: int, world: int):
    """(this rank's part of the batch, its ``gather``, the real tokens it owns).

    Even split: rows [rank*b, (rank+1)*b), trimmed to their longest sequence, gathered with ``gather_rows``.
    Uneven (or one rank): the whole batch on every rank, no gather; rank 0 owns its tokens.
    """
    n = len(batch)
    if world > 1 and n % world == 0:
        b = n // world
        part = _rows(batch, rank * b, (rank + 1) * b)
        return part, gather_rows, part.real_tokens
    return batch, _whole, batch.real_tokens if rank == 0 else 0


def _rows(batch: Batch, start: int, stop: int) -> Batch:
    q_mask, d_mask = batch.q_mask[start:stop], batch.d_mask[start:stop]
    tq, td = int(q_mask.sum(1).max()), int(d_mask.sum(1).max())
    q_ids, d_ids = batch.q_ids[start:stop, :tq], batch.d_ids[start:stop, :td]
    q_mask, d_mask = q_mask[:, :tq], d_mask[:, :td]
    return Batch(q_ids, q_mask, d_ids, d_mask, batch.index, int(q_mask.sum() + d_mask.sum()),
                 q_ids.numel() + d_ids.numel())


def _whole(x: torch.Tensor) -> torch.Tensor:
    return x


class _GatherRows(torch.autograd.Function):
    """all_gather of equal (b, D) shards along dim 0 -> (k*b, D) in rank order. Backward: all-reduce (sum) of the
    gradient, then this rank's slice: d(sum_r L_r)/dx, which is k * dL/dx when every rank computes the same L.
    (gloo has no reduce_scatter; the (k*b, D) all-reduce is tiny next to the model.)"""

    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.world = dist.get_rank(), dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        b = grad.shape[0] // ctx.world
        return grad[ctx.rank * b:(ctx.rank + 1) * b]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """(b, D) on each rank -> (k*b, D), differentiable (see ``_GatherRows`` for the gradient's scale)."""
    return _GatherRows.apply(x)


def average_gradients(params) -> None:
    """Plain torch.distributed: the mean over ranks of each .grad (DeepSpeed does this itself)."""
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def contrastive_backward_sharded(model, batch: Batch, temperature: float, chunk_size: int | None, autocast, *,
                                 backward=None) -> tuple[float, int]:
    """One global batch on this rank: (the global loss, real tokens this rank owns). Parameter gradients in .grad
    are this rank's share; their mean over ranks is the single-process gradient of the global loss (sharded: the
    gather's factor k; whole on every rank: k equal gradients)."""
    part, gather, owned = shard(batch, dist.get_rank(), dist.get_world_size())
    return contrastive_backward(model, part, temperature, chunk_size, autocast, gather=gather,
                                backward=backward), owned


# --------------------------------------------------------------------------------------------------------
# 2. DeepSpeed: the config and the recipe

DEFAULT_ZERO_STAGE = 2


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed override that cannot be used; the message names it and the key."""


def read_override(ref: str | None) -> dict:
    """``TrialSpec.deepspeed_config``: an inline JSON object, or a path / s3:// / gs:// URI of a JSON file."""
    if not ref:
        return {}
    text = ref if ref.lstrip().startswith("{") else storage.read_bytes(ref).decode()
    try:
        override = json.loads(text)
    except json.JSONDecodeError as e:
        raise DeepSpeedConfigError(f"deepspeed_config: {ref[:80]}: not JSON ({e})") from None
    check_override(override, ref)
    return override


def check_override(override, name: str = "deepspeed_config") -> None:
    if not isinstance(override, dict):
        raise DeepSpeedConfigError(f"deepspeed_config: {name[:80]}: must be a JSON object")
    for key in override:
        if key in DEEPSPEED_TRIAL_KEYS:
            raise DeepSpeedConfigError(f"deepspeed_config.{key}: set by the trial (its spec), not by an override")


def deepspeed_config(*, world: int, micro_batch: int, bf16: bool, override: dict | None = None) -> dict:
    """The engine's config: the default (ZeRO 2, bf16 autocast when the hardware has it) with ``override`` merged
    in, key by key (DeepSpeed config docs: deepspeed.ai/docs/config-json)."""
    config = {
        # the loop feeds the engine itself; DeepSpeed only checks that these agree (and times throughput)
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world,
        # the gradient cache calls backward once per sub-batch: step() is the only accumulation boundary
        # (DeepSpeed's caller-owned mode; checked with 0.19.8: tests/workers/test_distributed.py)
        "managed_gradient_accumulation": False,
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0; the paper's recipe does not clip
        "zero_optimization": {"stage": DEFAULT_ZERO_STAGE},
        "zero_allow_untested_optimizer": True,  # the trial's torch AdamW
        "steps_per_print": 2 ** 31 - 1,
        "wall_clock_breakdown": False,
    }
    if bf16:  # fp32 weights and optimizer, bf16 matmuls: the single-GPU trial's numerics
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return _merge(config, override or {})


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _offloads_optimizer(config: dict) -> bool:
    offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


def _optimizer(params, lr: float, weight_decay: float, config: dict, device: torch.device):
    if _offloads_optimizer(config):  # ZeRO-Offload steps on the CPU with DeepSpeed's AdamW (a JIT-built op)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=device.type == "cuda")


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int


def init_ranks(timeout_s: float = 1800.0) -> Ranks:
    """The process group from the environment (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK): NCCL on GPUs,
    gloo on CPUs (DeepSpeed's CPU accelerator falls back to gloo without oneCCL)."""
    import datetime

    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   auto_mpi_discovery=False, verbose=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def run_deepspeed_trial(spec: TrialSpec, *, report=None, checkpoint_uri: str | None = None,
                        output_dir: str | None = None) -> dict:
    """``workers.trial.run_trial`` on k ranks with DeepSpeed; every rank calls it (through ``run_rank``, which
    owns the process group), rank 0 reports. Returns the trial row (the same on every rank)."""
    import deepspeed

    started = time.perf_counter()
    ranks = init_ranks()
    report = _rank0_report(report, ranks)
    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    _quiet_deepspeed()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    # 1. load
    tokenizer, model = single._load(spec.model, device)
    shape = NeoxShape.from_config(model.config.to_dict())
    lr = spec.lr if spec.lr is not None else auto_lr(spec.model, model.config.to_dict())

    # 2. choose trainable parameters, then hand them to DeepSpeed (counted before ZeRO-3 partitions them)
    torch.manual_seed(spec.seed)  # LoRA's initialisation: the same on every rank
    model = select_trainable(model, spec.method, lora_rank=spec.lora_rank, trainable_fraction=spec.trainable_fraction,
                             lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout, lora_targets=spec.lora_targets)
    if spec.gradient_checkpointing:
        single._enable_checkpointing(model)
    n_params, n_trainable = count_params(model)
    cost = cost_per_token(spec.method, n_params, n_trainable)
    if spec.batch_size % ranks.world:
        raise ValueError(f"batch_size: {spec.batch_size} does not split over {ranks.world} ranks")
    micro = spec.batch_size // ranks.world
    tokens_per_pair = spec.planned_tokens_per_pair or measure_tokens_per_pair(spec.train_data, tokenizer,
                                                                              spec.max_length)
    planned_tokens = tokens_for_budget(spec.budget_flops, cost)
    planned_steps = int(planned_tokens / tokens_per_pair) // spec.batch_size  # as the planner counts them
    base = dict(n_params=n_params, n_trainable=n_trainable, planned_tokens=planned_tokens,
                planned_steps=planned_steps, budget_flops=spec.budget_flops)

    # the newest checkpoint, read by every rank (past a damaged one: the one before it; the reason says so). A
    # finished trial's marker: report it again, compute nothing
    skipped: list[str] = []
    restored = checkpoint.load(checkpoint_uri, skipped=skipped)
    _check_same_checkpoint(restored, device)
    if restored is not None and restored[1]["progress"]["done"]:
        progress = single.Progress(**restored[1]["progress"])
        report(single._event(progress, base, progress.rows, restart=True, done=True))
        return single._trial_row(progress, base)

    bf16 = spec.precision == "bf16" or (spec.precision == "auto" and single._has_bf16(device))
    config = deepspeed_config(world=ranks.world, micro_batch=micro, bf16=bf16,
                              override=read_override(spec.deepspeed_config))
    optimizer = _optimizer([p for p in model.parameters() if p.requires_grad], lr, spec.weight_decay, config, device)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine.train()
    autocast = contextlib.nullcontext  # the engine's torch_autocast does it

    # resume: every rank sets its partitions from the full tensors
    progress, restart = single.Progress(), False
    if restored is not None:
        progress, restart = _restore(engine, restored, ranks), True
    del restored
    if skipped:
        progress.reason = "; ".join([*skipped, f"resumed from step {progress.step}"])

    chunk = spec.chunk_size or single.auto_chunk_size(shape, micro, spec.max_length, spec.gradient_checkpointing,
                                                      device)
    hw_per_token = {}  # (padded length, gradient cache) -> hardware FLOP of one sequence

    def rank_hardware_flops(part: Batch, pairs: int) -> float:
        """What this rank executed: its part's forwards and backwards, and the loss over all ``pairs``."""
        total = loss_matmul_flops(pairs, shape.hidden)
        grad_cache = chunk < len(part)
        for b, t in step_shapes(part, chunk):
            if (t, grad_cache) not in hw_per_token:
                hw_per_token[t, grad_cache] = sequence_hardware_flops(
                    shape, spec.method, t, lora_rank=spec.lora_rank, trainable_fraction=spec.trainable_fraction,
                    lora_targets=spec.lora_targets, checkpointing=spec.gradient_checkpointing, grad_cache=grad_cache)
            total += b * hw_per_token[t, grad_cache]
        return total

    eval_batches = single._eval_batches(spec, tokenizer, device)

    def evaluate() -> float | None:
        if not eval_batches:
            return None
        engine.eval()
        loss = eval_loss(engine, eval_batches, spec.temperature, chunk, autocast,
                         split=lambda b: shard(b, ranks.rank, ranks.world)[:2])
        engine.train()
        return loss

    # 3. train to the budget
    rows = single.Reporter(report, progress, base, spec, started, restart)  # report: rank 0's only
    last_ckpt = time.perf_counter()
    stream = PairStream(spec.train_data, tokenizer, batch_size=spec.batch_size, max_length=spec.max_length,
                        seed=spec.seed, max_epochs=spec.max_epochs, skip_batches=progress.batches,
                        prefetch=spec.prefetch_batches)
    try:
        exhausted = True
        for batch in stream:
            remaining = spec.budget_flops - progress.flops
            final = cost * batch.real_tokens > remaining
            if final:  # the last step: only the pairs that still fit the budget (the same cut on every rank)
                batch = single.fit_budget(batch, cost, remaining)
                if batch is None:
                    exhausted = False
                    break
            for group in optimizer.param_groups:
                group["lr"] = lr * single.lr_factor(progress.flops / spec.budget_flops,
                                                    (progress.flops + cost * batch.real_tokens) / spec.budget_flops,
                                                    spec.warmup_fraction)
            t_step = time.perf_counter()
            batch = single._to(batch, device)
            part, gather, owned = shard(batch, ranks.rank, ranks.world)
            loss = contrastive_backward(engine, part, spec.temperature, chunk, autocast, gather=gather,
                                        backward=engine.backward)
            engine.step()  # reduces (ZeRO) and updates; zeroes the gradients
            progress.train_s += time.perf_counter() - t_step

            # FLOP: summed over ranks (rank 0's clock decides checkpoints for all)
            due = ranks.rank == 0 and time.perf_counter() - last_ckpt >= spec.checkpoint_every_s
            sums = torch.tensor([owned, rank_hardware_flops(part, len(batch)), float(due)], dtype=torch.float64,
                                device=device)
            dist.all_reduce(sums)
            tokens, hardware_flops, due = int(sums[0]), float(sums[1]), bool(sums[2])
            if tokens != batch.real_tokens:
                raise RuntimeError(f"ranks out of step at batch {batch.index}: their tokens sum to {tokens}, "
                                   f"the batch has {batch.real_tokens}")
            progress.step += 1
            progress.batches += 1
            progress.tokens += tokens
            progress.padded_tokens += batch.padded_tokens
            progress.flops += cost * tokens
            progress.hardware_flops += hardware_flops
            progress.train_loss = loss
            progress.bad_lines = stream.stats.bad_lines
            evaluated = spec.eval_every and progress.step % spec.eval_every == 0 and not final
            if evaluated:
                progress.eval_loss = evaluate()
            rows.step(tokens, optimizer.param_groups[0]["lr"], final=final, evaluated=evaluated)
            if due and not final:
                _save(engine, checkpoint_uri, progress, started, ranks, device)
                last_ckpt = time.perf_counter()
            if final:
                exhausted = False
                break
        if exhausted:
            progress.reason = (f"data exhausted after {spec.max_epochs:g} epoch(s): "
                               f"{progress.flops / spec.budget_flops:.1%} of the budget spent")
    finally:
        stream.close()
    progress.bad_lines = stream.stats.bad_lines
    rows.last_step(optimizer.param_groups[0]["lr"])

    # 4. evaluate (every rank: ZeRO-3's forwards are collective)
    progress.eval_loss = evaluate()
    if output_dir and spec.save_model:
        _save_model(engine, tokenizer, output_dir, ranks, config)

    # 5. report (rank 0) and the done marker, which replaces the checkpoints
    progress.wall_s += time.perf_counter() - started
    progress.done = True
    rows.finish()
    dist.barrier()
    if ranks.rank == 0:
        single._save(checkpoint_uri, progress, [], None, None)
    row = single._trial_row(progress, base)
    rows.done(row)
    engine.destroy()
    return row


def _rank0_report(report, ranks: Ranks):
    """Metrics come from rank 0 only; its events say how many ranks made them (the store ignores the key)."""
    def send(event: dict) -> None:
        if report is not None and ranks.rank == 0:
            report(dict(event, ranks=ranks.world))
    return send


def _quiet_deepspeed() -> None:
    import logging

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def _save_model(engine, tokenizer, output_dir: str, ranks: Ranks, config: dict) -> None:
    """The trained model as ``save_pretrained`` writes it (rank 0); ZeRO-3's partitions gathered first."""
    import deepspeed

    stage3 = config.get("zero_optimization", {}).get("stage", 0) == 3
    gathered = (deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
                if stage3 else contextlib.nullcontext())
    with gathered:
        if ranks.rank == 0:
            engine.module.save_pretrained(output_dir)
            tokenizer.save_pretrained(output_dir)
    dist.barrier()


# --- checkpoints: workers/checkpoint.py's format, whole tensors ---------------------------------------------
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")  # the state names of torch.optim.AdamW and DeepSpeedCPUAdam


def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters a checkpoint holds (frozen ones come from the model again), in the module's order: the same
    on every rank, which ZeRO-3's gathers need."""
    return [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]


def _save(engine, uri: str | None, progress, started: float, ranks: Ranks, device) -> None:
    """Each trainable parameter's full fp32 value and AdamW moments, AdamW's step count, the Progress and every
    rank's RNG; rank 0 writes. The full tensors come from DeepSpeed's full-state API (deepspeed/utils/
    tensor_fragment.py): an all-reduce (ZeRO 1/2) or all-gather (ZeRO 3) each, so every rank calls it."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if not uri:
        return
    tensors = {}
    for name, p in _trainable(engine):
        full = {"param": safe_get_full_fp32_param(p)} | {k: safe_get_full_optimizer_state(p, k) for k in ADAM_MOMENTS}
        if ranks.rank == 0:
            tensors |= {f"{key}.{name}": value.cpu() for key, value in full.items()}
    rng = _gather_rng(device)
    if ranks.rank == 0:
        tensors |= {f"rng.{name}": states for name, states in rng.items()}
        state = asdict(progress)
        state["wall_s"] = progress.wall_s + time.perf_counter() - started
        checkpoint.save(uri, progress.step, tensors, {"progress": state, "adam_step": _adam_step(engine)})
    dist.barrier()  # no rank trains on (or is killed) before the checkpoint is complete


def _restore(engine, restored: tuple[dict, dict], ranks: Ranks):
    """Sets this rank's partitions from a checkpoint ``_save`` wrote (of any number of ranks and ZeRO stage: its
    tensors are whole); its Progress."""
    from workers.trial import Progress

    tensors, state = restored
    if "adam_step" not in state:
        raise ValueError("the trial's checkpoint has no AdamW step count: not written by a DeepSpeed trial")
    _start_adam(engine, state["adam_step"])
    for name, p in _trainable(engine):
        _set_full_state(p, tensors[f"param.{name}"], {k: tensors[f"{k}.{name}"] for k in ADAM_MOMENTS})
    _set_rng({k.removeprefix("rng."): v for k, v in tensors.items() if k.startswith("rng.")}, ranks.rank)
    return Progress(**state["progress"])


def _adam_step(engine) -> int:
    """AdamW's step count (its bias correction): in the state of each flat fp32 partition the ZeRO optimizer
    steps (``engine.optimizer.optimizer``, the trial's AdamW)."""
    steps = {int(s["step"]) for s in engine.optimizer.optimizer.state.values()}
    if len(steps) != 1:
        raise RuntimeError(f"AdamW's partitions have step counts {sorted(steps)}, not one")
    return steps.pop()


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


def _check_same_checkpoint(restored, device) -> None:
    """Each rank reads the checkpoint itself: one that could not read the newest (a flaky store) would resume
    from an older one, out of step with the others. Raises then."""
    progress = restored[1]["progress"] if restored is not None else {"step": -1, "done": False}
    mine = torch.tensor([progress["step"], int(progress["done"])], device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    if any(not torch.equal(other, mine) for other in every):
        raise RuntimeError(f"the ranks read different checkpoints: (step, done) {[o.tolist() for o in every]}")


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
    # clone: a row of the stacked states is a view at an offset, which set_rng_state does not honour (segfault)
    torch.set_rng_state(rng["cpu"][rank].clone())
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"][rank].clone())


# --------------------------------------------------------------------------------------------------------
# 3. Launchers


def run_rank(spec: dict, rank: int, world: int, master_addr: str, master_port: int, *,
             checkpoint_uri: str | None = None, report=None, local_rank: int = 0, env: dict | None = None) -> dict:
    """One rank of a trial: the process group from this environment, the recipe, and the group torn down (a
    failing rank closes its connections, so its peers fail now rather than at the collective timeout; a reused
    Tune actor starts the next trial clean)."""
    os.environ.update({"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
                       **(env or {})})
    try:
        return run_deepspeed_trial(TrialSpec.from_dict(spec), report=report, checkpoint_uri=checkpoint_uri)
    finally:
        if dist.is_initialized():
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()  # torch's, and DeepSpeed's cached groups with it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _local_main(rank: int, world: int, port: int, spec: dict, checkpoint_uri, events) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    report = events.put if rank == 0 else None
    try:
        run_rank(spec, rank, world, "127.0.0.1", port, checkpoint_uri=checkpoint_uri, report=report)
    except BaseException:
        events.put({"error": traceback.format_exc(), "rank": rank})
        raise


def run_local(spec: TrialSpec, world: int, *, checkpoint_uri: str | None = None, report=None,
              timeout_s: float = 3600.0) -> dict:
    """The trial on ``world`` processes of this machine (gloo on CPU); ``report`` gets rank 0's events here.
    Returns the trial row. A rank that fails fails the call."""
    import torch.multiprocessing as mp

    events = mp.get_context("spawn").Queue()
    procs = mp.start_processes(_local_main, args=(world, free_port(), spec.to_dict(), checkpoint_uri, events),
                               nprocs=world, join=False, start_method="spawn")
    deadline, row = time.monotonic() + timeout_s, None
    try:
        while row is None:
            try:
                event = events.get(timeout=1.0)
            except queue.Empty:
                procs.join(timeout=0)  # raises ProcessRaisedException / ProcessExitedException on a failed rank
                if time.monotonic() > deadline:
                    raise TimeoutError(f"trial not done after {timeout_s:g} s") from None
                continue
            if "error" in event:
                raise RuntimeError(_rank_errors(event, events, procs, world))
            if report:
                report(event)
            if event.get("done"):
                row = event["trial"]
        while not procs.join(timeout=max(1.0, deadline - time.monotonic())):
            pass
        return row
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()


def _rank_errors(first: dict, events, procs, world: int) -> str:
    """A failure takes its peers down (connection reset): every rank's error, and how ranks that sent none died
    (a segfault leaves only an exit code)."""
    errors = {first["rank"]: first["error"]}
    until = time.monotonic() + 10.0
    while len(errors) < world and time.monotonic() < until:
        try:
            event = events.get(timeout=0.5)
        except queue.Empty:
            if not any(p.is_alive() for p in procs.processes):
                break
            continue
        if "error" in event:
            errors[event["rank"]] = event["error"]
    for rank, p in enumerate(procs.processes):
        if rank not in errors and p.exitcode not in (None, 0):
            errors[rank] = f"exited with code {p.exitcode}"
    return "\n".join(f"rank {rank} failed: {text}" for rank, text in sorted(errors.items()))


class _RankActor:
    """Ranks 1..k-1 of a trial, each in its own Ray actor (process)."""

    def gpu_ids(self) -> list:
        import ray

        return [str(g) for g in ray.get_gpu_ids()]

    def run(self, spec: dict, rank: int, world: int, addr: str, port: int, checkpoint_uri, env: dict) -> dict:
        env = dict(env)
        return run_rank(spec, rank, world, addr, port, checkpoint_uri=checkpoint_uri,
                        local_rank=int(env.pop("LOCAL_RANK", 0)), env=env)


def run_ray_ranks(spec: dict, *, ranks: int, bundle: dict, report, checkpoint_uri: str | None) -> dict:
    """Inside a Tune trial whose placement group holds ``ranks`` bundles like ``bundle`` on one node (the trial's
    own process in bundle 0): rank 0 runs here and reports; ranks 1..k-1 are actors in bundles 1..k-1. The ranks
    see all the trial's GPUs, so NCCL sees its peers (as Ray Train does). A failed actor kills the others;
    rank 0 then fails with its error."""
    import ray
    from ray.util import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

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
