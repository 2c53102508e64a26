"""docs/reference.md documents the whole public surface: every grid key, every store column, every command."""
from __future__ import annotations

import os
import re

from pydantic import BaseModel

from core.store import METRIC_NAMES, TRIAL_NAMES
from orchestrator import cli
from orchestrator.grid import Grid

REFERENCE = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "reference.md")


def reference() -> str:
    with open(REFERENCE, encoding="utf-8") as f:
        return f.read()


def grid_keys(cls: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in cls.model_fields.items():
        keys.append(prefix + name)
        for arg in (*getattr(field.annotation, "__args__", ()), field.annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                keys += grid_keys(arg, f"{prefix}{name}.")
    return keys


def test_every_grid_key_is_documented():
    doc = reference()
    keys = grid_keys(Grid)
    assert "train.batching" in keys and "methods.lora.rank" in keys  # the walk reaches nested sections
    missing = [k for k in keys if f"`{k}`" not in doc]
    assert not missing, f"docs/reference.md lacks grid keys: {missing}"


def test_every_store_column_is_documented():
    doc = reference()
    trials = doc[doc.index("`trials.parquet`, one row per trial"):doc.index("`metrics/`: one row per reported step")]
    metrics = doc[doc.index("`metrics/`: one row per reported step"):]
    assert not [c for c in TRIAL_NAMES if f"`{c}`" not in trials]
    assert not [c for c in METRIC_NAMES if f"`{c}`" not in metrics]


def test_every_command_is_documented():
    doc = reference()
    for command in cli.COMMANDS:
        assert re.search(rf"`repurpose {command}\b", doc), command
    assert "`repurpose plan" in doc
