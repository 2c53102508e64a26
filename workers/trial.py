"""One trial, top to bottom: load -> choose trainable parameters -> train to the FLOP budget -> evaluate -> report.

A plain function: tests call it directly; the driver runs it inside a Ray Tune trial through a thin
adapter (orchestrator/trainable.py). It knows nothing of the driver: it emits events through ``report``
and keeps its own checkpoint at ``checkpoint_uri``.

Events (dicts) passed to ``report``:
- progress (at most every ``report_every_s`` seconds, and at once for an evaluation or a restart):
  ``rows`` (metric rows since the last event), ``restart`` (True on the first event after a
  resume: ``rows`` then holds the whole history up to the checkpoint, so the consumer can replace what it
  stored and stay exactly-once), and a snapshot: ``step, tokens, flops, budget_flops, train_loss, eval_loss``.
- the last one also has ``done: True`` and ``trial``: the trial row (CONTRACTS.md trial columns it owns).

The budget (PAPER.md, "FLOP accounting"): cost per real token by method x real tokens. Before a step the
worker knows its batch's real tokens; a batch that would overshoot is cut to the pairs that still fit
(a last, smaller contrastive batch), so ``flops`` ends within two pairs of the budget (a contrastive
batch needs two), never above.
The lr schedule (linear warmup over 10 %, cosine to 0) runs on the fraction of the budget spent, which
equals the fraction of planned optimizer steps up to batch-to-batch token variation and ends exactly at
the budget.
"""
from __future__ import annotations

import contextlib
import time

import torch

from workers import checkpoint, storage
from workers.data import PairStream, collate, load_eval_pairs, make_encoder, measure_tokens_per_pair, pad_id_of
from workers.flops import NeoxShape, cost_per_token, loss_matmul_flops, sequence_hardware_flops, tokens_for_budget
from workers.loss import contrastive_backward, eval_loss, step_shapes
from workers.methods import count_params, select_trainable
from workers.models import auto_lr
from workers.spec import TrialSpec


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
    bad_lines: int = 0
    reason: str | None = None
    done: bool = False
    rows: list = field(default_factory=list)


def run_trial(spec: TrialSpec, *, report=None, checkpoint_uri: str | None = None,
              output_dir: str | None = None) -> dict:
    """Fine-tunes ``spec.model`` with ``spec.method`` until ``spec.budget_flops`` is spent; returns the trial row."""
    started = time.perf_counter()
    report = report or (lambda event: None)
    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = _autocast(spec.precision, device)

    # 1. load
    tokenizer, model = _load(spec.model, device)
    shape = NeoxShape.from_config(model.config.to_dict())
    lr = spec.lr if spec.lr is not None else auto_lr(spec.model, model.config.to_dict())

    # 2. choose trainable parameters
    torch.manual_seed(spec.seed)  # LoRA's initialisation
    model = select_trainable(model, spec.method, lora_rank=spec.lora_rank, trainable_fraction=spec.trainable_fraction,
                             lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout, lora_targets=spec.lora_targets)
    if spec.gradient_checkpointing:
        _enable_checkpointing(model)
    model.to(device).train()
    n_params, n_trainable = count_params(model)
    cost = cost_per_token(spec.method, n_params, n_trainable)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=lr, weight_decay=spec.weight_decay,
                                  foreach=device.type == "cuda")

    # plan: steps from the budget (reported; the schedule itself runs on the budget fraction)
    tokens_per_pair = spec.planned_tokens_per_pair or measure_tokens_per_pair(spec.train_data, tokenizer,
                                                                              spec.max_length)
    planned_tokens = tokens_for_budget(spec.budget_flops, cost)
    planned_steps = int(planned_tokens / tokens_per_pair) // spec.batch_size  # as the planner counts them

    # resume (past a damaged checkpoint: from the one before it, or from scratch; the trial's reason says so)
    progress, restart, skipped = Progress(), False, []
    restored = checkpoint.load(checkpoint_uri, skipped=skipped)
    if restored is not None:
        progress, restart = _restore(restored, trainable, optimizer), True
    if skipped:
        progress.reason = "; ".join([*skipped, f"resumed from step {progress.step}"])
    base = dict(n_params=n_params, n_trainable=n_trainable, planned_tokens=planned_tokens,
                planned_steps=planned_steps, budget_flops=spec.budget_flops)
    if progress.done:  # finished before a crash lost the news: report it again, compute nothing
        report(_event(progress, base, progress.rows, restart=True, done=True))
        return _trial_row(progress, base)

    chunk = spec.chunk_size or auto_chunk_size(shape, spec.batch_size, spec.max_length, spec.gradient_checkpointing,
                                               device)
    hw_per_token = {}  # padded length -> hardware FLOP of one sequence

    def step_hardware_flops(batch) -> float:
        total = loss_matmul_flops(len(batch), shape.hidden)
        for b, t in step_shapes(batch, chunk):
            if t not in hw_per_token:
                hw_per_token[t] = sequence_hardware_flops(
                    shape, spec.method, t, lora_rank=spec.lora_rank, trainable_fraction=spec.trainable_fraction,
                    lora_targets=spec.lora_targets, checkpointing=spec.gradient_checkpointing,
                    grad_cache=chunk < spec.batch_size)
            total += b * hw_per_token[t]
        return total

    eval_batches = _eval_batches(spec, tokenizer, device)

    def evaluate() -> float | None:
        if not eval_batches:
            return None
        model.eval()
        loss = eval_loss(model, eval_batches, spec.temperature, chunk, autocast)
        model.train()
        return loss

    # 3. train to the budget
    rows = Reporter(report, progress, base, spec, started, restart)
    last_ckpt = time.perf_counter()
    stream = PairStream(spec.train_data, tokenizer, batch_size=spec.batch_size, max_length=spec.max_length,
                        seed=spec.seed, max_epochs=spec.max_epochs, skip_batches=progress.batches,
                        prefetch=spec.prefetch_batches)
    try:
        exhausted = True
        for batch in stream:
            remaining = spec.budget_flops - progress.flops
            final = cost * batch.real_tokens > remaining
            if final:  # the last step: only the pairs that still fit the budget
                batch = fit_budget(batch, cost, remaining)
                if batch is None:
                    exhausted = False
                    break
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(progress.flops / spec.budget_flops,
                                             (progress.flops + cost * batch.real_tokens) / spec.budget_flops,
                                             spec.warmup_fraction)
            t_step = time.perf_counter()
            batch = _to(batch, device)
            loss = contrastive_backward(model, batch, spec.temperature, chunk, autocast)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress.train_s += time.perf_counter() - t_step

            progress.step += 1
            progress.batches += 1
            progress.tokens += batch.real_tokens
            progress.padded_tokens += batch.padded_tokens
            progress.flops += cost * batch.real_tokens
            progress.hardware_flops += step_hardware_flops(batch)
            progress.train_loss = loss
            progress.bad_lines = stream.stats.bad_lines
            evaluated = spec.eval_every and progress.step % spec.eval_every == 0 and not final
            if evaluated:
                progress.eval_loss = evaluate()
            rows.step(batch.real_tokens, optimizer.param_groups[0]["lr"], final=final, evaluated=evaluated)
            if time.perf_counter() - last_ckpt >= spec.checkpoint_every_s and not final:
                _save(checkpoint_uri, progress, trainable, optimizer, started)
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

    # 4. evaluate
    progress.eval_loss = evaluate()
    if output_dir and spec.save_model:
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)

    # 5. report
    progress.wall_s += time.perf_counter() - started
    progress.done = True
    rows.finish()
    _save(checkpoint_uri, progress, [], None, None)  # the done marker: counters and rows, no tensors
    row = _trial_row(progress, base)
    rows.done(row)
    return row


class Reporter:
    """A trial's metric rows and the events that carry them to ``report`` (run_trial and
    workers/distributed.py). A row every ``report_every`` steps, on an evaluation and on the last step; an
    event (the rows since the last one) at most every ``report_every_s`` seconds: under Ray Tune each is a round
    trip to the driver while training waits. The first row, an evaluation, the first event after a restart
    (``rows`` then holds the whole history up to the checkpoint) and the last step go out at once."""

    def __init__(self, report, progress: Progress, base: dict, spec: TrialSpec, started: float, restart: bool):
        self.report, self.progress, self.base, self.spec, self.started = report, progress, base, spec, started
        self.restart = restart
        self.pending = list(progress.rows) if restart else []
        self.last_row, self.tokens, self.last_event = time.perf_counter(), 0, -math.inf

    def step(self, tokens: int, lr: float, *, final: bool, evaluated: bool) -> None:
        """After an optimizer step of ``tokens`` real tokens (``progress`` already counts it)."""
        self.tokens += tokens
        if not (final or evaluated or self.progress.step % self.spec.report_every == 0):
            return
        now = self._add_row(lr, self.progress.eval_loss if evaluated else None)
        if final or evaluated or self.restart or now - self.last_event >= self.spec.report_every_s:
            self.report(_event(self.progress, self.base, self.pending, restart=self.restart))
            self.pending, self.restart, self.last_event = [], False, now

    def last_step(self, lr: float) -> None:
        """The loop ended between report steps (data exhausted, no pair left): the last step gets its row, so
        the final eval_loss is not pinned to an earlier step."""
        p = self.progress
        if p.step and (not p.rows or p.rows[-1]["step"] != p.step):
            self._add_row(lr, None)

    def finish(self) -> None:
        """The final eval_loss goes on the last row (before the done marker saves the rows); sent again if it
        went out before: the consumer upserts."""
        p = self.progress
        if p.rows:
            p.rows[-1]["eval_loss"] = p.eval_loss
            if not self.pending or self.pending[-1] is not p.rows[-1]:
                self.pending.append(p.rows[-1])

    def done(self, trial: dict) -> None:
        self.report(_event(self.progress, self.base, self.pending, restart=self.restart, done=True, trial=trial))

    def _add_row(self, lr: float, eval_loss) -> float:
        p, now = self.progress, time.perf_counter()
        row = _row(p, lr, p.wall_s + now - self.started, self.tokens / max(now - self.last_row, 1e-9), eval_loss)
        p.rows.append(row)
        self.pending.append(row)
        self.last_row, self.tokens = now, 0
        return now


def fit_budget(batch, cost: float, remaining: float):
    """The first pairs of ``batch`` whose tokens still fit ``remaining`` FLOP; None when fewer than two do."""
    per_pair = (batch.q_mask.sum(1) + batch.d_mask.sum(1)).cumsum(0)  # (B,)
    # float64: a long tensor times a float is float32, whose rounding could admit a pair past the budget
    n = int((per_pair.double() * cost <= remaining).sum())
    return batch.take(n) if n >= 2 else None


def lr_factor(before: float, after: float, warmup_fraction: float) -> float:
    """Linear warmup over the first ``warmup_fraction`` of training, then cosine to 0 (PAPER.md).

    ``before``/``after``: the budget fraction spent before and after this step. Warmup reaches its top at the
    end of the warmup steps (never an lr of 0 on step 1); the cosine is taken at the step's start (never 0 on
    the last one), as a step-indexed schedule does.
    """
    warm = after / warmup_fraction if warmup_fraction > 0 else 1.0
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, before - warmup_fraction) / (1.0 - warmup_fraction))))
    return min(warm, cos)


def auto_chunk_size(shape: NeoxShape, batch_size: int, max_length: int, checkpointing: bool,
                    device: torch.device) -> int:
    """The largest sub-batch (pairs) whose activations fit a share of free memory; the batch itself if it fits.

    Activation bytes per token of one block in 16-bit: 34*d + 5*heads*T (Korthikanti et al. 2022, Eq. 2);
    with checkpointing only each block's input (2*d bytes) stays, plus one block being recomputed.
    """
    per_block = 34 * shape.hidden + 5 * shape.heads * max_length
    per_token = (shape.layers * 2 * shape.hidden + per_block) if checkpointing else shape.layers * per_block
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] * 0.5
    else:
        import psutil

        free = psutil.virtual_memory().available * 0.25
    per_pair = 2 * max_length * per_token  # query and document
    fit = int(free // per_pair)
    if fit >= batch_size:
        return batch_size
    return max(1, 2 ** int(math.log2(max(fit, 1))))


def _load(name_or_path: str, device: torch.device):
    """Tokenizer (pad = EOS where it has none) and the backbone. On CPU, eager attention: torch's CPU flash
    attention backward ran 4x slower than the eager matmuls in bf16 (a 14m-shaped step took 2x as long;
    benchmarks/README.md); on GPU, SDPA."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    attention = "sdpa" if device.type == "cuda" else "eager"
    model = AutoModel.from_pretrained(name_or_path, attn_implementation=attention)  # GPTNeoXModel: no LM head
    model.config.use_cache = False
    return tokenizer, model


def _enable_checkpointing(model) -> None:
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


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext
    if precision == "auto" and not _has_bf16(device):
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def _has_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _eval_batches(spec: TrialSpec, tokenizer, device) -> list:
    if not spec.eval_data:
        return []
    pairs = load_eval_pairs(spec.eval_data, spec.eval_pairs)
    encode, pad = make_encoder(tokenizer, spec.max_length), pad_id_of(tokenizer)
    batches = []
    for i in range(0, len(pairs), spec.batch_size):
        chunk = pairs[i:i + spec.batch_size]
        if len(chunk) < 2:
            break
        q, d = encode([p[0] for p in chunk]), encode([p[1] for p in chunk])
        batches.append(_to(collate(q, d, pad, i // spec.batch_size), device))
    return batches


def _to(batch, device):
    if device.type == "cpu":
        return batch
    for k in ("q_ids", "q_mask", "d_ids", "d_mask"):
        setattr(batch, k, getattr(batch, k).to(device, non_blocking=True))
    return batch


def _row(p: Progress, lr: float, wall_s: float, tokens_per_s: float, eval_loss) -> dict:
    return {"step": p.step, "tokens": p.tokens, "flops": p.flops, "hardware_flops": p.hardware_flops,
            "train_loss": p.train_loss, "lr": lr, "wall_s": wall_s, "eval_loss": eval_loss,
            "tokens_per_s": tokens_per_s}


def _event(p: Progress, base: dict, rows: list, *, restart: bool, done: bool = False, trial: dict | None = None):
    event = {"rows": [dict(r) for r in rows], "restart": restart, "done": done, "step": p.step, "tokens": p.tokens,
             "flops": p.flops, "budget_flops": base["budget_flops"], "train_loss": p.train_loss,
             "eval_loss": p.eval_loss}
    if done:
        event["trial"] = trial or _trial_row(p, base)
    return event


def _trial_row(p: Progress, base: dict) -> dict:
    return {"n_params": base["n_params"], "n_trainable": base["n_trainable"], "tokens": p.tokens, "steps": p.step,
            "flops": p.flops, "hardware_flops": p.hardware_flops, "eval_loss": p.eval_loss,
            "train_loss": p.train_loss, "wall_s": p.wall_s, "train_s": p.train_s, "reason": p.reason,
            "planned_tokens": base["planned_tokens"], "planned_steps": base["planned_steps"],
            "bad_lines": p.bad_lines,
            "padding_fraction": 1 - p.tokens / p.padded_tokens if p.padded_tokens else None}


def _save(uri, progress: Progress, trainable, optimizer, started) -> None:
    """A checkpoint; one the store refuses (read-only, full, unreachable for a while) is skipped with a warning
    on the worker's stderr: the trial goes on and saves again at the next interval (a crash before then costs
    the steps since the last saved checkpoint, never the trial)."""
    if not uri:
        return
    try:
        _write_checkpoint(uri, progress, trainable, optimizer, started)
    except (OSError, storage.StorageError) as e:
        print(f"warning: checkpoint at step {progress.step} not saved ({' '.join(str(e).split())[:200]}); "
              "training goes on", file=sys.stderr, flush=True)


def _write_checkpoint(uri, progress: Progress, trainable, optimizer, started) -> None:
    state = asdict(progress)
    if started is not None:  # a mid-run checkpoint carries the wall time so far
        state["wall_s"] = progress.wall_s + time.perf_counter() - started
    if optimizer is None:  # a finished trial's marker: nothing to train on from here, no checkpoint kept
        checkpoint.save(uri, progress.step, {}, {"progress": state, "param_groups": []}, keep_previous=False)
        return
    opt_tensors, groups = checkpoint.optimizer_tensors(optimizer)
    tensors = {f"param.{name}": p for name, p in trainable} | opt_tensors | {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    checkpoint.save(uri, progress.step, tensors, {"progress": state, "param_groups": groups})


def _restore(restored, trainable, optimizer) -> Progress:
    tensors, state = restored
    if state["progress"]["done"]:
        return Progress(**state["progress"])
    with torch.no_grad():
        for name, p in trainable:
            p.copy_(tensors[f"param.{name}"])
    checkpoint.load_optimizer(optimizer, tensors, state["param_groups"])
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return Progress(**state["progress"])
