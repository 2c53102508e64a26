"""workers/attention.py: packed texts attend only within themselves, through transformers' AttentionInterface.

On a CPU the CUDA varlen kernel does not exist, so the flat path is tested with the reference kernel
(``segments``: each text's attention on its own) registered the same way and fed the same ``cu_seqlens``: per
family (tiny configs, sliding windows made to bind, GPT-NeoX's partial rotary, Gemma 2's soft-cap) the packed
forward's hidden states and every pooling equal the padded forward's, and so do one contrastive step's loss and
gradients; buckets (a compiled model's fixed shapes) change nothing; the hardware FLOP of a flat step equal
torch's FlopCounterMode (each text's own square). The kernel choice by device is a pure function. Where CUDA and
the varlen kernel exist, the real kernel is checked against the padded forward too."""
from __future__ import annotations

import contextlib

import pytest
import torch
from test_packing import pair_batch, texts, tiny

from core.models import FAMILIES
from workers import attention
from workers.attention import FLEX, MASK, SEGMENTS, VARLEN, choose
from workers.loss import contrastive_backward, embed, step_shapes
from workers.packing import Packer, bucket_length, pack_flat, unpack

pytestmark = pytest.mark.usefixtures("one_thread")
FP32 = contextlib.nullcontext


# --- the choice, by hand ------------------------------------------------------------------------------------
def test_kernel_by_device():
    assert choose("cpu", "llama") == MASK  # a CPU: eager attention over rows, whatever exists
    assert choose("cuda", "llama", varlen_available=True) == VARLEN
    assert choose("cuda", "gpt_neox", varlen_available=True) == VARLEN
    # Gemma 2's soft-cap, an fp32 step (flash takes 16-bit inputs) or a torch without the kernel: FlexAttention
    assert choose("cuda", "gemma2", varlen_available=True, flex_available=True) == FLEX
    assert choose("cuda", "llama", bf16=False, varlen_available=True, flex_available=True) == FLEX
    assert choose("cuda", "llama", varlen_available=False, flex_available=True) == FLEX
    assert choose("cuda", "llama", varlen_available=False, flex_available=False) == MASK
    with pytest.raises(ValueError, match="attention kernel 'paged'"):
        attention.implementation("paged", "sdpa")


# --- the flat layout by hand ----------------------------------------------------------------------------------
def test_pack_flat_by_hand():
    ids = torch.tensor([[11, 12, 13, 0], [21, 0, 0, 0], [31, 32, 33, 34], [41, 42, 0, 0]])
    mask = (ids != 0).long()
    p = pack_flat(ids, mask)
    assert p.input_ids.tolist() == [[11, 12, 13, 21, 31, 32, 33, 34, 41, 42]]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 0, 1, 2, 3, 0, 1]]  # restart per text
    assert p.cu_seqlens.tolist() == [0, 3, 4, 8, 10] and p.max_length == 4
    assert p.index.tolist() == [[0, 1, 2, 0], [3, 3, 3, 3], [4, 5, 6, 7], [8, 9, 8, 8]]
    # bucketed: 10 tokens -> the first bucket, 256; its tail (246) in pieces of at most 4 tokens, 64 of them (the
    # longest tail this bucket can hold, 256, over 4); the bound passed to the kernel fixed at 4
    b = pack_flat(ids, mask, bucket=True, max_text=4)
    assert b.input_ids.shape == (1, 256) and b.input_ids[0, :10].tolist() == p.input_ids[0].tolist()
    assert b.cu_seqlens.tolist() == [0, 3, 4, 8, 10] + [min(10 + 4 * k, 256) for k in range(1, 65)]
    assert b.position_ids[0, 10:16].tolist() == [0, 1, 2, 3, 0, 1] and b.max_length == 4
    # what attention computes: each text's own square, then the tail's pieces
    assert Packer(SEGMENTS).shapes([3, 1, 4, 2]) == [(1, 3), (1, 1), (1, 4), (1, 2)]
    assert Packer(SEGMENTS, bucket=True, max_text=4).shapes([3, 1, 4, 2])[4:] == [(1, 4)] * 61 + [(1, 2)]


def test_bucket_lengths_by_hand():
    # 256 x 2^(k/8) rounded up to a multiple of 64: 256, 320 (279.2), 320 (304.4), 384 (332.0), ...
    assert bucket_length(1) == (256, 0) and bucket_length(256) == (256, 0)
    assert bucket_length(257) == (320, 256) and bucket_length(321) == (384, 320)
    assert bucket_length(1000) == (1024, 960)  # 256 x 2^(15/8) = 938.9 -> 960; 2^(16/8) -> 1024
    lengths = {bucket_length(n)[0] for n in range(40_000, 48_000)}  # a chunk's tokens from batch to batch
    assert len(lengths) <= 3


# --- per family: the reference kernel equals the padded forward ---------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_flat_forward_equals_padded(family):
    model = tiny(family, "eager").eval()
    ids, mask = texts([6, 1, 9, 4, 7, 2, 9, 3])
    real = mask.bool()
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = {p: embed(model, ids, mask, p) for p in ("mean", "last", "weighted_mean")}
        attention.use(model, SEGMENTS)
        assert model.config._attn_implementation == attention.REGISTERED[SEGMENTS]
        for bucket in (False, True):
            p = pack_flat(ids, mask, bucket=bucket, max_text=ids.shape[1])
            rows = model(**p.model_kwargs()).last_hidden_state  # (1, total or bucket, D)
            torch.testing.assert_close(unpack(rows, p)[real], padded[real], atol=1e-5, rtol=1e-5)
            for pooling, e in expected.items():
                torch.testing.assert_close(embed(model, ids, mask, pooling, p), e, atol=1e-5, rtol=1e-5)


def test_flat_kernel_needs_boundaries():
    """Without cu_seqlens the registered kernel refuses (it would otherwise attend across texts)."""
    model = tiny("llama", "eager").eval()
    attention.use(model, SEGMENTS)
    ids, mask = texts([3, 4])
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        model(input_ids=ids)


def step(model, batch, chunk, packing, pooling):
    model.zero_grad(set_to_none=True)
    loss = contrastive_backward(model, batch, 0.05, chunk, FP32, pooling=pooling, packing=packing)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,method,pooling,chunk", [
    ("gpt_neox", "full", "mean", None), ("gpt_neox", "lora", "last", 4), ("llama", "full", "weighted_mean", 2),
    ("mistral", "full", "mean", None), ("qwen2", "full", "last", None), ("qwen3", "full", "mean", 4),
    ("gemma2", "full", "mean", None), ("gemma3_text", "full", "last", 4), ("olmo2", "full", "mean", None),
    ("phi3", "lora", "weighted_mean", None)])
def test_flat_step_gradients_equal_padded(family, method, pooling, chunk):
    """Loss and every trainable parameter's gradient, flat (reference kernel) vs padded; LoRA through peft's
    wrapper (the boundaries pass through it); one pass and the gradient cache."""
    from workers.methods import select_trainable

    torch.manual_seed(1)
    model = select_trainable(tiny(family, "eager"), method, **({"lora_rank": 4} if method == "lora" else {}))
    model.train()
    batch = pair_batch()
    loss, grads = step(model, batch, chunk, False, pooling)
    attention.use(model, SEGMENTS)
    loss_p, grads_p = step(model, batch, chunk, Packer(SEGMENTS, bucket=True, max_text=12), pooling)
    assert loss_p == pytest.approx(loss, abs=1e-5)
    assert grads_p.keys() == grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_p[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)


# --- hardware FLOP of a flat step against torch's counter --------------------------------------------------
@pytest.mark.parametrize("bucket", [False, True])
def test_flat_hardware_flops_match_torch_flop_counter(bucket):
    """Each text's own square (and the bucket's tail pieces), not a row's: FlopCounterMode on the reference
    kernel's matmuls agrees, and a flat step runs fewer FLOP than the mask kernel's rows."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModel, GPTNeoXConfig

    from core.models import ModelShape
    from core.spec import TrialSpec
    from workers.steps import HardwareFlops

    cfg = GPTNeoXConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, rotary_pct=0.25, use_cache=False)
    torch.manual_seed(0)
    model = AutoModel.from_config(cfg, attn_implementation="eager").train()
    attention.use(model, SEGMENTS)
    batch = pair_batch((12, 3, 7, 5, 12, 2, 9, 4), (40, 11, 25, 30, 8, 17, 33, 21))
    packer = Packer(SEGMENTS, bucket=bucket, max_text=40)
    spec = TrialSpec(model="m", method="full", budget_flops=1e12, train_data="x", gradient_checkpointing=False)
    with FlopCounterMode(display=False) as counter:
        contrastive_backward(model, batch, 0.025, None, FP32, packing=packer)
    shape = ModelShape.from_config(cfg.to_dict())
    ours = HardwareFlops(shape, spec, 8, packing=packer)(batch, 8)
    rows = HardwareFlops(shape, spec, 8, packing=True)(batch, 8)
    assert len(step_shapes(batch, None, packer)) >= 16  # one sequence per text
    assert abs(ours / counter.get_total_flops() - 1) < 1e-3
    if not bucket:
        assert ours < rows  # the rows' L x L between texts no longer runs


# --- FlexAttention (compiles on first use: minutes on this CPU) and the CUDA kernel ---------------------------
@pytest.mark.slow
def test_flex_document_mask_equals_padded():
    from workers.packing import pack

    model = tiny("llama", "eager").eval()
    ids, mask = texts([6, 1, 9, 4, 7, 2, 9, 3])
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).last_hidden_state
        attention.use(model, FLEX)
        p = pack(ids, mask)
        rows = model(**p.model_kwargs()).last_hidden_state
    torch.testing.assert_close(unpack(rows, p)[mask.bool()], padded[mask.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available() or attention.varlen_kernel() is None,
                    reason="the varlen FlashAttention kernel runs on CUDA only")
@pytest.mark.parametrize("family", ["gpt_neox", "llama", "qwen3", "mistral"])
def test_varlen_kernel_equals_padded_on_cuda(family):
    model = tiny(family, "sdpa").cuda().eval()
    ids, mask = (x.cuda() for x in texts([6, 1, 9, 4, 7, 2, 9, 3]))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        padded = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        attention.use(model, VARLEN)
        p = pack_flat(ids, mask, bucket=True, max_text=ids.shape[1])
        rows = model(**p.model_kwargs()).last_hidden_state.float()
    torch.testing.assert_close(unpack(rows, p)[mask.bool()], padded[mask.bool()], atol=3e-2, rtol=3e-2)


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_forward():
    """torch.compile of the decoder blocks (workers/steps.py compile_blocks) over bucketed flat rows: the eager
    forward's hidden states. Slow: inductor compiles each block for minutes on this shared CPU."""
    from workers.steps import compile_blocks

    model = tiny("gpt_neox", "eager").eval()
    ids, mask = texts([6, 1, 9, 4, 7, 2, 9, 3])
    attention.use(model, SEGMENTS)
    p = pack_flat(ids, mask, bucket=True, max_text=ids.shape[1])
    with torch.no_grad():
        eager = model(**p.model_kwargs()).last_hidden_state
        compile_blocks(model)
        compiled = model(**p.model_kwargs()).last_hidden_state
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
