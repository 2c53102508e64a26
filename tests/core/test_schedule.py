"""The one lr schedule (core/schedule.py), by hand: on budget fractions (the trial) and on steps with a floor (the
mini suite's pretraining)."""
import pytest

from core.schedule import warmup_cosine


def test_on_steps_with_a_floor():
    # 100 steps, 10 of warmup, cosine down to 10 % of the peak
    assert warmup_cosine(0, 1, 10, 100, 0.1) == pytest.approx(0.1)  # step 0: 1 / 10 of the way up
    assert warmup_cosine(9, 10, 10, 100, 0.1) == 1.0  # the top at the end of warmup
    assert warmup_cosine(55, 56, 10, 100, 0.1) == pytest.approx(0.55)  # halfway: 0.1 + 0.9 * 0.5
    assert warmup_cosine(100, 101, 10, 100, 0.1) == pytest.approx(0.1)


def test_on_budget_fractions():
    assert warmup_cosine(0.0, 0.05, 0.1) == pytest.approx(0.5)
    assert warmup_cosine(0.55, 0.6, 0.1) == pytest.approx(0.5)  # halfway through the cosine to 0
    assert warmup_cosine(0.0, 0.01, 0.0) == 1.0  # no warmup
    assert warmup_cosine(0, 1, 1, 1) == 1.0  # one step, all warmup: no cosine to divide by zero
