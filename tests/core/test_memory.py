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


def test_zero_buffers_by_hand():
    """DeepSpeed ZeRO's own buffers: the fp32 master partition (4 bytes per trainable parameter over the ranks) and,
    under ZeRO 1/2, the 4-byte gradient bucket of reduce_bucket_size elements (5e8 by default: 2 GB)."""
    from core.memory import zero_buffer_bytes

    n_tr = 805_736_448  # Pythia-1b full fine-tuning
    # ZeRO-2 over 8 ranks: 4 x 805,736,448 / 8 = 402,868,224 + 2e9 = 2,402,868,224
    assert zero_buffer_bytes(n_tr, 8, 2) == 2_402_868_224
    # one rank (DeepSpeed over one GPU still keeps both): 3,222,945,792 + 2e9 = 5,222,945,792
    assert zero_buffer_bytes(n_tr, 1, 1) == 5_222_945_792
    assert zero_buffer_bytes(n_tr, 8, 3) == 402_868_224  # ZeRO-3: the master partition, no ZeRO 1/2 bucket
    assert zero_buffer_bytes(n_tr, 8, 2, reduce_bucket_elements=10**6) == 402_868_224 + 4_000_000
    assert zero_buffer_bytes(7, 2, 2, reduce_bucket_elements=0) == 16  # an odd count: 4 parameters' worth a rank
    assert zero_buffer_bytes(n_tr, 8, 0) == 0  # no DeepSpeed


def test_footprint_counts_zero_buffers_in_its_static_part():
    from core.memory import footprint
    from core.models import model_shape

    shape = model_shape("EleutherAI/pythia-1b")
    plain = footprint(shape, "full", 75, shards=8, zero_stage=2, reduce_bucket_elements=0)
    zero = footprint(shape, "full", 75, shards=8, zero_stage=2)
    assert zero.static - plain.static == 2_000_000_000  # the bucket: 5e8 fp32 elements
    assert plain.zero_buffers == 402_868_224 and footprint(shape, "full", 75).zero_buffers == 0
