"""workers/loss.py: InfoNCE by hand, masked mean pooling, and the gradient cache checked against the one-shot
batch on the tiny model (fp32, no autocast), for full fine-tuning and LoRA (with dropout: the RNG replay)."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
from support import make_pairs

from workers.pair_batches import collate
from workers.pair_files import make_encoder, pad_id_of
from workers.loss import contrastive_backward, embed, eval_loss, info_nce
from workers.methods import select_trainable
from workers.steps import enable_checkpointing

TAU = 0.025
FP32 = contextlib.nullcontext
LORA_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


pytestmark = pytest.mark.usefixtures("one_thread")


def load(tiny_model, method="full", **kw):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModel.from_pretrained(tiny_model)
    torch.manual_seed(0)  # LoRA's initialisation
    model = select_trainable(model, method, lora_targets=LORA_TARGETS, **kw)
    return tokenizer, model.train()


def make_batch(tokenizer, n: int, seed: int = 0, max_length: int = 75):
    pairs = make_pairs(n, seed=seed)
    encode = make_encoder(tokenizer, max_length)
    return collate(encode([p["query"] for p in pairs]), encode([p["pos"][0] for p in pairs]), pad_id_of(tokenizer), 0)


def grads(model) -> dict[str, torch.Tensor]:
    out = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


# --------------------------------------------------------------------------------------------------------
# InfoNCE and pooling


def test_info_nce_by_hand():
    # unit vectors; cosines q_i . d_j:  q1=(1,0), q2=(0,1), q3=(.6,.8); d1=(1,0), d2=(.6,.8), d3=(0,1)
    #   q1: 1   .6  0
    #   q2: 0   .8  1
    #   q3: .6  1   .8        tau = 0.5 -> logits = 2 * cos
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
    d = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    e = math.exp
    q_to_d = [-2.0 + math.log(e(2.0) + e(1.2) + e(0.0)),  # row 1 [2, 1.2, 0], positive 2
              -1.6 + math.log(e(0.0) + e(1.6) + e(2.0)),  # row 2 [0, 1.6, 2], positive 1.6
              -1.6 + math.log(e(1.2) + e(2.0) + e(1.6))]  # row 3 [1.2, 2, 1.6], positive 1.6
    d_to_q = [-2.0 + math.log(e(2.0) + e(0.0) + e(1.2)),  # column 1 [2, 0, 1.2]
              -1.6 + math.log(e(1.2) + e(1.6) + e(2.0)),  # column 2 [1.2, 1.6, 2]
              -1.6 + math.log(e(0.0) + e(2.0) + e(1.6))]  # column 3 [0, 2, 1.6]
    expected = 0.5 * (sum(q_to_d) / 3 + sum(d_to_q) / 3)
    assert expected == pytest.approx(0.86752, abs=1e-5)  # log(11.709) - 2 = 0.4604, etc.
    assert info_nce(q, d, 0.5).item() == pytest.approx(expected, rel=1e-12)
    # symmetric: swapping the sides transposes the logits, so the loss is unchanged
    assert info_nce(d, q, 0.5).item() == pytest.approx(expected, rel=1e-12)


def test_mean_pooling_ignores_padding(tiny_model):
    tokenizer, model = load(tiny_model)
    model.eval()
    ids = torch.tensor(make_encoder(tokenizer, 75)(["the river stone is blue and the lamp is red"]))  # (1, T)
    t = ids.shape[1]
    pad = pad_id_of(tokenizer)
    with torch.no_grad():
        alone = embed(model, ids, torch.ones_like(ids))  # (1, D)
        # the same sequence with 9 extra pad tokens, next to a longer one that forces the padding
        longer = torch.randint(3, 500, (1, t + 9))
        padded = torch.cat([torch.cat([ids, torch.full((1, 9), pad)], 1), longer])  # (2, T + 9)
        mask = torch.ones_like(padded)
        mask[0, t:] = 0
        batched = embed(model, padded, mask)
        # junk ids under the mask change nothing either
        junk = padded.clone()
        junk[0, t:] = 7
        junk_emb = embed(model, junk, mask)
        hidden = model(input_ids=ids).last_hidden_state[0]  # (T, D)
    torch.testing.assert_close(batched[0:1], alone, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(junk_emb[0:1], alone, atol=1e-6, rtol=1e-5)
    # the mean over the real tokens, then unit norm (not a mean over the padded length)
    by_hand = hidden.mean(0) / hidden.mean(0).norm()
    torch.testing.assert_close(alone[0], by_hand, atol=1e-6, rtol=1e-5)
    assert alone.norm().item() == pytest.approx(1.0, abs=1e-6)
    # the pads' hidden states are not zero: a mean that counted them would differ (so the checks can fail)
    with torch.no_grad():
        unmasked = embed(model, padded[0:1], torch.ones_like(padded[0:1]))
    assert (unmasked - alone).abs().max().item() > 1e-3


def test_eval_loss_is_info_nce_over_the_whole_batch(tiny_model):
    tokenizer, model = load(tiny_model)
    model.eval()
    batches = [make_batch(tokenizer, 8, seed=3), make_batch(tokenizer, 5, seed=4)]
    with torch.no_grad():
        by_batch = [info_nce(embed(model, b.q_ids, b.q_mask), embed(model, b.d_ids, b.d_mask), TAU).item()
                    for b in batches]
    expected = (8 * by_batch[0] + 5 * by_batch[1]) / 13  # weighted by pairs
    for chunk in (None, 3):  # sub-batches only split the forward; negatives are still the whole batch
        assert eval_loss(model, batches, TAU, chunk, FP32) == pytest.approx(expected, rel=1e-6)
    # negatives restricted to sub-batches would give a lower loss: the comparison can fail
    with torch.no_grad():
        b = batches[0]
        q, d = embed(model, b.q_ids, b.q_mask), embed(model, b.d_ids, b.d_mask)
        split = 0.5 * (info_nce(q[:4], d[:4], TAU) + info_nce(q[4:], d[4:], TAU)).item()
    assert split < by_batch[0] - 1e-3


# --------------------------------------------------------------------------------------------------------
# The gradient cache


@pytest.mark.parametrize("method,kw", [("full", {}), ("lora", {"lora_rank": 4})])
@pytest.mark.parametrize("chunk", [3, 5])  # 12 pairs: 4 even sub-batches; 5 + 5 + 2
def test_gradient_cache_equals_one_shot(tiny_model, method, kw, chunk):
    tokenizer, model = load(tiny_model, method, **kw)
    batch = make_batch(tokenizer, 12)
    loss_once = contrastive_backward(model, batch, TAU, None, FP32)
    once = grads(model)
    loss_cached = contrastive_backward(model, batch, TAU, chunk, FP32)
    cached = grads(model)
    assert loss_cached == pytest.approx(loss_once, abs=1e-5)
    assert set(cached) == set(once) and len(once) > 0
    assert any(g.abs().max() > 1e-4 for g in once.values())  # real gradients, not zeros compared
    for name in once:
        torch.testing.assert_close(cached[name], once[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("pooling", ["last", "weighted_mean"])
def test_gradient_cache_equals_one_shot_for_every_pooling(tiny_model, pooling):
    """The other poolings (workers/pooling.py) through the same cache; ``last`` on texts that end in the EOS the
    data path appends. Sub-batches of 5 trim to their own longest row, so the pooled positions move: still equal."""
    from workers.pooling import with_eos

    tokenizer, model = load(tiny_model)
    pairs = make_pairs(12)
    encode = make_encoder(tokenizer, 75)
    if pooling == "last":
        encode = with_eos(encode, tokenizer.eos_token_id, 75)
    batch = collate(encode([p["query"] for p in pairs]), encode([p["pos"][0] for p in pairs]),
                    pad_id_of(tokenizer), 0)
    assert all(r[-1] == tokenizer.eos_token_id for r in encode(["a text"])) or pooling != "last"
    loss_once = contrastive_backward(model, batch, TAU, None, FP32, pooling=pooling)
    once = grads(model)
    loss_cached = contrastive_backward(model, batch, TAU, 5, FP32, pooling=pooling)
    cached = grads(model)
    loss_mean = contrastive_backward(model, batch, TAU, None, FP32)
    grads(model)
    assert loss_cached == pytest.approx(loss_once, abs=1e-5) and abs(loss_mean - loss_once) > 1e-4
    for name in once:
        torch.testing.assert_close(cached[name], once[name], atol=1e-5, rtol=1e-4, msg=name)


def test_gradient_cache_refuses_left_padding(tiny_model):
    tokenizer, model = load(tiny_model)
    batch = make_batch(tokenizer, 4)
    batch.q_mask[0, 0] = 0  # a pad before real tokens (left padding): the sub-batch trim would cut real tokens
    with pytest.raises(ValueError, match="right-padded"):
        contrastive_backward(model, batch, TAU, 2, FP32)


def _reference_with_dropout(model, batch, chunk):
    """One differentiable pass that draws dropout in the gradient cache's order: q sub-batches, then d."""
    sides = [(batch.q_ids, batch.q_mask), (batch.d_ids, batch.d_mask)]
    embs = []
    for ids, mask in sides:
        parts = []
        for i in range(0, ids.shape[0], chunk):
            m = mask[i:i + chunk]
            t = int(m.sum(1).max())  # trimmed like workers.loss._chunks
            parts.append(embed(model, ids[i:i + chunk, :t], m[:, :t]))
        embs.append(torch.cat(parts))
    loss = info_nce(embs[0], embs[1], TAU)
    loss.backward()
    return loss.item()


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("chunk", [3, 5])
def test_gradient_cache_replays_lora_dropout(tiny_model, chunk, checkpointing):
    """With dropout the cached embeddings and the re-run must see the same masks: the RNG replay makes the
    cache equal a differentiable pass that drew the same masks."""
    tokenizer, model = load(tiny_model, "lora", lora_rank=4, lora_dropout=0.3)
    if checkpointing:
        enable_checkpointing(model)
    batch = make_batch(tokenizer, 12)
    # the B matrices start at 0, which hides dropout on the adapters' path: give them weights first
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)

    torch.manual_seed(123)
    loss_ref = _reference_with_dropout(model, batch, chunk)
    ref = grads(model)
    torch.manual_seed(123)
    loss_cached = contrastive_backward(model, batch, TAU, chunk, FP32)
    cached = grads(model)
    assert loss_cached == pytest.approx(loss_ref, abs=1e-5)
    for name in ref:
        torch.testing.assert_close(cached[name], ref[name], atol=1e-5, rtol=1e-4, msg=name)

    # dropout is really on: other masks give another loss and other gradients (so the checks above can fail)
    torch.manual_seed(124)
    loss_other = contrastive_backward(model, batch, TAU, chunk, FP32)
    other = grads(model)
    assert abs(loss_other - loss_ref) > 1e-4
    assert max((other[n] - ref[n]).abs().max().item() for n in ref) > 1e-3


def test_bf16_gradients_meet_in_fp32_as_deepspeeds_do(tiny_model):
    """Under bf16 autocast the one-pass step embeds queries and documents in a region each: every weight's
    gradients from the two forwards are summed in fp32, as DeepSpeed's (which runs each forward in its own region)
    and as autocast without its weight cache. One shared region would sum them in bf16 on the cached copy."""
    tokenizer, model = load(tiny_model)
    batch = make_batch(tokenizer, 8)

    def grads(autocast) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        contrastive_backward(model, batch, 0.05, None, autocast, packing=False)
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ours = grads(lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    uncached = grads(lambda: torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False))
    assert all(torch.equal(a, b) for a, b in zip(ours, uncached))

    model.zero_grad(set_to_none=True)  # the shared region, by hand: its sums differ
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = embed(model, batch.q_ids, batch.q_mask)
        d = embed(model, batch.d_ids, batch.d_mask)
    info_nce(q, d, 0.05).backward()
    shared = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert not all(torch.equal(a, b) for a, b in zip(shared, uncached))
