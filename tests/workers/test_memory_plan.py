"""The memory model against what autograd really keeps, per family; and the trial's own decision (checkpointing and
chunk) from its share of the device, not from the memory free at the moment.

The activation bytes are measured with ``torch.autograd.graph.saved_tensors_hooks``: every tensor a training forward
under bf16 autocast saves for backward, each storage once, weights (the bf16 casts of parameters) left out — those
are the model's ``weight_copies``."""
from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from support import tiny_config

from core.memory import GIB, activation_bytes_per_token, footprint
from core.models import FAMILIES, ModelShape, model_shape
from core.spec import TrialSpec
from workers import steps

pytestmark = pytest.mark.usefixtures("one_thread")
B, T = 3, 37  # 111 tokens: no weight of these configs has 111 rows


def saved_activation_bytes(model) -> float:
    """Bytes per token that one training forward saves for backward (unique storages with batch or token rows)."""
    seen = {}

    def pack(t):
        rows = t.dim() >= 3 or (t.dim() == 2 and t.shape[0] == B * T) or t.shape[:2] == (B, T)
        if rows:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(3, 100, (B, T))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)
    return sum(seen.values()) / (B * T)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scale", [1, 4])
def test_activation_model_matches_what_autograd_saves(family, scale):
    from transformers import AutoModel

    cfg = tiny_config(family)
    cfg.hidden_size *= scale
    cfg.intermediate_size *= scale
    if getattr(cfg, "head_dim", None):
        cfg.head_dim *= scale
    torch.manual_seed(0)
    model = AutoModel.from_config(cfg, attn_implementation="eager").train()
    shape = ModelShape.from_config(cfg.to_dict())
    measured = saved_activation_bytes(model)
    # the footprint's per pair is two texts of max_length tokens: per token, blocks and what is outside them
    predicted = footprint(shape, "full", T, eager_attention=True).per_pair / (2 * T)
    assert predicted == pytest.approx(measured, rel=0.08), (family, scale, measured, predicted)


def test_activation_bytes_by_hand():
    """Pythia-1b, SDPA: linear inputs 2 x (h + a + h + I) = 2 x 14,336, Q/K/V 6a, GELU input 2I, the LayerNorm input
    4h -> 28,672 + 12,288 + 16,384 + 8,192 = 65,536 = 32 x 2048; eager adds 6 x 8 heads x 75 keys = 3,600."""
    shape = model_shape("EleutherAI/pythia-1b")
    assert activation_bytes_per_token(shape, 75, eager_attention=False) == 65_536
    assert activation_bytes_per_token(shape, 75, eager_attention=True) == 65_536 + 3_600


def fake_cuda(monkeypatch, total: int):
    """A CUDA device of ``total`` bytes whose free memory must not be consulted (a reused process or a shared GPU
    makes it wrong); empty_cache and the allocator's cap (the trial's share) are recorded."""
    calls = []
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device=None: calls.append(("cap", fraction)))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=total))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: pytest.fail("free memory is not the trial's budget"))
    return calls


def spec(**fields) -> TrialSpec:
    return TrialSpec(model="EleutherAI/pythia-1b", method="full", budget_flops=1e18, train_data="x", **fields)


def test_trial_sizes_its_chunk_from_its_share(monkeypatch):
    """Pythia-1b full (tests/orchestrator/test_plan.py has the numbers by hand): its share of an 80 GB GPU decides."""
    shape = model_shape("EleutherAI/pythia-1b")
    calls = fake_cuda(monkeypatch, 80 * 10**9)
    cuda = torch.device("cuda", 0)
    whole = steps.memory_plan(shape, spec(), cuda)
    assert (whole.gradient_checkpointing, whole.chunk_size) == (False, 256) and calls == ["empty_cache", ("cap", 1.0)]
    # a quarter of it (20 GB): 13 pairs without checkpointing, so with it: chunk 64
    quarter = steps.memory_plan(shape, spec(device_share=0.25), cuda)
    assert (quarter.gradient_checkpointing, quarter.chunk_size) == (True, 64)
    # forced off: the largest chunk without it (8)
    off = steps.memory_plan(shape, spec(device_share=0.25, gradient_checkpointing=False), cuda)
    assert (off.gradient_checkpointing, off.chunk_size) == (False, 8)
    # a chunk the user fixed: checkpointing only if that chunk does not fit without it
    fixed = steps.memory_plan(shape, spec(device_share=0.25, chunk_size=8), cuda)
    assert (fixed.gradient_checkpointing, fixed.chunk_size) == (False, 8)
    fixed = steps.memory_plan(shape, spec(device_share=0.25, chunk_size=32), cuda)
    assert (fixed.gradient_checkpointing, fixed.chunk_size) == (True, 32)
    # DeepSpeed ZeRO-2 over 4 ranks of 16 GB (over 2, ZeRO's own master partition and 2 GB gradient bucket leave no
    # room: tests/orchestrator/test_plan.py has the numbers by hand): each rank's 256 pairs in chunks of 16
    fake_cuda(monkeypatch, 16 * 10**9)
    ranked = steps.memory_plan(shape, spec(), cuda, world=4, zero_stage=2)
    assert (ranked.gradient_checkpointing, ranked.chunk_size) == (False, 16)
    # the id does not move: checkpointing decided by the trial is a runtime matter
    assert quarter.trial_id() == spec().trial_id() == spec(gradient_checkpointing=True).trial_id()


def test_cpu_budget_is_a_quarter_of_free_memory(monkeypatch):
    import psutil

    shape = model_shape("EleutherAI/pythia-1b")
    # CPU (eager attention): 65,536 + 3,600 B per token and block -> 150 x (16 x 69,136 + 4 x 2048) = 167,155,200 B
    # a pair; a quarter of 8 GiB free = 2 GiB -> 12 pairs < 16, so checkpointed: 150 x (4 x 2048 x 16 + 69,136 +
    # 8,192) = 31,260,000 B a pair -> 68 -> chunk 64
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=8 * GIB))
    cpu = steps.memory_plan(shape, spec(), torch.device("cpu"))
    assert (cpu.gradient_checkpointing, cpu.chunk_size) == (True, 64)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=64 * GIB))
    big = steps.memory_plan(shape, dataclasses.replace(spec(), batch_size=64), torch.device("cpu"))
    assert (big.gradient_checkpointing, big.chunk_size) == (False, 64)  # the whole batch fits


def test_packed_pairs_hold_their_real_tokens(monkeypatch):
    """Packed, a pair holds the planner's tokens per pair, not two texts at max_length: Pythia-1b full with 60 tokens
    a pair instead of 150 -> 60 x 1,056,768 = 63,406,080 B a pair. One pass of 1024 pairs: (15,989,088,256 +
    1,611,472,896 + 1024 x 63,406,080) x 1.1 = 90.8e9 > 80e9; through the gradient cache 80e9 / 1.1 - 15,989,088,256
    = 56.74e9 B of room holds 894 pairs -> chunk 512, against 256 padded."""
    shape = model_shape("EleutherAI/pythia-1b")
    fake_cuda(monkeypatch, 80 * 10**9)
    cuda = torch.device("cuda", 0)
    packed = steps.memory_plan(shape, spec(planned_tokens_per_pair=60.0), cuda, packing=True)
    padded = steps.memory_plan(shape, spec(planned_tokens_per_pair=60.0), cuda, packing=False)
    assert (packed.chunk_size, padded.chunk_size) == (512, 256)
    # without the planner's measure: the worst case, as padded
    assert steps.memory_plan(shape, spec(), cuda, packing=True).chunk_size == 256
