"""One pass when the batch fits: the memory model (core/memory.py ``fits_one_pass``) decides from the trial's share
of its device; then the step runs one forward and backward, recomputes nothing, and counts no extra forward in its
hardware FLOP. The gradient cache stays for batches that do not fit; both paths train the same."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from test_packing import pair_batch

from core.models import ModelShape
from core.memory import fits_one_pass
from core.spec import TrialSpec
from workers import steps

pytestmark = pytest.mark.usefixtures("one_thread")

# a GPT-NeoX of hidden 64, 4 blocks, MLP 256: per token and block 24·h² = 98,304 FLOP of Linears forward
CFG = {"model_type": "gpt_neox", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
       "intermediate_size": 256, "vocab_size": 512, "rotary_pct": 0.25, "use_parallel_residual": True}


def test_the_share_decides_one_pass():
    """The same trial on a GPU: a share that holds the whole batch runs it in one pass, a smaller one in chunks."""
    shape = ModelShape.from_config(CFG)
    spec = TrialSpec(model="m", method="full", budget_flops=1e12, train_data="x", batch_size=1024)
    fp = steps.trial_footprint(shape, spec, torch.device("cuda"))
    need = fp.total(1024, False, one_pass=True)
    assert fits_one_pass(fp, need, 1024) and not fits_one_pass(fp, need - 1, 1024)
    from core.memory import choose

    assert choose(fp, need, 1024) == (False, 1024)  # one pass: chunk = the batch
    assert choose(fp, need - 1, 1024)[1] < 1024  # the gradient cache


def hand_flops(lengths: list[int], pairs: int, extra_forward: bool) -> float:
    """Full fine-tuning of CFG, padded, no checkpointing, by hand. Per token and block: Linears 24·h² forward,
    attention 2·2·t·h forward (QK^T and AV over a padded length t); backward twice each (the activations' and the
    weights' gradients; dQ, dK, d(probs), dV); the gradient cache adds one forward. Loss: 3 x 2·B²·h."""
    h, blocks = 64, 4
    total = 3 * 2.0 * pairs * pairs * h
    for t in lengths:
        forward = 24 * h * h + 4 * t * h
        total += blocks * t * forward * (4 if extra_forward else 3)
    return total


def test_one_pass_counts_no_recompute_by_hand():
    shape = ModelShape.from_config(CFG)
    batch = pair_batch()  # 6 pairs: queries padded to 5, documents to 12
    spec = TrialSpec(model="m", method="full", budget_flops=1e12, train_data="x", gradient_checkpointing=False)
    padded = [5] * 6 + [12] * 6
    assert steps.HardwareFlops(shape, spec, 6)(batch, 6) == pytest.approx(hand_flops(padded, 6, False), rel=1e-12)
    # through the gradient cache in chunks of 3, each sub-batch trimmed to its own longest text
    chunked = [5] * 6 + [12] * 3 + [10] * 3  # queries (3, 5, 2 | 4, 1, 5), documents (9, 4, 12 | 7, 3, 10)
    assert steps.HardwareFlops(shape, spec, 3)(batch, 6) == pytest.approx(hand_flops(chunked, 6, True), rel=1e-12)
    # the paper's FLOP for the same step (6·N per real token) lie below both: attention and padding are not in them
    n = shape.n_params()
    real = int(batch.q_mask.sum() + batch.d_mask.sum())
    assert 6 * n * real < steps.HardwareFlops(shape, spec, 6)(batch, 6)


def test_a_trial_takes_one_pass_where_the_batch_fits(tiny_model, pairs_file, eval_file):
    """On this CPU the tiny model's batch fits: the trial's memory plan picks chunk = the batch, the trial trains
    as the gradient cache's (same losses), and runs fewer hardware FLOP for the same paper FLOP."""
    from workers.trial import run_trial

    base = TrialSpec(model=tiny_model, method="full", budget_flops=4e9, train_data=str(pairs_file),
                     eval_data=str(eval_file), batch_size=16, precision="fp32", eval_pairs=32, num_threads=1,
                     gradient_checkpointing=False, packing="off", report_every_s=0.0)
    shape = ModelShape.from_config(__import__("core.models", fromlist=["read_config"]).read_config(tiny_model))
    assert steps.memory_plan(shape, base, torch.device("cpu")).chunk_size == 16  # one pass
    runs = {}
    for chunk in (None, 4):
        events = []
        row = run_trial(dataclasses.replace(base, chunk_size=chunk), report=events.append)
        runs[chunk] = (row, [r["train_loss"] for e in events for r in e.rows])
    (one, losses_one), (cached, losses_cached) = runs[None], runs[4]
    assert one["steps"] == cached["steps"] >= 3 and one["flops"] == cached["flops"]
    assert losses_one == pytest.approx(losses_cached, rel=1e-4)
    # the cache's extra forward is a third of a full fine-tuning step's matmuls: 3/4 of the cached count remains,
    # and a little less (its sub-batches are padded to their own longest text, the whole batch to its longest)
    assert one["hardware_flops"] < cached["hardware_flops"]
    assert one["hardware_flops"] > 0.7 * cached["hardware_flops"]
