"""The grid file: validation at the edge (one line, the field's path), expansion, stable trial ids."""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest
from pydantic import ValidationError
import yaml

from orchestrator.errors import GridError, UserError
from core.spec import trial_id
from orchestrator.grid import expand, load_grid, parse_grid
from core import spec as spec_defaults

# config.json of a 4-layer, 64-wide GPT-NeoX (the shape of tests/conftest.py's tiny_model): no weights needed
TINY_CONFIG = {"model_type": "gpt_neox", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
               "intermediate_size": 256, "vocab_size": 512, "use_parallel_residual": True,
               "repurpose_pretrain_lr": 1e-3}
class _Delete:
    """The key removed from the grid (a stable repr: test ids must be the same in every process)."""

    def __repr__(self) -> str:
        return "<deleted>"


DELETE = _Delete()


def make_workspace(root, config=TINY_CONFIG) -> None:
    """root/tiny/config.json, root/nolr/config.json (no pretraining lr), root/train.jsonl, root/eval.jsonl."""
    for name, cfg in (("tiny", config), ("nolr", {k: v for k, v in config.items() if "lr" not in k})):
        os.makedirs(root / name, exist_ok=True)
        (root / name / "config.json").write_text(json.dumps(cfg))
    pair = json.dumps({"query": "q", "pos": ["d"], "neg": []})
    (root / "train.jsonl").write_text((pair + "\n") * 10)
    (root / "eval.jsonl").write_text(pair + "\n")


def base_grid() -> dict:
    return {
        "name": "t",
        "models": ["./tiny"],
        "methods": {"full": {}, "freeze": {"trainable_fraction": [0.25, 0.5]}, "bias": {}, "lora": {"rank": [8, 32]}},
        "budgets": [1e9, 4e9],
        "data": {"train": "train.jsonl", "eval": "eval.jsonl"},
    }


def set_path(d: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    for key in parents:
        d = d.setdefault(key, {})
    if value is DELETE:
        del d[last]
    else:
        d[last] = value
    return d


def write_grid(root, grid: dict, name: str = "grid.yaml") -> str:
    path = root / name
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return str(path)


@pytest.fixture
def ws(tmp_path):
    make_workspace(tmp_path)
    return tmp_path


def load(ws, **changes):
    """Load base_grid() with dotted-path changes (``train__lr=...`` for ``train.lr``)."""
    g = base_grid()
    for key, value in changes.items():
        set_path(g, key.replace("__", "."), value)
    return load_grid(write_grid(ws, g))


def cell(t):
    s = t.spec
    return (t.model, s.method, s.lora_rank, s.trainable_fraction, s.budget_flops)


def ids_by_cell(grid) -> dict:
    return {cell(t): t.trial_id for t in expand(grid)}


# --- parsing and defaults ----------------------------------------------------------------------------------
def test_defaults_are_the_papers(ws):
    g = load(ws)
    t = g.train
    assert (t.batch_size, t.temperature, t.max_length, t.lr, t.warmup_fraction, t.weight_decay) == (
        1024, 0.025, 75, "auto", 0.1, 0.1)
    assert (g.plan.min_steps, g.plan.max_epochs, g.run.max_failures, g.run.checkpoint_every_s) == (10, 1.0, 2, 60.0)
    assert g.methods.lora.targets is None  # the family's default: for GPT-NeoX the authors' four (docs/study.md)
    lora = next(t for t in expand(g) if t.spec.method == "lora")
    assert lora.spec.lora_targets == ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
    assert g.resources.gpus == "auto" and g.resources.deepspeed_from_params == 1e9


def test_grid_is_frozen(ws):
    g = load(ws)
    with pytest.raises(ValidationError, match="frozen"):
        g.name = "other"
    with pytest.raises(ValidationError, match="frozen"):
        g.train.batch_size = 2


def test_yaml_quirks_scalars_and_null_sections(ws):
    # PyYAML reads 1.5e15 as a string; `bias:` is null; a scalar is a list of one
    path = ws / "g.yaml"
    path.write_text("name: t\nmodels: ./tiny\nmethods:\n  bias:\n  lora: {rank: 8}\nbudgets: [1.5e15, 6e15]\n"
                    "data: {train: train.jsonl}\nplan: {train_pairs: 2.1e6}\ntrain:\n")
    g = load_grid(str(path))
    assert g.budgets == (1.5e15, 6e15) and g.methods.lora.rank == (8,) and g.models == ("./tiny",)
    assert g.methods.selected() == ("bias", "lora") and g.plan.train_pairs == 2_100_000
    assert g.train.batch_size == spec_defaults.BATCH_SIZE


def test_paths_resolve_against_the_grid_file(ws, monkeypatch):
    monkeypatch.chdir("/")
    g = load(ws, models=["./tiny", "EleutherAI/pythia-14m"])
    specs = {t.model: t.spec for t in expand(g)}
    assert specs["./tiny"].model == str(ws / "tiny")
    assert specs["EleutherAI/pythia-14m"].model == "EleutherAI/pythia-14m"  # a hub name stays a hub name
    assert specs["./tiny"].train_data == str(ws / "train.jsonl")
    assert specs["./tiny"].eval_data == str(ws / "eval.jsonl")
    assert g.base_dir == str(ws)


def test_base_dir_key_moves_relative_paths(ws):
    sub = ws / "grids"
    sub.mkdir()
    g = base_grid()
    g["base_dir"] = ".."
    assert expand(load_grid(write_grid(sub, g)))[0].spec.model == str(ws / "tiny")


# --- expansion ---------------------------------------------------------------------------------------------
def test_expansion_counts_and_order(ws):
    g = load(ws, models=["./tiny", "EleutherAI/pythia-14m"])
    trials = expand(g)
    # 2 models x (full + 2 fractions + bias + 2 ranks) x 2 budgets
    assert len(trials) == 2 * 6 * 2
    assert [cell(t)[1:] for t in trials[:12]] == [
        ("full", None, None, 1e9), ("full", None, None, 4e9),
        ("freeze", None, 0.25, 1e9), ("freeze", None, 0.25, 4e9),
        ("freeze", None, 0.5, 1e9), ("freeze", None, 0.5, 4e9),
        ("bias", None, None, 1e9), ("bias", None, None, 4e9),
        ("lora", 8, None, 1e9), ("lora", 8, None, 4e9), ("lora", 32, None, 1e9), ("lora", 32, None, 4e9)]
    assert len({t.trial_id for t in trials}) == len(trials)
    assert all(re.fullmatch(r"[0-9a-f]{16}", t.trial_id) for t in trials)


def test_spec_carries_the_grid(ws):
    g = load(ws, train__lr=3e-4, train__seed=7, methods__lora__alpha=16, run__eval_every=5, run__report_every=3)
    by = {cell(t)[1:3]: t.spec for t in expand(g)}
    lora, full = by[("lora", 8)], by[("full", None)]
    assert lora.lr == 3e-4 and lora.seed == 7 and lora.lora_alpha == 16 and lora.eval_every == 5
    assert lora.report_every == 3 and full.lora_alpha is None  # LoRA's knobs stay on LoRA trials
    assert expand(load(ws))[0].spec.lr is None  # auto: the worker resolves it


# --- trial ids ---------------------------------------------------------------------------------------------
def test_trial_id_is_the_hash_of_the_identity():
    assert trial_id({"a": 1, "b": [1, 2]}) == trial_id({"b": [1, 2], "a": 1})
    assert trial_id({"a": 1.0}) != trial_id({"a": 2.0})
    assert len(trial_id({})) == 16


def test_ids_are_stable_across_loads_and_machines(ws, tmp_path_factory):
    first = ids_by_cell(load(ws))
    assert ids_by_cell(load(ws)) == first
    # another machine: the same grid and files under another directory
    other = tmp_path_factory.mktemp("elsewhere")
    make_workspace(other)
    assert ids_by_cell(load(other)) == first
    # the same model written differently
    assert list(ids_by_cell(load(ws, models=["tiny/"])).values()) == list(first.values())


def test_stored_grid_round_trips(ws, tmp_path_factory):
    g = load(ws, methods__lora__alpha=16.0, plan__train_pairs=100)
    store = tmp_path_factory.mktemp("store")
    (store / "grid.yaml").write_text(g.to_yaml())
    again = load_grid(str(store / "grid.yaml"))
    assert again == g
    assert [(t.trial_id, t.spec) for t in expand(again)] == [(t.trial_id, t.spec) for t in expand(g)]


@pytest.mark.parametrize("change", [
    {"train__batch_size": 512}, {"train__lr": 1e-4}, {"train__seed": 1}, {"train__max_length": 64},
    {"train__temperature": 0.05}, {"train__warmup_fraction": 0.2}, {"train__weight_decay": 0.0},
    {"train__precision": "fp32"}, {"train__gradient_checkpointing": False}, {"plan__max_epochs": 2},
    {"data__train": "other.jsonl"}, {"data__eval": DELETE}, {"run__eval_pairs": 100},
])
def test_ids_change_with_a_defining_field(ws, change):
    shutil.copy(ws / "train.jsonl", ws / "other.jsonl")
    before, after = ids_by_cell(load(ws)), ids_by_cell(load(ws, **change))
    assert before.keys() == after.keys()
    assert all(before[k] != after[k] for k in before)


@pytest.mark.parametrize("change", [
    {"name": "renamed"}, {"run__report_every": 10}, {"run__checkpoint_every_s": 5}, {"run__chunk_size": 8},
    {"run__save_model": True}, {"run__max_failures": 0}, {"run__max_concurrent_trials": 2},
    {"plan__min_steps": 1}, {"plan__tokens_per_pair": 20}, {"plan__train_pairs": 5},
    {"resources__gpus": 8}, {"resources__cpus_per_trial": 4},
])
def test_ids_ignore_runtime_knobs(ws, change):
    assert ids_by_cell(load(ws, **change)) == ids_by_cell(load(ws))


def test_extending_a_grid_keeps_existing_ids(ws):
    before = ids_by_cell(load(ws))
    after = ids_by_cell(load(ws, budgets=[1e9, 4e9, 1.6e10], models=["./tiny", "EleutherAI/pythia-14m"],
                             methods__lora__rank=[8, 32, 128]))
    assert len(after) == 2 * 7 * 3
    assert all(after[k] == v for k, v in before.items())


def test_lora_knobs_change_only_lora_ids(ws):
    before, after = ids_by_cell(load(ws)), ids_by_cell(load(ws, methods__lora__dropout=0.1))
    for k in before:
        assert (before[k] != after[k]) == (k[1] == "lora")


# --- validation: every bad grid is one line naming the field -----------------------------------------------
BAD_GRIDS = [
    ("methods.lora.rank", [8, 32, 0], "methods.lora.rank[2]: must be >= 1"),
    ("methods.lora.rank", [8.5], "methods.lora.rank[0]: must be an integer, got 8.5"),
    ("methods.lora.rank", [True], "methods.lora.rank[0]: must be an integer, got True"),
    ("methods.lora.rank", [8, 8], "methods.lora.rank: 8 is listed twice"),
    ("methods.lora.rank", [], "methods.lora.rank: must not be empty"),
    ("methods.lora.rank", DELETE, "methods.lora.rank: required"),
    ("methods.lora.alpha", 0, "methods.lora.alpha: must be > 0"),
    ("methods.lora.dropout", 1, "methods.lora.dropout: must be < 1"),
    ("methods.lora.targets", ["embed_in"], "methods.lora.targets: ./tiny: LoRA targets ['embed_in'] are not "
                                           "Linears of a gpt_neox block (it has query_key_value, dense, "
                                           "dense_h_to_4h, dense_4h_to_h)"),
    ("methods.lora.trainable_fraction", [0.5], "methods.lora.trainable_fraction: trainable_fraction is a "
                                               "hyperparameter of freeze, not lora"),
    ("methods.freeze.rank", [8], "methods.freeze.rank: rank is a hyperparameter of lora, not freeze"),
    ("methods.full.rank", [8], "methods.full.rank: rank is a hyperparameter of lora, not full"),
    ("methods.bias.trainable_fraction", [0.5], "methods.bias.trainable_fraction: trainable_fraction is a "
                                               "hyperparameter of freeze, not bias"),
    ("methods.bias.lr", 1e-3, "methods.bias.lr: unknown key for bias (allowed: none)"),
    ("methods.freeze.trainable_fraction", [0.5, 1.5], "methods.freeze.trainable_fraction[1]: must be <= 1"),
    ("methods.freeze.trainable_fraction", [0], "methods.freeze.trainable_fraction[0]: must be > 0"),
    ("methods.freeze.trainable_fraction", ["half"], "methods.freeze.trainable_fraction[0]: must be a number, "
                                                    "got 'half'"),
    ("methods.adapter", {}, "methods.adapter: unknown method (expected one of full, freeze, bias, lora)"),
    ("methods", {}, "methods: must name at least one of full, freeze, bias, lora"),
    ("methods", [], "methods: must be a mapping"),
    ("budgets", [1e9, -1], "budgets[1]: must be > 0"),
    ("budgets", [1e9, "lots"], "budgets[1]: must be a number, got 'lots'"),
    ("budgets", ["inf"], "budgets[0]: must be a finite number, got 'inf'"),
    ("budgets", [1e9, 1e9], "budgets: 1000000000.0 is listed twice"),
    ("budgets", DELETE, "budgets: required"),
    ("name", "Paper Grid", "name: must match [a-z0-9][a-z0-9._-]*, got 'Paper Grid'"),
    ("name", "../escape", "name: must match [a-z0-9][a-z0-9._-]*, got '../escape'"),
    ("name", 7, "name: must be a string"),
    ("name", DELETE, "name: required"),
    ("models", [], "models: must not be empty"),
    ("models", ["./tiny", ""], "models[1]: must not be empty"),
    ("models", DELETE, "models: required"),
    ("traing", {}, "traing: unknown key (did you mean train?)"),
    ("train", [1], "train: must be a mapping"),
    ("train.batchsize", 8, "train.batchsize: unknown key (did you mean batch_size?)"),
    ("train.batch_size", 1, "train.batch_size: must be >= 2"),
    ("train.temperature", 0, "train.temperature: must be > 0"),
    ("train.max_length", 0, "train.max_length: must be >= 1"),
    ("train.lr", -1, "train.lr: must be 'auto' or a number > 0, got -1"),
    ("train.lr", "fast", "train.lr: must be 'auto' or a number > 0, got 'fast'"),
    ("train.warmup_fraction", 1, "train.warmup_fraction: must be < 1"),
    ("train.warmup_fraction", -0.1, "train.warmup_fraction: must be >= 0"),
    ("train.weight_decay", -0.1, "train.weight_decay: must be >= 0"),
    ("train.seed", "zero", "train.seed: must be an integer, got 'zero'"),
    ("train.precision", "fp16", "train.precision: must be one of 'auto', 'bf16' or 'fp32', got 'fp16'"),
    ("train.gradient_checkpointing", "yes", "train.gradient_checkpointing: must be auto, true or false, got 'yes'"),
    ("resources.gpu_memory_gb", 0, "resources.gpu_memory_gb: must be 'auto' or a number of GB > 0, got 0"),
    ("data", DELETE, "data: required"),
    ("data.train", DELETE, "data.train: required"),
    ("data.test", "x.jsonl", "data.test: unknown key"),
    ("plan.min_steps", 0, "plan.min_steps: must be >= 1"),
    ("plan.max_epochs", 0, "plan.max_epochs: must be > 0"),
    ("plan.tokens_per_pair", 0, "plan.tokens_per_pair: must be > 0"),
    ("plan.train_pairs", 0, "plan.train_pairs: must be >= 1"),
    ("resources.gpus", -1, "resources.gpus: must be 'auto' or an integer >= 0, got -1"),
    ("resources.gpu_fraction", 1.5, "resources.gpu_fraction: must be <= 1"),
    ("resources.cpus_per_trial", 0, "resources.cpus_per_trial: must be > 0"),
    ("resources.deepspeed_from_params", 0, "resources.deepspeed_from_params: must be > 0"),
    ("resources.deepspeed_gpus", 0, "resources.deepspeed_gpus: must be >= 1"),
    ("run.max_failures", -1, "run.max_failures: must be >= 0"),
    ("run.checkpoint_every_s", 0, "run.checkpoint_every_s: must be > 0"),
    ("run.report_every", 0, "run.report_every: must be >= 1"),
    ("adaptive.noise_runs", 1, "adaptive.noise_runs: must be >= 2"),
    ("adaptive.decide_runs", 0, "adaptive.decide_runs: must be >= 1"),
    ("adaptive.decide_flops", -0.1, "adaptive.decide_flops: must be >= 0"),
    ("run.eval_every", -1, "run.eval_every: must be >= 0"),
    ("run.eval_pairs", 0, "run.eval_pairs: must be >= 1"),
    ("run.max_concurrent_trials", 0, "run.max_concurrent_trials: must be >= 1"),
    ("run.save_model", "yes", "run.save_model: must be true or false"),
    # checks beyond the schema: the models, the data, cross-field
    ("models", ["./tiny", "tiny/"], "models[1]: the same model as models[0]"),
    ("models", ["./nolr"], "train.lr: 'auto' needs the pretraining lr of ./nolr (a Pythia name or "
                           "'repurpose_pretrain_lr' in its config.json); give a number"),
    ("data.eval", DELETE, None),  # and run.eval_every: 10, below
]


@pytest.mark.parametrize("dotted, value, expected", BAD_GRIDS, ids=[f"{c[0]}={c[1]!r}" for c in BAD_GRIDS])
def test_bad_grid_is_one_line_naming_the_field(ws, dotted, value, expected):
    g = base_grid()
    set_path(g, dotted, value)
    if expected is None:  # evaluating during training without eval data
        g["run"] = {"eval_every": 10}
        expected = "run.eval_every: evaluating during training needs data.eval"
    path = write_grid(ws, g)
    with pytest.raises(GridError) as e:
        load_grid(path)
    assert str(e.value) == f"{path}: {expected}"
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_a_misspelt_top_level_key_is_named_not_the_missing_one(ws):
    """`modles:` for `models:`: pydantic reports both the unknown key and the now missing `models`; the user must
    read the first (it said only "models: required" before)."""
    g = base_grid()
    g["modles"] = g.pop("models")
    path = write_grid(ws, g)
    with pytest.raises(GridError) as e:
        load_grid(path)
    assert str(e.value) == f"{path}: modles: unknown key (did you mean models?)"


def test_an_explicit_lr_needs_no_pretraining_lr(ws):
    assert load(ws, models=["./nolr"], train__lr=1e-4).train.lr == 1e-4


@pytest.mark.parametrize("dotted, value, pattern", [
    ("models", ["./missing"], r"models\[0\]: .*/missing: model path is not a checkpoint directory"),
    ("models", ["./train.jsonl"], r"models\[0\]: .*/train.jsonl: model path is not a checkpoint directory"),
    ("data.train", "nothing/*.jsonl", r"data.train: no file matches .*/nothing/\*.jsonl"),
    ("data.eval", "gone.jsonl", r"data.eval: no file matches .*/gone.jsonl"),
])
def test_bad_references_name_the_field(ws, dotted, value, pattern):
    g = base_grid()
    set_path(g, dotted, value)
    path = write_grid(ws, g)
    with pytest.raises(GridError, match=f"^{re.escape(path)}: {pattern}$"):
        load_grid(path)


def test_not_a_grid_file(ws):
    with pytest.raises(GridError, match=r"^.*/nope.yaml: cannot read the grid file \(No such file or directory\)$"):
        load_grid(str(ws / "nope.yaml"))
    (ws / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(GridError, match=r"list.yaml: must be a YAML mapping"):
        load_grid(str(ws / "list.yaml"))
    (ws / "broken.yaml").write_text("name: t\nmodels: [a, b\n")
    with pytest.raises(GridError, match=r"broken.yaml: line \d+: invalid YAML: "):
        load_grid(str(ws / "broken.yaml"))


def test_parse_grid_without_a_file(ws):
    g = parse_grid(base_grid(), base_dir=str(ws))
    assert expand(g)[0].spec.model == str(ws / "tiny")
    with pytest.raises(GridError, match=r"^grid.yaml: budgets\[0\]: must be > 0$"):
        parse_grid({**base_grid(), "budgets": [0]}, base_dir=str(ws))


def test_shipped_grids_load():
    """Every grid in grids/ loads (torchtune's habit: every shipped config is loaded by a test)."""
    root = os.path.join(os.path.dirname(__file__), "..", "..", "grids")
    paths = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".yaml"))
    assert any(p.endswith("paper.yaml") for p in paths)
    for p in paths:
        assert expand(load_grid(p))
