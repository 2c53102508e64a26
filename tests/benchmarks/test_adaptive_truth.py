"""benchmarks/adaptive.py's ground truth is written in the store's terms: a LoRA cell's N counts its adapters (as
the store and every fit do, docs/study.md), so the truth is a surface the analysis can represent and the
benchmark measures the policy, not a mismatch between the truth's N and the fit's. Quick: no replay."""
from __future__ import annotations

import math

import pytest

from analysis.fit import fit_surface, split_usable
from benchmarks.adaptive import TRUTHS, grid_cells, make_store, true_loss

LATE = TRUTHS[2]  # "late winner": LoRA E=0.3743, A=150, alpha=0.32, B=100, beta=0.28; B +2 % per octave of rank


def test_a_lora_cells_truth_counts_its_adapters_in_n():
    cells = grid_cells()
    row = cells[cells["trial_id"] == "lora-8-70m-6e+15"]
    # pythia-70m: 6 blocks of width 512 (MLP 2048); LoRA r=8 on query_key_value 512->1536, dense 512->512,
    # dense_h_to_4h 512->2048, dense_4h_to_h 2048->512: 6 * 8 * (2048 + 1024 + 2560 + 2560) = 393,216 adapters
    # on the base's 18,915,328 non-embedding parameters
    n = 18_915_328 + 393_216
    assert int(row["n_params"].iloc[0]) == n and int(row["n_trainable"].iloc[0]) == 393_216
    tokens = 6e15 // (4 * n + 2 * 393_216)  # LoRA's 4N + 2N_tr FLOP per token
    b = 100.0 * (1 + 0.02 * math.log2(128 / 8))  # rank 8 is 4 octaves from 128
    expected = 0.3743 + 150.0 / n ** 0.32 + b / tokens ** 0.28
    assert true_loss(LATE, row)[0] == pytest.approx(expected, rel=1e-12)
    # with the base model's N the truth would differ (the inconsistency this guards against)
    assert abs(expected / (0.3743 + 150.0 / 18_915_328 ** 0.32 + b / tokens ** 0.28) - 1) > 1e-4


def test_the_noise_free_truth_is_a_surface_the_fit_recovers():
    """The LoRA r=128 slice of the noise-free store, fitted on the store's N and D, gives back the truth's law with
    no residual (with the base model's N in the truth no surface fits it exactly). Warm-started from a generic
    point (two minimisations, not the full grid of starts): quick."""
    store = make_store(LATE, 0.0, 0)
    usable, _ = split_usable(store[(store["method"] == "lora") & (store["lora_rank"] == 128)])
    surface = fit_surface(usable, method="lora", hparam=128.0, n_boot=0, start=(0.5, 100.0, 0.3, 50.0, 0.3))
    assert surface.params == pytest.approx([0.3743, 150.0, 0.32, 100.0, 0.28], rel=1e-4)
    assert surface.max_rel_err < 1e-6
