"""Feasibility of a grid before anything runs: per trial N, tokens, optimizer steps, resources or a skip reason.

Pure functions (``planned_steps``, ``skip_reason``, ``size_trial``, ``plan_trial``) and one entry point,
``plan_grid(grid) -> Plan``, which adds the only I/O: the models' configs (never their weights) and, once per
(tokenizer, data), a measurement of the tokens a pair really has; once per data file, a count of its pairs.

Per trial (docs/study.md "FLOP convention"): N, N_tr from the config (``core.flops.param_counts``), planned tokens
= ``tokens_for_budget(budget, cost_per_token)``, planned pairs = tokens / tokens per pair, steps =
pairs // batch_size. Infeasible cells are kept, marked with ``skip_reason``: too few optimizer steps to be a
training run, more pairs than ``max_epochs`` passes over the data hold, or (where the GPUs' memory is known) no
share of a node's GPUs that holds the trial (core/memory.py).

Resources (``size_trial``): the grid's knobs say what a trial would like (a GPU share for small models, DeepSpeed
from ``deepspeed_from_params`` trainable parameters); the memory model says whether that holds it, and if not the
trial takes the next size up — a larger share, a whole GPU, DeepSpeed over 2, 4, ... GPUs of one node — with
gradient checkpointing only where not even a small chunk of activations fits without it. Checkpoints are spaced by
their size (``core.memory.checkpoint_interval_s``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Mapping

from core import memory as mem
from core.errors import UserError, one_line
from core import methods
from core.flops import cost_per_token, planned_steps, sequence_hardware_flops, tokens_for_budget
from core.methods import param_counts
from core.models import ModelShape, model_shape, pythia_size
from core.spec import TrialSpec, attention_unsupported, default
from core.throughput import assumed_utilisation, share_for
from orchestrator.grid import Grid, Trial, expand, replicate_of, resolved_lr

# The authors planned every cell with 78 tokens per pair (14 query + 64 positive at max length 75; docs/study.md).
# Used only when the data cannot be read here (e.g. `plan` on a laptop for an s3:// grid), with a warning.
FALLBACK_TOKENS_PER_PAIR = 78.0


@dataclass(frozen=True)
class PlannedTrial:
    trial_id: str
    model: str  # as written in the grid
    spec: TrialSpec  # carries the planner's tokens per pair, tokens and steps to the worker (runtime knobs)
    family: str  # the model's model_type (gpt_neox, llama, qwen3, ...)
    n_params: int  # N: non-embedding parameters, LoRA adapters included
    n_trainable: int  # N_tr
    cost_per_token: float  # FLOP per real token, paper convention
    planned_tokens: int
    planned_pairs: float
    steps: int  # optimizer steps
    planned_flops: float  # planned_tokens * cost_per_token <= budget_flops
    hardware_flops: float  # estimated FLOP executed (recomputation included, padding not): device-hours in `plan`
    resources: Mapping[str, float]  # Ray resources of one trial: {"CPU": 1, "GPU": 0.25}
    deepspeed_gpus: int  # 0: plain PyTorch; k: DeepSpeed ZeRO over the k GPUs in `resources`
    skip_reason: str | None  # None: runnable
    memory_bytes: int | None = None  # estimated peak on each of its GPUs (None: CPU, or the GPUs' memory unknown)
    checkpointing: bool | None = None  # gradient checkpointing as planned (None: the trial decides on its device)
    lr: float | None = None  # the peak lr the trial will use ('auto' resolved; None: not resolvable here)

    @property
    def method(self) -> str:
        return self.spec.method

    @property
    def lora_rank(self) -> int | None:
        return self.spec.lora_rank

    @property
    def trainable_fraction(self) -> float | None:
        return self.spec.trainable_fraction

    @property
    def budget_flops(self) -> float:
        return self.spec.budget_flops

    @property
    def runnable(self) -> bool:
        return self.skip_reason is None

    def display_resources(self) -> dict[str, float]:
        """``resources`` plus ``"deepspeed": k`` for multi-GPU trials (what `plan` shows; not for Ray)."""
        return {**self.resources, "deepspeed": self.deepspeed_gpus} if self.deepspeed_gpus else dict(self.resources)

    def to_json(self) -> dict:
        """One row of `plan --json` (docs/reference.md): exactly these keys."""
        return {
            "trial_id": self.trial_id, "model": self.model, "method": self.method, "lora_rank": self.lora_rank,
            "trainable_fraction": self.trainable_fraction, "budget_flops": self.budget_flops,
            "planned_tokens": self.planned_tokens, "steps": self.steps, "resources": self.display_resources(),
            "skip_reason": self.skip_reason,
            "memory_gb": None if self.memory_bytes is None else round(self.memory_bytes / 1e9, 2),
            "gradient_checkpointing": self.checkpointing, "checkpoint_every_s": self.spec.checkpoint_every_s,
            **self.knobs(),
        }

    def knobs(self) -> dict:
        """The knob columns (``knob_columns``) this trial sets away from their defaults (lr: a number given or
        scaled, not 'auto'): what `plan` adds to its rows."""
        defaults = knob_defaults()
        return {k: v for k, v in knob_columns(self.spec, self.lr).items()
                if (self.spec.lr is not None if k == "lr" else v != defaults[k])}


@dataclass(frozen=True)
class DataStats:
    """What the planner needs to know about the data: tokens per pair by model (as in the grid), the number
    of training pairs (None: unknown, the max_epochs check is not applied), and warnings for the user."""

    tokens_per_pair: Mapping[str, float]
    train_pairs: int | None
    warnings: tuple[str, ...] = ()
    # (model, query_instruction) -> tokens per pair, for the grid's text settings other than the first (the first
    # is tokens_per_pair's: the grid's data cap and `plan`'s line stay one number per model)
    by_texts: Mapping[tuple, float] = dataclasses.field(default_factory=dict)

    def pair_tokens(self, model: str, spec: TrialSpec) -> float:
        """The tokens per pair of a trial: its model's, measured with its query instruction."""
        return self.by_texts.get((model, spec.query_instruction), self.tokens_per_pair[model])


@dataclass(frozen=True)
class Plan:
    grid: Grid
    trials: tuple[PlannedTrial, ...]
    gpus_available: int  # GPUs per node the resources were planned for (0: CPU-only)
    data: DataStats
    gpu_memory: float | None = None  # bytes of one GPU the trials were sized against (None: unknown)

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.data.warnings

    @property
    def runnable(self) -> tuple[PlannedTrial, ...]:
        return tuple(t for t in self.trials if t.runnable)

    @property
    def skipped(self) -> tuple[PlannedTrial, ...]:
        return tuple(t for t in self.trials if not t.runnable)

    @property
    def total_flops(self) -> float:
        """Planned FLOP of the runnable trials (paper convention)."""
        return float(sum(t.planned_flops for t in self.runnable))

    def to_json(self) -> dict:
        """`plan --json` (docs/reference.md)."""
        return {"trials": [t.to_json() for t in self.trials], "total_flops": self.total_flops,
                "gpu_memory_gb": None if self.gpu_memory is None else self.gpu_memory / 1e9}


def knob_columns(spec: TrialSpec, lr: float | None) -> dict:
    """The store's knob columns of a trial (core/store.py): the lr it uses, its hard negatives per pair, its
    attention, its query instruction."""
    return {"lr": lr, "negatives": spec.hard_negatives, "attention": spec.attention,
            "query_instruction": spec.query_instruction}


def knob_defaults() -> dict:
    return {"negatives": default("hard_negatives"), "attention": default("attention"),
            "query_instruction": default("query_instruction")}


# --- pure policy -------------------------------------------------------------------------------------------
def skip_reason(*, pairs: float, steps: int, min_steps: int, train_pairs: int | None,
                max_epochs: float, nothing_to_train: str | None = None) -> str | None:
    """Why a cell is infeasible, or None. Both ends of the study's degenerate cells (docs/study.md): 2.8B full at
    1.5e15 is ~one batch; 14M at 1.5e18 needs ~2.7e9 pairs. ``nothing_to_train``: the method's reason when it has
    no parameter to train on this model (bias on a family without biases: Llama, Qwen3, Gemma, OLMo 2, Phi-3)."""
    if nothing_to_train:
        return nothing_to_train  # the one reason that matters
    reasons = []
    if train_pairs is not None and pairs > max_epochs * train_pairs:
        reasons.append(f"needs {short(pairs)} pairs, data has {short(train_pairs)} (max_epochs {max_epochs:g})")
    if steps < min_steps:
        reasons.append(f"{steps} optimizer steps < min_steps {min_steps}")
    return "; ".join(reasons) or None


@dataclass(frozen=True)
class Sizing:
    """Where a trial runs: Ray resources, DeepSpeed GPUs (0: one process), the share of each GPU it may fill, the
    planned checkpointing (None: decided by the trial), its estimated peak per GPU and, when nothing on a node holds
    it, why."""

    resources: dict
    deepspeed_gpus: int
    share: float = 1.0
    checkpointing: bool | None = None
    memory: int | None = None
    problem: str | None = None


def size_trial(shape: ModelShape, spec: TrialSpec, gpus_available: int, grid: Grid,
               gpu_memory: float | None = None) -> Sizing:
    """The trial's resources. ``gpus_available``: GPUs on one node, 0 = CPU-only; ``gpu_memory``: bytes of one GPU
    (None: unknown, the knobs alone decide).

    The knobs first: N below ``gpu_fraction_below_params`` takes ``gpu_fraction`` of a GPU, else a whole one; N_tr
    from ``deepspeed_from_params`` on takes ``deepspeed_gpus`` GPUs of one node (default: all) under DeepSpeed
    (gradients and AdamW's moments, 12 bytes per trainable parameter, are what ZeRO shards). So LoRA on 2.8B takes
    one GPU, full fine-tuning of 1.4B a node. Then memory: a one-process trial that its share does not hold takes
    half a GPU, a whole one, then DeepSpeed over 2, 4, ... GPUs (ZeRO-2, or the override's stage)."""
    r = grid.resources
    cpus = r.cpus_per_trial
    n, n_tr = param_counts(shape, spec.method, spec.lora_rank, spec.trainable_fraction, spec.lora_targets)
    if gpus_available <= 0:
        return Sizing({"CPU": _num(cpus)}, 0)
    if n_tr >= r.deepspeed_from_params:
        k, problem = deepspeed_ranks(spec.batch_size, gpus_available, r.deepspeed_gpus)
        if problem:
            return dataclasses.replace(_sizing(1.0, k, cpus), problem=problem)
        options = [(1.0, k)]
    else:
        first = _num(share_for(n, r.gpu_fraction, r.gpu_fraction_below_params)[0])  # a measured table, or the knobs
        options = [(f, 0) for f in sorted({first, 0.5, 1}) if f >= first]
        if gpu_memory is not None:  # what memory may need beyond one GPU: rank counts the batch splits over
            options += [(1.0, k) for k in _deepspeed_sizes(gpus_available) if spec.batch_size % k == 0]
    if gpu_memory is None:
        share, k = options[0]
        return _sizing(share, k, cpus)
    stage = _zero_stage(spec.deepspeed_config)
    tried = None
    for share, k in options:
        fp = mem.footprint(shape, spec.method, spec.max_length, lora_rank=spec.lora_rank,
                           trainable_fraction=spec.trainable_fraction, lora_targets=spec.lora_targets,
                           shards=max(k, 1), zero_stage=stage if k else 0)
        micro = spec.batch_size // max(k, 1)
        chosen = mem.choose(fp, share * gpu_memory, micro, spec.gradient_checkpointing)
        if chosen is not None:
            ckpt, chunk = chosen
            return dataclasses.replace(_sizing(share, k, cpus), checkpointing=ckpt,
                                       memory=fp.total(chunk, ckpt, one_pass=chunk >= micro))
        tried = (share, k, fp)
    share, k, fp = tried
    where = f"ZeRO-{stage} over {k} GPUs" if k else f"{share:g} of a GPU"
    hint = "; a deepspeed_config with ZeRO stage 3 shards the weights too" if k and stage < 3 else ""
    return dataclasses.replace(_sizing(share, k, cpus), memory=fp.total(1, True), problem=(
        f"does not fit in GPU memory: needs {fp.total(1, True) / 1e9:.1f} GB per GPU at the least ({where}, "
        f"checkpointing, 1 pair per chunk); a GPU has {gpu_memory / 1e9:.0f} GB{hint}"))


def deepspeed_ranks(batch_size: int, gpus_available: int, asked: int | None) -> tuple[int, str | None]:
    """(ranks, problem) of a DeepSpeed trial: each rank embeds ``batch_size / ranks`` pairs
    (workers/distributed.py), so the ranks must divide the batch. ``resources.deepspeed_gpus`` (``asked``, capped at
    the node's GPUs) is taken as it is or the trial is skipped with the reason; by default the most GPUs of one
    node that divide the batch (1024 pairs on a 6-GPU node: 4)."""
    if asked:
        k = min(asked, gpus_available)
        if batch_size % k:
            return k, (f"train.batch_size {batch_size} does not split over resources.deepspeed_gpus {k} ranks "
                       "(choose a count that divides it)")
        return k, None
    return max(k for k in range(1, gpus_available + 1) if batch_size % k == 0), None


def node_problem(resources: Mapping[str, float], nodes: list[Mapping[str, float]] | None) -> str | None:
    """Why no node of the cluster holds the trial's resources (its ranks are placed on one node: STRICT_PACK), or
    None. ``nodes``: each live node's Ray resources (None: not known, nothing checked)."""
    if not nodes or any(all(node.get(k, 0) >= v for k, v in resources.items()) for node in nodes):
        return None
    wanted = ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items()))
    largest = max(nodes, key=lambda node: (node.get("GPU", 0), node.get("CPU", 0)))
    has = ", ".join(f"{largest.get(k, 0):g} {k}" for k in sorted(resources))
    return f"no node holds the trial: it needs {wanted} on one node; the largest node has {has}"


def _sizing(share: float, k: int, cpus: float) -> Sizing:
    if k:
        return Sizing({"CPU": _num(cpus * k), "GPU": k}, k)
    return Sizing({"CPU": _num(cpus), "GPU": _num(share)}, 0, share=share)


def _deepspeed_sizes(gpus: int) -> list[int]:
    """2, 4, 8, ... up to the node's GPUs, and the node itself."""
    sizes, k = [], 2
    while k < gpus:
        sizes.append(k)
        k *= 2
    return sizes + ([gpus] if gpus > 1 else [])


def _zero_stage(override: str | None) -> int:
    """The ZeRO stage a DeepSpeed override asks for (inline JSON or a local file; 2, the default, otherwise)."""
    if not override:
        return 2
    text = override
    if not override.lstrip().startswith("{"):
        if "://" in override or not os.path.isfile(override):
            return 2  # a remote override: read by the trial; planned as the default stage
        with open(override) as f:
            text = f.read()
    try:
        return int(json.loads(text).get("zero_optimization", {}).get("stage", 2))
    except (ValueError, AttributeError, TypeError):
        return 2


def plan_trial(trial: Trial, shape: ModelShape, tokens_per_pair: float, train_pairs: int | None,
               gpus_available: int, grid: Grid, family: str | None = None,
               gpu_memory: float | None = None, nodes: list[Mapping[str, float]] | None = None) -> PlannedTrial:
    spec = trial.spec
    family = family or shape.family
    n, n_tr = param_counts(shape, spec.method, spec.lora_rank, spec.trainable_fraction, spec.lora_targets)
    cost = cost_per_token(spec.method, n, n_tr)
    tokens = tokens_for_budget(spec.budget_flops, cost)
    pairs, steps = planned_steps(tokens, tokens_per_pair, spec.batch_size)
    sizing = size_trial(shape, spec, gpus_available, grid, gpu_memory)
    if not sizing.problem and node_problem(sizing.resources, nodes):  # else a placement group Tune waits on forever
        sizing = dataclasses.replace(sizing, problem=node_problem(sizing.resources, nodes))
    nothing_to_train = methods.get(spec.method).empty_reason if n_tr == 0 else None
    reason = skip_reason(pairs=pairs, steps=steps, min_steps=grid.plan.min_steps, train_pairs=train_pairs,
                         max_epochs=grid.plan.max_epochs, nothing_to_train=nothing_to_train)
    if sizing.problem and not nothing_to_train:
        reason = "; ".join(filter(None, (reason, sizing.problem)))
    reason = attention_unsupported(family, spec.attention) or reason  # nothing else matters: it cannot run
    spec = dataclasses.replace(
        spec, planned_tokens_per_pair=tokens_per_pair, planned_tokens=tokens, planned_steps=steps,
        device_share=sizing.share,
        checkpoint_every_s=mem.checkpoint_interval_s(mem.checkpoint_bytes(n_tr), spec.checkpoint_every_s))
    checkpointing = sizing.checkpointing
    if checkpointing is None and spec.gradient_checkpointing != "auto":
        checkpointing = spec.gradient_checkpointing
    return PlannedTrial(
        trial_id=trial.trial_id, model=trial.model, family=family, spec=spec,
        n_params=n, n_trainable=n_tr, cost_per_token=cost, planned_tokens=tokens, planned_pairs=pairs,
        steps=steps, planned_flops=tokens * cost, resources=sizing.resources, deepspeed_gpus=sizing.deepspeed_gpus,
        hardware_flops=tokens * hardware_flops_per_token(shape, spec, tokens_per_pair, bool(checkpointing)),
        skip_reason=reason, memory_bytes=sizing.memory, checkpointing=checkpointing,
        lr=_trial_lr(grid, trial),
    )


def _trial_lr(grid: Grid, trial: Trial) -> float | None:
    """The trial's peak lr, 'auto' resolved from the model's config (None where it cannot be: a hub name)."""
    try:
        return resolved_lr(grid, trial.model, trial.spec.lr)
    except Exception:  # noqa: BLE001 -- the trial resolves it from the loaded model
        return None


def first_run_flops(trials) -> float:
    """Planned FLOP of the runnable trials' first runs (replicate 0): the one-seed grid's, however many seeds."""
    return float(sum(t.planned_flops for t in trials if t.runnable and t.spec.replicate == 0))


def replicates(cell: PlannedTrial, grid: Grid, numbers) -> list[PlannedTrial]:
    """Replicates ``numbers`` of a planned cell: the same plan, each with its own seed and id (replicate 0 is the
    cell as planned). The adaptive driver asks for further ones where a decision is close."""
    out = []
    for r in numbers:
        trial_id, spec = replicate_of(grid, cell.model, cell.spec, r)
        out.append(dataclasses.replace(cell, trial_id=trial_id, spec=spec))
    return out


def hardware_flops_per_token(shape: ModelShape, spec: TrialSpec, tokens_per_pair: float,
                             checkpointing: bool) -> float:
    """FLOP executed per real token of a trial (core.flops.sequence_hardware_flops at the mean text length, half
    a pair's texts: its query, its document and its hard negatives; padding and the gradient cache's extra forward
    left out): what device-hours are estimated from."""
    length = max(1, round(tokens_per_pair / (2 + spec.hard_negatives)))
    return sequence_hardware_flops(shape, spec.method, length, lora_rank=spec.lora_rank,
                                   trainable_fraction=spec.trainable_fraction, lora_targets=spec.lora_targets,
                                   checkpointing=checkpointing) / length


def default_gpus(grid: Grid) -> int:
    """What `plan` assumes without a cluster: the grid's ``resources.gpus``, CPU-only when it is ``auto``."""
    return grid.resources.gpus if isinstance(grid.resources.gpus, int) else 0


def plan_grid(grid: Grid, *, gpus_available: int | None = None, data: DataStats | None = None,
              strict_data: bool = False, gpu_memory: float | None = None,
              nodes: list[Mapping[str, float]] | None = None) -> Plan:
    """Every trial of the grid with its plan. ``gpus_available``: GPUs per node (the driver asks Ray; None:
    ``default_gpus``). ``data``: known data statistics (None: measured, see ``measure_data``). ``gpu_memory``:
    bytes of one GPU (the driver: from the cluster's accelerator type; `plan`: from ``--device``); the grid's
    ``resources.gpu_memory_gb`` wins over it. ``nodes``: the live nodes' Ray resources (the driver's cluster), so a
    trial that no node holds is skipped (None: not checked)."""
    gpus = default_gpus(grid) if gpus_available is None else gpus_available
    data = measure_data(grid, strict=strict_data) if data is None else data
    if grid.resources.gpu_memory_gb != "auto":
        gpu_memory = grid.resources.gpu_memory_gb * 1e9
    gpu_memory = gpu_memory if gpus else None
    shapes = {m: model_shape(grid.model_path(m)) for m in grid.models}
    cells = (plan_trial(t, shapes[t.model], data.pair_tokens(t.model, t.spec), data.train_pairs, gpus, grid,
                        gpu_memory=gpu_memory, nodes=nodes)
             for t in expand(grid))
    trials = tuple(r for cell in cells for r in replicates(cell, grid, range(grid.seeds)))
    return Plan(grid=grid, trials=trials, gpus_available=gpus, data=data, gpu_memory=gpu_memory)


# --- the data: measured once ------------------------------------------------------------------------------
def tokenizer_key(grid: Grid, model: str) -> str:
    """Models that share a tokenizer share a measurement: all Pythia hub models use GPT-NeoX-20B's."""
    path = grid.model_path(model)
    if path == model and pythia_size(model):
        return "pythia"
    return path


def measure_data(grid: Grid, *, strict: bool = False) -> DataStats:
    """Tokens per pair (``plan.tokens_per_pair`` or measured on ``plan.sample_pairs`` pairs once per tokenizer)
    and training pairs (``plan.train_pairs`` or counted once). Local data that is bad is a UserError; remote
    data or a tokenizer that cannot be reached here falls back (78 tokens per pair; pairs unknown) with a
    warning, unless ``strict`` (the driver: a sweep must not run on a guess)."""
    warnings: list[str] = []
    uri = grid.resolve(grid.data.train)
    train_pairs = grid.plan.train_pairs
    readable = True
    if train_pairs is None:
        try:
            from workers.pair_files import count_pairs  # torch-free (workers.pair_batches imports torch)

            train_pairs = count_pairs(uri, **negatives_kwargs(grid))
        except Exception as e:  # noqa: BLE001 -- classified below: bad input, or unreachable here
            _unreachable(e, uri, strict, "data.train")
            readable = False
            warnings.append(f"warning: cannot count the pairs in {uri} ({one_line(e)}); max_epochs not "
                            "checked (set plan.train_pairs)")
    tokens_per_pair: dict[str, float] = {}
    by_texts: dict[tuple, float] = {}
    measured: dict[tuple, tuple[float, str | None]] = {}  # (tokenizer, instruction) -> (tokens per pair, warning)
    concerns: dict[str, list[str]] = {}  # a warning -> the models it concerns: each is said once, naming them
    first, *others = grid.train.query_instruction
    for model in grid.models:
        check_instructions(grid, model, strict)
        for instruction in (first, *others):
            if grid.plan.tokens_per_pair is not None:
                value = grid.plan.tokens_per_pair
            else:
                key = (tokenizer_key(grid, model), instruction)
                if key not in measured:
                    measured[key] = _measure(grid, model, uri, readable, strict, instruction)
                value, warning = measured[key]
                if warning is not None and model not in concerns.get(warning, []):
                    concerns.setdefault(warning, []).append(model)
            if instruction == first:
                tokens_per_pair[model] = value
            else:
                by_texts[model, instruction] = value
    warnings += [warning.replace("{models}", ", ".join(models), 1) for warning, models in concerns.items()]
    if grid.data.eval is not None and (strict or "://" not in grid.data.eval):
        _check_eval(grid, strict)
    return DataStats(tokens_per_pair, train_pairs, tuple(dict.fromkeys(warnings)), by_texts)


def negatives_kwargs(grid: Grid) -> dict:
    """The data readers' ``hard_negatives`` argument where the grid takes hard negatives (none: the readers'
    default, the call it always was)."""
    k = grid.train.hard_negatives()
    return {"hard_negatives": k} if k else {}


def check_instructions(grid: Grid, model: str, strict: bool) -> None:
    """Each query instruction of the grid encodes to real tokens with ``model``'s tokenizer: one that gives no
    token, or only the unknown token, would train on nothing the user meant (a UserError, exit 2). A tokenizer
    that cannot be loaded here (a hub name offline) is checked by the driver (``strict``)."""
    instructions = [q for q in grid.train.query_instruction if q]
    if not instructions or not (strict or os.path.isdir(grid.model_path(model))):
        return  # a hub name: `plan` stays offline, the driver's strict plan checks it
    try:
        tokenizer = _load_tokenizer(grid.model_path(model))
    except Exception as e:  # noqa: BLE001 -- no tokenizer here; the driver's strict plan checks it
        if strict:
            raise UserError(f"{model}: cannot load its tokenizer ({one_line(e)})") from None
        return
    from workers.pair_files import make_encoder

    encode, unk = make_encoder(tokenizer, grid.train.max_length), getattr(tokenizer, "unk_token_id", None)
    for q in instructions:
        ids = encode([q])[0]
        if not ids or all(i == unk for i in ids):
            what = "no token" if not ids else "only unknown tokens"
            raise UserError(f"train.query_instruction: {q[:40]!r}: {model}'s tokenizer encodes it as {what}")


def _check_eval(grid: Grid, strict: bool) -> None:
    """The held-out pairs the workers will read (the first ``run.eval_pairs``): bad ones fail here, before any
    trial runs, rather than as one failed trial per cell."""
    from workers.pair_files import load_eval_pairs

    uri = grid.resolve(grid.data.eval)
    try:
        pairs = load_eval_pairs(uri, grid.run.eval_pairs)
    except Exception as e:  # noqa: BLE001 -- classified by _unreachable
        _unreachable(e, uri, strict, "data.eval")
        return
    if len(pairs) < 2:  # in-batch negatives: an eval batch needs two pairs, else no eval_loss at all
        raise UserError(f"data.eval: {uri}: {len(pairs)} usable pair(s); evaluation needs at least 2")


def _measure(grid: Grid, model: str, uri: str, readable: bool, strict: bool,
             query_instruction: str = "") -> tuple[float, str | None]:
    """Tokens per pair with ``model``'s tokenizer, and the warning when it fell back to the authors' constant, with
    ``{models}`` where the caller names every model it concerns (unreadable data is one problem, not one per model;
    a tokenizer's is its models')."""
    fallback = (f"with {FALLBACK_TOKENS_PER_PAIR:g} tokens per pair (the authors' constant; "
                "set plan.tokens_per_pair)")
    if not readable:
        return FALLBACK_TOKENS_PER_PAIR, f"warning: cannot read {uri}: planning {{models}} {fallback}"
    try:
        from workers.pair_files import measure_tokens_per_pair

        tokenizer = _load_tokenizer(grid.model_path(model))
    except Exception as e:  # noqa: BLE001 -- no tokenizer here (offline hub, no tokenizer files)
        if strict:
            raise UserError(f"{model}: cannot load its tokenizer ({one_line(e)})") from None
        return FALLBACK_TOKENS_PER_PAIR, (f"warning: cannot load the tokenizer of {{models}} ({one_line(e)}): "
                                          f"planning {fallback}")
    try:
        texts = negatives_kwargs(grid) | ({"query_instruction": query_instruction} if query_instruction else {})
        return measure_tokens_per_pair(uri, tokenizer, grid.train.max_length, sample=grid.plan.sample_pairs,
                                       **texts), None
    except Exception as e:  # noqa: BLE001
        _unreachable(e, uri, strict, "data.train")
        return FALLBACK_TOKENS_PER_PAIR, f"warning: cannot read {uri} ({one_line(e)}): planning {{models}} {fallback}"


def _load_tokenizer(path: str):
    """The model's tokenizer without torch (AutoTokenizer imports it); it counts what the trial's does."""
    from workers.pair_files import load_tokenizer  # lazy: the driver stays light

    return load_tokenizer(path)


def _unreachable(e: Exception, uri: str, strict: bool, field: str) -> None:
    """Re-raise what is the user's to fix: any problem with local data, any problem at all when strict. A local
    file's problem names the grid field too (``data.train: /d/x.jsonl: no usable pairs``); a remote one stays
    ``<uri>: <problem>``."""
    if strict or "://" not in uri:
        problem = one_line(e) if uri in str(e) else f"{uri}: {one_line(e)}"
        raise UserError(problem if "://" in uri else f"{field}: {problem}") from None


# --- numbers as people read them ---------------------------------------------------------------------------
def short(x: float) -> str:
    """1273.4 -> '1273', 2.7e9 -> '2.7e9' (no '+', no leading zeros in the exponent)."""
    if abs(x) < 1e4:
        return f"{x:.0f}"
    mantissa, exp = f"{x:.1e}".split("e")
    return f"{mantissa}e{int(exp)}"


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def utilisation_of(trial: PlannedTrial, mfu: float | None) -> float:
    """The fraction of the device's peak a trial's hardware FLOP are assumed to run at: ``plan --mfu`` where given,
    else the figure measured for its size (core/throughput.py ``assumed_utilisation``)."""
    return mfu if mfu else assumed_utilisation(trial.n_params)[0]


def utilisation_note(plan: Plan, mfu: float | None) -> list[str]:
    """The plan's lines saying which utilisation its hours assume, and which GPU fraction small trials share."""
    if mfu:
        lines = [f"hours at {mfu:.0%} MFU (--mfu) of the hardware FLOP"]
    else:
        sizes = {}
        for t in plan.runnable:
            sizes.setdefault(t.model, assumed_utilisation(t.n_params))
        lines = ["hours at the utilisation measured per model size (core/throughput.py; plan --mfu F overrides): "
                 + "; ".join(f"{model} {value:.2f} ({source})" for model, (value, source) in sizes.items())]
    r = plan.grid.resources
    if plan.gpus_available:
        fraction, why = share_for(0, r.gpu_fraction, r.gpu_fraction_below_params)  # the smallest model's share
        lines.append(f"GPU sharing: trials with N < {r.gpu_fraction_below_params:.3g} take {fraction:g} of a GPU "
                     f"({why}; the rule: "
                     "the fraction with the most real tokens/s per GPU in the measured table, core/throughput.py)")
    return lines
