"""train.attention: bidirectional (workers/packing.py "Attention"): the causal mask replaced per family, padded and
packed alike; a one-token text is what causal attention gives; a token sees the tokens after it; other models in
the process stay causal; unsupported families are named."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from workers import attention as kernels
from workers.packing import (BIDIRECTIONAL_FAMILIES, attention_unsupported, make_bidirectional, pack, pack_flat,
                             unpack)

sys.path.insert(0, os.path.dirname(__file__))  # `import test_packing` whatever pytest's import mode
from test_packing import texts, tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CASES = [(f, a) for f in BIDIRECTIONAL_FAMILIES for a in ("eager", "sdpa")]


@pytest.mark.parametrize("family,attention", CASES)
def test_bidirectional_padded_equals_packed_and_differs_from_causal(family, attention):
    causal = tiny(family, attention).eval()
    bidi = make_bidirectional(tiny(family, attention).eval())  # the same weights (seed 0)
    ids, mask = texts([6, 1, 9, 4, 7, 2, 9, 3])
    real = mask.bool()
    p = pack(ids, mask)
    with torch.no_grad():
        padded = bidi(input_ids=ids, attention_mask=mask).last_hidden_state
        packed = unpack(bidi(input_ids=p.input_ids, position_ids=p.position_ids).last_hidden_state, p)
        torch.testing.assert_close(packed[real], padded[real], atol=1e-5, rtol=1e-5)
        plain = causal(input_ids=ids, attention_mask=mask).last_hidden_state
        # the first token now sees the rest of its text (a one-token text: only itself, below)
        assert not torch.allclose(padded[:, 0][mask.sum(1) > 1], plain[:, 0][mask.sum(1) > 1], atol=1e-3)
        # one token: nothing to see but itself, as causal
        one_ids, one_mask = texts([1, 1, 1])
        torch.testing.assert_close(bidi(input_ids=one_ids, attention_mask=one_mask).last_hidden_state,
                                   causal(input_ids=one_ids, attention_mask=one_mask).last_hidden_state)
        # the other model in the process is still causal
        torch.testing.assert_close(causal(input_ids=ids, attention_mask=mask).last_hidden_state, plain)


@pytest.mark.parametrize("family", BIDIRECTIONAL_FAMILIES)
def test_bidirectional_flat_kernel_equals_padded(family):
    """The flat kernels (varlen on CUDA; on a CPU its reference, segments, fed the same cu_seqlens) build no mask:
    inside a bidirectional model's forward they drop causality, so a flat packed forward equals the padded
    bidirectional one; a causal model in the same process keeps its causal flat forward."""
    causal = tiny(family, "eager").eval()
    bidi = make_bidirectional(tiny(family, "eager").eval())
    ids, mask = texts([6, 1, 9, 4, 7, 2, 9, 3])
    real = mask.bool()
    with torch.no_grad():
        padded = bidi(input_ids=ids, attention_mask=mask).last_hidden_state
        plain = causal(input_ids=ids, attention_mask=mask).last_hidden_state
        for model in (bidi, causal):
            kernels.use(model, kernels.SEGMENTS)
        for bucket in (False, True):
            p = pack_flat(ids, mask, bucket=bucket, max_text=ids.shape[1])
            flat = unpack(bidi(**p.model_kwargs()).last_hidden_state, p)
            torch.testing.assert_close(flat[real], padded[real], atol=1e-5, rtol=1e-5)
            flat_causal = unpack(causal(**p.model_kwargs()).last_hidden_state, p)
            torch.testing.assert_close(flat_causal[real], plain[real], atol=1e-5, rtol=1e-5)


def test_padding_is_still_masked():
    """A text's states do not depend on the padding after it (the padding mask survives the overlay)."""
    bidi = make_bidirectional(tiny("llama", "eager").eval())
    ids, mask = texts([5, 9])
    other = ids.clone()
    other[0, 5:] = 3  # different pad ids, still masked
    with torch.no_grad():
        a = bidi(input_ids=ids, attention_mask=mask).last_hidden_state[0, :5]
        b = bidi(input_ids=other, attention_mask=mask).last_hidden_state[0, :5]
    torch.testing.assert_close(a, b)


def test_unsupported_families_say_why():
    assert attention_unsupported("qwen3") is None and attention_unsupported("gemma2", "causal") is None
    assert "gemma2" in attention_unsupported("gemma2")
    with pytest.raises(ValueError, match="phi3"):
        make_bidirectional(tiny("phi3", "eager"))


@pytest.mark.skipif(not torch.cuda.is_available() or kernels.varlen_kernel() is None,
                    reason="the varlen FlashAttention kernel runs on CUDA only")
@pytest.mark.parametrize("family", ["gpt_neox", "qwen3"])
def test_bidirectional_varlen_equals_padded_on_cuda(family):
    """The real flat kernel drops causality inside a bidirectional model's forward as its reference does."""
    bidi = make_bidirectional(tiny(family, "sdpa").cuda().eval())
    ids, mask = (x.cuda() for x in texts([6, 1, 9, 4, 7, 2, 9, 3]))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        padded = bidi(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        kernels.use(bidi, kernels.VARLEN)
        p = pack_flat(ids, mask, bucket=True, max_text=ids.shape[1])
        rows = bidi(**p.model_kwargs()).last_hidden_state.float()
    torch.testing.assert_close(unpack(rows, p)[mask.bool()], padded[mask.bool()], atol=3e-2, rtol=3e-2)
