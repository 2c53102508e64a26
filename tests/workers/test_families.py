"""Every decoder family, every method: N and N_tr from the config equal a count of ``named_parameters()``, the
hardware FLOP count equals torch's FlopCounterMode, freeze finds the blocks, LoRA targets every block Linear, bias
cells are skipped where a family has no biases; pooling by hand; Pythia's trial ids unchanged; the shipped
family grids plan offline.

Tiny configs of each family's own config class (GQA, head_dim != hidden/heads where the family allows it), saved
with ``save_pretrained`` beside a tokenizer trained here, and loaded back as the trial loads them."""
from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace

import pytest
import torch
from support import VOCAB, build_tokenizer, make_pairs, tiny_config

from core.flops import cost_per_token, loss_matmul_flops, sequence_hardware_flops
from core.methods import param_counts
from core.models import FAMILIES, ModelConfigError, auto_lr, model_shape, read_config, trained_blocks
from workers.loss import contrastive_backward, step_shapes
from workers.methods import count_params, decoder_blocks, select_trainable
from workers.pooling import append_eos, assert_right_padded, pool, with_eos
from workers.steps import enable_checkpointing

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = os.path.join(os.path.dirname(__file__), "..", "..")
HAS_BIAS = {"gpt_neox", "qwen2"}
METHODS = [("full", {}), ("freeze", {"trainable_fraction": 0.5}), ("bias", {}), ("lora", {"lora_rank": 4})]
CASES = [(f, m, kw) for f in FAMILIES for m, kw in METHODS if m != "bias" or f in HAS_BIAS]
POOLING = {f: ("mean", "last", "weighted_mean")[i % 3] for i, f in enumerate(FAMILIES)}  # FLOPs do not depend on it


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{family: path} of tiny checkpoints (weights + config + a BPE tokenizer trained on the test pairs)."""
    from transformers import AutoModel

    root = tmp_path_factory.mktemp("families")
    texts = [p["query"] + " " + p["pos"][0] for p in make_pairs(500, seed=3)]
    tokenizer = build_tokenizer(root / "tokenizer", texts, vocab_size=VOCAB)
    paths = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        path = str(root / family)
        AutoModel.from_config(tiny_config(family)).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[family] = path
    return paths


def load(path):
    from transformers import AutoModel

    torch.manual_seed(0)
    return AutoModel.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)


def by_hand(model) -> tuple[int, int]:
    """(N, N_tr) straight from named_parameters: everything but the input embedding (by name)."""
    params = [(n, p) for n, p in model.named_parameters()
              if n.rsplit(".", 2)[-2:] not in (["embed_in", "weight"], ["embed_tokens", "weight"])]
    assert len(params) == len(list(model.parameters())) - 1  # exactly one input embedding, no LM head
    return sum(p.numel() for _, p in params), sum(p.numel() for _, p in params if p.requires_grad)


# --- shapes from the config ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_shape_from_config_matches_the_loaded_model(checkpoints, family):
    model = load(checkpoints[family])
    shape = model_shape(checkpoints[family])
    assert shape.family == family == read_config(checkpoints[family])["model_type"]
    n, _ = by_hand(model)
    assert shape.n_params() == n
    assert shape.bias_params() == sum(p.numel() for name, p in model.named_parameters() if "bias" in name)
    assert (shape.bias_params() > 0) == (family in HAS_BIAS)
    # LoRA's default targets: every Linear inside the decoder blocks, nothing else
    block = decoder_blocks(model)[0]
    linears = {name.rsplit(".", 1)[-1] for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(shape.default_lora_targets()) == linears
    for name, (a, b, bias) in shape.linears().items():
        layer = block.get_submodule(next(n for n, _ in block.named_modules() if n.endswith(name)))
        assert (layer.in_features, layer.out_features, layer.bias is not None) == (a, b, bias)


@pytest.mark.parametrize("family,method,kw", CASES, ids=[f"{f}-{m}" for f, m, _ in CASES])
def test_n_and_n_trainable_by_hand(checkpoints, family, method, kw):
    shape = model_shape(checkpoints[family])
    model = select_trainable(load(checkpoints[family]), method, **kw)
    n, n_tr = by_hand(model)
    assert (n, n_tr) == count_params(model) == param_counts(shape, method, kw.get("lora_rank"),
                                                            kw.get("trainable_fraction"))
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    if method == "freeze":  # the last ceil(f L) blocks (found from the model) and the final norm, no embedding
        k = trained_blocks(shape.layers, kw["trainable_fraction"])
        blocks = {int(name.split(".")[1]) for name in trained if name.startswith("layers.")}
        assert blocks == set(range(shape.layers - k, shape.layers))
        assert {name for name in trained if not name.startswith("layers.")} == \
            ({"final_layer_norm.weight", "final_layer_norm.bias"} if family == "gpt_neox" else {"norm.weight"})
    if method == "bias":
        assert trained == {name for name, _ in model.named_parameters() if "bias" in name}
    if method == "lora":
        adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trained}
        assert adapted == set(shape.default_lora_targets()) and all("lora_" in name for name in trained)
    # cost per token (docs/study.md): full 6N, freeze 2N + 4N_tr, bias / lora 4N + 2N_tr
    expected = {"full": 6 * n, "freeze": 2 * n + 4 * n_tr, "bias": 4 * n + 2 * n_tr, "lora": 4 * n + 2 * n_tr}
    assert cost_per_token(method, n, n_tr) == expected[method]


def test_bias_on_a_family_without_biases_is_an_error_not_a_silent_run(checkpoints):
    with pytest.raises(ValueError, match="no bias parameters"):
        select_trainable(load(checkpoints["llama"]), "bias")


# --- hardware FLOPs against torch's counter -----------------------------------------------------------------
RATIOS: dict = {}


@pytest.mark.slow  # torch's FLOP counter over every family x method (tests/workers/test_flops.py keeps GPT-NeoX's quick)
@pytest.mark.parametrize("family,method,kw", CASES, ids=[f"{f}-{m}" for f, m, _ in CASES])
def test_hardware_flops_match_torch_flop_counter(checkpoints, family, method, kw):
    """One training step, eager attention, right padding, per mode: plain, checkpointing, checkpointing + the
    gradient cache (sub-batches of 2). Ours within 2 % of FlopCounterMode's total."""
    from torch.utils.flop_counter import FlopCounterMode

    shape = model_shape(checkpoints[family])
    b = 4
    q_mask = torch.ones(b, 6, dtype=torch.long)
    d_mask = torch.ones(b, 10, dtype=torch.long)
    d_mask[:2, 7:] = 0  # padding is executed, so counted
    gen = torch.Generator().manual_seed(0)
    batch = SimpleNamespace(q_ids=torch.randint(2, VOCAB, (b, 6), generator=gen), q_mask=q_mask,
                            d_ids=torch.randint(2, VOCAB, (b, 10), generator=gen), d_mask=d_mask)
    ratios = []
    for checkpointing, chunk in ((False, None), (True, None), (True, 2)):
        model = select_trainable(load(checkpoints[family]), method, **kw)
        if checkpointing:
            enable_checkpointing(model)
        model.train()
        with FlopCounterMode(display=False) as counter:
            contrastive_backward(model, batch, 0.05, chunk, contextlib.nullcontext, pooling=POOLING[family])
        ours = loss_matmul_flops(b, shape.hidden) + sum(
            n * sequence_hardware_flops(shape, method, t, lora_rank=kw.get("lora_rank"),
                                        trainable_fraction=kw.get("trainable_fraction"),
                                        checkpointing=checkpointing, grad_cache=chunk is not None)
            for n, t in step_shapes(batch, chunk))
        ratios.append(ours / counter.get_total_flops())
    RATIOS[family, method] = ratios
    print(f"{family:12s} {method:7s} " + " ".join(f"{r:.4f}" for r in ratios))
    assert all(0.98 <= r <= 1.02 for r in ratios), ratios


# --- pooling ------------------------------------------------------------------------------------------------
def test_last_token_pooling_picks_the_eos_under_right_padding():
    eos, pad = 0, 1
    rows = [append_eos([5, 6, 7], eos, 8), append_eos([5], eos, 8), append_eos(list(range(2, 20)), eos, 8)]
    assert rows == [[5, 6, 7, 0], [5, 0], [2, 3, 4, 5, 6, 7, 8, 0]]  # the text truncated, never the EOS
    assert append_eos([5, 6, 0], eos, 8) == [5, 6, 0]  # an EOS already there is not doubled
    ids = torch.full((3, 8), pad)
    mask = torch.zeros(3, 8, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    hidden = torch.arange(3 * 8 * 2, dtype=torch.float32).view(3, 8, 2)  # (B, T, D): row i, position t
    out = pool(hidden, mask, "last")
    assert torch.equal(out, torch.stack([hidden[0, 3], hidden[1, 1], hidden[2, 7]]))
    assert all(ids[i, len(r) - 1] == eos for i, r in enumerate(rows))  # the pooled position holds the EOS
    encode = with_eos(lambda texts: [[5] * len(t) for t in texts], eos, 4)
    assert encode(["ab", "abcdef"]) == [[5, 5, 0], [5, 5, 5, 0]]


def test_weighted_mean_by_hand():
    # row 0: 3 real tokens, weights 1/6, 2/6, 3/6; row 1: 1 real token, weight 1; padding ignored
    hidden = torch.tensor([[[6.0, 0.0], [0.0, 6.0], [6.0, 6.0], [100.0, 100.0]],
                           [[2.0, 4.0], [100.0, 100.0], [100.0, 100.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    out = pool(hidden, mask, "weighted_mean")
    assert torch.allclose(out, torch.tensor([[1.0 + 0.0 + 3.0, 0.0 + 2.0 + 3.0], [2.0, 4.0]]))
    assert torch.allclose(pool(hidden, mask, "mean"), torch.tensor([[4.0, 4.0], [2.0, 4.0]]))


def test_left_padding_is_refused():
    assert_right_padded(torch.tensor([[1, 1, 0], [1, 0, 0]]))
    with pytest.raises(ValueError, match="right-padded"):
        assert_right_padded(torch.tensor([[0, 1, 1], [1, 1, 1]]))


# --- plan: families, bias cells, lr, unsupported models -----------------------------------------------------
def test_bias_cells_are_skipped_on_families_without_biases(checkpoints, tmp_path):
    from orchestrator.grid import parse_grid
    from orchestrator.plan import DataStats, plan_grid

    models = [checkpoints[f] for f in ("gpt_neox", "llama", "qwen2", "qwen3")]
    grid = parse_grid({"name": "fam", "models": models, "methods": {"bias": {}, "lora": {"rank": [2]}},
                       "budgets": [1e9], "data": {"train": "s3://b/train.jsonl"},
                       "train": {"lr": 1e-4, "batch_size": 4}, "plan": {"min_steps": 1}}, base_dir=str(tmp_path))
    plan = plan_grid(grid, data=DataStats({m: 20.0 for m in models}, None))
    skipped = {(t.family, t.method): t.skip_reason for t in plan.trials}
    assert skipped[("llama", "bias")] == skipped[("qwen3", "bias")] == "model has no bias parameters"
    assert skipped[("gpt_neox", "bias")] is None and skipped[("qwen2", "bias")] is None
    assert all(skipped[(f, "lora")] is None for f in ("gpt_neox", "llama", "qwen2", "qwen3"))


def test_unsupported_model_type_is_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "mamba", "hidden_size": 8}')
    with pytest.raises(ModelConfigError, match=r"^\S+: model_type 'mamba' is not supported") as e:
        model_shape(str(tmp_path))
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


# Model cards' "Number of Parameters (Non-Embedding)": Qwen3-0.6B 0.44B, 1.7B 1.4B, 4B 3.6B; Llama 3.2 1B and 3B
# total 1.23B / 3.21B with the (tied) 128256 x hidden embedding; SmolLM2 135M / 360M / 1.7B in total.
@pytest.mark.parametrize("name,n,total", [
    ("Qwen/Qwen3-0.6B", 0.44e9, None), ("Qwen/Qwen3-1.7B-Base", 1.4e9, None), ("Qwen/Qwen3-4B", 3.6e9, None),
    ("meta-llama/Llama-3.2-1B", None, 1.23e9), ("meta-llama/Llama-3.2-3B-Instruct", None, 3.21e9),
    ("HuggingFaceTB/SmolLM2-135M", None, 135e6), ("HuggingFaceTB/SmolLM2-360M", None, 362e6),
    ("HuggingFaceTB/SmolLM2-1.7B", None, 1.71e9),
])
def test_builtin_tables_match_the_model_cards(name, n, total):
    shape = model_shape(name)  # offline: the built-in table
    if n is not None:
        assert shape.n_params() == pytest.approx(n, rel=0.03)
    if total is not None:
        assert shape.n_params() + shape.vocab * shape.hidden == pytest.approx(total, rel=0.03)
    assert shape.bias_params() == 0
    with pytest.raises(ModelConfigError, match="set train.lr"):
        auto_lr(name)


# --- trial ids and the shipped grids ------------------------------------------------------------------------
def test_pythia_trial_ids_unchanged():
    """grids/paper.yaml's ids from before families and pooling existed (a fixed-id regression test)."""
    from orchestrator.grid import expand, load_grid

    trials = {(t.model, t.spec.method, t.spec.lora_rank, t.spec.budget_flops): t.trial_id
              for t in expand(load_grid(os.path.join(REPO, "grids", "paper.yaml")))}
    assert trials["EleutherAI/pythia-14m", "full", None, 1.5e15] == "3c39feed4ba4eecb"
    assert trials["EleutherAI/pythia-2.8b", "lora", 2048, 9.6e16] == "bd80dd27f0e070b8"
    assert trials["EleutherAI/pythia-2.8b", "lora", 2048, 1.5e18] == "90b1a57a3c0f1f1e"


FAMILY_GRIDS = ["qwen3.yaml", "smollm2.yaml", "llama3.2.yaml", "cross-family.yaml"]


@pytest.mark.parametrize("name", FAMILY_GRIDS)
def test_family_grids_plan_offline(name):
    from orchestrator.grid import load_grid
    from orchestrator.plan import DataStats, plan_grid

    grid = load_grid(os.path.join(REPO, "grids", name))
    plan = plan_grid(grid, data=DataStats({m: 78.0 for m in grid.models}, None))
    families = {t.family for t in plan.trials}
    assert families <= set(FAMILIES) and plan.runnable
    assert {t.budget_flops for t in plan.trials} == {1.5e15, 6.0e15, 2.4e16, 9.6e16, 3.8e17, 1.5e18}
    assert {t.method for t in plan.trials} == {"full", "freeze", "bias", "lora"}
    for t in plan.trials:
        if t.method == "bias" and t.family != "gpt_neox":
            assert t.skip_reason == "model has no bias parameters"
        assert t.planned_flops <= t.budget_flops
    if name == "cross-family.yaml":
        assert len(families) >= 3 and {t.spec.pooling for t in plan.trials} >= {"mean", "last"}
