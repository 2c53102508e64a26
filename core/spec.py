"""The trial's typed, frozen configuration: everything that defines one fine-tuning run.

The driver builds it from a validated grid; tests build it directly. Fields that change the result
define the trial (``identity()``, hashed into the trial id by ``trial_id``); runtime knobs (reporting cadence,
checkpoint interval, chunk size of the exact gradient cache) do not. The fields' defaults are the grid's
defaults (orchestrator/grid.py reads them with ``default``); values are validated at the grid's edge, and
``__post_init__`` keeps only the invariants that make a spec meaningful.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from core import methods
from core.errors import UserError
from core.hashing import json_hash
from core.models import LORA_TARGETS

BATCHING = ("random", "length_buckets")
KEEP_WEIGHTS = ("trainable", "none")
# mean over real tokens (the study's); last: the EOS appended to every text, its hidden state (Qwen3-Embedding,
# E5-Mistral); weighted_mean: SGPT's position-weighted mean, w_i = i / sum_j j (Muennighoff 2022)
POOLINGS = ("mean", "last", "weighted_mean")
# texts packed in rows without padding (workers/packing.py): auto = where the family packs; speed, not results
PACKINGS = ("auto", "on", "off")
# causal: the family's own mask (the paper's); bidirectional: every token attends to every real token of its text
# (LLM2Vec, NV-Embed), for the families whose attention takes a replaced mask (workers/packing.py "Attention")
ATTENTIONS = ("causal", "bidirectional")
TRIAL_ID_HEX = 16
# the families whose every layer's mask comes from transformers' create_causal_mask, which the bidirectional
# attention overlays (workers/packing.py "Attention"); the others' bidirectional cells are planned skipped
BIDIRECTIONAL_FAMILIES = ("gpt_neox", "llama", "qwen2", "qwen3", "olmo2")


def attention_unsupported(family: str, attention: str = "bidirectional") -> str | None:
    """Why a model of ``family`` cannot train with ``attention``; None when it can."""
    if attention == "causal" or family in BIDIRECTIONAL_FAMILIES:
        return None
    return (f"attention bidirectional: model_type {family!r} does not build its mask with create_causal_mask alone "
            f"(sliding-window layers or a per-config mask; bidirectional: {', '.join(BIDIRECTIONAL_FAMILIES)})")

# Defaults are the paper's (docs/study.md, "Training recipe").
BATCH_SIZE = 1024
TEMPERATURE = 0.025  # InfoNCE tau; logits scaled by 40
MAX_LENGTH = 75
WARMUP_FRACTION = 0.1
WEIGHT_DECAY = 0.1

# Knobs that change how a trial runs but not what it computes.
RUNTIME_FIELDS = ("chunk_size", "report_every", "report_every_s", "checkpoint_every_s", "save_model",
                  "keep_weights", "weights_uri", "token_cache", "planned_tokens_per_pair", "planned_tokens", "planned_steps", "num_threads",
                  "prefetch_batches", "deepspeed_config", "device_share", "packing", "compile")
# Identity fields added after sweeps existed: in the identity only when not at their default (ids stay stable).
ADDED_FIELDS = ("batching", "pooling", "replicate", "query_instruction", "hard_negatives", "attention")
# A DeepSpeed override may tune how the engine runs (ZeRO stage, offload, buckets, communication), not what the
# trial computes: these keys are the trial's (its fields, or fixed by workers/distributed.py's loop).
DEEPSPEED_TRIAL_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                        "managed_gradient_accumulation", "optimizer", "scheduler", "gradient_clipping", "fp16",
                        "bf16", "torch_autocast", "amp", "communication_data_type")  # gradients reduce in fp32


@dataclass(frozen=True)
class TrialSpec:
    model: str  # HF name or local path of a GPT-NeoX checkpoint
    method: str  # a core.methods record's name: full | freeze | bias | lora
    budget_flops: float  # paper convention
    train_data: str  # BGE JSONL or Parquet: path, glob or s3:// / gs:// URI
    eval_data: str | None = None
    lora_rank: int | None = None
    trainable_fraction: float | None = None
    lora_alpha: float | None = None  # None: peft's default, as the authors' code
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    # random: the paper's batches, a seeded random sample padded to their longest; length_buckets: pairs of similar
    # length batched together (less padding, but in-batch negatives are no longer random: ~0.1 nats worse eval
    # loss, benchmarks/README.md), an opt-in that is part of the trial's identity
    batching: str = "random"
    pooling: str = "mean"
    batch_size: int = BATCH_SIZE
    temperature: float = TEMPERATURE
    max_length: int = MAX_LENGTH
    lr: float | None = None  # None: 'auto' = Pythia pretraining lr / 10
    # the knobs of train.negatives / attention / query_instruction (docs/reference.md "Knobs"); each at its default
    # is today's trial and stays out of the identity (ADDED_FIELDS)
    hard_negatives: int = 0  # k mined negatives per pair from the data's `neg` lists; 0: in-batch negatives only
    attention: str = "causal"
    query_instruction: str = ""  # prepended to every query (never to documents); "": none
    warmup_fraction: float = WARMUP_FRACTION
    weight_decay: float = WEIGHT_DECAY
    seed: int = 0  # train.seed + replicate (``replicate_seed``): a replicate's own data order and initialisation
    # which run of its cell this is: 0 the cell's first (the id of a sweep without replicates), 1, 2, ... further
    # runs of the same cell with their own seed, so the run-to-run spread can be measured (grid key ``seeds``)
    replicate: int = 0
    max_epochs: float = 1.0  # more passes over the training pairs than this: planned as skipped
    # auto: only when the memory model (core/memory.py) needs it, decided by the trial from its device; true/false
    # force it. It recomputes, it does not change results; ids hash "auto" as true, the default it replaced.
    gradient_checkpointing: bool | str = "auto"
    precision: str = "auto"  # auto (bf16 autocast where the hardware has it) | bf16 | fp32
    eval_every: int = 0  # optimizer steps between evaluations; 0: at the end only
    eval_pairs: int = 4096  # held-out pairs used (the first ones of the eval file)
    # torch.compile of the decoder blocks (core/throughput.py compile_decision): auto = on CUDA where the trial's
    # planned steps pass the break-even, true / false force it; how it runs, not what it computes
    compile: bool | str = "auto"
    # runtime knobs
    chunk_size: int | None = None  # gradient-cache sub-batch (pairs); None: automatic from memory
    # a sub-batch's texts packed in rows, no padding (workers/packing.py): the padded step's results up to float
    # rounding; auto: where the model's family packs, on: always (an error where it cannot), off: padded
    packing: str = "auto"
    report_every: int = 1  # optimizer steps between metrics rows
    # seconds between events to ``report`` (rows batched in between; evaluations, restarts and the end are sent
    # at once): under Ray Tune every report is a round trip to the driver during which training waits
    report_every_s: float = 1.0
    checkpoint_every_s: float = 60.0
    save_model: bool = False
    keep_weights: str = "trainable"  # trainable: a completed trial keeps what it trained under <sweep>/models/; none
    weights_uri: str | None = None  # where it keeps them: <sweep>/models/<trial_id>, set by the driver; None: nowhere
    # the token cache the trial reads its pairs from (workers/token_cache.py: the same batches as the raw data, no
    # tokeniser on the training path), set by the driver once `prepare` built it; None: the raw data
    token_cache: str | None = None
    planned_tokens_per_pair: float | None = None  # from the planner; measured on the data when None
    planned_tokens: int | None = None  # from the planner (core.flops.tokens_for_budget); reported as planned_tokens
    planned_steps: int | None = None  # from the planner (core.flops.planned_steps); reported as planned_steps
    num_threads: int | None = None
    prefetch_batches: int = 4
    # DeepSpeed trials (planned with deepspeed_gpus > 0): a JSON object, inline or a path / s3:// / gs:// URI,
    # merged over the default engine config (ZeRO 2). A runtime knob: ZeRO stage, offload and buckets move
    # tensors, not results; the keys that would change results are the trial's and rejected
    # (DEEPSPEED_TRIAL_KEYS above).
    deepspeed_config: str | None = None
    # the share of its GPU the trial may fill (a fractional GPU's fraction; 1 for a whole one), set by the planner:
    # what the trial sizes its chunk against (core/memory.py), not the memory other trials left free
    device_share: float = 1.0

    def __post_init__(self):
        # invariants only (values are validated at the grid's edge): what makes the method's fields meaningful
        record = methods.get(self.method)
        for name in methods.HPARAM_FIELDS:
            if (record.hparam == name) != (getattr(self, name) is not None):
                owners = " and ".join(m for m in methods.names() if methods.get(m).hparam == name)
                raise ValueError(f"{name}: required for method {owners} and only for it")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling: {self.pooling!r} is not one of {', '.join(POOLINGS)}")
        if self.packing not in PACKINGS:
            raise ValueError(f"packing: {self.packing!r} is not one of {', '.join(PACKINGS)}")
        if self.keep_weights not in KEEP_WEIGHTS:
            raise ValueError(f"keep_weights: {self.keep_weights!r} is not one of {', '.join(KEEP_WEIGHTS)}")
        if self.gradient_checkpointing not in (True, False, "auto"):
            raise ValueError(f"gradient_checkpointing: {self.gradient_checkpointing!r} is not auto, true or false")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention: {self.attention!r} is not one of {', '.join(ATTENTIONS)}")
        if self.hard_negatives < 0:
            raise ValueError(f"hard_negatives: must be >= 0, got {self.hard_negatives}")
        if isinstance(self.replicate, bool) or not isinstance(self.replicate, int) or self.replicate < 0:
            raise ValueError(f"replicate: a non-negative integer (got {self.replicate!r})")
        if self.compile not in (True, False, "auto"):
            raise ValueError(f"compile: {self.compile!r} is not auto, true or false")
        if self.batching not in BATCHING:
            raise ValueError(f"batching: {self.batching!r} is not one of {', '.join(BATCHING)}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrialSpec":
        d = dict(d)
        if "lora_targets" in d:
            d["lora_targets"] = tuple(d["lora_targets"])
        return cls(**d)

    def identity(self) -> dict:
        """The fields that define the trial's result (hashed into its id). A field added after sweeps existed
        enters only when it is not its default (``batching``; ``replicate`` 0, a cell's first run), so those sweeps
        keep their ids."""
        d = {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}
        for name in ADDED_FIELDS:
            if d[name] == default(name):
                del d[name]
        if d["gradient_checkpointing"] == "auto":  # ids made when true was the default stay (the same results)
            d["gradient_checkpointing"] = True
        return d

    def trial_id(self) -> str:
        return trial_id(self.identity())


def replicate_seed(base_seed: int, replicate: int) -> int:
    """The seed of a cell's replicate: the grid's ``train.seed`` for the first, then one up per replicate."""
    return int(base_seed) + int(replicate)


def default(name: str):
    """A TrialSpec field's default: the grid's default for the same key."""
    return TrialSpec.__dataclass_fields__[name].default


def trial_id(identity: dict) -> str:
    """Short sha256 of the canonical JSON of a trial's identity (sorted keys, no spaces, repr floats)."""
    return json_hash(identity, hex_chars=TRIAL_ID_HEX)


class DeepSpeedConfigError(UserError):
    """A DeepSpeed override that cannot be used; the message names it and the key."""


def parse_deepspeed_override(text: str, name: str = "deepspeed_config") -> dict:
    """A DeepSpeed override's JSON text -> the checked object (``check_deepspeed_override``)."""
    try:
        override = json.loads(text)
    except json.JSONDecodeError as e:
        raise DeepSpeedConfigError(f"deepspeed_config: {name[:80]}: not JSON ({e})") from None
    check_deepspeed_override(override, name)
    return override


def check_deepspeed_override(override, name: str = "deepspeed_config") -> None:
    """An override may tune how the engine runs, never what the trial computes (DEEPSPEED_TRIAL_KEYS)."""
    if not isinstance(override, dict):
        raise DeepSpeedConfigError(f"deepspeed_config: {name[:80]}: must be a JSON object")
    for key in override:
        if key in DEEPSPEED_TRIAL_KEYS:
            raise DeepSpeedConfigError(f"deepspeed_config.{key}: set by the trial (its spec), not by an override")
