"""core/throughput.py's rules with hand numbers: the utilisation plan assumes per size, the GPU fraction small trials
share, and the compile break-even."""
from __future__ import annotations

import pytest

from core import throughput as tp
from core.throughput import (assumed_utilisation, best_fraction, compile_decision, compile_pays, share_for)


def test_assumed_utilisation_by_size():
    # the H200 rows: 160m 0.18, 410m 0.25, 1b 0.20, 1.4b 0.21; between rows the row below; outside, the nearest
    assert assumed_utilisation(85_056_000)[0] == 0.18
    assert assumed_utilisation(18_915_328)[0] == 0.18  # 70m: below the table, its first row
    assert assumed_utilisation(302_311_424)[0] == 0.25
    assert assumed_utilisation(500e6)[0] == 0.25
    assert assumed_utilisation(805_736_448)[0] == 0.20
    assert assumed_utilisation(6.9e9)[0] == 0.21
    value, source = assumed_utilisation(302_311_424)
    assert "pythia-410m" in source and "measured" in source and "H200" in source


def test_best_fraction_by_hand():
    # 4 trials at 0.25 deliver 2.4x one alone, 8 at 0.125 2.5x (under 10 % more than 2.4x): 0.25
    table = ((1.0, 1.0), (0.5, 1.6), (0.25, 2.4), (0.125, 2.5))
    assert best_fraction(table) == 0.25
    # memory: 0.25 does not hold the trial, 0.5 does
    assert best_fraction(table, fits=lambda f: f >= 0.5) == 0.5
    # no gain from sharing: a whole GPU
    assert best_fraction(((1.0, 1.0), (0.5, 1.05), (0.25, 1.0))) == 1.0
    # 0.5 is no gain but 0.25 is (contention then overlap): still found, against the best so far
    assert best_fraction(((1.0, 1.0), (0.5, 1.02), (0.25, 1.5))) == 0.25


def test_share_without_a_measured_table_keeps_the_grid_knob(monkeypatch):
    assert not any(t.measured for t in tp.SHARING)  # no GPU measurement yet: the default claims no gain
    assert share_for(18.9e6, 0.25, 1e8)[0] == 0.25
    assert share_for(302e6, 0.25, 1e8) == (1.0, "a whole GPU (N >= resources.gpu_fraction_below_params)")
    measured = tp.Sharing(1e8, ((1.0, 1.0), (0.5, 1.7), (0.25, 2.3), (0.125, 2.4)), True, "H100, by hand")
    monkeypatch.setattr(tp, "SHARING", (measured,))
    fraction, why = share_for(18.9e6, 0.5, 1e8)
    assert fraction == 0.25 and "measured" in why
    assert share_for(302e6, 0.5, 1e8)[0] == 1.0  # above the table's sizes: the grid's knobs


def test_compile_break_even_by_hand():
    # 0.3 s eager steps, 1.25x faster compiled: 0.3 x (1 - 1/1.25) = 0.06 s saved a step; 3 shapes x 60 s = 180 s
    # of compiling: the break-even is 3,000 steps
    assert not compile_pays(3000, 0.3, compile_s_per_shape=60.0, speedup=1.25, shapes=3)
    assert compile_pays(3001, 0.3, compile_s_per_shape=60.0, speedup=1.25, shapes=3)
    assert not compile_pays(10**6, 0.3, speedup=1.0)  # no speed-up: never
    assert not compile_pays(10**6, 0.0)


def test_compile_switch():
    assert compile_decision(True, "cpu", 1, 0.0) and compile_decision("true", "cpu", 1, 0.0)
    assert not compile_decision(False, "cuda", 10**6, 1.0)
    assert not compile_decision("auto", "cpu", 10**6, 1.0)  # eager on CPU (and in tests)
    assert compile_decision("auto", "cuda", 10**6, 1.0)
    assert not compile_decision("auto", "cuda", 10, 0.3)
    with pytest.raises(ValueError, match="compile"):
        from core.spec import TrialSpec

        TrialSpec(model="m", method="full", budget_flops=1.0, train_data="x", compile="sometimes")
