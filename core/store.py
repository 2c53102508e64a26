"""The store's layout (docs/reference.md "The store"): where each file lives and what its columns are called.

The writer (orchestrator/store.py) and the readers (analysis/load.py, status) import these names; the Arrow
types live beside them as plain strings, turned into a pyarrow schema by ``fsio.arrow_schema`` where
pyarrow is loaded anyway. A row with a key that is not a column is refused on write (a misspelt key would
otherwise become a silent null column).

    <storage>/<sweep>/grid.yaml            the resolved grid, its history, and what the planner measured (data cap)
    <storage>/<sweep>/trials.parquet       one row per trial, its latest state
    <storage>/<sweep>/metrics/<id>.parquet one row per reported step, each (trial_id, step) once
    <storage>/<sweep>/checkpoints/<id>/    a running trial's own checkpoints (safetensors + JSON)
    <storage>/<sweep>/models/<id>/         a completed trial's trained weights (safetensors + manifest.json)
    <storage>/<sweep>/analysis/            what `fit` writes by default
"""
from __future__ import annotations

from core.errors import UserError
from core.uris import join

GRID_FILE = "grid.yaml"
TRIALS_FILE = "trials.parquet"
METRICS_DIR = "metrics"
CHECKPOINTS_DIR = "checkpoints"
MODELS_DIR = "models"  # <sweep>/models/<trial_id>/: a completed trial's kept weights (workers/weights.py)
MODEL_MANIFEST = "manifest.json"  # written last: a models/<trial_id>/ without it is a save that did not finish
ANALYSIS_DIR = "analysis"

TRIAL_STATUSES = ("pending", "running", "completed", "failed", "skipped")
COMPLETED = "completed"

# retrieval on the eval pairs, each query against all eval positives (one relevant document per query)
RETRIEVAL = (("recall_at_1", "float64"), ("recall_at_10", "float64"), ("mrr_at_10", "float64"),
             ("ndcg_at_10", "float64"))
RETRIEVAL_NAMES = tuple(n for n, _ in RETRIEVAL)
# (name, Arrow type) in store order; the first CONTRACT_* of each are the contract's columns, in its order.
TRIAL_COLUMNS = (
    ("sweep", "string"), ("trial_id", "string"), ("model", "string"), ("method", "string"),
    ("lora_rank", "int64"), ("trainable_fraction", "float64"), ("budget_flops", "float64"),
    ("n_params", "int64"), ("n_trainable", "int64"), ("status", "string"), ("reason", "string"),
    ("tokens", "int64"), ("steps", "int64"), ("flops", "float64"), ("hardware_flops", "float64"),
    ("eval_loss", "float64"), ("train_loss", "float64"), ("wall_s", "float64"),
    ("family", "string"),  # the model's model_type: gpt_neox, llama, qwen3, ...
    ("pooling", "string"),  # mean | last | weighted_mean
    *RETRIEVAL,
    ("mfu", "float64"),  # flops (the paper's) / (train_s x the device's bf16 peak): what trains
    # extensions (the contract allows new columns; docs/reference.md documents each)
    ("planned_tokens", "int64"),  # the planner's tokens for the budget (core.flops.tokens_for_budget)
    ("planned_steps", "int64"),  # the planner's optimizer steps (core.flops.planned_steps)
    ("bad_lines", "int64"),  # unusable data lines skipped by the trial
    ("padding_fraction", "float64"),  # padded / all tokens the trial processed
    ("updated_at", "float64"),  # unix time of the row's last change
    ("node_id", "string"),  # the Ray node the trial (last) ran on
    ("train_s", "float64"),  # time inside optimizer steps; wall_s - train_s is the trial's overhead
    ("batching", "string"),  # random (the paper's) | length_buckets (opt-in: train.batching)
    # which run of its cell the trial is (0: the first; grid key seeds) and the seed it ran with, train.seed +
    # replicate; a store written before them reads replicate 0 and seed train.seed (analysis/load.py)
    ("replicate", "int64"),
    ("seed", "int64"),
    ("hfu", "float64"),  # hardware_flops / (train_s x the peak): recompute included, so hfu >= mfu
    # the knobs (docs/reference.md "Knobs"), null in a store written before them (= their defaults)
    ("lr", "float64"),  # the peak lr the trial used ('auto' resolved)
    ("negatives", "int64"),  # hard negatives per pair (0: in-batch only)
    ("attention", "string"),  # causal | bidirectional
    ("query_instruction", "string"),  # prepended to queries ("": none)
)
METRIC_COLUMNS = (
    ("sweep", "string"), ("trial_id", "string"), ("step", "int64"), ("tokens", "int64"), ("flops", "float64"),
    ("train_loss", "float64"), ("lr", "float64"), ("wall_s", "float64"), ("eval_loss", "float64"),
    ("tokens_per_s", "float64"),
    *RETRIEVAL,  # where evaluated (null elsewhere)
    ("mfu", "float64"),
    ("hardware_flops", "float64"),  # extension: FLOP executed up to the step, recomputation included
    ("hfu", "float64"),  # hardware_flops / (train_s so far x the peak); mfu is the paper's flops over the same
)
CONTRACT_TRIAL_COLUMNS = tuple(n for n, _ in TRIAL_COLUMNS[:25])
CONTRACT_METRIC_COLUMNS = tuple(n for n, _ in METRIC_COLUMNS[:15])
# What every store holds, since the first one: a store written before a column existed reads it as null.
REQUIRED_TRIAL_COLUMNS = CONTRACT_TRIAL_COLUMNS[:18]
REQUIRED_METRIC_COLUMNS = CONTRACT_METRIC_COLUMNS[:10]
TRIAL_NAMES = tuple(n for n, _ in TRIAL_COLUMNS)
METRIC_NAMES = tuple(n for n, _ in METRIC_COLUMNS)


class StoreError(UserError):
    """The store cannot be used (unreadable, unwritable, unknown sweep, not a sweep); the message names it."""


def sweep_uri(storage_uri: str, sweep: str) -> str:
    return join(storage_uri, sweep)


def metrics_uri(sweep: str, trial_id: str) -> str:
    """``sweep``: the sweep's URI."""
    return join(sweep, METRICS_DIR, f"{trial_id}.parquet")


def checkpoint_uri(sweep: str, trial_id: str) -> str:
    return join(sweep, CHECKPOINTS_DIR, trial_id)


def model_uri(sweep: str, trial_id: str) -> str:
    """Where a trial's kept weights live: ``<sweep>/models/<trial_id>``."""
    return join(sweep, MODELS_DIR, trial_id)


def model_uri_for_checkpoint(checkpoint: str) -> str:
    """A trial's ``<sweep>/checkpoints/<trial_id>`` -> ``<sweep>/models/<trial_id>`` (what the worker is given)."""
    head, _, trial_id = checkpoint.rstrip("/").rpartition("/")
    sweep, _, folder = head.rpartition("/")
    if folder != CHECKPOINTS_DIR or not trial_id or not sweep:
        raise ValueError(f"{checkpoint}: not <sweep>/{CHECKPOINTS_DIR}/<trial_id>")
    return model_uri(sweep, trial_id)


def data_cap_tokens(data: dict | None, model: str | None = None) -> int | None:
    """The one data cap (grid.yaml's ``data``, written by the driver from the planner's measurement): the real
    tokens ``max_epochs`` passes over the training pairs hold, for ``model``'s tokenizer (None: the largest over
    the sweep's models). None when the data were not counted."""
    data = data or {}
    pairs, per_pair = data.get("train_pairs"), data.get("tokens_per_pair") or {}
    if not pairs or not per_pair:
        return None
    tokens_per_pair = per_pair.get(model) if model in per_pair else max(per_pair.values())
    return int(pairs * tokens_per_pair * data.get("max_epochs", 1.0))

# The live driver's claim on a sweep (orchestrator/lease.py): JSON {host, pid, started_at, heartbeat_at, expiry_s,
# token}, created only if absent and renewed only by compare-and-swap (fsio/__init__.py "conditional writes").
LEASE_FILE = "lease"

# Storage-wide, beside the sweeps (sweep names never start with "_"): content-addressed token caches shared by
# sweeps, <storage>/_cache/tokens/<key>/ (workers/token_cache.py)
CACHE_DIR = "_cache"
