"""The store's tables (shared/CONTRACTS.md): column names and Arrow types, shared by writer and readers.

Only pyarrow here: the driver writes with these schemas, analysis reads with them.
"""
from __future__ import annotations

import pyarrow as pa

TRIAL_STATUSES = ("pending", "running", "completed", "failed", "skipped")

TRIALS_SCHEMA = pa.schema(
    [
        ("sweep", pa.string()),
        ("trial_id", pa.string()),
        ("model", pa.string()),
        ("method", pa.string()),
        ("lora_rank", pa.int64()),
        ("trainable_fraction", pa.float64()),
        ("budget_flops", pa.float64()),
        ("n_params", pa.int64()),
        ("n_trainable", pa.int64()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("tokens", pa.int64()),
        ("steps", pa.int64()),
        ("flops", pa.float64()),
        ("hardware_flops", pa.float64()),
        ("eval_loss", pa.float64()),
        ("train_loss", pa.float64()),
        ("wall_s", pa.float64()),
        # extensions (CONTRACTS.md allows new columns)
        ("planned_tokens", pa.int64()),
        ("planned_steps", pa.int64()),
        ("bad_lines", pa.int64()),
        ("padding_fraction", pa.float64()),
        ("updated_at", pa.float64()),
        ("node_id", pa.string()),  # the Ray node the trial (last) ran on
        ("train_s", pa.float64()),  # time inside optimizer steps; wall_s - train_s is the trial's overhead
    ]
)

METRICS_SCHEMA = pa.schema(
    [
        ("sweep", pa.string()),
        ("trial_id", pa.string()),
        ("step", pa.int64()),
        ("tokens", pa.int64()),
        ("flops", pa.float64()),
        ("train_loss", pa.float64()),
        ("lr", pa.float64()),
        ("wall_s", pa.float64()),
        ("eval_loss", pa.float64()),
        ("tokens_per_s", pa.float64()),
        # extension
        ("hardware_flops", pa.float64()),
    ]
)

TRIALS_COLUMNS = tuple(TRIALS_SCHEMA.names)
METRICS_COLUMNS = tuple(METRICS_SCHEMA.names)
# The columns CONTRACTS.md lists (a test checks the writer against them).
CONTRACT_TRIALS_COLUMNS = TRIALS_COLUMNS[:18]
CONTRACT_METRICS_COLUMNS = METRICS_COLUMNS[:10]

TRIALS_FILE = "trials.parquet"
METRICS_DIR = "metrics"
GRID_FILE = "grid.yaml"
