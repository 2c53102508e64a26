"""The trial's typed, frozen configuration: everything that defines one fine-tuning run.

The driver builds it from a validated grid; tests build it directly. Fields that change the result
define the trial (``identity()``, hashed into the trial id); runtime knobs (reporting cadence,
checkpoint interval, chunk size of the exact gradient cache) do not.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from workers.flops import LORA_TARGETS, METHODS

# Defaults are the paper's (PAPER.md, "Training recipe").
BATCH_SIZE = 1024
TEMPERATURE = 0.025  # InfoNCE tau; logits scaled by 40
MAX_LENGTH = 75
WARMUP_FRACTION = 0.1
WEIGHT_DECAY = 0.1

# Knobs that change how a trial runs but not what it computes.
RUNTIME_FIELDS = ("chunk_size", "report_every", "report_every_s", "checkpoint_every_s", "save_model", "planned_tokens_per_pair",
                  "num_threads", "prefetch_batches", "deepspeed_config")
# A DeepSpeed override may tune how the engine runs (ZeRO stage, offload, buckets, communication), not what the
# trial computes: these keys are the trial's (its fields, or fixed by workers/distributed.py's loop).
DEEPSPEED_TRIAL_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                        "managed_gradient_accumulation", "optimizer", "scheduler", "gradient_clipping", "fp16",
                        "bf16", "torch_autocast", "amp")


@dataclass(frozen=True)
class TrialSpec:
    model: str  # HF name or local path of a GPT-NeoX checkpoint
    method: str  # full | freeze | bias | lora
    budget_flops: float  # paper convention
    train_data: str  # BGE JSONL or Parquet: path, glob or s3:// / gs:// URI
    eval_data: str | None = None
    lora_rank: int | None = None
    trainable_fraction: float | None = None
    lora_alpha: float | None = None  # None: peft's default, as the authors' code
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    batch_size: int = BATCH_SIZE
    temperature: float = TEMPERATURE
    max_length: int = MAX_LENGTH
    lr: float | None = None  # None: 'auto' = Pythia pretraining lr / 10
    warmup_fraction: float = WARMUP_FRACTION
    weight_decay: float = WEIGHT_DECAY
    seed: int = 0
    max_epochs: float = 1.0
    gradient_checkpointing: bool = True
    precision: str = "auto"  # auto (bf16 autocast where the hardware has it) | bf16 | fp32
    eval_every: int = 0  # optimizer steps between evaluations; 0: at the end only
    eval_pairs: int = 4096  # held-out pairs used (the first ones of the eval file)
    # runtime knobs
    chunk_size: int | None = None  # gradient-cache sub-batch (pairs); None: automatic from memory
    report_every: int = 1  # optimizer steps between metrics rows
    # seconds between events to ``report`` (rows batched in between; evaluations, restarts and the end are sent
    # at once): under Ray Tune every report is a round trip to the driver during which training waits
    report_every_s: float = 1.0
    checkpoint_every_s: float = 60.0
    save_model: bool = False
    planned_tokens_per_pair: float | None = None  # from the planner; measured on the data when None
    num_threads: int | None = None
    prefetch_batches: int = 4
    # DeepSpeed trials (planned with deepspeed_gpus > 0): a JSON object, inline or a path / s3:// / gs:// URI,
    # merged over the default engine config (ZeRO 2). A runtime knob: ZeRO stage, offload and buckets move
    # tensors, not results; the keys that would change results are the trial's and rejected
    # (DEEPSPEED_TRIAL_KEYS above).
    deepspeed_config: str | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        if (self.method == "lora") != (self.lora_rank is not None):
            raise ValueError("lora_rank: required for method lora and only for it")
        if (self.method == "freeze") != (self.trainable_fraction is not None):
            raise ValueError("trainable_fraction: required for method freeze and only for it")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError("lora_rank: must be >= 1")
        if self.trainable_fraction is not None and not 0 < self.trainable_fraction <= 1:
            raise ValueError("trainable_fraction: must be in (0, 1]")
        if self.budget_flops <= 0:
            raise ValueError("budget_flops: must be > 0")
        if self.batch_size < 2:
            raise ValueError("batch_size: must be >= 2 (in-batch negatives)")
        if self.temperature <= 0:
            raise ValueError("temperature: must be > 0")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError("precision: must be auto, bf16 or fp32")
        if self.deepspeed_config is not None and self.deepspeed_config.lstrip().startswith("{"):
            try:
                override = json.loads(self.deepspeed_config)
            except json.JSONDecodeError as e:
                raise ValueError(f"deepspeed_config: not a JSON object ({e})") from None
            if not isinstance(override, dict):
                raise ValueError("deepspeed_config: not a JSON object")
            owned = sorted(set(override) & set(DEEPSPEED_TRIAL_KEYS))
            if owned:
                raise ValueError(f"deepspeed_config.{owned[0]}: set by the trial (its spec), not by an override")

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
        """The fields that define the trial's result (hashed into its id)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}
