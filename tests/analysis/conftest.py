"""Fixtures for the analysis tests: synthetic stores (storegen.py); S3 is the shared ``moto_s3`` (tests/conftest.py)."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # `import storegen` whatever pytest's import mode

import storegen  # noqa: E402


@pytest.fixture
def small_store(tmp_path):
    """Full fine-tuning only, 4 models x 3 budgets: enough for every fit, quick to fit."""
    trials = storegen.make_trials(slices={"full": (None,)}, models=tuple(storegen.PYTHIA)[:4],
                                  budgets=storegen.BUDGETS[:3], seed=3)
    return storegen.write_store(tmp_path, trials)
