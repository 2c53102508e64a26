from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "analysis"))

import storegen  # noqa: E402


@pytest.fixture
def tiny_store(tmp_path):
    """(storage, sweep name) of a real store written like the driver writes one: full fine-tuning, 4 x 3 trials."""
    trials = storegen.make_trials(slices={"full": (None,)}, models=tuple(storegen.PYTHIA)[:4],
                                  budgets=storegen.BUDGETS[:3], seed=3)
    storegen.write_store(tmp_path, trials, sweep="tiny")
    return str(tmp_path), "tiny"
