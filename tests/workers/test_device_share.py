"""A trial that shares its GPU: its allocator is capped at its share, and its MFU divides by its share of the GPU's
peak. The CUDA calls are replaced at their seams (no GPU here); the numbers are by hand."""
from __future__ import annotations

import types

import pytest
import torch

from core.devices import mfu
from workers import steps
from workers.device_peak import trial_peak

H100 = 989e12  # core/devices.py: H100 SXM, dense bf16


def h100(device):
    return H100, "test"


def test_a_shared_trial_divides_by_its_share_of_the_peak():
    cuda = torch.device("cuda", 0)
    assert trial_peak(cuda, 0.25, peak=h100) == 247.25e12  # 989 / 4
    assert trial_peak(cuda, 0.5, peak=h100) == 494.5e12
    assert trial_peak(cuda, 1.0, world=4, peak=h100) == 3956e12  # DeepSpeed over 4 whole GPUs
    # 1e15 FLOP executed in 10 s of steps: 1e14 FLOP/s over a quarter H100 = 0.40445, over the whole one 0.10111
    assert mfu(1e15, 10.0, trial_peak(cuda, 0.25, peak=h100)) == pytest.approx(0.404449, abs=1e-6)
    assert mfu(1e15, 10.0, trial_peak(cuda, 1.0, peak=h100)) == pytest.approx(0.101112, abs=1e-6)
    # a CPU trial's peak is what its threads measured, whole; an unknown GPU has none
    assert trial_peak(torch.device("cpu"), 0.25, peak=lambda d: (2e11, "measured")) == 2e11
    assert trial_peak(cuda, 0.25, peak=lambda d: (None, "unknown")) is None


def test_the_allocator_is_capped_at_the_share():
    calls = []
    fake = types.SimpleNamespace(set_per_process_memory_fraction=lambda f, d: calls.append((f, str(d))))
    steps.cap_allocator(torch.device("cuda", 1), 0.25, cuda=fake)
    steps.cap_allocator(torch.device("cuda", 1), 1.0, cuda=fake)  # a reused process's next, whole-GPU trial
    steps.cap_allocator(torch.device("cpu"), 0.25, cuda=fake)  # no allocator to cap
    assert calls == [(0.25, "cuda:1"), (1.0, "cuda:1")]


def test_memory_plan_caps_a_shared_gpu_trial(monkeypatch, tiny_model):
    """memory_plan on a (faked) 24 GB GPU for a 0.25 trial: its budget is 6 GB, and the allocator gets 0.25."""
    from core.models import ModelShape
    from core.spec import TrialSpec
    from transformers import AutoConfig

    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=24e9))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, str(d))))
    shape = ModelShape.from_config(AutoConfig.from_pretrained(tiny_model).to_dict())
    spec = TrialSpec(model=tiny_model, method="full", budget_flops=1e9, train_data="x", batch_size=16,
                     device_share=0.25)
    planned = steps.memory_plan(shape, spec, torch.device("cuda", 0))
    assert calls == [(0.25, "cuda:0")]
    assert planned.chunk_size == 16 and planned.gradient_checkpointing is False  # the tiny model fits 6 GB whole
