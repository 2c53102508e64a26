"""The planner: N from the config, budget -> tokens -> steps, skipped cells with reasons, resources, and
the data measured once. Numbers are computed by hand in the comments."""
from __future__ import annotations

import json
import os
import sys
import types

import pytest
import yaml

from orchestrator.errors import UserError
from orchestrator.grid import expand, parse_grid
from orchestrator.plan import (FALLBACK_TOKENS_PER_PAIR, DataStats, measure_data, plan_grid, planned_steps,
                               short, size_trial, skip_reason)

PAPER = os.path.join(os.path.dirname(__file__), "..", "..", "grids", "paper.yaml")
# 4 layers, hidden 64, intermediate 256 (tests/conftest.py's tiny_model)
TINY_CONFIG = {"model_type": "gpt_neox", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
               "intermediate_size": 256, "vocab_size": 512, "use_parallel_residual": True,
               "repurpose_pretrain_lr": 1e-3}
# One block: qkv 64*192+192 = 12480, dense 64*64+64 = 4160, h_to_4h 64*256+256 = 16640, 4h_to_h 256*64+64 = 16448,
# two LayerNorms 4*64 = 256 -> 49984. N = 4*49984 + final LayerNorm 2*64 = 200064.
TINY_N = 200_064


def tiny_grid(root, **changes) -> "Grid":  # noqa: F821
    os.makedirs(root / "tiny", exist_ok=True)
    (root / "tiny" / "config.json").write_text(json.dumps(TINY_CONFIG))
    (root / "train.jsonl").write_text(json.dumps({"query": "q", "pos": ["d"]}) + "\n")
    g = {"name": "t", "models": ["./tiny"], "methods": {"full": {}, "freeze": {"trainable_fraction": [0.5]},
         "bias": {}, "lora": {"rank": [8]}}, "budgets": [1.2e9, 1.2e10], "data": {"train": "train.jsonl"},
         "train": {"batch_size": 4}}
    for key, value in changes.items():
        section, field = key.split("__")
        g.setdefault(section, {})[field] = value
    return parse_grid(g, base_dir=str(root))


def by_cell(plan) -> dict:
    return {(t.method, t.lora_rank, t.trainable_fraction, t.budget_flops): t for t in plan.trials}


# --- pure pieces -------------------------------------------------------------------------------------------
def test_planned_steps():
    assert planned_steps(999, 30.0, 4) == (33.3, 8)
    assert planned_steps(78 * 1024 * 10, 78.0, 1024) == (10240.0, 10)


def test_skip_reason_both_ends():
    assert skip_reason(pairs=1273.0, steps=1, min_steps=10, train_pairs=None, max_epochs=1) == \
        "1 optimizer steps < min_steps 10"
    assert skip_reason(pairs=2.69e9, steps=2_630_506, min_steps=10, train_pairs=2_100_000, max_epochs=1) == \
        "needs 2.7e9 pairs, data has 2.1e6 (max_epochs 1)"
    assert skip_reason(pairs=3e6, steps=2929, min_steps=10, train_pairs=2_100_000, max_epochs=1.5) is None
    assert skip_reason(pairs=40, steps=3, min_steps=10, train_pairs=20, max_epochs=1) == \
        "needs 40 pairs, data has 20 (max_epochs 1); 3 optimizer steps < min_steps 10"


def test_short_numbers():
    assert [short(x) for x in (0, 1273.4, 9999, 2.69e9, 2_100_000, 1.5e18)] == \
        ["0", "1273", "9999", "2.7e9", "2.1e6", "1.5e18"]


def test_tiny_model_by_hand(tmp_path):
    plan = plan_grid(tiny_grid(tmp_path), data=DataStats({"./tiny": 30.0}, train_pairs=1000))
    cells = by_cell(plan)
    full_small, full_big = cells[("full", None, None, 1.2e9)], cells[("full", None, None, 1.2e10)]
    # full: cost 6N = 1,200,384 FLOP/token; 1.2e9 buys floor(999.68) = 999 tokens = 33.3 pairs = 8 steps of 4
    assert (full_small.n_params, full_small.n_trainable) == (TINY_N, TINY_N)
    assert full_small.cost_per_token == 1_200_384
    assert (full_small.planned_tokens, full_small.steps) == (999, 8)
    assert full_small.skip_reason == "8 optimizer steps < min_steps 10"
    # 1.2e10 buys 9996 tokens (1,200,384 * 9997 > 1.2e10) = 333.2 pairs = 83 steps
    assert (full_big.planned_tokens, full_big.steps, full_big.skip_reason) == (9996, 83, None)
    assert full_big.planned_flops == 9996 * 1_200_384 <= 1.2e10
    # freeze 0.5: the last 2 of 4 blocks + the final LayerNorm train: N_tr = 2*49984 + 128 = 100096;
    # cost 2N + 4N_tr = 400128 + 400384 = 800512
    freeze = cells[("freeze", None, 0.5, 1.2e10)]
    assert (freeze.n_trainable, freeze.cost_per_token, freeze.planned_tokens) == (100_096, 800_512, 14_990)
    # bias: per block 192+64+256+64 Linear biases + 2*64 LayerNorm biases = 704; N_tr = 4*704 + 64 = 2880
    bias = cells[("bias", None, None, 1.2e10)]
    assert (bias.n_trainable, bias.cost_per_token) == (2880, 4 * TINY_N + 2 * 2880)
    # LoRA r=8: 8 * (in+out) per Linear = 8 * (256+128+320+320) = 8192 per block, 32768 in all; N = N + 32768
    lora = cells[("lora", 8, None, 1.2e10)]
    assert (lora.n_params, lora.n_trainable) == (TINY_N + 32_768, 32_768)
    assert lora.cost_per_token == 4 * (TINY_N + 32_768) + 2 * 32_768
    # totals: the runnable trials only
    # at 1.2e9 the cheaper methods just make it: LoRA's cost 996,864 buys 1203 tokens = 40.1 pairs = 10 steps
    assert [t.skip_reason is not None for t in plan.trials].count(True) == 1
    assert cells[("lora", 8, None, 1.2e9)].steps == 10 and cells[("lora", 8, None, 1.2e9)].runnable
    assert plan.total_flops == sum(t.planned_tokens * t.cost_per_token for t in plan.trials if t.runnable)


def test_too_little_data_is_skipped_not_dropped(tmp_path):
    grid = tiny_grid(tmp_path)
    plan = plan_grid(grid, data=DataStats({"./tiny": 30.0}, train_pairs=300))
    assert len(plan.trials) == len(expand(grid)) == 8
    assert by_cell(plan)[("full", None, None, 1.2e10)].skip_reason == "needs 333 pairs, data has 300 (max_epochs 1)"
    two_epochs = plan_grid(tiny_grid(tmp_path, plan__max_epochs=2), data=DataStats({"./tiny": 30.0}, 300))
    assert by_cell(two_epochs)[("full", None, None, 1.2e10)].runnable


def test_plan_keeps_ids_and_records_tokens_per_pair(tmp_path):
    grid = tiny_grid(tmp_path)
    plan = plan_grid(grid, data=DataStats({"./tiny": 30.0}, None))
    assert [t.trial_id for t in plan.trials] == [t.trial_id for t in expand(grid)]
    assert all(t.spec.planned_tokens_per_pair == 30.0 for t in plan.trials)
    assert all(t.spec.identity() == e.spec.identity() for t, e in zip(plan.trials, expand(grid)))


def test_json_rows_have_exactly_the_contract_keys(tmp_path):
    doc = plan_grid(tiny_grid(tmp_path), data=DataStats({"./tiny": 30.0}, None)).to_json()
    assert set(doc) == {"trials", "total_flops", "gpu_memory_gb"}
    assert all(set(row) == {"trial_id", "model", "method", "lora_rank", "trainable_fraction", "budget_flops",
                            "planned_tokens", "steps", "resources", "skip_reason", "memory_gb",
                            "gradient_checkpointing", "checkpoint_every_s"} for row in doc["trials"])
    json.dumps(doc)


# --- resources ---------------------------------------------------------------------------------------------
def pythia(size: str, method: str = "full", grid=None, **fields):
    """(shape, spec) of a Pythia size from the built-in tables (no download)."""
    from core.models import model_shape
    from core.spec import TrialSpec

    spec = TrialSpec(model=f"EleutherAI/pythia-{size}", method=method, budget_flops=1e18, train_data="x",
                     **fields)
    return model_shape(spec.model), spec


def test_resources_policy_without_memory(tmp_path):
    """The knobs alone (GPU memory unknown): N below 1e8 shares a GPU, N_tr from 1e9 takes a node."""
    grid = tiny_grid(tmp_path, resources__cpus_per_trial=2)
    size = lambda spec_of, gpus, g=grid: (lambda s: (s.resources, s.deepspeed_gpus))(size_trial(*spec_of, gpus, g))
    assert size(pythia("14m"), 0) == ({"CPU": 2}, 0)  # CPU-only cluster
    assert size(pythia("14m"), 8) == ({"CPU": 2, "GPU": 0.25}, 0)  # N = 1.2M: a quarter GPU
    assert size(pythia("410m"), 8) == ({"CPU": 2, "GPU": 1}, 0)  # N = 302M: one GPU
    assert size(pythia("1.4b"), 8) == ({"CPU": 16, "GPU": 8}, 8)  # N_tr = 1.2B: DeepSpeed over the node
    assert size(pythia("2.8b", "lora", lora_rank=8), 8) == ({"CPU": 2, "GPU": 1}, 0)  # LoRA: small N_tr
    capped = tiny_grid(tmp_path, resources__deepspeed_gpus=4)
    assert size(pythia("1.4b"), 8, capped) == ({"CPU": 4, "GPU": 4}, 4)


# Pythia-1b full fine-tuning, by hand (core/memory.py): N = 805,736,448, N + embedding (50304 x 2048) =
# 908,759,040 parameters. weights 4 x 908,759,040 = 3,635,036,160; bf16 copies 2N = 1,611,472,896; gradients 4N =
# 3,222,945,792; AdamW 8N = 6,445,891,584; overhead 2^30 -> static 15,989,088,256 B (~16 GB, the figure).
# Activations (SDPA): 8h + 8a + 4I = 65,536 B per token and block, x 16 blocks, + 4h = 8,192 outside them (the
# final LayerNorm's input): 150 tokens x 1,056,768 = 158,515,200 B per pair; checkpointed: 150 x (4 x 2048 x 16 +
# 65,536 + 8,192) = 30,720,000 B per pair. Everything x 1.1 margin.
def test_memory_sizes_one_billion_full(tmp_path):
    grid = tiny_grid(tmp_path)
    shape, spec = pythia("1b", batch_size=1024)
    # 80 GB: 80e9 / 1.1 - 15,989,088,256 = 56.74e9 B -> 357 pairs -> chunk 256, no checkpointing
    s = size_trial(shape, spec, 8, grid, 80e9)
    assert (s.resources, s.deepspeed_gpus, s.checkpointing) == ({"CPU": 1, "GPU": 1}, 0, False)
    assert s.memory == int((15_989_088_256 + 256 * 158_515_200) * 1.1) + 1
    # 20 GB, one GPU per node: 2.19e9 B -> 13 pairs < 16 without checkpointing; with it 71 -> chunk 64
    s = size_trial(shape, spec, 1, grid, 20e9)
    assert (s.resources, s.checkpointing, s.problem) == ({"CPU": 1, "GPU": 1}, True, None)
    # 16 GB (below the static 17.6 GB with the margin), 8 per node: ZeRO-2 shards gradients and AdamW, and adds its
    # fp32 master partition (4N / k) and the 2 GB gradient bucket (core/memory.py zero_buffer_bytes). Over 2 GPUs:
    # 3,635,036,160 + 1,611,472,896 + (3,222,945,792 + 6,445,891,584) / 2 + 3,222,945,792 / 2 + 2e9 + 2^30 =
    # 14,766,142,464 > 16e9 / 1.1 = 14,545,454,545: no room. Over 4: 3,635,036,160 + 1,611,472,896 + 2,417,209,344
    # + 805,736,448 + 2e9 + 2^30 = 11,543,196,672; 3.0e9 B left -> 18 pairs of the 256 per rank -> chunk 16
    s = size_trial(shape, spec, 8, grid, 16e9)
    assert (s.resources, s.deepspeed_gpus, s.checkpointing) == ({"CPU": 4, "GPU": 4}, 4, False)
    assert s.memory == int((11_543_196_672 + 16 * 158_515_200) * 1.1) + 1
    # one 16 GB GPU and nothing else: no share holds it, and the plan says so
    s = size_trial(shape, spec, 1, grid, 16e9)
    assert s.problem.startswith("does not fit in GPU memory: needs 17.6 GB per GPU at the least (1 of a GPU")


def test_memory_grows_a_share_before_a_gpu(tmp_path):
    """Pythia-70m full at batch 1024 on a 24 GB card: a quarter (6 GB) holds the static ~1.4 GB and a chunk."""
    grid = tiny_grid(tmp_path)
    shape, spec = pythia("70m", batch_size=1024)
    s = size_trial(shape, spec, 4, grid, 24e9)
    assert s.resources == {"CPU": 1, "GPU": 0.25} and s.share == 0.25 and s.checkpointing is False
    # a 2 GB card: a quarter (0.5 GB) cannot hold the static part, half of it (1 GB) neither, a whole one can
    s = size_trial(shape, spec, 4, grid, 2e9)
    assert s.resources == {"CPU": 1, "GPU": 1} and s.share == 1


def test_plan_carries_the_share_checkpointing_and_checkpoint_interval(tmp_path):
    stats = DataStats({"./tiny": 30.0}, None)
    plan = plan_grid(tiny_grid(tmp_path, resources__gpus=4, resources__gpu_memory_gb=24), data=stats)
    assert plan.gpu_memory == 24e9
    assert all(t.spec.device_share == 0.25 and t.checkpointing is False for t in plan.trials)
    assert all(t.spec.checkpoint_every_s == 60.0 for t in plan.trials)  # tiny checkpoints: the grid's interval
    row = plan.to_json()["trials"][0]
    assert row["gradient_checkpointing"] is False and row["memory_gb"] > 1.0 and row["checkpoint_every_s"] == 60.0
    # forced on by the grid: planned on whatever memory says
    forced = plan_grid(tiny_grid(tmp_path, resources__gpus=4, resources__gpu_memory_gb=24,
                                 train__gradient_checkpointing=True), data=stats)
    assert all(t.checkpointing is True for t in forced.trials)
    # CPU: decided by the trial on its machine
    assert all(t.checkpointing is None for t in plan_grid(tiny_grid(tmp_path), data=stats).trials)


def test_checkpoint_interval_scales_with_size():
    from core.memory import checkpoint_bytes, checkpoint_interval_s

    # 1B full: 12 x 805,736,448 = 9.67e9 B; at 250 MB/s a 38.7 s write; 5 % of the time -> every 773 s
    assert checkpoint_bytes(805_736_448) == 9_668_837_376
    assert checkpoint_interval_s(9_668_837_376, 60.0) == pytest.approx(773.5, abs=0.1)
    assert checkpoint_interval_s(10**6, 60.0) == 60.0  # small: the grid's floor


def test_plan_shows_cpu_unless_the_grid_names_gpus(tmp_path):
    stats = DataStats({"./tiny": 30.0}, None)
    assert all(t.resources == {"CPU": 1} for t in plan_grid(tiny_grid(tmp_path), data=stats).trials)
    with_gpus = plan_grid(tiny_grid(tmp_path, resources__gpus=4), data=stats)
    assert with_gpus.gpus_available == 4 and all(t.resources["GPU"] == 0.25 for t in with_gpus.trials)
    assert plan_grid(tiny_grid(tmp_path), gpus_available=2, data=stats).trials[0].resources["GPU"] == 0.25


# --- the paper's grid, offline -----------------------------------------------------------------------------
def paper_grid(**plan_keys):
    with open(PAPER) as f:
        data = yaml.safe_load(f)
    data["plan"].update(plan_keys)
    return parse_grid(data, source=PAPER, base_dir=os.path.dirname(PAPER))


def test_paper_grid_plans_both_degenerate_ends():
    # the authors' 78 tokens per pair; a BGE-sized training set of 2.1e6 pairs
    plan = plan_grid(paper_grid(), data=DataStats({m: 78.0 for m in paper_grid().models}, 2_100_000))
    assert len(plan.trials) == 8 * 9 * 6
    cells = {(t.model.split("-")[-1], t.method, t.lora_rank, t.trainable_fraction, t.budget_flops): t
             for t in plan.trials}
    # 2.8b full: 6 * 2,517,652,480 FLOP/token; 1.5e15 buys 99,298 tokens = 1273 pairs = 1 step of 1024
    big = cells[("2.8b", "full", None, None, 1.5e15)]
    assert (big.n_params, big.planned_tokens, big.steps) == (2_517_652_480, 99_298, 1)
    assert big.skip_reason == "1 optimizer steps < min_steps 10"
    # 14m full: 6 * 1,189,888 FLOP/token; 1.5e18 buys 2.1e11 tokens = 2.7e9 pairs > 2.1e6
    small = cells[("14m", "full", None, None, 1.5e18)]
    assert small.planned_tokens == int(1.5e18 // (6 * 1_189_888))
    assert small.skip_reason == "needs 2.7e9 pairs, data has 2.1e6 (max_epochs 1)"
    assert cells[("410m", "lora", 128, None, 2.4e16)].runnable
    assert 0 < len(plan.skipped) < len(plan.trials)


def test_paper_grid_resources_on_a_gpu_cluster():
    plan = plan_grid(paper_grid(), gpus_available=8, data=DataStats({m: 78.0 for m in paper_grid().models}, None))
    first = {(t.model.split("-")[-1], t.method, t.lora_rank, t.trainable_fraction): t for t in plan.trials}
    assert first[("14m", "full", None, None)].resources == {"CPU": 1, "GPU": 0.25}
    assert first[("1b", "full", None, None)].resources == {"CPU": 1, "GPU": 1}
    assert first[("1.4b", "full", None, None)].display_resources() == {"CPU": 8, "GPU": 8, "deepspeed": 8}
    assert first[("2.8b", "lora", 8, None)].resources == {"CPU": 1, "GPU": 1}
    # rank 2048 on 2.8b: 32 layers * 2048 * 38400 = 2.5e9 adapter parameters: DeepSpeed
    assert first[("2.8b", "lora", 2048, None)].deepspeed_gpus == 8


# --- measuring the data (a stand-in workers.pair_files: no network) ------------------------------------
class FakeDataError(ValueError):
    pass


@pytest.fixture
def fake_data(monkeypatch):
    """workers.pair_files with call counters; ``fake.fail = "..."`` makes every read raise DataError."""
    fake = types.ModuleType("workers.pair_files")
    fake.DataError, fake.calls, fake.fail = FakeDataError, [], None

    def count_pairs(uri):
        fake.calls.append(("count", uri))
        if fake.fail:
            raise FakeDataError(f"{uri}: {fake.fail}")
        return 5000

    def measure_tokens_per_pair(uri, tokenizer, max_length, sample=1024):
        fake.calls.append(("measure", tokenizer, max_length, sample))
        if fake.fail:
            raise FakeDataError(f"{uri}: {fake.fail}")
        return 40.0

    fake.count_pairs, fake.measure_tokens_per_pair = count_pairs, measure_tokens_per_pair
    monkeypatch.setitem(sys.modules, "workers.pair_files", fake)
    monkeypatch.setattr("orchestrator.plan._load_tokenizer", lambda path: f"tok:{path}")
    return fake


def test_measured_once_per_tokenizer_and_data(fake_data):
    # the 8 Pythia models share one tokenizer: one measurement, one count
    stats = measure_data(paper_grid())
    assert stats.tokens_per_pair == {m: 40.0 for m in paper_grid().models} and stats.train_pairs == 5000
    assert [c[0] for c in fake_data.calls] == ["count", "measure"]
    assert fake_data.calls[1][1:] == ("tok:EleutherAI/pythia-14m", 75, 1024)
    assert stats.warnings == ()


def test_grid_numbers_override_measurement(fake_data):
    stats = measure_data(paper_grid(tokens_per_pair=50, train_pairs=10**6))
    assert fake_data.calls == [] and stats.train_pairs == 10**6
    assert set(stats.tokens_per_pair.values()) == {50.0}


def test_unreachable_remote_data_falls_back_with_a_warning(fake_data):
    fake_data.fail = "cannot open: no network"
    plan = plan_grid(paper_grid(train_pairs=2_100_000))
    assert {t.spec.planned_tokens_per_pair for t in plan.trials} == {FALLBACK_TOKENS_PER_PAIR}
    assert len(plan.warnings) == 1 and plan.warnings[0].startswith("warning: cannot read s3://your-bucket/")
    assert "78 tokens per pair" in plan.warnings[0]
    cells = {(t.model, t.method, t.budget_flops): t for t in plan.trials}
    assert cells[("EleutherAI/pythia-14m", "full", 1.5e18)].skip_reason.startswith("needs 2.7e9 pairs")
    # without plan.train_pairs the pairs are unknown: warned, and the max_epochs check is off
    unknown = measure_data(paper_grid())
    assert unknown.train_pairs is None and len(unknown.warnings) == 2 and "plan.train_pairs" in unknown.warnings[0]


def test_strict_planning_refuses_a_guess(fake_data):
    fake_data.fail = "cannot open: no network"
    with pytest.raises(UserError, match=r"^s3://your-bucket/bge/train/\*.jsonl: cannot open: no network$"):
        measure_data(paper_grid(), strict=True)


def test_bad_local_data_is_a_user_error(fake_data, tmp_path):
    fake_data.fail = "3 of 4 lines unusable"
    with pytest.raises(UserError, match=r"train.jsonl: 3 of 4 lines unusable$"):
        measure_data(tiny_grid(tmp_path))


def test_missing_tokenizer_falls_back(fake_data, tmp_path, monkeypatch):
    def no_tokenizer(path):
        raise OSError(f"{path} has no tokenizer files")

    monkeypatch.setattr("orchestrator.plan._load_tokenizer", no_tokenizer)
    stats = measure_data(tiny_grid(tmp_path))
    assert stats.tokens_per_pair == {"./tiny": FALLBACK_TOKENS_PER_PAIR} and stats.train_pairs == 5000
    assert "cannot load the tokenizer of ./tiny" in stats.warnings[0]
    with pytest.raises(UserError, match="cannot load its tokenizer"):
        measure_data(tiny_grid(tmp_path), strict=True)


def test_measures_real_data_with_the_models_tokenizer(tiny_model, pairs_file, tmp_path):
    """The real workers.pair_files and tokenizer: one measurement on a sample, one count."""
    from transformers import AutoTokenizer

    g = {"name": "t", "models": [tiny_model], "methods": {"full": {}}, "budgets": [1e10],
         "data": {"train": pairs_file}, "train": {"batch_size": 8, "max_length": 32}, "plan": {"sample_pairs": 64}}
    stats = measure_data(parse_grid(g))
    # by hand: the first 64 pairs of the file, each text tokenised (no special tokens) and truncated to 32
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    with open(pairs_file) as f:
        pairs = [json.loads(line) for line in f][:64]
    lengths = [min(32, len(tokenizer(text, add_special_tokens=False)["input_ids"]))
               for p in pairs for text in (p["query"], p["pos"][0])]
    expected = sum(lengths) / 64
    assert stats.tokens_per_pair == {tiny_model: pytest.approx(expected)} and 2 < expected <= 64
    assert stats.train_pairs == 2000 and stats.warnings == ()


def test_cluster_gpu_memory_from_ray_accelerator_types(monkeypatch):
    import ray

    from orchestrator.driver import cluster_gpu_memory

    nodes = [{"Alive": True, "Resources": {"CPU": 8, "GPU": 8, "accelerator_type:H100": 1}},
             {"Alive": True, "Resources": {"CPU": 8, "GPU": 4, "accelerator_type:L4": 1}},
             {"Alive": False, "Resources": {"GPU": 1, "accelerator_type:T4": 1}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    assert cluster_gpu_memory() == 24e9  # the smallest live GPU sizes every trial
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"GPU": 1}}])
    assert cluster_gpu_memory() is None  # no type named: the knobs alone
