"""workers/trial.py (and the steps it shares with the DeepSpeed recipe, workers/steps.py) end to end on the tiny
model (4 layers x 64, 512-token BPE; tests/conftest.py).

Every method trains to its FLOP budget (numbers cross-checked against a replay of the data stream and
test_flops.py's hand counts), the lr schedule by hand, the budget's edges (the last partial step, one pair left,
a padding-heavy last batch), kill -9 and resume against an uninterrupted run, bad data, exhausted data, lr
'auto', precisions, half-precision checkpoints loaded in fp32, the plan taken from the planner.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import make_pairs, write_jsonl
from test_flops import CASES

import workers.steps as steps_mod
import workers.trial as trial_mod
from core.models import ModelConfigError
from core.spec import TrialSpec
from workers import checkpoint
from workers.pair_files import DataError, measure_tokens_per_pair
from workers.steps import has_bf16, lr_factor, train_stream
from workers.trial import run_trial

ROOT = Path(__file__).resolve().parents[2]
# ~36 real tokens a pair, 16 pairs a step: full fine-tuning (6 x 200,064 FLOP a token) spends ~7e8 a step,
# so 6.5e9 is ~9 steps of full and ~13 of freeze / bias / LoRA
BUDGET = 6.5e9
METHOD_CASES = [c for c in CASES if c[1].get("trainable_fraction") != 0.3]  # full, freeze 0.5, bias, lora r=4


pytestmark = pytest.mark.usefixtures("one_thread")


def make_spec(tiny_model, pairs_file, eval_file, method="full", **kw) -> TrialSpec:
    args = dict(model=tiny_model, method=method, budget_flops=BUDGET, train_data=str(pairs_file),
                eval_data=str(eval_file), batch_size=16, precision="fp32", eval_pairs=32, num_threads=1)
    return TrialSpec(**(args | kw))


def all_rows(events) -> list[dict]:
    return [r for e in events for r in e.rows]


def upsert(rows) -> list[dict]:
    """What the driver's store keeps: rows keyed by step, later ones replacing earlier ones."""
    return [r for _, r in sorted({r["step"]: r for r in rows}.items())]


def replay_step_tokens(spec: TrialSpec, cost: float) -> tuple[list[int], int | None]:
    """The real tokens of each step, recomputed from the data stream by the budget rule (exact integer
    arithmetic: Python compares int and float exactly): whole batches while they fit, then the pairs of the
    next batch that still fit (at least 2). Also the tokens of the first pair left out (None: none)."""
    from transformers import AutoTokenizer

    steps, total = [], 0
    with train_stream(spec, AutoTokenizer.from_pretrained(spec.model)) as stream:
        for batch in stream:
            lens = (batch.q_mask.sum(1) + batch.d_mask.sum(1)).tolist()
            used = 0
            for i, n in enumerate(lens):
                if int(cost) * (total + used + n) > spec.budget_flops:
                    if i >= 2:
                        steps.append(used)
                    return steps, n
                used += n
            steps.append(used)
            total += used
    return steps, None


def spy_on_model(monkeypatch) -> dict:
    """Captures the model run_trial trains (make_plan passes it to count_params) and its weights before training."""
    seen = {}
    real = steps_mod.count_params

    def spy(model):
        seen["model"] = model
        seen["before"] = {k: p.detach().clone() for k, p in model.named_parameters()}
        return real(model)

    monkeypatch.setattr(steps_mod, "count_params", spy)
    return seen


# --------------------------------------------------------------------------------------------------------
# Every method


@pytest.mark.slow  # trains the tiny model
@pytest.mark.parametrize("method,kw,n,n_tr,cost", METHOD_CASES, ids=[c[0] for c in METHOD_CASES])
def test_every_method_trains_to_its_budget(tiny_model, pairs_file, eval_file, tmp_path, monkeypatch,
                                           method, kw, n, n_tr, cost):
    seen = spy_on_model(monkeypatch)
    spec = make_spec(tiny_model, pairs_file, eval_file, method, save_model=True, **kw)
    events = []
    row = run_trial(spec, report=events.append, output_dir=str(tmp_path / "out"))

    # parameters and FLOP (test_flops.py's hand numbers)
    assert (row["n_params"], row["n_trainable"]) == (n, n_tr)
    assert 0.97 * BUDGET <= row["flops"] <= BUDGET
    assert row["flops"] == cost * row["tokens"]
    assert row["hardware_flops"] >= row["flops"]  # checkpointing recomputes the forward
    assert math.isfinite(row["eval_loss"]) and math.isfinite(row["train_loss"])
    assert row["reason"] is None and row["bad_lines"] == 0

    # tokens = the real tokens of the batches the stream served, step by step
    step_tokens, _ = replay_step_tokens(spec, cost)
    assert 8 <= len(step_tokens) <= 15
    assert row["steps"] == len(step_tokens) and row["tokens"] == sum(step_tokens)

    # metric rows: steps 1..n once each (the last one again, with eval_loss, in the done event when it was sent
    # before), batched into events at most every report_every_s (the first at once, the done event at the end)
    rows = all_rows(events)
    assert [r["step"] for r in rows] in ([*range(1, row["steps"] + 1)], [*range(1, row["steps"] + 1), row["steps"]])
    assert len(events) <= 3 + row["wall_s"] / spec.report_every_s  # the first, the last step, done
    assert [r["tokens"] for r in upsert(rows)] == [sum(step_tokens[:i + 1]) for i in range(len(step_tokens))]
    assert all(r["flops"] == cost * r["tokens"] for r in rows)
    last = upsert(rows)[-1]
    assert last["eval_loss"] == row["eval_loss"] and last["flops"] == row["flops"]
    assert all(r["eval_loss"] is None for r in upsert(rows)[:-1])  # eval_every=0: at the end only
    assert events[-1].done and events[-1].trial == row and not any(e.done for e in events[:-1])
    # lr 'auto': the tiny model's config says pretraining lr 1e-3, so 1e-4 at the warmup's top; the first step is
    # on the warmup's line (the budget fraction it reaches / 0.1), capped at the top: 9-13 steps, so a step is
    # 8-11 % of the budget
    assert rows[0]["lr"] == pytest.approx(1e-4 * min(1.0, rows[0]["flops"] / BUDGET / 0.1), rel=1e-12)
    # the trial row: no planner here, so the plan by hand (whole tokens the budget buys; whole batches of the
    # pairs those tokens make at the data's measured tokens per pair), and the batching
    from transformers import AutoTokenizer

    per_pair = measure_tokens_per_pair(spec.train_data, AutoTokenizer.from_pretrained(tiny_model), spec.max_length)
    assert row["planned_tokens"] == int(BUDGET // cost)
    assert row["planned_steps"] == int(row["planned_tokens"] / per_pair) // 16
    assert row["batching"] == "random"

    # frozen parameters unchanged, trained ones changed; the trained non-embedding ones are N_tr
    model = seen["model"]
    after = dict(model.named_parameters())
    trained = {k for k, p in after.items() if p.requires_grad}
    assert sum(after[k].numel() for k in trained if "emb" not in k) == n_tr
    for k, before in seen["before"].items():
        assert torch.equal(after[k], before) != (k in trained), k

    # save_model wrote the trained weights
    from safetensors.torch import load_file

    out = tmp_path / "out"
    if method == "lora":  # peft saves the adapters only, without the adapter name
        saved = load_file(out / "adapter_model.safetensors")
        assert {k.replace(".default", "") for k in trained} == set(saved)
        for k in trained:
            assert torch.equal(saved[k.replace(".default", "")], after[k]), k
    else:
        saved = load_file(out / "model.safetensors")
        assert set(saved) == set(after)
        assert all(torch.equal(saved[k], after[k]) for k in after)
    assert (out / "tokenizer.json").exists()


# --------------------------------------------------------------------------------------------------------
# The lr schedule


def test_lr_factor_by_hand():
    w = 0.1
    assert lr_factor(0.0, 0.05, w) == pytest.approx(0.5)  # warmup: the fraction reached after the step / 0.1
    assert lr_factor(0.05, 0.08, w) == pytest.approx(0.8)
    assert lr_factor(0.0, 1e-6, w) == pytest.approx(1e-5)  # never 0 on the first step
    assert lr_factor(0.09, 0.1, w) == 1.0  # the top at the end of warmup
    assert lr_factor(0.1, 0.2, w) == 1.0  # cosine from its start
    assert lr_factor(0.1 + 0.9 / 4, 0.5, w) == pytest.approx(0.8535533905932737)  # 0.5 (1 + cos(pi / 4))
    assert lr_factor(0.55, 0.6, w) == pytest.approx(0.5)  # halfway through the cosine
    end = lr_factor(0.99, 1.0, w)  # the last step: taken at its start, 0.5 (1 + cos(pi 0.89 / 0.9))
    assert end == pytest.approx(3.0458649045211894e-4) and 0 < end < 1e-3
    assert lr_factor(1.0, 1.0, w) == 0.0
    assert lr_factor(0.0, 0.01, 0.0) == 1.0  # no warmup


def fixed_length_pairs(path, n: int = 400) -> str:
    """Pairs whose both sides are longer than 8 tokens: at max_length 8 every pair is exactly 16 real tokens and
    every batch of 16 exactly 256, so budget fractions are whole fifths and the schedule can be written by hand."""
    return write_jsonl(path, make_pairs(n, seed=3))


FIXED = dict(max_length=8, eval_data=None)
STEP_TOKENS = 16 * 16


@pytest.mark.slow  # trains the tiny model
def test_rows_follow_the_lr_schedule_by_hand(tiny_model, eval_file, tmp_path):
    """Five equal steps, warmup 40 %, peak 2e-3. Step i spends the budget fraction (i-1)/5 -> i/5: warmup
    i/5 / 0.4 (0.5, 1.0), then the cosine at the step's start, 0.5 (1 + cos(pi (start - 0.4) / 0.6)):
    start 0.4 -> 1.0, 0.6 -> 0.75, 0.8 -> 0.25."""
    train = fixed_length_pairs(tmp_path / "fixed.jsonl")
    cost = CASES[0][4]  # full
    spec = make_spec(tiny_model, train, eval_file, budget_flops=5 * cost * STEP_TOKENS, lr=2e-3,
                     warmup_fraction=0.4, **FIXED)
    events = []
    row = run_trial(spec, report=events.append)
    rows = upsert(all_rows(events))
    assert [r["tokens"] for r in rows] == [STEP_TOKENS * i for i in range(1, 6)]  # the premise: equal steps
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 2e-3, 2e-3, 1.5e-3, 5e-4], rel=1e-9)
    assert row["steps"] == 5 and row["flops"] == spec.budget_flops and row["reason"] is None
    assert row["eval_loss"] is None  # no eval data


# --------------------------------------------------------------------------------------------------------
# The budget's edges: the last partial step, one pair left, a padding-heavy last batch


def first_batches(spec: TrialSpec, n: int) -> list:
    """The first ``n`` batches the trial's stream serves (workers/steps.py's train_stream, as run_trial reads it)."""
    from transformers import AutoTokenizer

    with train_stream(spec, AutoTokenizer.from_pretrained(spec.model)) as stream:
        return [b for _, b in zip(range(n), stream)]


def pair_tokens(batch) -> list[int]:
    return (batch.q_mask.sum(1) + batch.d_mask.sum(1)).tolist()


@pytest.mark.slow  # trains the tiny model
@pytest.mark.parametrize("margin", ["mid-pair", "one FLOP short"])
def test_final_partial_step_ends_within_one_pair(tiny_model, pairs_file, eval_file, margin):
    cost = CASES[0][4]  # full: 6 x 200,064
    batches = first_batches(make_spec(tiny_model, pairs_file, eval_file, budget_flops=1e15), 4)
    lens = pair_tokens(batches[3])
    three = sum(b.real_tokens for b in batches[:3])
    seven = sum(lens[:7])
    if margin == "mid-pair":  # 3 batches, 7 pairs of the 4th, half the 8th: 7 pairs fit
        budget, expected = cost * (three + seven) + cost * lens[7] / 2, three + seven
    else:  # 1 FLOP short of the 7th pair's end: only 6 fit (float32 rounding of the cut would let in the 7th)
        budget, expected = cost * (three + seven) - 1.0, three + seven - lens[6]
    assert budget % (cost * batches[3].real_tokens) != 0

    row = run_trial(make_spec(tiny_model, pairs_file, eval_file, budget_flops=budget, eval_data=None))
    assert row["steps"] == 4 and row["tokens"] == expected
    assert row["flops"] == cost * expected <= budget
    next_pair = lens[7] if margin == "mid-pair" else lens[6]
    assert budget - row["flops"] < cost * next_pair  # within one pair's cost of the budget
    assert row["reason"] is None


@pytest.mark.slow  # trains the tiny model
@pytest.mark.parametrize("pairs_left", [1, 2])
def test_one_pair_left_in_the_budget_ends_without_a_step(tiny_model, eval_file, tmp_path, pairs_left):
    """After 3 whole steps the budget holds 1.5 pairs (a contrastive batch needs 2): the trial ends there, no
    step of one pair, and not as 'data exhausted'. With 2.5 pairs left a last step of 2 pairs runs."""
    train = fixed_length_pairs(tmp_path / "fixed.jsonl")
    cost = CASES[0][4]
    budget = cost * (3 * STEP_TOKENS + 16 * pairs_left + 8)
    events = []
    row = run_trial(make_spec(tiny_model, train, eval_file, budget_flops=budget, **FIXED), report=events.append)
    expected = 3 * STEP_TOKENS + (16 * 2 if pairs_left == 2 else 0)
    assert row["steps"] == (4 if pairs_left == 2 else 3) and row["tokens"] == expected
    assert row["flops"] == cost * expected <= budget and row["reason"] is None
    assert [r["step"] for r in upsert(all_rows(events))] == list(range(1, row["steps"] + 1))


@pytest.mark.slow  # trains the tiny model
def test_padding_heavy_last_batch_is_cut_by_real_tokens(tiny_model, eval_file, tmp_path):
    """The 4th batch's real tokens fit the remaining budget, its padded tokens do not: it trains whole (the
    paper counts real tokens), and the budget then holds less than a pair: flops end <= budget, within two pairs.
    Half the pairs have a one-word query and a long positive, half the reverse: every batch is ~45 % padding
    whether it is batched at random or by length (both kinds have the same longer side)."""
    lines = []
    for i, p in enumerate(make_pairs(400, seed=4)):
        long = p["pos"][0]
        lines.append({"query": "the", "pos": [long]} if i % 2 else {"query": long, "pos": ["the"]})
    train = write_jsonl(tmp_path / "ragged.jsonl", lines)
    cost = CASES[0][4]
    spec = make_spec(tiny_model, train, eval_file, **FIXED)
    batches = first_batches(spec, 4)
    three, real, padded = sum(b.real_tokens for b in batches[:3]), batches[3].real_tokens, batches[3].padded_tokens
    assert padded > 1.3 * real  # padding-heavy
    budget = cost * (three + real + 1)  # between the 4th batch's real and padded cost, less than a pair over
    assert cost * (three + real) <= budget < cost * (three + padded)

    row = run_trial(dataclasses.replace(spec, budget_flops=budget))
    assert row["steps"] == 4 and row["tokens"] == three + real  # whole: not cut by its padded tokens
    assert row["flops"] == cost * row["tokens"] <= budget  # counted by real tokens
    assert budget - row["flops"] < cost * 2 * min(min(pair_tokens(b)) for b in batches)
    assert row["padding_fraction"] == pytest.approx(1 - row["tokens"] / sum(b.padded_tokens for b in batches))
    assert row["reason"] is None


# --------------------------------------------------------------------------------------------------------
# Kill -9 and resume

CHILD = """
import json, os, signal, sys
sys.path.insert(0, sys.argv[3])
from core.spec import TrialSpec
from workers.trial import run_trial

KILL_AT = int(sys.argv[4])

def report(event):
    # the event of step KILL_AT goes out before that step's checkpoint: step KILL_AT - 1's is the newest
    if event.step == KILL_AT:
        with open(os.path.join(sys.argv[2], "LATEST")) as f:
            assert f.read().strip() == f"step-{KILL_AT - 1:08d}", "not the checkpoint of the step before"
        os.kill(os.getpid(), signal.SIGKILL)

run_trial(TrialSpec.from_dict(json.loads(sys.argv[1])), report=report, checkpoint_uri=sys.argv[2])
print("done", flush=True)
"""


@pytest.mark.slow
def test_kill_and_resume_equals_an_uninterrupted_run(tiny_model, pairs_file, eval_file, tmp_path, monkeypatch):
    # LoRA with dropout and the gradient cache: the resumed run needs the adapters, AdamW's moments, the data
    # position and the RNG state back to reproduce the uninterrupted one. The child kills itself (SIGKILL) at the
    # event of step 4 (an event per step: report_every_s 0), after step 4's optimizer update and before its
    # checkpoint: the newest is step 3's (a checkpoint every step: checkpoint_every_s 0). No timing involved.
    spec = make_spec(tiny_model, pairs_file, eval_file, "lora", budget_flops=5e9, lora_rank=4, lora_dropout=0.1,
                     chunk_size=8, checkpoint_every_s=0.0, report_every_s=0.0)
    ckpt = str(tmp_path / "ckpt")
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec.to_dict()), ckpt, str(ROOT), "4"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    _, state = checkpoint.load(ckpt)
    k = state["progress"]["step"]
    assert k == 3 and not state["progress"]["done"]

    ref_events = []
    ref = run_trial(spec, report=ref_events.append)  # uninterrupted, no checkpoint
    assert ref["steps"] > k + 1

    events = []
    row = run_trial(spec, report=events.append, checkpoint_uri=ckpt)
    for key in ("flops", "tokens", "steps", "hardware_flops", "n_params", "n_trainable"):
        assert row[key] == ref[key], key
    assert row["eval_loss"] == pytest.approx(ref["eval_loss"], abs=1e-6)
    assert row["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-6)
    # the first event after the resume: restart, and the history up to the checkpoint plus the new step
    assert events[0].restart and not any(e.restart for e in events[1:])
    assert [r["step"] for r in events[0].rows] == list(range(1, k + 2))
    rows, ref_rows = upsert(all_rows(events)), upsert(all_rows(ref_events))
    assert [r["step"] for r in rows] == list(range(1, ref["steps"] + 1))
    for r, q in zip(rows, ref_rows):
        assert (r["tokens"], r["flops"], r["lr"]) == (q["tokens"], q["flops"], q["lr"])
        assert r["train_loss"] == pytest.approx(q["train_loss"], abs=1e-6)

    # a third call finds the done checkpoint: the same row, no training
    def no_training(*a, **kw):
        raise AssertionError("trained after completion")

    monkeypatch.setattr(trial_mod, "contrastive_backward", no_training)
    again = []
    assert run_trial(spec, report=again.append, checkpoint_uri=ckpt) == row
    assert len(again) == 1 and again[0].done and again[0].restart
    assert [r["step"] for r in again[0].rows] == list(range(1, row["steps"] + 1))


# --------------------------------------------------------------------------------------------------------
# Data: bad lines, exhaustion


@pytest.mark.slow  # trains the tiny model
def test_a_few_bad_lines_are_skipped(tiny_model, eval_file, tmp_path):
    lines = make_pairs(200, seed=5)
    lines[77] = '{"query": "no closing brace"'  # 1 of 200: 0.5 %, under the 1 % limit
    train = write_jsonl(tmp_path / "train.jsonl", lines)
    row = run_trial(make_spec(tiny_model, train, eval_file, budget_flops=2e9))
    assert row["bad_lines"] == 1 and row["steps"] >= 2 and math.isfinite(row["eval_loss"])


@pytest.mark.slow  # trains the tiny model
def test_too_many_bad_lines_fail_naming_the_file(tiny_model, eval_file, tmp_path):
    lines = make_pairs(200, seed=5)
    for i in range(0, 200, 20):  # 10 of 200: 5 %
        lines[i] = {"query": "a query without its positive"}
    train = write_jsonl(tmp_path / "dirty.jsonl", lines)
    with pytest.raises(DataError, match="dirty.jsonl") as e:
        run_trial(make_spec(tiny_model, train, eval_file, budget_flops=2e9))
    assert str(tmp_path) in str(e.value) and "10 of 200" in str(e.value)


@pytest.mark.slow  # trains the tiny model
def test_data_exhausted_before_the_budget(tiny_model, eval_file, tmp_path):
    train = write_jsonl(tmp_path / "small.jsonl", make_pairs(200, seed=6))
    events = []
    # report_every 5: the last step (12) is not a report step, it still gets the last row
    spec = make_spec(tiny_model, train, eval_file, budget_flops=1e13, max_epochs=1, report_every=5)
    row = run_trial(spec, report=events.append)
    assert row["steps"] == 12  # 200 pairs -> 12 full batches of 16, the last 8 pairs dropped
    assert "data" in row["reason"] and "1 epoch" in row["reason"]
    assert row["flops"] < 1e13 and row["flops"] == CASES[0][4] * row["tokens"]
    rows = upsert(all_rows(events))
    assert [r["step"] for r in rows] == [5, 10, 12]
    assert rows[-1]["eval_loss"] == row["eval_loss"] and rows[-1]["tokens"] == row["tokens"]
    assert rows[1]["eval_loss"] is None


# --------------------------------------------------------------------------------------------------------
# lr 'auto', precisions


@pytest.mark.slow  # trains the tiny model
def test_lr_auto_needs_a_known_pretraining_lr(tiny_model, pairs_file, eval_file, tmp_path):
    mystery = tmp_path / "mystery-neox"
    shutil.copytree(tiny_model, mystery)
    cfg = json.loads((mystery / "config.json").read_text())
    del cfg["repurpose_pretrain_lr"]
    (mystery / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="repurpose_pretrain_lr"):
        run_trial(make_spec(str(mystery), pairs_file, eval_file, lr=None))
    # with an lr given it trains
    row = run_trial(make_spec(str(mystery), pairs_file, eval_file, lr=1e-4, budget_flops=2e9, eval_data=None))
    assert row["steps"] >= 2


@pytest.mark.slow  # trains the tiny model
def test_precisions_train(tiny_model, pairs_file, eval_file):
    rows, losses = {}, {}
    for precision in ("fp32", "bf16", "auto"):
        events = []
        rows[precision] = run_trial(make_spec(tiny_model, pairs_file, eval_file, budget_flops=2e9,
                                              precision=precision), report=events.append)
        losses[precision] = [r["train_loss"] for r in upsert(all_rows(events))]
        assert math.isfinite(rows[precision]["eval_loss"]) and all(map(math.isfinite, losses[precision]))
    assert rows["fp32"]["tokens"] == rows["bf16"]["tokens"]  # same data, same budget
    assert losses["bf16"][0] != losses["fp32"][0]  # bf16 autocast really ran
    # 'auto' is bf16 where the CPU has it (avx512_bf16 / amx_bf16), fp32 elsewhere
    assert losses["auto"] == losses["bf16" if has_bf16(torch.device("cpu")) else "fp32"]


# --------------------------------------------------------------------------------------------------------
# Half-precision checkpoints, the planner's plan


@pytest.mark.slow  # trains the tiny model
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_load_in_fp32(tiny_model, tmp_path, dtype):
    """Pythia's config says float16, Qwen's and Llama's bfloat16; transformers 5 loads with dtype='auto'. The
    trainable weights (and so AdamW's moments) must be fp32 all the same: autocast does the bf16 math."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    half = tmp_path / f"neox-{str(dtype).removeprefix('torch.')}"
    model = AutoModel.from_pretrained(tiny_model).to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(half)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(tiny_model) / name).exists():
            shutil.copy(Path(tiny_model) / name, half / name)
    assert {t.dtype for t in load_file(half / "model.safetensors").values()} == {dtype}  # the files are half
    assert json.loads((half / "config.json").read_text()).get("dtype") == str(dtype).removeprefix("torch.")

    _, loaded = steps_mod.load(str(half), torch.device("cpu"))
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}


@pytest.mark.slow  # trains the tiny model
def test_the_plan_is_the_planners_when_it_set_one(tiny_model, pairs_file, eval_file, monkeypatch):
    """planned_tokens / planned_steps from the spec (the planner's, core.flops) go to the trial row as they are;
    the worker neither recounts them nor measures the data's tokens per pair for them."""
    def no_measuring(*a, **kw):
        raise AssertionError("measured tokens per pair although the planner set the plan")

    monkeypatch.setattr(steps_mod, "measure_tokens_per_pair", no_measuring)
    row = run_trial(make_spec(tiny_model, pairs_file, eval_file, budget_flops=2e9, eval_data=None,
                              planned_tokens=1234, planned_steps=7))
    assert (row["planned_tokens"], row["planned_steps"]) == (1234, 7) and row["steps"] >= 2
