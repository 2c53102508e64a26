"""What a trial leaves for its users beyond the loss: retrieval metrics on every evaluation, the pooling it was
asked for, and its trained weights kept once under the sweep — equal to what `repurpose export` serves."""
from __future__ import annotations

import json
import os

import pytest
import torch

import workers.steps as steps_mod
from core.spec import TrialSpec
from core.store import checkpoint_uri, model_uri
from workers.trial import run_trial

pytestmark = pytest.mark.usefixtures("one_thread")


def spec_for(tiny_model, pairs_file, eval_file, **kw) -> TrialSpec:
    args = dict(model=tiny_model, method="lora", lora_rank=4, budget_flops=6.5e9, train_data=str(pairs_file),
                eval_data=str(eval_file), batch_size=16, precision="fp32", eval_pairs=48, num_threads=1,
                eval_every=4, report_every_s=0.0)
    return TrialSpec(**(args | kw))


@pytest.mark.slow  # trains the tiny model
def test_retrieval_metrics_on_every_evaluation(tiny_model, pairs_file, eval_file):
    events = []
    row = run_trial(spec_for(tiny_model, pairs_file, eval_file), report=events.append)
    keys = ("recall_at_1", "recall_at_10", "mrr_at_10", "ndcg_at_10")
    assert all(0.0 <= row[k] <= 1.0 for k in keys)
    # with one relevant document: recall@1 <= MRR@10 <= nDCG@10 <= recall@10 (each positive's rank weighs
    # 1[r=1] <= 1/r <= 1/log2(r+1) <= 1[r<=10])
    assert row["recall_at_1"] <= row["mrr_at_10"] <= row["ndcg_at_10"] <= row["recall_at_10"]
    rows = {r["step"]: r for e in events for r in e.rows}
    evaluated = [s for s, r in rows.items() if r["eval_loss"] is not None]
    assert evaluated and all(s % 4 == 0 for s in evaluated[:-1]) and evaluated[-1] == row["steps"]
    for step, r in rows.items():
        assert (r.get("ndcg_at_10") is not None) == (step in evaluated)
    assert rows[row["steps"]]["ndcg_at_10"] == row["ndcg_at_10"]


@pytest.mark.slow  # trains the tiny model
def test_last_token_pooling_appends_the_eos(tiny_model, pairs_file, eval_file):
    """`last`: every training and eval text ends in the tokenizer's EOS (truncated text, kept EOS), and the
    trial trains and evaluates with it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    eos = tokenizer.eos_token_id
    texts = ["a text", "a much longer text that runs well past eight tokens of this tiny vocabulary"]
    for max_length in (8, 64):
        ids = steps_mod.encoder(spec_for(tiny_model, pairs_file, eval_file, pooling="last", max_length=max_length),
                                tokenizer)(texts)
        plain = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        # by hand: the text's tokens, cut to max_length - 1 so that the EOS always fits, then the EOS
        assert ids == [p[:max_length - 1] + [eos] for p in plain]
    spec = spec_for(tiny_model, pairs_file, eval_file, pooling="last", max_length=8)
    with steps_mod.train_stream(spec, tokenizer) as stream:
        batch = next(iter(stream))
    last = batch.q_mask.sum(1) - 1  # right padding: the last real position of each row
    assert (batch.q_ids[torch.arange(len(batch)), last] == eos).all()
    row = run_trial(spec)
    assert row["eval_loss"] is not None and 0 <= row["ndcg_at_10"] <= 1


@pytest.mark.slow  # trains the tiny model
def test_weights_kept_once_and_served_as_the_trial_embeds(tiny_model, pairs_file, eval_file, tmp_path,
                                                          monkeypatch):
    """The trial keeps its adapter under <sweep>/models/<trial_id>; a crash after that save (before the done marker)
    and a resume keep exactly one save; the folder `repurpose export` builds from it, loaded by
    sentence-transformers, gives the trial's own retrieval metrics on the eval pairs."""
    sweep = str(tmp_path / "sweep")
    ckpt = checkpoint_uri(sweep, "t1")
    spec = spec_for(tiny_model, pairs_file, eval_file, eval_every=0, weights_uri=model_uri(sweep, "t1"))
    real_finish = steps_mod.finish

    def crash(*args, **kwargs):
        raise SystemExit("killed between the weights' save and the done marker")

    monkeypatch.setattr(steps_mod, "finish", crash)
    with pytest.raises(SystemExit):
        run_trial(spec, checkpoint_uri=ckpt)
    first = json.loads(open(os.path.join(model_uri(sweep, "t1"), "manifest.json")).read())
    monkeypatch.setattr(steps_mod, "finish", real_finish)
    row = run_trial(spec, checkpoint_uri=ckpt)
    kept = sorted(os.listdir(model_uri(sweep, "t1")))
    second = json.loads(open(os.path.join(model_uri(sweep, "t1"), "manifest.json")).read())
    assert kept == sorted(["manifest.json", second["file"]])  # one save: the resumed run's replaced the first
    assert first["method"] == second["method"] == "lora"

    from sentence_transformers import SentenceTransformer

    from workers.export import export_model
    from workers.pair_files import load_eval_pairs
    from workers.retrieval import retrieval_metrics

    out = str(tmp_path / "exported")
    export_model(tiny_model, model_uri(sweep, "t1"), "mean", spec.max_length, out)
    st = SentenceTransformer(out, device="cpu")
    pairs = load_eval_pairs(spec.eval_data, spec.eval_pairs)
    q = st.encode([p[0] for p in pairs], convert_to_tensor=True, batch_size=16)
    d = st.encode([p[1] for p in pairs], convert_to_tensor=True, batch_size=16)
    served = retrieval_metrics(q, d)
    for key, value in served.items():
        assert value == pytest.approx(row[key], abs=1e-6), key


@pytest.mark.slow  # trains the tiny model
def test_mfu_by_hand_on_a_cpu_trial(tiny_model, pairs_file, eval_file):
    """mfu = the paper's FLOP / (seconds in optimizer steps x the device's peak), hfu = the hardware FLOP over the
    same; on CPU the peak is the best bf16 matmul rate measured once per machine (workers/device_peak.py), the same
    one the trial read."""
    from workers.device_peak import device_peak

    events = []
    row = run_trial(spec_for(tiny_model, pairs_file, eval_file, eval_every=0), report=events.append)
    peak, source = device_peak(torch.device("cpu"))
    assert peak > 1e9 and "matmul" in source
    assert row["mfu"] == pytest.approx(row["flops"] / (row["train_s"] * peak), rel=1e-12)
    assert row["hfu"] == pytest.approx(row["hardware_flops"] / (row["train_s"] * peak), rel=1e-12)
    last = [r for e in events for r in e.rows][-1]
    assert 0 < last["mfu"] < 1 and 0 < row["mfu"] < 1
    assert last["hfu"] == pytest.approx(last["hardware_flops"] / (row["train_s"] * peak), rel=1e-9)
    # attention and padding run on top of the paper's 6·N per real token: hfu above mfu
    assert row["hfu"] > row["mfu"] and last["hfu"] > last["mfu"]


def test_auto_precision_ignores_emulated_bf16(monkeypatch):
    """A T4 / V100 reports bf16 "supported" by emulation only: 'auto' must not pick it (fp32 there)."""
    calls = []

    def t4(including_emulation: bool = True) -> bool:
        calls.append(including_emulation)
        return including_emulation  # emulated only

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", t4)
    assert not steps_mod.has_bf16(torch.device("cuda", 0)) and calls == [False]
    assert not steps_mod.uses_bf16("auto", torch.device("cuda", 0))
    assert steps_mod.uses_bf16("bf16", torch.device("cuda", 0))  # asked for explicitly: the user's call
