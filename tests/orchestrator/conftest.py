"""Fixtures for the driver's end-to-end tests: grids on the tiny model. Each test's private Ray (the CLI in a
subprocess, stopped by marker at teardown) is tests/conftest.py's ``ray_env`` (tests/raykit.py)."""
from __future__ import annotations

import pyarrow as pa
import pytest
import yaml



# --- grids and the store -------------------------------------------------------------------------------------
@pytest.fixture
def make_grid(tmp_path, tiny_model, pairs_file, eval_file):
    """``make_grid(name, **sections) -> path``: a grid on the tiny model and the fixture data; keyword
    arguments replace top-level keys (``methods=…``, ``budgets=…``, ``run=…``)."""

    def make(name: str, filename: str | None = None, **sections) -> str:
        grid = {"name": name, "models": [tiny_model], "methods": {"bias": {}}, "budgets": [5.0e9],
                "data": {"train": pairs_file, "eval": eval_file}, "train": {"batch_size": 16},
                "plan": {"min_steps": 3}}
        grid.update(sections)
        path = tmp_path / (filename or f"{name}.yaml")
        path.write_text(yaml.safe_dump(grid, sort_keys=False))
        return str(path)

    return make


# docs/reference.md "The store", written out here (not imported from analysis.schema) so that drift fails a test.
CONTRACT_TRIALS = {
    "sweep": pa.string(), "trial_id": pa.string(), "model": pa.string(), "method": pa.string(),
    "lora_rank": pa.int64(), "trainable_fraction": pa.float64(), "budget_flops": pa.float64(),
    "n_params": pa.int64(), "n_trainable": pa.int64(), "status": pa.string(), "reason": pa.string(),
    "tokens": pa.int64(), "steps": pa.int64(), "flops": pa.float64(), "hardware_flops": pa.float64(),
    "eval_loss": pa.float64(), "train_loss": pa.float64(), "wall_s": pa.float64(),
    "family": pa.string(), "pooling": pa.string(), "recall_at_1": pa.float64(), "recall_at_10": pa.float64(),
    "mrr_at_10": pa.float64(), "ndcg_at_10": pa.float64(), "mfu": pa.float64(),
}
CONTRACT_METRICS = {
    "sweep": pa.string(), "trial_id": pa.string(), "step": pa.int64(), "tokens": pa.int64(),
    "flops": pa.float64(), "train_loss": pa.float64(), "lr": pa.float64(), "wall_s": pa.float64(),
    "eval_loss": pa.float64(), "tokens_per_s": pa.float64(),
    "recall_at_1": pa.float64(), "recall_at_10": pa.float64(), "mrr_at_10": pa.float64(), "ndcg_at_10": pa.float64(),
    "mfu": pa.float64(),
}


@pytest.fixture(scope="session")
def contract() -> tuple[dict, dict]:
    """(trials.parquet, metrics/) column -> Arrow type, in the contract's order."""
    return CONTRACT_TRIALS, CONTRACT_METRICS
