"""The store's tables as pyarrow schemas, for the readers. Names, types and paths are core/store.py's (the writer,
orchestrator/store.py, builds the same schemas from them)."""
from __future__ import annotations

from fsio import arrow_schema
from core.store import (COMPLETED, CONTRACT_METRIC_COLUMNS, CONTRACT_TRIAL_COLUMNS, GRID_FILE, METRIC_COLUMNS,
                        METRIC_NAMES, METRICS_DIR, TRIAL_COLUMNS, TRIAL_NAMES, TRIAL_STATUSES, TRIALS_FILE)

TRIALS_SCHEMA = arrow_schema(TRIAL_COLUMNS)
METRICS_SCHEMA = arrow_schema(METRIC_COLUMNS)
TRIALS_COLUMNS, METRICS_COLUMNS = TRIAL_NAMES, METRIC_NAMES
CONTRACT_TRIALS_COLUMNS, CONTRACT_METRICS_COLUMNS = CONTRACT_TRIAL_COLUMNS, CONTRACT_METRIC_COLUMNS

__all__ = ["COMPLETED", "CONTRACT_METRICS_COLUMNS", "CONTRACT_TRIALS_COLUMNS", "GRID_FILE", "METRICS_COLUMNS",
           "METRICS_DIR", "METRICS_SCHEMA", "TRIALS_COLUMNS", "TRIALS_FILE", "TRIALS_SCHEMA", "TRIAL_STATUSES"]
