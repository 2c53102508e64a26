"""core/memory.py's decisions on footprints small enough to follow by hand (the per-family bytes are checked against
autograd in tests/workers/test_memory_plan.py, Pythia-1b's by hand in tests/orchestrator/test_plan.py)."""
from __future__ import annotations

from core.memory import Footprint, choose, largest_chunk

# static 100 B (the bf16 copies); 10 B a pair, 2 B checkpointed; no overhead. Totals are x 1.1.
FP = Footprint(weights=0, weight_copies=100, gradients=0, optimizer=0, per_pair=10, per_pair_checkpointed=2,
               overhead=0)


def test_one_pass_holds_two_sets_of_weight_copies():
    # the whole batch of 64 in one pass: (100 + 100 + 640) x 1.1 = 924 B
    assert FP.total(64, False, one_pass=True) == 924
    assert largest_chunk(FP, 924, 64, False) == 64
    # 900 B: not in one pass; through the gradient cache 900 / 1.1 - 100 = 718 B -> 71 pairs, capped below the
    # batch at 63 -> the power of two 32
    assert largest_chunk(FP, 900, 64, False) == 32
    assert FP.total(32, False) == 462  # (100 + 320) x 1.1


def test_checkpointing_only_below_the_minimum_chunk():
    # 250 B: 250 / 1.1 - 100 = 127 B -> 12 pairs -> 8 < 16 without; checkpointed 63 pairs -> 32
    assert choose(FP, 250, 64) == (True, 32)
    assert choose(FP, 250, 64, checkpointing=False) == (False, 8)
    # 300 B: 172 B -> 17 pairs -> 16: enough, no checkpointing
    assert choose(FP, 300, 64) == (False, 16)
    # a batch smaller than the minimum: the batch is enough (8 pairs, one pass: (200 + 80) x 1.1 = 308)
    assert choose(FP, 308, 8) == (False, 8)
    # nothing fits: 100 B is below the static part
    assert choose(FP, 100, 64) is None
