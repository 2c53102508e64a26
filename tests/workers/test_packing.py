"""workers/packing.py: texts packed in rows (no padding) give the padded forward's results.

The layout and the pack by hand; per supported family (tiny configs of tests/support.py, eager and SDPA, sliding
windows made to bind) the packed rows' hidden states and every pooling's embeddings equal the padded batch's;
one contrastive step's loss and parameter gradients (one pass and the gradient cache) agree; the hardware FLOP
count of a packed step equals torch's FlopCounterMode; the switch (``run.packing``) is a runtime knob; a
trial trains the same with packing on and off."""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from support import VOCAB, tiny_config

from core.models import FAMILIES
from workers.loss import contrastive_backward, embed, eval_embeddings, step_shapes
from workers.packing import PACKED_FAMILIES, Layout, layout, pack, packs, unpack

pytestmark = pytest.mark.usefixtures("one_thread")
FP32 = contextlib.nullcontext
NO_SDPA = {"gemma2"}  # transformers 5 refuses SDPA for Gemma 2


# --- the layout and the pack by hand ------------------------------------------------------------------------
def test_layout_best_fit_decreasing_by_hand():
    lengths = [5, 2, 7, 3, 1, 4]
    # rows of 7 (the longest): 7 -> new row 0; 5 -> new row 1 (2 free); 4 -> new row 2 (3 free); 3 -> row 2 (the
    # only one with 3 free); 2 -> row 1; 1 -> nowhere left, new row 3
    assert layout(lengths) == Layout(rows=((2,), (0, 1), (5, 3), (4,)), length=7)
    # rows of 10: 7 -> row 0 (3 free); 5 -> row 1 (5 free); 4 -> row 1, the least room that holds it (1 free);
    # 3 -> row 0 (0 free); 2 -> new row 2 (8 free); 1 -> row 1 (1 free beats 8)
    assert layout(lengths, 10) == Layout(rows=((2, 3), (0, 5, 4), (1,)), length=10)
    # ties: longest first in input order, and among rows with equal room the first opened
    assert layout([2, 2, 2, 2], 4) == Layout(rows=((0, 1), (2, 3)), length=4)
    assert layout([0, 3], 3) == Layout(rows=((1,), (0,)), length=3)  # an empty text takes its one pad
    with pytest.raises(ValueError, match="does not fit"):
        layout([5], 4)


def test_pack_by_hand():
    ids = torch.tensor([[11, 12, 13, 0], [21, 0, 0, 0], [31, 32, 33, 34], [41, 42, 0, 0]])
    mask = (ids != 0).long()
    p = pack(ids, mask)
    # lengths 3, 1, 4, 2 into rows of 4: 4 -> row 0; 3 -> row 1 (1 free); 2 -> row 2 (2 free); 1 -> row 1
    assert p.layout == Layout(rows=((2,), (0, 1), (3,)), length=4)
    assert p.input_ids.tolist() == [[31, 32, 33, 34], [11, 12, 13, 21], [41, 42, 0, 0]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 0]]  # the tail: position 0
    # where each text's tokens sit in the flattened rows; padding points at the text's first token
    assert p.index.tolist() == [[4, 5, 6, 4], [7, 7, 7, 7], [0, 1, 2, 3], [8, 9, 8, 8]]
    hidden = torch.arange(12.0).view(3, 4, 1)  # (R, L, 1): a token's flat position
    assert unpack(hidden, p)[..., 0].tolist() == p.index.float().tolist()


# --- per family: hidden states and pooled embeddings --------------------------------------------------------
def tiny(family: str, attention: str, seed: int = 0):
    """``family``'s tiny model; a sliding window of 3 tokens where the family has one, so that it binds."""
    from transformers import AutoModel

    cfg = tiny_config(family)
    if getattr(cfg, "sliding_window", None) is not None:
        cfg.sliding_window = 3
    torch.manual_seed(seed)
    return AutoModel.from_config(cfg, attn_implementation=attention, dtype=torch.float32)


def texts(lengths, seed=0):
    """Right-padded (S, T) ids and mask of texts of ``lengths`` (pads: id 1)."""
    gen = torch.Generator().manual_seed(seed)
    t = max(lengths)
    mask = (torch.arange(t)[None] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(2, VOCAB, (len(lengths), t), generator=gen) * mask + (1 - mask)
    return ids, mask


CASES = [(f, a) for f in FAMILIES for a in ("eager", "sdpa") if not (a == "sdpa" and f in NO_SDPA)]


@pytest.mark.parametrize("family,attention", CASES)
def test_packed_forward_equals_padded(family, attention):
    """Every text's hidden states, and its embedding under every pooling, as in the padded batch (fp32)."""
    model = tiny(family, attention).eval()
    ids, mask = texts([6, 1, 9, 4, 7, 2, 9, 3])
    p = pack(ids, mask)
    assert len(p.layout.rows) < ids.shape[0]  # texts do share rows
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (S, T, D)
        rows = model(input_ids=p.input_ids, position_ids=p.position_ids).last_hidden_state  # (R, L, D)
        real = mask.bool()
        torch.testing.assert_close(unpack(rows, p)[real], padded[real], atol=1e-5, rtol=1e-5)
        for pooling in ("mean", "last", "weighted_mean"):
            torch.testing.assert_close(embed(model, ids, mask, pooling, p), embed(model, ids, mask, pooling),
                                       atol=1e-5, rtol=1e-5)


def test_every_family_packs():
    assert set(PACKED_FAMILIES) == set(FAMILIES)
    assert packs("auto", "llama") and packs("on", "gemma2") and not packs("off", "llama")
    assert not packs("auto", "mamba")  # not verified: padded
    # a GPU: from 2e8 parameters on (H200: 160m 0.85x, 410m 1.42x of the padded tokens/s); "on" whatever the size
    assert not packs("auto", "llama", device_type="cuda", n_params=85_056_000)
    assert packs("auto", "llama", device_type="cuda", n_params=302_311_424)
    assert packs("on", "llama", device_type="cuda", n_params=85_056_000)
    with pytest.raises(ValueError, match="packing 'on': model_type 'mamba'"):
        packs("on", "mamba")


# --- one contrastive step: loss and gradients ---------------------------------------------------------------
@dataclasses.dataclass
class Pairs:
    """A contrastive batch as workers/pair_batches.py's Batch carries it."""

    q_ids: torch.Tensor
    q_mask: torch.Tensor
    d_ids: torch.Tensor
    d_mask: torch.Tensor

    def __len__(self) -> int:
        return self.q_ids.shape[0]


def pair_batch(q_lengths=(3, 5, 2, 4, 1, 5), d_lengths=(9, 4, 12, 7, 3, 10), seed=0) -> Pairs:
    return Pairs(*texts(list(q_lengths), seed), *texts(list(d_lengths), seed + 1))


def step(model, batch, chunk, packing, pooling):
    model.zero_grad(set_to_none=True)
    loss = contrastive_backward(model, batch, 0.05, chunk, FP32, pooling=pooling, packing=packing)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,pooling,chunk", [("gpt_neox", "mean", None), ("gpt_neox", "last", 4),
                                                  ("llama", "weighted_mean", 2), ("gemma3_text", "mean", 4)])
def test_step_gradients_equal_padded(family, pooling, chunk):
    """Loss and every parameter's gradient, packed vs padded: one pass, and the gradient cache's sub-batches."""
    model = tiny(family, "eager").train()
    batch = pair_batch()
    loss, grads = step(model, batch, chunk, False, pooling)
    loss_p, grads_p = step(model, batch, chunk, True, pooling)
    assert loss_p == pytest.approx(loss, abs=1e-5)
    assert grads_p.keys() == grads.keys() and len(grads) == len(list(model.parameters()))
    for name in grads:
        torch.testing.assert_close(grads_p[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_eval_embeddings_equal_padded():
    model = tiny("qwen3", "eager").eval()
    batches = [pair_batch(), pair_batch((2, 6, 1, 3), (5, 5, 8, 2), seed=5)]
    padded = eval_embeddings(model, batches, 4, FP32, pooling="last")
    packed = eval_embeddings(model, batches, 4, FP32, pooling="last", packing=True)
    for (q, d), (qp, dp) in zip(padded, packed):
        torch.testing.assert_close(qp, q, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dp, d, atol=1e-5, rtol=1e-5)


# --- hardware FLOPs of a packed step against torch's counter ------------------------------------------------
@pytest.mark.parametrize("method,kw", [("full", {}), ("lora", {"lora_rank": 8})])
@pytest.mark.parametrize("checkpointing,chunk", [(False, None), (True, 4)])
def test_packed_hardware_flops_match_torch_flop_counter(method, kw, checkpointing, chunk):
    """test_flops.py's check on a packed step (Pythia-14m-shaped, eager): what the step runs is its rows."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModel, GPTNeoXConfig

    from core.models import ModelShape
    from core.models import PYTHIA_SHAPES
    from core.spec import TrialSpec
    from workers.methods import select_trainable
    from workers.steps import HardwareFlops, enable_checkpointing

    d, layers, heads = PYTHIA_SHAPES["14m"]
    cfg = GPTNeoXConfig(vocab_size=512, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * d, rotary_pct=0.25, use_cache=False)
    torch.manual_seed(0)
    model = select_trainable(AutoModel.from_config(cfg, attn_implementation="eager"), method, **kw)
    if checkpointing:
        enable_checkpointing(model)
    model.train()
    batch = pair_batch((12, 3, 7, 5, 12, 2, 9, 4), (40, 11, 25, 30, 8, 17, 33, 21))
    spec = TrialSpec(model="m", method=method, budget_flops=1e12, train_data="x", lora_rank=kw.get("lora_rank"),
                     gradient_checkpointing=checkpointing, chunk_size=chunk)
    with FlopCounterMode(display=False) as counter:
        contrastive_backward(model, batch, 0.025, chunk, FP32, packing=True)
    shape = ModelShape.from_config(cfg.to_dict())
    ours = HardwareFlops(shape, spec, chunk or 8, packing=True)(batch, 8)
    padded = HardwareFlops(shape, spec, chunk or 8)(batch, 8)
    assert sum(r for r, _ in step_shapes(batch, chunk, True)) < 16  # fewer rows than texts
    print(f"{method} checkpointing={checkpointing} chunk={chunk}: ours/torch {ours / counter.get_total_flops():.4f}, "
          f"packed/padded {ours / padded:.2f}")
    assert abs(ours / counter.get_total_flops() - 1) < 1e-3
    assert ours < 0.85 * padded  # padding was ~40 % of the padded step's tokens



# --- the switch: a runtime knob; a trial with packing on and off ---------------------------------------------
def test_the_switch_is_a_runtime_knob_and_validated(tmp_path):
    from core.spec import TrialSpec
    from orchestrator.errors import GridError
    from orchestrator.grid import expand, parse_grid

    def grid(**run):
        return parse_grid({"name": "p", "models": ["EleutherAI/pythia-14m"], "methods": {"full": {}},
                           "budgets": [1e15], "data": {"train": "s3://b/train.jsonl"}, "run": run},
                          base_dir=str(tmp_path))

    ids = {p: [t.trial_id for t in expand(grid(packing=p))] for p in ("auto", "on", "off")}
    assert ids["auto"] == ids["on"] == ids["off"]
    assert {t.spec.packing for t in expand(grid())} == {"auto"}
    with pytest.raises(GridError, match=r"run\.packing"):
        grid(packing="sometimes")
    with pytest.raises(ValueError, match="packing"):
        TrialSpec(model="m", method="full", budget_flops=1.0, train_data="x", packing="yes")


@pytest.mark.slow  # trains the tiny model twice
def test_a_trial_trains_the_same_packed(tiny_model, pairs_file, eval_file):
    """Packing on and off: the same losses step by step (float rounding apart), fewer hardware FLOP packed."""
    from core.spec import TrialSpec
    from workers.trial import run_trial

    base = TrialSpec(model=tiny_model, method="full", budget_flops=4e9, train_data=str(pairs_file),
                     eval_data=str(eval_file), batch_size=16, chunk_size=8, precision="fp32", eval_pairs=32,
                     num_threads=1, gradient_checkpointing=False)
    runs = {}
    for packing in ("off", "on"):
        events = []
        row = run_trial(dataclasses.replace(base, packing=packing), report=events.append)
        runs[packing] = (row, [r["train_loss"] for e in events for r in e.rows])
    (off, losses_off), (on, losses_on) = runs["off"], runs["on"]
    assert on["steps"] == off["steps"] >= 4 and on["tokens"] == off["tokens"]
    assert losses_on == pytest.approx(losses_off, rel=1e-4)
    assert on["eval_loss"] == pytest.approx(off["eval_loss"], rel=1e-4)
    assert on["hardware_flops"] < off["hardware_flops"]  # the padding (~20 % here) no longer runs
