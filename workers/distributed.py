"""Data-parallel trials: one contrastive batch over k ranks, DeepSpeed ZeRO, launched inside one Tune trial.

Three parts, top to bottom:

1. The math (plain ``torch.distributed``). Every rank reads the same seeded stream, so it holds the same global
   batch; it embeds only its shard (``shard``), and ``gather_rows`` all-gathers the shards' embeddings with
   gradient, so every query still sees all negatives of the global batch (in-batch InfoNCE is not separable
   over shards: tests/workers/test_loss.py). Every rank then computes the same global loss L. The gather's
   backward all-reduces the gradient of the gathered rows and keeps this rank's slice: d(sum over ranks of
   L)/dx = k * dL/dx. Averaging parameter gradients over the k ranks (DeepSpeed does) removes the k: the update
   is the single-process gradient of the global loss (checked to float tolerance, tests/workers/
   test_distributed.py). The exact gradient cache (workers/loss.py) works unchanged on top: it gathers the
   cached embeddings, gets dL/d(local embeddings) through the same backward and re-embeds the shard chunk by
   chunk, one ``engine.backward`` of the surrogate (e * g).sum() per chunk. A batch that does not split evenly (a
   trial's last, budget-cut step; a last eval batch) is computed whole on every rank: exact too, and every rank
   runs the same forwards, which ZeRO-3 needs (its parameter gathers are collectives).

2. The DeepSpeed recipe, ``run_deepspeed_trial``: workers/trial.py's steps (workers/steps.py's public functions:
   load, plan, budget cut, lr schedule, rows, trial row) around a DeepSpeed engine (one recipe per
   path, no shared base class). Config: ZeRO 2 by default; stage 3 or CPU optimizer offload through
   ``TrialSpec.deepspeed_config`` (a JSON object merged over the default). That field is a runtime knob, not
   part of the trial's identity: stage, offload and buckets move tensors, not results (ZeRO 2 and 3 with and
   without offload give the single-process losses), and the keys that would change results (optimizer,
   schedule, batch sizes, clipping, precision: core.spec.DEEPSPEED_TRIAL_KEYS) are the trial's and rejected in an
   override. Precision: DeepSpeed's ``torch_autocast`` (bf16 matmuls over fp32 weights and fp32 AdamW, gradients
   reduced in fp32: ``deepspeed_config``), what a single-GPU trial runs, so a trial's result does not depend on how
   many GPUs it got. FLOP: each rank counts the real tokens of its shard, summed over ranks by one all-reduce per
   step (and checked against the global batch: ranks out of step raise); the budget is global. Metrics: rank 0
   reports, once per event.
   Checkpoints: whole tensors in the project's format, whatever the ZeRO stage or number of ranks; on resume
   rank 0 reads them and sends them to the others (workers/zero_checkpoint.py); a finished trial's done marker
   replaces them.

3. Launchers on this side: ``run_rank`` (one rank: process group, recipe, teardown) and ``run_local`` (k processes
   on this machine, gloo on CPU: tests, CPU-only runs). Inside a Tune trial, orchestrator/launchers.py starts the
   ranks (rank 0 in the trial's own process, which reports; ranks 1..k-1 as Ray actors) through ``run_rank``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

import fsio as storage
from core.events import TrialEvent
from core.models import ModelShape
from core.spec import TrialSpec, parse_deepspeed_override
from workers import steps, zero_checkpoint
from workers.pair_batches import Batch
from workers.loss import contrastive_backward
from workers.packing import packs

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


# --------------------------------------------------------------------------------------------------------
# 2. DeepSpeed: the config and the recipe

DEFAULT_ZERO_STAGE = 2


def read_override(ref: str | None) -> dict:
    """``TrialSpec.deepspeed_config``: an inline JSON object, or a path / s3:// / gs:// URI of a JSON file; checked
    by core.spec (the grid checks inline objects at its edge, with the same function)."""
    if not ref:
        return {}
    text = ref if ref.lstrip().startswith("{") else storage.read_bytes(ref).decode()
    return parse_deepspeed_override(text, ref)


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
    if bf16:  # fp32 weights, optimizer and gradient reduction, bf16 matmuls: the single-GPU trial's numerics
        # DeepSpeed 0.19.8 tags the parameters of its "lower precision safe" modules (nn.Linear by default) with the
        # autocast dtype (runtime/torch_autocast.py, init_autocast_params), and under autocast ZeRO 1/2/3 reduce a
        # gradient in its parameter's tag, whatever communication_data_type says (runtime/base_optimizer.py,
        # get_param_comm_dtype; ZeRO-3 also gathers the parameter in it: zero/partition_parameters.py,
        # get_allgather_dtype). No module tagged: every gradient reduced in fp32 (tests/workers/test_distributed.py)
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
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
    # fused on a GPU: one kernel for every tensor, 2.67x foreach's step over 1B parameters on an H200 (benchmarks/gpu.py)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int


def rank_device(local_rank: int, accelerator: str, cuda_available: bool) -> tuple[str, str]:
    """(torch device, process-group backend) of a rank. Each rank sees all of its trial's GPUs, so it must take
    cuda:LOCAL_RANK before the process group starts (else every rank lands on cuda:0 and the first collective
    fails: "tensor not on device passed to init_process_group"); the backend follows the accelerator DeepSpeed
    uses (``DS_ACCELERATOR=cpu`` on a GPU box — tests, run_local — is gloo, never nccl)."""
    if accelerator != "cpu" and cuda_available:
        return f"cuda:{local_rank}", "nccl"
    return "cpu", "gloo"


# How long a collective (and the rendezvous) may wait for a peer before it fails: 5 minutes, not torch's 30. It is
# the backstop for what the launcher's watcher does not judge — setup (a peer loading its model while the others
# wait in the engine's first broadcast) and checkpoints (the others wait while rank 0 writes or reads one: a 34 GB
# checkpoint, 2.8B full fine-tuning, takes 136 s at core/memory.py's 250 MB/s). A dead rank or one that stops
# stepping ends the trial far sooner: orchestrator/launchers.py watches the ranks and their heartbeats. NCCL, unlike
# gloo, does not notice a dead peer by itself: without the watcher a failed rank left the others blocked for 30 min.
COLLECTIVE_TIMEOUT_S = 300.0
HEARTBEAT_KEY = "repurpose/heartbeat/{rank}"  # in the rendezvous store: "<phase>:<count>" (``Heartbeat``)


def host_store(world: int, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> dist.TCPStore:
    """The trial's rendezvous store, listening on a port the OS chooses (port 0) and holds from now on: its
    ``.port`` is handed to the ranks, which connect to it (``init_ranks``). Choosing a free port, closing it and
    binding it again later raced when trials started together."""
    import datetime

    return dist.TCPStore("0.0.0.0", 0, world, is_master=True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def connect_store(addr: str, port: int, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> dist.TCPStore:
    import datetime

    return dist.TCPStore(addr, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))


class Heartbeat:
    """What a rank tells the launcher's watcher: its phase and a counter that moves as it works. ``train``: a step
    is under way, and a counter that stops moving for ``orchestrator.launchers.HEARTBEAT_STALE_S`` means the rank
    is stuck; ``setup``, ``io`` (a checkpoint) and ``finish``: not judged (the collective timeout bounds them)."""

    def __init__(self, store, rank: int):
        self.store, self.key, self.count = store, HEARTBEAT_KEY.format(rank=rank), 0

    def __call__(self, phase: str) -> None:
        self.count += 1
        self.store.set(self.key, f"{phase}:{self.count}")


def init_ranks(store=None, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> tuple[Ranks, Heartbeat]:
    """The process group from the environment (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK), on this rank's
    device (``rank_device``), through ``store`` (the launcher's, ``host_store``) or a connection to the store at
    MASTER_ADDR:MASTER_PORT. Collectives time out after ``timeout_s``."""
    import datetime

    import deepspeed

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device, backend = rank_device(local_rank, os.environ.get("DS_ACCELERATOR", ""), torch.cuda.is_available())
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    if store is None:
        store = connect_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), timeout_s)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), local_rank)
    beat = Heartbeat(store, ranks.rank)
    beat("setup")
    return ranks, beat


FAULT_ENV = "REPURPOSE_RANK_FAULT"


def rank_fault(rank: int, step: int) -> None:
    """Test-only (tests/workers/test_rank_failures.py): with ``REPURPOSE_RANK_FAULT=<rank>:<die|hang>:<step>`` in
    the environment, that rank SIGKILLs itself, or sleeps for good (alive, stuck inside its step), after that many
    optimizer steps; a no-op without the variable."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    who, what, when = spec.split(":")
    if int(who) != rank or int(when) != step:
        return
    if what == "die":
        os.kill(os.getpid(), 9)
    while what == "hang":
        time.sleep(3600)


def run_deepspeed_trial(spec: TrialSpec, *, report=None, checkpoint_uri: str | None = None,
                        output_dir: str | None = None, store=None) -> dict:
    """``workers.trial.run_trial`` on k ranks with DeepSpeed; every rank calls it (through ``run_rank``, which
    owns the process group), rank 0 reports. Returns the trial row (the same on every rank)."""
    import deepspeed

    started = time.perf_counter()
    ranks, beat = init_ranks(store)
    report = _rank0_report(report, ranks)
    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    _quiet_deepspeed()
    device = torch.device(rank_device(ranks.local_rank, os.environ.get("DS_ACCELERATOR", ""),
                                      torch.cuda.is_available())[0])

    # 1. load; 2. choose trainable parameters and plan (counted before ZeRO-3 partitions them)
    tokenizer, model = steps.load(spec.model, device)
    shape = ModelShape.from_config(model.config.to_dict())
    if spec.batch_size % ranks.world:
        raise ValueError(f"batch_size: {spec.batch_size} does not split over {ranks.world} ranks")
    micro = spec.batch_size // ranks.world
    # the engine's config (ZeRO 2 unless overridden; DeepSpeed's torch_autocast does the bf16 math), then
    # checkpointing and this rank's chunk from the memory model for that stage
    config = deepspeed_config(world=ranks.world, micro_batch=micro, bf16=steps.uses_bf16(spec.precision, device),
                              override=read_override(spec.deepspeed_config))
    packing = packs(spec.packing, shape.family, device_type=device.type, n_params=shape.n_params())
    spec = steps.memory_plan(shape, spec, device, world=ranks.world, packing=packing,
                             zero_stage=config.get("zero_optimization", {}).get("stage", 0))
    model = steps.prepare(model, spec)
    plan = steps.make_plan(spec, model, tokenizer, device, world=ranks.world)  # hardware FLOP: summed over ranks

    # the newest checkpoint, read by rank 0 and sent to the others (past a damaged one: the one before it; the
    # reason says so), so every rank resumes from the same step; a finished trial's marker: reported again, nothing
    # computed. Its tensors follow once the engine is up (zero_checkpoint.restore)
    restored, skipped = zero_checkpoint.read(checkpoint_uri, ranks.rank, device)
    row = steps.finished_row(None if restored is None else ({}, restored.state), plan, report)
    if row is not None:
        return row

    # the engine: ZeRO over the trial's AdamW
    optimizer = _optimizer([p for p in model.parameters() if p.requires_grad], plan.lr, spec.weight_decay, config,
                           device)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine.train()
    autocast = contextlib.nullcontext
    progress = steps.Progress() if restored is None else zero_checkpoint.restore(engine, restored, ranks.rank)
    steps.resume_reason(progress, skipped)
    restart, restored = restored is not None, None

    chunk = spec.chunk_size
    hardware_flops = steps.HardwareFlops(shape, spec, chunk, packing)  # what this rank executes
    eval_batches = steps.eval_batches(spec, tokenizer, device)

    def evaluate() -> dict | None:  # every rank: ZeRO-3's forwards are collective
        return steps.evaluate(engine, eval_batches, spec, chunk, autocast, packing=packing,
                              split=lambda b: shard(b, ranks.rank, ranks.world)[:2])

    # 3. train to the budget: the same seeded stream, so the same global batch and budget cut, on every rank
    rows = steps.Reporter(report, progress, plan, spec, started, restart)  # report: rank 0's only
    last_ckpt = time.perf_counter()
    with contextlib.closing(steps.budget_batches(spec, tokenizer, progress, plan, optimizer, rows)) as batches:
        for batch, final in batches:
            beat("train")
            rank_fault(ranks.rank, progress.step)
            t_step = time.perf_counter()
            part, gather, owned = shard(steps.to_device(batch, device), ranks.rank, ranks.world)
            loss = contrastive_backward(engine, part, spec.temperature, chunk, autocast, gather=gather,
                                        backward=engine.backward, pooling=spec.pooling, packing=packing)
            engine.step()  # reduces (ZeRO) and updates; zeroes the gradients
            train_s = time.perf_counter() - t_step
            # tokens and hardware FLOP summed over ranks; rank 0's clock decides checkpoints for all
            due = ranks.rank == 0 and time.perf_counter() - last_ckpt >= spec.checkpoint_every_s
            tokens, rank_flops, due = _sum_over_ranks(batch, owned, hardware_flops(part, len(batch)), due, device)
            progress.advance(tokens, batch.padded_tokens, plan.cost, rank_flops, loss, train_s)
            rows.step(tokens, optimizer.param_groups[0]["lr"], final=final, evaluate=evaluate)
            if due and not final:
                beat("io")  # rank 0 writes while the others wait: bounded by the collective timeout
                zero_checkpoint.save(engine, checkpoint_uri, progress, started, ranks.rank, device)
                last_ckpt = time.perf_counter()

    # 4. evaluate
    beat("finish")
    evaluation = evaluate()
    if output_dir and spec.save_model:
        _save_model(engine, tokenizer, output_dir, ranks, config)
    _keep_weights(engine, spec, ranks, progress)

    # 5. report (rank 0) and the done marker, which replaces the checkpoints, once every rank is done
    zero_checkpoint.barrier()
    row = steps.finish(progress, rows, evaluation, started, checkpoint_uri if ranks.rank == 0 else None)
    engine.destroy()
    return row


def _keep_weights(engine, spec: TrialSpec, ranks, progress) -> None:
    """Rank 0 keeps what trained (steps.keep_weights); under ZeRO-3 the trainable parameters are gathered first,
    a collective every rank enters (ZeRO 1/2 hold them whole on every rank: nothing to gather)."""
    if not steps.keeps_weights(spec):
        return
    import deepspeed

    params = [p for p in engine.module.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, enabled=any(hasattr(p, "ds_id") for p in params)):
        if ranks.rank == 0:
            steps.keep_weights(engine.module, spec, progress)
    zero_checkpoint.barrier()


def _sum_over_ranks(batch: Batch, owned: int, rank_flops: float, due: bool, device) -> tuple[int, float, bool]:
    """(real tokens, hardware FLOP, checkpoint due) summed over ranks: one all-reduce a step. The ranks' tokens
    must make the global batch's: ranks out of step raise."""
    sums = torch.tensor([owned, rank_flops, float(due)], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    tokens = int(sums[0])
    if tokens != batch.real_tokens:
        raise RuntimeError(f"ranks out of step at batch {batch.index}: their tokens sum to {tokens}, "
                           f"the batch has {batch.real_tokens}")
    return tokens, float(sums[1]), bool(sums[2])


def _rank0_report(report, ranks: Ranks):
    """Metrics come from rank 0 only; its events say how many ranks made them (the store ignores the key)."""
    def send(event: TrialEvent) -> None:
        if report is not None and ranks.rank == 0:
            report(dataclasses.replace(event, ranks=ranks.world))
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
    zero_checkpoint.barrier()


# --------------------------------------------------------------------------------------------------------
# 3. Launchers


def run_rank(spec: dict, rank: int, world: int, master_addr: str, master_port: int, *,
             checkpoint_uri: str | None = None, report=None, local_rank: int = 0, env: dict | None = None,
             store=None, trial_id: str | None = None) -> dict:
    """One rank of a trial: the process group from this environment (through ``store`` where this process hosts
    the rendezvous, else a connection to it at master_addr:master_port), the recipe, and the group torn down (a
    failing rank closes its connections, so its peers fail now rather than at the collective timeout; a reused
    Tune actor starts the next trial clean)."""
    os.environ.update({"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
                       **(env or {})})
    from workers.probe import record

    record(rank=rank, trial_id=trial_id, device=rank_device(local_rank, os.environ.get("DS_ACCELERATOR", ""),
                                                            torch.cuda.is_available())[0])
    try:
        return run_deepspeed_trial(TrialSpec.from_dict(spec), report=report, checkpoint_uri=checkpoint_uri,
                                   store=store)
    finally:
        if dist.is_initialized():
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()  # torch's, and DeepSpeed's cached groups with it


def _local_main(rank: int, world: int, port: int, spec: dict, checkpoint_uri, events) -> None:
    if not torch.cuda.is_available():  # a GPU box runs its ranks on its GPUs (nccl): the GPU check's ZeRO rows
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # once ran a 1.4B model on CPU for want of this
    report = events.put if rank == 0 else None
    try:
        run_rank(spec, rank, world, "127.0.0.1", port, checkpoint_uri=checkpoint_uri, report=report)
    except BaseException:
        events.put({"error": traceback.format_exc(), "rank": rank})
        raise


def run_local(spec: TrialSpec, world: int, *, checkpoint_uri: str | None = None, report=None,
              timeout_s: float = 3600.0) -> dict:
    """The trial on ``world`` processes of this machine (its GPUs with nccl where it has them, else the CPU with
    gloo); ``report`` gets rank 0's events here.
    Returns the trial row. A rank that fails fails the call."""
    import torch.multiprocessing as mp

    events = mp.get_context("spawn").Queue()
    store = host_store(world)  # this process hosts the rendezvous; every rank connects to it
    procs = mp.start_processes(_local_main, args=(world, store.port, spec.to_dict(), checkpoint_uri, events),
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
            if not isinstance(event, TrialEvent):  # a rank's error
                raise RuntimeError(_rank_errors(event, events, procs, world))
            if report:
                report(event)
            if event.done:
                row = event.trial
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
        if not isinstance(event, TrialEvent):
            errors[event["rank"]] = event["error"]
    for rank, p in enumerate(procs.processes):
        if rank not in errors and p.exitcode not in (None, 0):
            errors[rank] = f"exited with code {p.exitcode}"
    return "\n".join(f"rank {rank} failed: {text}" for rank, text in sorted(errors.items()))
