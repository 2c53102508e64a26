"""FLOP and parameter accounting: hand-computed numbers, round trips, and the hardware count checked
against torch's own FlopCounterMode on a Pythia-14m-shaped model."""
import contextlib
from types import SimpleNamespace

import pytest

from core.flops import (cost_per_token, flops_for_tokens, loss_matmul_flops, sequence_hardware_flops,
                        tokens_for_budget)
from core.methods import param_counts
from core.models import ModelShape, trained_blocks
from core.models import PYTHIA_SHAPES, auto_lr, model_shape, pretrain_lr

# docs/study.md's non-embedding parameter counts
PAPER_N = {"14m": 1_189_888, "31m": 4_739_072, "70m": 18_915_328, "160m": 85_056_000, "410m": 302_311_424,
           "1b": 805_736_448, "1.4b": 1_208_602_624, "2.8b": 2_517_652_480}


@pytest.mark.parametrize("size", sorted(PAPER_N))
def test_pythia_n_matches_the_paper(size):
    assert model_shape(f"EleutherAI/pythia-{size}").n_params() == PAPER_N[size]


# tiny: hidden 64, 4 layers, intermediate 256. Block = qkv 64*192+192 + dense 64*64+64 + h_to_4h 64*256+256
# + 4h_to_h 256*64+64 + two LayerNorms 4*64 = 49,984; N = 4 * 49,984 + final LayerNorm 128 = 200,064.
TINY = ModelShape(hidden=64, layers=4, heads=4, intermediate=256, vocab=512)
CASES = [
    # method, kwargs, N, N_tr, cost per token
    ("full", {}, 200_064, 200_064, 6 * 200_064),
    ("freeze", {"trainable_fraction": 0.5}, 200_064, 2 * 49_984 + 128, 2 * 200_064 + 4 * 100_096),
    ("freeze", {"trainable_fraction": 0.3}, 200_064, 2 * 49_984 + 128, 2 * 200_064 + 4 * 100_096),  # ceil(1.2) = 2
    # bias per block: qkv 192 + dense 64 + h_to_4h 256 + 4h_to_h 64 + LayerNorms 128 = 704; + final LN bias 64
    ("bias", {}, 200_064, 4 * 704 + 64, 4 * 200_064 + 2 * 2_880),
    # LoRA r=4 per block: 4*(64+192) + 4*(64+64) + 4*(64+256) + 4*(256+64) = 4,096
    ("lora", {"lora_rank": 4}, 200_064 + 16_384, 16_384, 4 * 216_448 + 2 * 16_384),
]


@pytest.mark.parametrize("method,kw,n,n_tr,cost", CASES)
def test_param_counts_and_cost_by_hand(method, kw, n, n_tr, cost):
    assert param_counts(TINY, method, kw.get("lora_rank"), kw.get("trainable_fraction")) == (n, n_tr)
    assert cost_per_token(method, n, n_tr) == cost


def test_trained_blocks_guards_float_error():
    assert trained_blocks(10, 0.3) == 3  # 0.3 * 10 = 3.0000000000000004
    assert trained_blocks(6, 0.25) == 2 and trained_blocks(6, 1.0) == 6 and trained_blocks(6, 0.01) == 1


@pytest.mark.parametrize("budget", [1.5e15, 6e15, 2.4e16, 3.8e17, 1.5e18])
@pytest.mark.parametrize("cost", [6 * 1_189_888, 4 * 18_915_328 + 2 * 1_000, 1234.5])
def test_budget_tokens_budget_round_trip(budget, cost):
    tokens = tokens_for_budget(budget, cost)
    assert flops_for_tokens(tokens, cost) <= budget < flops_for_tokens(tokens + 1, cost)


def test_paper_degenerate_cells():
    # docs/study.md: 2.8B full fine-tuning at 1.5e15 is ~1,300 pairs of 78 tokens (about one batch)
    n = PAPER_N["2.8b"]
    pairs = tokens_for_budget(1.5e15, cost_per_token("full", n, n)) / 78
    assert 1_200 < pairs < 1_350
    n = PAPER_N["14m"]
    assert tokens_for_budget(1.5e18, cost_per_token("full", n, n)) / 78 == pytest.approx(2.7e9, rel=0.01)


def test_lr_auto_from_name_and_metadata(tiny_model):
    assert auto_lr("EleutherAI/pythia-160m") == pytest.approx(6e-5)
    assert auto_lr("EleutherAI/pythia-2.8b-deduped") == pytest.approx(1.6e-5)
    assert pretrain_lr(tiny_model) == 1e-3  # from config.json's repurpose_pretrain_lr
    assert set(PYTHIA_SHAPES) == set(PAPER_N)


def pythia_14m_shaped(method: str, kw: dict):
    """(hidden, shape, model): a randomly initialised Pythia-14m-shaped model (eager attention), ``method``'s
    parameters trainable."""
    import torch
    from transformers import AutoModel, GPTNeoXConfig

    from workers.methods import select_trainable

    d, layers, heads = PYTHIA_SHAPES["14m"]
    cfg = GPTNeoXConfig(vocab_size=512, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * d, rotary_pct=0.25, use_cache=False)
    torch.manual_seed(0)
    model = select_trainable(AutoModel.from_config(cfg, attn_implementation="eager"), method, **kw,
                             lora_targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"))
    return d, ModelShape.from_config(cfg.to_dict()), model


METHODS = [("full", {}), ("freeze", {"trainable_fraction": 0.5}), ("bias", {}), ("lora", {"lora_rank": 8})]


@pytest.mark.parametrize("method,kw", METHODS)
@pytest.mark.parametrize("checkpointing,chunk", [(False, None), (True, None), (True, 4)])
def test_hardware_flops_match_torch_flop_counter(method, kw, checkpointing, chunk):
    """One training step of a Pythia-14m-shaped model (eager attention): our count equals torch's (within 0.1 %)'s."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from workers.loss import contrastive_backward, step_shapes
    from workers.methods import count_params
    from workers.steps import enable_checkpointing

    d, shape, model = pythia_14m_shaped(method, kw)
    if checkpointing:
        enable_checkpointing(model)
    model.train()
    assert count_params(model) == param_counts(shape, method, kw.get("lora_rank"), kw.get("trainable_fraction"))
    b = 8
    q_mask = torch.ones(b, 12, dtype=torch.long)
    d_mask = torch.ones(b, 40, dtype=torch.long)
    d_mask[:, 30:] = 0  # padding: executed, so counted in hardware FLOPs
    batch = SimpleNamespace(q_ids=torch.randint(2, 512, (b, 12)), q_mask=q_mask,
                            d_ids=torch.randint(2, 512, (b, 40)), d_mask=d_mask)
    with FlopCounterMode(display=False) as counter:
        contrastive_backward(model, batch, 0.025, chunk, contextlib.nullcontext)
    ours = loss_matmul_flops(b, d) + sum(
        n * sequence_hardware_flops(shape, method, t, lora_rank=kw.get("lora_rank"),
                                    trainable_fraction=kw.get("trainable_fraction"),
                                    checkpointing=checkpointing, grad_cache=chunk is not None)
        for n, t in step_shapes(batch, chunk))
    ratio = ours / counter.get_total_flops()
    print(f"{method} checkpointing={checkpointing} chunk={chunk}: ours/torch = {ratio:.4f}")
    assert abs(ratio - 1) < 1e-3  # exact up to float rounding: the lora_B recompute error was 0.4 %


@pytest.mark.parametrize("method,kw", [("full", {}), ("lora", {"lora_rank": 8})])
@pytest.mark.parametrize("chunk,packing", [(None, False), (4, False), (4, True), (4, "segments")])
def test_hard_negative_flops_match_torch_flop_counter(method, kw, chunk, packing):
    """A step with 2 hard negatives per pair: the negatives' forwards and backwards and the extra logit columns
    are counted (our count within 1 % of torch's; the paper-convention FLOP counts their real tokens). Padded,
    packed in rows (the mask kernel) and flat (``segments``, the varlen kernel's CPU reference: each text's own
    square)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from workers import attention
    from workers.pair_batches import collate
    from workers.loss import contrastive_backward, step_shapes

    d, shape, model = pythia_14m_shaped(method, kw)
    if isinstance(packing, str):
        attention.use(model, packing)
    model.train()
    b, k = 8, 2
    g = torch.Generator().manual_seed(1)
    seq = lambda n, lo, hi: [torch.randint(2, 512, (int(torch.randint(lo, hi, (1,), generator=g)),),  # noqa: E731
                                           generator=g).tolist() for _ in range(n)]
    batch = collate(seq(b, 5, 12), seq(b, 20, 40), 0, 0, seq(b * k, 20, 40))
    assert batch.hard_negatives == k and batch.n_ids.shape[0] == b * k
    assert batch.real_tokens == int(batch.q_mask.sum() + batch.d_mask.sum() + batch.n_mask.sum())
    with FlopCounterMode(display=False) as counter:
        contrastive_backward(model, batch, 0.025, chunk, contextlib.nullcontext, packing=packing)
    ours = loss_matmul_flops(b, d, k) + sum(
        n * sequence_hardware_flops(shape, method, t, lora_rank=kw.get("lora_rank"), checkpointing=False,
                                    grad_cache=chunk is not None)
        for n, t in step_shapes(batch, chunk, packing))
    ratio = ours / counter.get_total_flops()
    print(f"{method} chunk={chunk} packing={packing}: ours/torch = {ratio:.4f}")
    assert abs(ratio - 1) < 0.01
def test_padding_fraction_by_hand():
    from core.flops import padding_fraction

    assert padding_fraction(60, 80) == 0.25 and padding_fraction(80, 80) == 0.0
    assert padding_fraction(0, 0) is None  # nothing processed: no fraction, not "no padding"


def test_the_last_step_counts_the_hard_negatives_tokens():
    """A trial's last batch is cut to the pairs whose real tokens fit the budget left: a pair's tokens include its
    hard negatives (else the cut batch overshoots the budget by their tokens). Pairs of 2 + 3 tokens with one
    negative of 4: 9 tokens each; at 1 FLOP per token, 20 FLOP left keep 2 pairs (18), not 4 (the 20 of their
    queries and documents alone)."""
    from workers.pair_batches import collate
    from workers.steps import fit_budget

    batch = collate([[5, 6]] * 4, [[7, 8, 9]] * 4, 0, 0, [[1, 2, 3, 4]] * 4)
    assert batch.real_tokens == 36
    cut = fit_budget(batch, 1.0, 20.0)
    assert len(cut) == 2 and cut.real_tokens == 18 and cut.n_ids.shape[0] == 2
    assert fit_budget(batch, 1.0, 17.0) is None  # one pair fits: fewer than two, no step
