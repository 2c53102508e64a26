"""One trial, top to bottom: load -> choose trainable parameters -> train to the FLOP budget -> evaluate -> report.

A plain function: tests call it directly; the driver runs it inside a Ray Tune trial through a thin
adapter (orchestrator/trainable.py). It knows nothing of the driver: it emits events through ``report``
and keeps its own checkpoint at ``checkpoint_uri``. The steps it shares with the DeepSpeed recipe
(workers/distributed.py) are workers/steps.py's public functions: the budget cut, the lr schedule, the rows.

``report`` gets core.events.TrialEvent values: progress (the metric rows since the last event and a snapshot), and
last the done event with the trial row.

The budget (docs/study.md, "FLOP convention"; workers/steps.py): cost per real token by method x real tokens; the
last batch is cut to the pairs that still fit, so ``flops`` ends within two pairs of the budget, never above.
The lr schedule (linear warmup, cosine to 0) runs on the fraction of the budget spent.
"""
from __future__ import annotations

import contextlib
import time

import torch

from core.models import ModelShape
from core.spec import TrialSpec
from workers import checkpoint, probe, steps
from workers.loss import contrastive_backward
from workers.packing import packs


def run_trial(spec: TrialSpec, *, report=None, checkpoint_uri: str | None = None,
              output_dir: str | None = None, trial_id: str | None = None) -> dict:
    """Fine-tunes ``spec.model`` with ``spec.method`` until ``spec.budget_flops`` is spent; returns the trial row."""
    started = time.perf_counter()
    report = report or (lambda event: None)
    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    # the first visible GPU: a Ray trial sees only its own (none when it was planned without one: CUDA_VISIBLE_DEVICES
    # empty, orchestrator/launchers.py); a shared one's allocator is capped at the trial's share
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    probe.record(trial_id=trial_id, device=str(device))
    autocast = steps.autocast_for(spec.precision, device)

    # 1. load
    tokenizer, model = steps.load(spec.model, device)
    shape = ModelShape.from_config(model.config.to_dict())
    # texts in rows without padding (workers/packing.py); checkpointing and the gradient cache's chunk, where "auto"
    packing = packs(spec.packing, shape.family, device_type=device.type, n_params=shape.n_params())
    spec = steps.memory_plan(shape, spec, device, packing=packing)  # one pass where the batch fits: no recompute

    # 2. choose trainable parameters; the plan (N, N_tr, cost per token, lr, planned tokens and steps)
    model = steps.prepare(model, spec)
    model.to(device).train()
    plan = steps.make_plan(spec, model, tokenizer, device)
    # packed rows' attention kernel by device (workers/attention.py); torch.compile where it pays (core/throughput.py)
    compiled = steps.compiles(shape, spec, plan, device, packing)
    packer = steps.packer_for(shape, spec, device, packing, compiled)
    steps.use_packer(model, packer)
    if compiled:
        steps.compile_blocks(model)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=plan.lr, weight_decay=spec.weight_decay,
                                  fused=device.type == "cuda")  # one kernel: 2.67x foreach, H200

    # resume (past a damaged checkpoint: from the one before it, or from scratch; the trial's reason says so); a
    # trial that finished before a crash lost the news is reported again, nothing computed
    skipped: list[str] = []
    restored = checkpoint.load(checkpoint_uri, skipped=skipped)
    row = steps.finished_row(restored, plan, report)
    if row is not None:
        return row
    progress = steps.Progress()
    if restored is not None:
        progress = steps.Progress.from_state(restored[1])
        checkpoint.restore_trainer(restored, trainable, optimizer)
    steps.resume_reason(progress, skipped)

    chunk = spec.chunk_size
    hardware_flops = steps.HardwareFlops(shape, spec, chunk, packer)
    eval_batches = steps.eval_batches(spec, tokenizer, device)

    def evaluate() -> dict | None:
        return steps.evaluate(model, eval_batches, spec, chunk, autocast, packing=packer)

    # 3. train to the budget
    rows = steps.Reporter(report, progress, plan, spec, started, restart=restored is not None)
    last_ckpt = time.perf_counter()
    with contextlib.closing(steps.budget_batches(spec, tokenizer, progress, plan, optimizer, rows)) as batches:
        for batch, final in batches:
            t_step = time.perf_counter()
            batch = steps.to_device(batch, device)
            loss = contrastive_backward(model, batch, spec.temperature, chunk, autocast, pooling=spec.pooling,
                                        packing=packer)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress.advance(batch.real_tokens, batch.padded_tokens, plan.cost, hardware_flops(batch, len(batch)),
                             loss, time.perf_counter() - t_step)
            rows.step(batch.real_tokens, optimizer.param_groups[0]["lr"], final=final, evaluate=evaluate)
            if not final and time.perf_counter() - last_ckpt >= spec.checkpoint_every_s:
                tensors, state = checkpoint.trainer_tensors(trainable, optimizer)
                steps.save_checkpoint(checkpoint_uri, progress, started, tensors, state)
                last_ckpt = time.perf_counter()

    # 4. evaluate
    evaluation = evaluate()
    if output_dir and spec.save_model:
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    steps.keep_weights(model, spec, progress)  # before the done marker: a resumed trial saves again, once

    # 5. report, and the done marker (counters and rows, no tensors) in place of the checkpoints
    return steps.finish(progress, rows, evaluation, started, checkpoint_uri)
