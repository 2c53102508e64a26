"""The steps every trial takes, as public functions: workers/trial.py (one device) and workers/distributed.py
(DeepSpeed on k ranks) are two recipes written with them (torchtune's habit: a recipe per path, shared
utilities, no base class). A change here changes both paths, on purpose; a change to one recipe changes only it.

In the order a recipe calls them:
- setup: ``load`` (tokenizer and backbone, fp32), ``prepare`` (trainable parameters, checkpointing),
  ``make_plan`` (N, N_tr, cost per token, peak lr, planned tokens and steps: the planner's when it set them,
  else core.flops' functions -- never a third way), ``autocast_for``, ``memory_plan`` (checkpointing and chunk).
- resume: ``Progress`` (what a checkpoint carries besides tensors), ``finished_row`` (a trial that finished
  before a crash lost the news), ``resume_reason``; ``save_checkpoint`` / ``checkpoint_state``.
- each step: ``budget_batches`` (the batches under the budget: ``start_step``, the cut by real tokens,
  ``fit_budget``, and the lr, ``lr_factor``; the end of the data, ``exhausted_reason``), ``Progress.advance``,
  ``HardwareFlops``, ``Reporter.step`` (evaluation when due, the metric row, the event).
- the end: ``finish`` (final eval loss on the last row, the done marker, the done event,
  the trial row ``trial_row``).

The budget (docs/study.md, "FLOP convention"): cost per real token by method x real tokens. Before a step the
worker knows its batch's real tokens; a batch that would overshoot is cut to the pairs that still fit (a last,
smaller contrastive batch), so ``flops`` ends within two pairs of the budget (a contrastive batch needs two),
never above. The lr schedule (linear warmup over ``warmup_fraction``, cosine to 0) runs on the fraction of the
budget spent, which equals the fraction of planned optimizer steps up to batch-to-batch token variation and ends
exactly at the budget.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

import fsio as storage
from core.errors import one_line
from core.models import ModelShape
from core.flops import (cost_per_token, loss_matmul_flops, padding_fraction, planned_steps, sequence_hardware_flops,
                        tokens_for_budget)
from core.devices import hfu, mfu
from core.events import TrialEvent
from core.schedule import warmup_cosine
from core.memory import MARGIN, OVERHEAD_BYTES, Footprint, choose, footprint
from core.models import auto_lr
from core.spec import TrialSpec
from workers import checkpoint
from workers.device_peak import has_bf16
from workers.pair_batches import PairStream, collate
from workers.pair_files import (load_eval_pairs, make_encoder, measure_tokens_per_pair, pad_id_of,
                                with_query_instruction)
from workers.loss import eval_embeddings, mean_info_nce, step_shapes
from workers.methods import count_params, select_trainable
from workers.pooling import eos_id_of, with_eos
from workers.retrieval import retrieval_metrics

# --------------------------------------------------------------------------------------------------------
# Setup


def load(name_or_path: str, device: torch.device):
    """Tokenizer (pad = EOS where it has none) and the backbone in fp32.

    fp32 whatever the checkpoint's dtype: transformers 5 loads with dtype="auto", and Pythia's config says
    float16 (Qwen's and Llama's bfloat16), which would train half-precision weights with half-precision AdamW
    moments and no loss scaling; autocast does the bf16 math over fp32 weights instead. On CPU, eager attention:
    torch's CPU flash-attention backward ran 4x slower than the eager matmuls in bf16 (a 14m-shaped step took 2x
    as long; benchmarks/README.md); on GPU, SDPA."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    attention = "sdpa" if device.type == "cuda" else "eager"
    model = AutoModel.from_pretrained(name_or_path, attn_implementation=attention,  # GPTNeoXModel: no LM head
                                      dtype=torch.float32)
    model.config.use_cache = False
    return tokenizer, model


def prepare(model, spec: TrialSpec):
    """The model to train: the method's trainable parameters (LoRA's initialisation seeded by the trial's seed,
    the same on every rank), gradient checkpointing when the spec asks."""
    torch.manual_seed(spec.seed)
    if spec.attention == "bidirectional":  # the causal mask replaced (workers/packing.py "Attention")
        from workers.packing import make_bidirectional

        make_bidirectional(model)
    model = select_trainable(model, spec.method, lora_rank=spec.lora_rank, trainable_fraction=spec.trainable_fraction,
                             lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout, lora_targets=spec.lora_targets)
    if spec.gradient_checkpointing is True:  # "auto": decided by memory_plan before
        enable_checkpointing(model)
    return model


def enable_checkpointing(model) -> None:
    # Non-reentrant checkpointing needs no grad-requiring input; transformers' input hook would make the
    # frozen embedding's output require grad and drag frozen blocks into backward (FLOPs the paper's
    # 2N + 4N_tr does not have), so it is removed again.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    base.disable_input_require_grads()


@dataclass(frozen=True)
class Plan:
    """What the trial knows before its first step; the plan columns of its trial row."""

    n_params: int  # N: non-embedding parameters, LoRA adapters included
    n_trainable: int  # N_tr
    cost: float  # FLOP per real token (core.flops.cost_per_token)
    lr: float  # the schedule's peak
    planned_tokens: int
    planned_steps: int
    budget_flops: float
    batching: str
    peak_flops: float | None = None  # the trial's share of its device's bf16 peak x the ranks (workers/device_peak.py)


def make_plan(spec: TrialSpec, model, tokenizer, device: torch.device | None = None, world: int = 1) -> Plan:
    """N and N_tr of the prepared model (counted before ZeRO-3 partitions it), the cost per token, the peak lr
    ('auto': Pythia's pretraining lr / 10), and the planned tokens and steps: the planner's (``spec``) when it
    set them, else the same core.flops functions the planner calls."""
    n_params, n_trainable = count_params(model)
    cost = cost_per_token(spec.method, n_params, n_trainable)
    lr = spec.lr if spec.lr is not None else auto_lr(spec.model, model.config.to_dict())
    tokens = spec.planned_tokens if spec.planned_tokens is not None else tokens_for_budget(spec.budget_flops, cost)
    n_steps = spec.planned_steps
    if n_steps is None:
        per_pair = spec.planned_tokens_per_pair or measure_tokens_per_pair(
            spec.train_data, tokenizer, spec.max_length, query_instruction=spec.query_instruction,
            hard_negatives=spec.hard_negatives)
        _, n_steps = planned_steps(tokens, per_pair, spec.batch_size)
    peak = None
    if device is not None:
        from workers.device_peak import trial_peak

        peak = trial_peak(device, spec.device_share, world)
    return Plan(n_params, n_trainable, cost, lr, tokens, n_steps, spec.budget_flops, spec.batching, peak)


def uses_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast: asked for, or 'auto' where the hardware has it."""
    return precision == "bf16" or (precision == "auto" and has_bf16(device))


def autocast_for(precision: str, device: torch.device):
    """A zero-argument context-manager factory: bf16 autocast over fp32 weights, or nothing."""
    if not uses_bf16(precision, device):
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def trial_footprint(shape: ModelShape, spec: TrialSpec, device: torch.device, *, world: int = 1,
                    zero_stage: int = 0, packing: bool = False) -> Footprint:
    """The trial's memory on ``device`` (core/memory.py): eager attention and no CUDA overhead on a CPU; packed, a
    pair holds the planner's tokens per pair."""
    eager = device.type != "cuda"
    return footprint(shape, spec.method, spec.max_length, lora_rank=spec.lora_rank,
                     trainable_fraction=spec.trainable_fraction, lora_targets=spec.lora_targets, eager_attention=eager,
                     shards=world, zero_stage=zero_stage, overhead=0 if eager else OVERHEAD_BYTES,
                     tokens_per_pair=spec.planned_tokens_per_pair if packing else None)


def memory_plan(shape: ModelShape, spec: TrialSpec, device: torch.device, *, world: int = 1,
                zero_stage: int = 0, packing: bool = False) -> TrialSpec:
    """The spec with gradient checkpointing and the gradient cache's chunk decided (core/memory.py), where the spec
    leaves them to the trial ("auto" and None): the largest chunk of this rank's ``batch_size // world`` pairs that
    fits, checkpointing only when not even a small chunk fits without it.

    The budget is the trial's share of its device's memory (``spec.device_share`` of a GPU's total: other trials on a
    shared GPU have theirs, and a reused process's cached blocks from the previous trial are released first), not
    the memory free right now. On a CPU, a quarter of the free host memory for activations, as before any planner.
    ``packing``: texts run in rows without padding, so a pair holds the planner's tokens per pair, not twice
    ``max_length`` (measured on an H200: padded peaks were ~0.6 of the worst case, the queries being short)."""
    fp = trial_footprint(shape, spec, device, world=world, zero_stage=zero_stage, packing=packing)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        budget = spec.device_share * torch.cuda.get_device_properties(device).total_memory
        cap_allocator(device, spec.device_share)
    else:
        import psutil

        budget = (fp.static + 0.25 * psutil.virtual_memory().available) * MARGIN
    batch = max(1, spec.batch_size // world)
    ckpt, chunk = spec.gradient_checkpointing, spec.chunk_size
    if chunk is not None:
        if ckpt == "auto":
            ckpt = fp.total(chunk, False, one_pass=chunk >= batch) > budget
    else:
        chosen = choose(fp, budget, batch, ckpt)
        if chosen is None:  # nothing fits: the smallest there is (the planner skips such trials where it knows)
            print(f"warning: {spec.model} {spec.method}: needs about {fp.total(1, True) / 1e9:.1f} GB with one "
                  f"pair per chunk; the device offers {budget / 1e9:.1f} GB", file=sys.stderr, flush=True)
            chosen = (ckpt if ckpt != "auto" else True, 1)
        ckpt, chunk = chosen
    return dataclasses.replace(spec, gradient_checkpointing=bool(ckpt), chunk_size=chunk)


def packer_for(shape: ModelShape, spec: TrialSpec, device: torch.device, packing: bool, compiled: bool = False):
    """How the trial packs (workers/packing.py ``Packer``; None: padded): the attention kernel for its device
    (workers/attention.py ``choose``: varlen FlashAttention on CUDA, the block-diagonal mask on a CPU) and, for a
    compiled model, flat rows padded to bucket lengths (the longest text: max length, + 1 for an appended EOS)."""
    from workers.attention import FLAT, choose
    from workers.packing import Packer

    if not packing:
        return None
    kernel = choose(device.type, shape.family, bf16=uses_bf16(spec.precision, device))
    return Packer(kernel, bucket=compiled and kernel in FLAT, max_text=spec.max_length + 1)


def use_packer(model, packer) -> None:
    """The model's attention switched to the packer's kernel (nothing to do padded)."""
    if packer is not None:
        from workers.attention import use

        use(model, packer.kernel)


def compiles(shape: ModelShape, spec: TrialSpec, plan: Plan, device: torch.device, packing: bool) -> bool:
    """``spec.compile`` decided (core/throughput.py ``compile_decision``): auto compiles on CUDA, for packed trials
    (whose flat rows come in a few bucket lengths; padded batches would recompile per length), where the planned
    steps' saving passes the compiles' cost; the eager step's seconds estimated from its hardware FLOP (the planner's
    per-token count at the mean text length) at the utilisation measured for the model's size."""
    from core.throughput import assumed_utilisation, compile_decision

    if spec.compile == "auto" and not packing:
        return False

    eager_step_s = 0.0
    if plan.peak_flops:
        per_pair = spec.planned_tokens_per_pair or 2.0 * spec.max_length
        length = max(1, round(per_pair / 2))
        per_token = sequence_hardware_flops(shape, spec.method, length, lora_rank=spec.lora_rank,
                                            trainable_fraction=spec.trainable_fraction,
                                            lora_targets=spec.lora_targets, checkpointing=False) / length
        utilisation, _ = assumed_utilisation(plan.n_params)
        eager_step_s = per_token * per_pair * spec.batch_size / (plan.peak_flops * utilisation)
    return compile_decision(spec.compile, device.type, plan.planned_steps, eager_step_s)


def compile_blocks(model) -> None:
    """Each decoder block compiled in place (``nn.Module.compile``: parameter names and checkpoints unchanged),
    for fixed shapes (``dynamic=False``: the packer's bucket lengths keep them few)."""
    from workers.methods import decoder_blocks

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for block in decoder_blocks(base):
        block.compile(dynamic=False)


def cap_allocator(device: torch.device, share: float, cuda=torch.cuda) -> None:
    """A trial that shares its GPU (``device_share`` < 1) may allocate only its share: one trial's overshoot then
    fails that trial (an OOM, its own row) instead of its neighbours on the GPU. Set on every GPU trial, so that a
    reused process's next trial gets its own share, whole GPU included."""
    if device.type == "cuda":
        cuda.set_per_process_memory_fraction(min(1.0, share), device)


class HardwareFlops:
    """The matmul FLOP one step executes where it runs (core.flops.sequence_hardware_flops per padded sequence,
    cached by length), for the hardware_flops column. ``packing`` (as the step runs, workers/packing.py): per
    packed row instead, a row of L tokens costing what a padded sequence of L does: its Linears on its tokens
    (the real ones and the row's tail), its attention L^2, as eager and SDPA attention compute it under the
    block-diagonal mask; a flat kernel (varlen, workers/attention.py) computes each text's own square only, and
    ``packing`` (a ``Packer``) says which (workers/packing.py ``Packer.shapes``)."""

    def __init__(self, shape: ModelShape, spec: TrialSpec, chunk: int, packing=False):
        self.shape, self.spec, self.chunk, self.packing, self.per_sequence = shape, spec, chunk, packing, {}

    def __call__(self, part, pairs: int) -> float:
        """``part``: the batch (or this rank's shard) run here; ``pairs``: the whole batch, whose loss it computes."""
        s, total = self.spec, loss_matmul_flops(pairs, self.shape.hidden, self.spec.hard_negatives)
        grad_cache = self.chunk < len(part)  # as workers/loss.py decides
        for b, t in step_shapes(part, self.chunk, self.packing):
            if (t, grad_cache) not in self.per_sequence:
                self.per_sequence[t, grad_cache] = sequence_hardware_flops(
                    self.shape, s.method, t, lora_rank=s.lora_rank, trainable_fraction=s.trainable_fraction,
                    lora_targets=s.lora_targets, checkpointing=s.gradient_checkpointing is True,
                    grad_cache=grad_cache)
            total += b * self.per_sequence[t, grad_cache]
        return total


def eval_batches(spec: TrialSpec, tokenizer, device) -> list:
    """The held-out pairs as batches of the training batch size (a last batch of fewer than 2 pairs dropped): from
    the token cache when the trial has one, else tokenised here."""
    if not spec.eval_data:
        return []
    if spec.token_cache:
        from workers import token_cache

        return [to_device(b, device) for b in token_cache.eval_batches(
            spec.token_cache, limit=spec.eval_pairs, batch_size=spec.batch_size, pooling_eos=_eos(spec, tokenizer),
            pad_id=pad_id_of(tokenizer))]
    pairs = [with_query_instruction(p, spec.query_instruction) for p in load_eval_pairs(spec.eval_data, spec.eval_pairs)]
    encode, pad = encoder(spec, tokenizer), pad_id_of(tokenizer)
    batches = []
    for i in range(0, len(pairs), spec.batch_size):
        chunk = pairs[i:i + spec.batch_size]
        if len(chunk) < 2:
            break
        q, d = encode([p[0] for p in chunk]), encode([p[1] for p in chunk])
        batches.append(to_device(collate(q, d, pad, i // spec.batch_size), device))
    return batches


def evaluate(model, batches: list, spec: TrialSpec, chunk: int, autocast, *, split=None,
             packing: bool = False) -> dict | None:
    """The held-out evaluation from one embedding pass (None without eval data): ``eval_loss`` (the mean
    contrastive loss, in-batch negatives) and retrieval over all eval pairs (``recall_at_1``, ``recall_at_10``,
    ``mrr_at_10``, ``ndcg_at_10``: each query against every eval positive, workers/retrieval.py). The model is
    back in training mode after. ``packing``: packed rows (workers/packing.py), as the training steps run."""
    if not batches:
        return None
    model.eval()
    pairs = eval_embeddings(model, batches, chunk, autocast, split=split, pooling=spec.pooling, packing=packing)
    model.train()
    q, d = torch.cat([q for q, _ in pairs]), torch.cat([d for _, d in pairs])
    return {"eval_loss": mean_info_nce(pairs, spec.temperature), **retrieval_metrics(q, d)}


def encoder(spec: TrialSpec, tokenizer):
    """texts -> token ids as the trial embeds them: truncated to ``max_length``; for last-token pooling the
    tokenizer's EOS appended to every text (the text truncated, not the EOS: workers/pooling.py)."""
    encode = make_encoder(tokenizer, spec.max_length)
    return with_eos(encode, eos_id_of(tokenizer), spec.max_length) if spec.pooling == "last" else encode


def _eos(spec: TrialSpec, tokenizer) -> int | None:
    return eos_id_of(tokenizer) if spec.pooling == "last" else None


def train_stream(spec: TrialSpec, tokenizer, skip_batches: int = 0):
    """The trial's training batches from batch ``skip_batches`` on: the same seeded sequence on every rank and
    after every resume, batched as ``spec.batching`` says. From the token cache when the trial has one (random
    batches: the same pairs, padded the same, as the raw path's; O(1) resume), else the raw data
    (workers/pair_batches.py PairStream)."""
    if spec.token_cache and spec.batching == "random":  # a hard-negative trial's cache holds its negatives
        from workers.token_cache import CachedPairs

        return CachedPairs(spec.token_cache, spec.batch_size, spec.seed, spec.max_epochs, skip_batches,
                           pooling_eos=_eos(spec, tokenizer), pad_id=pad_id_of(tokenizer),
                           prefetch=spec.prefetch_batches, hard_negatives=spec.hard_negatives)
    return PairStream(spec.train_data, tokenizer, batch_size=spec.batch_size, max_length=spec.max_length,
                      seed=spec.seed, max_epochs=spec.max_epochs, skip_batches=skip_batches,
                      batching=spec.batching, prefetch=spec.prefetch_batches, encode=encoder(spec, tokenizer),
                      query_instruction=spec.query_instruction, hard_negatives=spec.hard_negatives)


def to_device(batch, device):
    if device.type == "cpu":
        return batch
    for k in ("q_ids", "q_mask", "d_ids", "d_mask", "n_ids", "n_mask"):
        if getattr(batch, k, None) is not None:
            setattr(batch, k, getattr(batch, k).to(device, non_blocking=True))
    return batch


# --------------------------------------------------------------------------------------------------------
# Progress and checkpoint state


@dataclass
class Progress:
    """Everything a checkpoint carries besides tensors."""

    step: int = 0
    batches: int = 0  # data position: batches consumed from the stream
    tokens: int = 0  # real tokens
    padded_tokens: int = 0
    flops: float = 0.0  # paper convention
    hardware_flops: float = 0.0
    wall_s: float = 0.0
    train_s: float = 0.0  # inside optimizer steps (forward, backward, update): wall_s minus this is overhead
    train_loss: float | None = None
    eval_loss: float | None = None
    retrieval: dict = field(default_factory=dict)  # the last evaluation's recall_at_1 ... ndcg_at_10
    bad_lines: int = 0
    reason: str | None = None
    done: bool = False
    rows: list = field(default_factory=list)

    @classmethod
    def from_state(cls, state: dict) -> "Progress":
        """From a checkpoint's state.json (``checkpoint_state``)."""
        return cls(**state["progress"])

    def evaluated(self, evaluation: dict | None) -> None:
        """An evaluation's results (steps.evaluate; None without eval data) become the trial's latest."""
        evaluation = dict(evaluation or {})
        self.eval_loss = evaluation.pop("eval_loss", None)
        self.retrieval = evaluation

    def advance(self, tokens: int, padded_tokens: int, cost: float, hardware_flops: float, loss: float,
                train_s: float) -> None:
        """One optimizer step of ``tokens`` real tokens done."""
        self.step += 1
        self.batches += 1
        self.tokens += tokens
        self.padded_tokens += padded_tokens
        self.flops += cost * tokens
        self.hardware_flops += hardware_flops
        self.train_loss, self.train_s = loss, self.train_s + train_s


def finished_row(restored, plan: Plan, report) -> dict | None:
    """A checkpoint that is a finished trial's done marker (the trial ended before a crash lost the news): its
    done event again (restart: the whole history) and its trial row; None for any other checkpoint."""
    if restored is None or not restored[1]["progress"]["done"]:
        return None
    progress = Progress.from_state(restored[1])
    report(event(progress, plan, progress.rows, restart=True, done=True))
    return trial_row(progress, plan)


def resume_reason(progress: Progress, skipped: list[str]) -> None:
    """Resumed past a damaged checkpoint (from the one before it, or from scratch): the trial's reason says so."""
    if skipped:
        progress.reason = "; ".join([*skipped, f"resumed from step {progress.step}"])


def checkpoint_state(progress: Progress, started: float | None) -> dict:
    """The JSON side of a checkpoint; a mid-run one carries the wall time so far (``started``: the run's start)."""
    state = asdict(progress)
    if started is not None:
        state["wall_s"] = progress.wall_s + time.perf_counter() - started
    return {"progress": state}


def save_checkpoint(uri: str | None, progress: Progress, started: float | None, tensors: dict, state: dict, *,
                    keep_previous: bool = True) -> None:
    """A checkpoint (workers/checkpoint.py's format); one the store refuses (read-only, full, unreachable for a
    while) is skipped with a warning on the worker's stderr: the trial goes on and saves again at the next
    interval (a crash before then costs the steps since the last saved checkpoint, never the trial)."""
    if not uri:
        return
    try:
        checkpoint.save(uri, progress.step, tensors, checkpoint_state(progress, started) | state,
                        keep_previous=keep_previous)
    except (OSError, storage.StorageError) as e:
        print(f"warning: checkpoint at step {progress.step} not saved ({' '.join(str(e).split())[:200]}); "
              "training goes on", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------
# Each step: the budget cut and the lr


def budget_batches(spec: TrialSpec, tokenizer, progress: Progress, plan: Plan, optimizer, rows: "Reporter"):
    """The training batches of the trial's remaining steps, as (batch, final), each with the optimizer's lr set
    for it (``start_step``). Ends after the final (budget-cut) step, or without a step when fewer than two pairs
    are left in the budget, or when the data runs out (the trial's reason says so); then the last step gets its
    metric row. Use it under ``contextlib.closing``: the stream's thread stops however the loop ends."""
    stream = train_stream(spec, tokenizer, skip_batches=progress.batches)
    try:
        for batch in stream:
            batch, final = start_step(batch, progress, plan, spec.warmup_fraction, optimizer)
            if batch is None:
                break
            progress.bad_lines = stream.stats.bad_lines
            yield batch, final
            if final:
                break
        else:
            progress.reason = exhausted_reason(spec, progress)
    finally:
        stream.close()
    progress.bad_lines = stream.stats.bad_lines
    rows.last_step(optimizer.param_groups[0]["lr"])


def start_step(batch, progress: Progress, plan: Plan, warmup_fraction: float, optimizer):
    """(the batch to train on, whether it is the last) before an optimizer step, the optimizer's lr set for it.

    A batch whose real tokens overshoot the remaining budget is the last: cut to the pairs that still fit
    (``fit_budget``); (None, True) when fewer than two do -- the trial ends without a step."""
    remaining = plan.budget_flops - progress.flops
    final = plan.cost * batch.real_tokens > remaining
    if final:
        batch = fit_budget(batch, plan.cost, remaining)
        if batch is None:
            return None, True
    spent = progress.flops / plan.budget_flops
    after = (progress.flops + plan.cost * batch.real_tokens) / plan.budget_flops
    for group in optimizer.param_groups:
        group["lr"] = plan.lr * lr_factor(spent, after, warmup_fraction)
    return batch, final


def fit_budget(batch, cost: float, remaining: float):
    """The first pairs of ``batch`` whose real tokens (a pair's hard negatives' included) still fit ``remaining``
    FLOP; None when fewer than two do."""
    per_pair = pair_tokens(batch).cumsum(0)  # (B,)
    # float64: a long tensor times a float is float32, whose rounding could admit a pair past the budget
    n = int((per_pair.double() * cost <= remaining).sum())
    return batch.take(n) if n >= 2 else None


def pair_tokens(batch) -> torch.Tensor:
    """(B,) real tokens of each pair: its query, its document and its k hard negatives (rows i*k .. i*k + k - 1)."""
    tokens = batch.q_mask.sum(1) + batch.d_mask.sum(1)
    k = getattr(batch, "hard_negatives", 0)
    return tokens + batch.n_mask.sum(1).view(-1, k).sum(1) if k else tokens


def lr_factor(before: float, after: float, warmup_fraction: float) -> float:
    """Linear warmup over the first ``warmup_fraction`` of training, then cosine to 0 (docs/study.md).

    ``before``/``after``: the budget fraction spent before and after this step. Warmup reaches its top at the
    end of the warmup steps (never an lr of 0 on step 1); the cosine is taken at the step's start (never 0 on
    the last one), as a step-indexed schedule does.
    """
    return warmup_cosine(before, after, warmup_fraction)


def exhausted_reason(spec: TrialSpec, progress: Progress) -> str:
    return (f"data exhausted after {spec.max_epochs:g} epoch(s): "
            f"{progress.flops / spec.budget_flops:.1%} of the budget spent")


# --------------------------------------------------------------------------------------------------------
# Metric rows, events, the trial row


class Reporter:
    """A trial's metric rows and the events that carry them to ``report``. A row every ``report_every`` steps, on
    an evaluation and on the last step; an event (the rows since the last one) at most every ``report_every_s``
    seconds: under Ray Tune each is a round trip to the driver while training waits. The first row, an
    evaluation, the first event after a restart (``rows`` then holds the whole history up to the checkpoint) and
    the last step go out at once."""

    def __init__(self, report, progress: Progress, plan: Plan, spec: TrialSpec, started: float, restart: bool):
        self.report, self.progress, self.plan, self.spec, self.started = report, progress, plan, spec, started
        self.restart = restart
        self.pending = list(progress.rows) if restart else []
        self.last_row, self.tokens, self.last_event = time.perf_counter(), 0, -math.inf

    def step(self, tokens: int, lr: float, *, final: bool, evaluate) -> None:
        """After an optimizer step of ``tokens`` real tokens (``progress`` already counts it): ``evaluate()`` when
        an evaluation is due (every ``eval_every`` steps; the last step's comes with ``finish``), then the row."""
        p, spec = self.progress, self.spec
        self.tokens += tokens
        evaluated = bool(spec.eval_every) and p.step % spec.eval_every == 0 and not final
        if evaluated:
            p.evaluated(evaluate())
        if not (final or evaluated or p.step % spec.report_every == 0):
            return
        now = self._add_row(lr, evaluated)
        if final or evaluated or self.restart or now - self.last_event >= spec.report_every_s:
            self.report(event(p, self.plan, self.pending, restart=self.restart))
            self.pending, self.restart, self.last_event = [], False, now

    def last_step(self, lr: float) -> None:
        """The loop ended between report steps (data exhausted, no pair left): the last step gets its row, so
        the final eval_loss is not pinned to an earlier step."""
        p = self.progress
        if p.step and (not p.rows or p.rows[-1]["step"] != p.step):
            self._add_row(lr, False)

    def finish(self) -> None:
        """The final evaluation goes on the last row (before the done marker saves the rows); sent again if it
        went out before: the consumer upserts."""
        p = self.progress
        if p.rows:
            p.rows[-1].update(eval_loss=p.eval_loss, **p.retrieval)
            if not self.pending or self.pending[-1] is not p.rows[-1]:
                self.pending.append(p.rows[-1])

    def done(self, trial: dict) -> None:
        self.report(event(self.progress, self.plan, self.pending, restart=self.restart, done=True, trial=trial))

    def _add_row(self, lr: float, evaluated: bool) -> float:
        p, now = self.progress, time.perf_counter()
        row = metric_row(p, lr, p.wall_s + now - self.started, self.tokens / max(now - self.last_row, 1e-9),
                         evaluated, self.plan.peak_flops)
        p.rows.append(row)
        self.pending.append(row)
        self.last_row, self.tokens = now, 0
        return now


def keeps_weights(spec: TrialSpec) -> bool:
    return spec.weights_uri is not None and spec.keep_weights == "trainable"


def keep_weights(model, spec: TrialSpec, progress: Progress) -> None:
    """A completed trial keeps what it trained (``spec.keep_weights`` trainable) at ``spec.weights_uri``, which the
    driver sets to ``<sweep>/models/<trial_id>`` (workers/weights.py: safetensors + a manifest written last).
    Called before the done marker: a trial killed in between saves again on resume and replaces the save
    atomically, so the sweep holds each trial's weights exactly once. A save the store refuses (read-only, full,
    unreachable) does not fail the trial, as a refused checkpoint does not: its reason says the weights were not
    kept, and `export` says so too."""
    if not keeps_weights(spec):
        return
    from workers.weights import save_trained

    try:
        save_trained(model, spec.method, spec.weights_uri, base_model=spec.model)
    except (OSError, storage.StorageError) as e:
        problem = one_line(e, 200)
        print(f"warning: trained weights not kept ({problem})", file=sys.stderr, flush=True)
        progress.reason = "; ".join(filter(None, [progress.reason, f"weights not kept: {problem}"]))


def finish(progress: Progress, rows: Reporter, evaluation: dict | None, started: float,
           checkpoint_uri: str | None) -> dict:
    """The trial's end: the final evaluation on the last row, the done marker at ``checkpoint_uri`` (counters and
    rows, no tensors; it replaces the checkpoints), the done event; returns the trial row."""
    progress.evaluated(evaluation)
    progress.wall_s += time.perf_counter() - started
    progress.done = True
    rows.finish()
    save_checkpoint(checkpoint_uri, progress, None, {}, {}, keep_previous=False)
    row = trial_row(progress, rows.plan)
    rows.done(row)
    return row


def metric_row(p: Progress, lr: float, wall_s: float, tokens_per_s: float, evaluated: bool,
               peak_flops: float | None = None) -> dict:
    """A metric row (core/store.py METRIC_COLUMNS); the evaluation's columns only where this step evaluated; MFU
    (the paper's FLOP) and HFU (the hardware FLOP) over the steps so far."""
    evaluation = {"eval_loss": p.eval_loss, **p.retrieval} if evaluated else {"eval_loss": None}
    return {"step": p.step, "tokens": p.tokens, "flops": p.flops, "hardware_flops": p.hardware_flops,
            "train_loss": p.train_loss, "lr": lr, "wall_s": wall_s, "tokens_per_s": tokens_per_s,
            "mfu": mfu(p.flops, p.train_s, peak_flops), "hfu": hfu(p.hardware_flops, p.train_s, peak_flops),
            **evaluation}


def event(p: Progress, plan: Plan, rows: list, *, restart: bool, done: bool = False,
          trial: dict | None = None) -> TrialEvent:
    """What ``report`` gets: the rows since the last event and a snapshot (core/events.py)."""
    return TrialEvent(rows=tuple(dict(r) for r in rows), restart=restart, done=done, step=p.step, tokens=p.tokens,
                      flops=p.flops, budget_flops=plan.budget_flops, train_loss=p.train_loss,
                      eval_loss=p.eval_loss, trial=(trial or trial_row(p, plan)) if done else None)


def trial_row(p: Progress, plan: Plan) -> dict:
    """The trial columns the worker owns (core/store.py names them)."""
    return {"n_params": plan.n_params, "n_trainable": plan.n_trainable, "tokens": p.tokens, "steps": p.step,
            "flops": p.flops, "hardware_flops": p.hardware_flops, "eval_loss": p.eval_loss, **p.retrieval,
            "train_loss": p.train_loss, "wall_s": p.wall_s, "train_s": p.train_s, "reason": p.reason,
            "planned_tokens": plan.planned_tokens, "planned_steps": plan.planned_steps, "batching": plan.batching,
            "lr": plan.lr,
            "mfu": mfu(p.flops, p.train_s, plan.peak_flops), "hfu": hfu(p.hardware_flops, p.train_s, plan.peak_flops),
            "bad_lines": p.bad_lines,
            "padding_fraction": padding_fraction(p.tokens, p.padded_tokens)}
