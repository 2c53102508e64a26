"""`repurpose export` (workers/export.py): a trial's kept weights as a sentence-transformers folder.

A real store on disk (grid.yaml, trials.parquet, models/<trial_id>/ written by workers/weights.py from a trained
tiny GPT-NeoX), exported through ``orchestrator.cli.main``; ``SentenceTransformer(DIR)`` must embed the eval texts
as the trial did: the trial's embedding is recomputed here from its definition (the trial's tokens — for last the
text cut to max_length - 1 and the EOS appended —, the last hidden state of the trained model, mean / last /
position-weighted mean over real tokens, L2-normalised), cosine >= 0.9999 per text. Bad exports are exit 2, one
line, nothing written.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import yaml

from support import METHOD_KW, trained
from fsio import arrow_schema
from core.store import TRIAL_COLUMNS
from orchestrator.cli import main
from analysis.trial_choice import TrialChoiceError, select_trial
from workers.pair_files import load_eval_pairs, make_encoder
from core.store import model_uri
from workers.weights import save_trained

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_LENGTH = 24  # short enough that some eval texts are truncated
BUDGET = 1e9




def trial_embeddings(model, tokenizer, texts, pooling: str) -> torch.Tensor:
    """The trial's embedding, from its definition (docs/study.md "Training recipe" and "Beyond the study")."""
    eos = tokenizer.eos_token_id
    if pooling == "last":
        seqs = [ids + [eos] for ids in make_encoder(tokenizer, MAX_LENGTH - 1)(texts)]
    else:
        seqs = make_encoder(tokenizer, MAX_LENGTH)(texts)
    out = []
    with torch.no_grad():
        for ids in seqs:  # one text at a time: no padding to reason about
            h = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)
                      ).last_hidden_state[0]  # (T, D)
            if pooling == "mean":
                v = h.mean(0)
            elif pooling == "last":
                v = h[-1]  # the appended EOS
            else:
                w = torch.arange(1, len(ids) + 1, dtype=torch.float32)
                v = (h * (w / w.sum()).unsqueeze(1)).sum(0)
            out.append(F.normalize(v, dim=0))
    return torch.stack(out)


def write_store(root, rows: list[dict], budgets=(BUDGET, 4 * BUDGET), name="sw") -> str:
    sweep = os.path.join(root, name)
    os.makedirs(sweep, exist_ok=True)
    grid = {"name": name, "budgets": list(budgets), "train": {"max_length": MAX_LENGTH}}
    with open(os.path.join(sweep, "grid.yaml"), "w") as f:
        yaml.safe_dump({"grid": grid, "history": []}, f)
    full = [{"sweep": name, "budget_flops": BUDGET, "status": "completed", "pooling": "mean"} | r for r in rows]
    table = pa.Table.from_pylist(full, schema=arrow_schema(TRIAL_COLUMNS))
    pq.write_table(table, os.path.join(sweep, "trials.parquet"))
    return sweep


@pytest.fixture(scope="module")
def eval_texts(eval_file):
    pairs = load_eval_pairs(eval_file, 24)
    return [t for p in pairs for t in p]


CASES = [(m, "mean") for m in METHOD_KW] + [("full", "last"), ("lora", "last"), ("freeze", "weighted_mean"),
                                            ("lora", "weighted_mean")]


@pytest.mark.slow  # trains and exports the tiny model
@pytest.mark.parametrize("method,pooling", CASES)
def test_export_embeds_as_the_trial(tiny_model, tmp_path, eval_texts, method, pooling):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    model = trained(tiny_model, method)
    sweep = write_store(tmp_path, [{"trial_id": "t1", "model": tiny_model, "method": method, "pooling": pooling,
                                    "eval_loss": 1.0}])
    save_trained(model, method, model_uri(sweep, "t1"), base_model=tiny_model)
    out = tmp_path / "out"
    assert main(["export", "sw", "--trial", "t1", "--out", str(out), "--storage", str(tmp_path)]) == 0
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out.tmp-")]  # the temp name is gone
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    st = SentenceTransformer(str(out), device="cpu", local_files_only=True)
    got = st.encode(eval_texts, convert_to_tensor=True, batch_size=16)  # padded batches, as a user runs it
    want = trial_embeddings(model, AutoTokenizer.from_pretrained(tiny_model), eval_texts, pooling)
    cos = (F.normalize(got.float(), dim=1) * want).sum(1)
    assert cos.min().item() >= 0.9999, (method, pooling, cos.min().item())
    assert torch.allclose(got.norm(dim=1), torch.ones(len(eval_texts)), atol=1e-5)  # Normalize


@pytest.mark.slow  # trains and exports the tiny model
def test_folder_loads_in_a_fresh_offline_interpreter(tiny_model, tmp_path, eval_texts):
    from transformers import AutoTokenizer

    model = trained(tiny_model, "lora")
    sweep = write_store(tmp_path, [{"trial_id": "t1", "model": tiny_model, "method": "lora", "pooling": "last",
                                    "eval_loss": 1.0}])
    save_trained(model, "lora", model_uri(sweep, "t1"))
    out = tmp_path / "out"
    os.makedirs(out)  # an existing empty directory is fine
    assert main(["export", "sw", "--budget", "1e9", "--out", str(out), "--storage", str(tmp_path)]) == 0
    texts = eval_texts[:6]
    code = ("import json, sys\nfrom sentence_transformers import SentenceTransformer\n"
            f"e = SentenceTransformer({str(out)!r}, device='cpu').encode({texts!r})\n"
            "print(json.dumps(e.tolist()))")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = torch.tensor(json.loads(res.stdout.strip().splitlines()[-1]))
    want = trial_embeddings(model, AutoTokenizer.from_pretrained(tiny_model), texts, "last")
    assert (got * want).sum(1).min().item() >= 0.9999


# --- choosing the trial -------------------------------------------------------------------------------------
ROWS = [
    {"trial_id": "a", "status": "completed", "budget_flops": 1e9, "eval_loss": 2.0},
    {"trial_id": "b", "status": "completed", "budget_flops": 1e9, "eval_loss": 1.5},
    {"trial_id": "c", "status": "failed", "budget_flops": 1e9, "eval_loss": None},
    {"trial_id": "d", "status": "completed", "budget_flops": 4e9, "eval_loss": 1.0},
    {"trial_id": "e", "status": "completed", "budget_flops": 1e9, "eval_loss": 1.5},
]


def test_budget_picks_the_lowest_eval_loss_at_that_budget():
    pick = lambda c: select_trial(ROWS, trial_id=None, budget=c, budgets=[1e9, 4e9, 1.6e10], sweep="sw")
    assert pick(1e9)["trial_id"] == "b"  # b and e tie at 1.5: the smaller id, deterministic
    assert pick(4e9)["trial_id"] == "d"
    with pytest.raises(TrialChoiceError, match="no completed trial"):
        pick(1.6e10)
    with pytest.raises(TrialChoiceError, match="not a budget of the grid"):
        pick(2e9)


# --- bad input: exit 2, one line, nothing written -------------------------------------------------------------
@pytest.fixture
def bad_store(tiny_model, tmp_path):
    sweep = write_store(tmp_path, [
        {"trial_id": "kept", "model": tiny_model, "method": "bias", "eval_loss": 1.0},
        {"trial_id": "nokept", "model": tiny_model, "method": "bias", "eval_loss": 0.5},
        {"trial_id": "failed", "model": tiny_model, "method": "bias", "status": "failed"},
    ])
    save_trained(trained(tiny_model, "bias"), "bias", model_uri(sweep, "kept"))
    return tmp_path


@pytest.mark.slow  # trains and exports the tiny model
@pytest.mark.parametrize("argv,message", [
    (["--trial", "nope"], "no trial 'nope'"),
    (["--trial", "nokept"], "kept no weights"),
    (["--budget", "1e9"], "kept no weights"),  # the best at 1e9 is 'nokept'
    (["--trial", "failed"], "is failed"),
    (["--budget", "2e9"], "not a budget of the grid"),
    (["--budget", "4e9"], "no completed trial"),
    (["--trial", "kept", "--budget", "1e9"], "not allowed with argument"),
    ([], "one of the arguments --trial --budget is required"),
])
def test_bad_exports_exit_2_and_write_nothing(bad_store, capsys, argv, message):
    out = bad_store / "out"
    code = main(["export", "sw", *argv, "--out", str(out), "--storage", str(bad_store)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not [p for p in os.listdir(bad_store) if p.startswith(".out")]


@pytest.mark.slow  # trains and exports the tiny model
def test_an_existing_non_empty_out_is_refused(bad_store, capsys):
    out = bad_store / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", "sw", "--trial", "kept", "--out", str(out), "--storage", str(bad_store)]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]
    (bad_store / "file").write_text("x")
    assert main(["export", "sw", "--trial", "kept", "--out", str(bad_store / "file"),
                 "--storage", str(bad_store)]) == 2


def test_an_unknown_sweep_is_refused(tmp_path, capsys):
    assert main(["export", "nosuch", "--trial", "x", "--out", str(tmp_path / "o"), "--storage", str(tmp_path)]) == 2
    assert "no sweep named 'nosuch'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
