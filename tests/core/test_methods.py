"""One record per method (core/methods.py): a method registered here flows through the FLOP and memory arithmetic,
the trial's identity, the grid and the plan with no other edit, and no package compares a method's name outside
core/methods.py and the worker's selection (workers/methods.py)."""
import ast
import dataclasses
import pathlib

import pytest

from core import memory, methods
from core.flops import cost_per_token, sequence_hardware_flops
from core.models import ModelShape
from core.spec import TrialSpec

REPO = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("core", "fsio", "workers", "analysis", "orchestrator", "benchmarks")
ALLOWED = {"core/methods.py", "workers/methods.py"}

# hidden 64, 4 layers, intermediate 256 (tests/workers/test_flops.py): a block has 49,984 parameters, N = 200,064;
# LoRA r=4 on the four Linears adds 4 * (256 + 128 + 320 + 320) = 4,096 per block, 16,384 in all.
TINY = ModelShape(hidden=64, layers=4, heads=4, intermediate=256, vocab=512)

# A DoRA-like variant: LoRA's adapters plus a magnitude vector per adapted Linear, and a costlier backward
# (5 N + 3 N_tr per token, made up for the test). Its N_tr is LoRA's (the record counts adapters the same way).
DORA = methods.Method(
    "dora_test", cost_n=5.0, cost_trainable=3.0, trains="adapters", hparam="lora_rank", grid_key="rank",
    symbol="r", hparam_title="DoRA rank", hparam_unit="rank", hparam_axis="DoRA rank r", hparam_integer=True,
    hparam_log_axis=True, weight_grads="adapters")


@pytest.fixture
def dora():
    methods.register(DORA)
    yield DORA
    methods.unregister(DORA.name)


def test_the_built_in_costs_by_hand():
    # the paper's convention: full 6N, freeze 2N + 4N_tr, bias and LoRA 4N + 2N_tr; N = 1000, N_tr = 10
    assert [cost_per_token(m, 1000, 10) for m in ("full", "freeze", "bias", "lora")] == [6000, 2040, 4020, 4020]
    assert methods.names() == ("full", "freeze", "bias", "lora")
    assert methods.LORA.serving_params(1040, 40) == 1000 and methods.FREEZE.serving_params(1000, 250) == 1000


def test_labels_and_hyperparameter_fields():
    assert methods.LORA.label(8.0) == "lora r=8" and methods.FREEZE.label(0.25) == "freeze f=0.25"
    assert methods.FULL.label(None) == "full" and methods.LORA.show(float("nan")) == ""
    assert methods.LORA.hparam_fields(8.0) == {"lora_rank": 8, "trainable_fraction": None}
    assert methods.FREEZE.hparam_value({"lora_rank": 8, "trainable_fraction": 0.5}) == 0.5
    assert methods.BIAS.hparam_value({"lora_rank": 8}) is None


def test_an_unknown_method_is_one_line():
    with pytest.raises(ValueError, match=r"method: 'dora' is not one of full, freeze, bias, lora"):
        methods.get("dora")
    with pytest.raises(ValueError, match="already registered"):
        methods.register(dataclasses.replace(methods.FULL))


def test_a_registered_method_flows_through_flops_memory_and_identity(dora):
    n, n_tr = methods.param_counts(TINY, "dora_test", lora_rank=4)
    assert (n, n_tr) == (200_064 + 16_384, 16_384)
    assert cost_per_token("dora_test", n, n_tr) == 5 * 216_448 + 3 * 16_384
    # executed FLOPs: the adapters' (same targets, same rank) as LoRA's, whatever the convention says
    assert sequence_hardware_flops(TINY, "dora_test", 10, lora_rank=4) == \
        sequence_hardware_flops(TINY, "lora", 10, lora_rank=4)
    fp = memory.footprint(TINY, "dora_test", 16, lora_rank=4)
    assert (fp.gradients, fp.optimizer) == (4 * 16_384, 8 * 16_384)
    spec = TrialSpec(model="m", method="dora_test", budget_flops=1e12, train_data="d", lora_rank=4)
    lora = dataclasses.replace(spec, method="lora")
    assert spec.identity()["method"] == "dora_test" and spec.trial_id() != lora.trial_id()
    with pytest.raises(ValueError, match="lora_rank: required for method lora and dora_test and only for it"):
        TrialSpec(model="m", method="dora_test", budget_flops=1e12, train_data="d")


def test_a_registered_method_flows_through_the_grid_and_the_plan(dora, tmp_path):
    from orchestrator import grid as grid_mod
    from orchestrator.plan import plan_trial

    (tmp_path / "train.jsonl").write_text('{"query": "q", "pos": ["p"]}\n')
    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(
        '{"model_type": "gpt_neox", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, '
        '"intermediate_size": 256, "vocab_size": 512, "repurpose_pretrain_lr": 0.001}')
    Methods, configs = grid_mod.methods_model()  # the grid's sections, built from the records registered now
    section = Methods.model_validate({"dora_test": {"rank": [4, 8]}, "full": None})
    assert section.cells() == (("full", None, None), ("dora_test", 4, None), ("dora_test", 8, None))
    assert list(configs["dora_test"].model_fields) == ["rank", "alpha", "dropout", "targets"]

    g = grid_mod.parse_grid({"name": "g", "models": ["tiny"], "methods": {"full": {}}, "budgets": [1e12],
                             "data": {"train": "train.jsonl"}}, base_dir=str(tmp_path))
    spec = TrialSpec(model=str(model_dir), method="dora_test", budget_flops=4e9, train_data="train.jsonl",
                     lora_rank=4, batch_size=2)
    planned = plan_trial(grid_mod.Trial(spec.trial_id(), "tiny", spec), TINY, 10.0, None, 0, g)
    cost = 5 * 216_448 + 3 * 16_384  # 1,131,392 FLOP per token
    assert (planned.n_params, planned.n_trainable, planned.cost_per_token) == (216_448, 16_384, cost)
    assert planned.planned_tokens == 4e9 // cost == 3_535 and planned.steps == 3_535 // 10 // 2


def _method_comparisons(path: pathlib.Path) -> list[str]:
    """``x == "lora"``-like comparisons (and ``in ("full", ...)``) of a string literal naming a method."""
    names = set(methods.names())
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            for part in (node.left, *node.comparators):
                literals = part.elts if isinstance(part, (ast.Tuple, ast.List, ast.Set)) else [part]
                for lit in literals:
                    if isinstance(lit, ast.Constant) and lit.value in names:
                        where = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
                        out.append(f"{where}:{node.lineno}: compares with {lit.value!r}")
    return out


def test_no_package_compares_a_method_name():
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if str(path.relative_to(REPO)) not in ALLOWED:
                found += _method_comparisons(path)
    assert found == []


def test_the_comparison_finder_finds_one(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text('def f(method):\n    return method in ("bias", "x") or "lora" == method\n')
    assert _method_comparisons(bad) == ["probe.py:2: compares with 'bias'", "probe.py:2: compares with 'lora'"]
