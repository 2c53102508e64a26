"""The knobs as grid axes: validation (one line), expansion, ids unchanged at the defaults."""
from __future__ import annotations

import os
import sys

import pytest

from orchestrator.errors import GridError
from orchestrator.grid import expand

sys.path.insert(0, os.path.dirname(__file__))  # `import test_grid` whatever pytest's import mode
from test_grid import ids_by_cell, load, make_workspace  # noqa: E402


@pytest.fixture
def ws(tmp_path):
    make_workspace(tmp_path)
    return tmp_path


def test_defaults_keep_ids(ws):
    plain = ids_by_cell(load(ws))
    spelled = ids_by_cell(load(ws, train__lr_scale=[1], train__attention="causal", train__query_instruction=""))
    assert spelled == plain


def test_lr_list_and_scale_are_axes(ws):
    trials = expand(load(ws, methods={"full": {}}, budgets=[1e9], train__lr=[1e-4, 3e-4]))
    assert [t.spec.lr for t in trials] == [1e-4, 3e-4]
    scaled = expand(load(ws, methods={"full": {}}, budgets=[1e9], train__lr_scale=[0.5, 1, 2]))
    # tiny's pretraining lr is 1e-3: auto = 1e-4; factor 1 stays 'auto' (None), the others resolve
    assert [t.spec.lr for t in scaled] == [pytest.approx(5e-5), None, pytest.approx(2e-4)]
    plain = expand(load(ws, methods={"full": {}}, budgets=[1e9]))
    assert scaled[1].trial_id == plain[0].trial_id
    assert len({t.trial_id for t in scaled}) == 3


def test_knob_axes_multiply(ws):
    g = load(ws, methods={"full": {}}, budgets=[1e9], train__attention=["causal", "bidirectional"],
             train__query_instruction=["", "Find the passage: "], train__negatives={"hard": 2})
    trials = expand(g)
    assert len(trials) == 4 and len({t.trial_id for t in trials}) == 4
    assert {(t.spec.attention, t.spec.query_instruction, t.spec.hard_negatives) for t in trials} == {
        ("causal", "", 2), ("bidirectional", "", 2), ("causal", "Find the passage: ", 2),
        ("bidirectional", "Find the passage: ", 2)}


@pytest.mark.parametrize("change, message", [
    ({"train__negatives": {"hard": -1}}, "train.negatives.hard: must be >= 1"),
    ({"train__negatives": {"hard": 0}}, "train.negatives.hard: must be >= 1"),
    ({"train__attention": "sideways"}, "train.attention[0]: must be one of 'causal' or 'bidirectional', got 'sideways'"),
    ({"train__lr_scale": [0]}, "train.lr_scale[0]: must be > 0"),
    ({"train__lr": [1e-4, 2e-4], "train__lr_scale": [0.5, 2]}, "train: lr_scale scales one lr"),
    ({"train__query_instruction": [3]}, "train.query_instruction: must be a string or a list of strings"),
    ({"train__lr": [1e-4, "fast"]}, "train.lr: must be 'auto' or a number > 0"),
])
def test_bad_knobs_are_one_line(ws, change, message):
    with pytest.raises(GridError) as e:
        load(ws, **change)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_plan_rows_show_the_knobs_they_set(ws):
    from orchestrator.plan_view import render_plan
    from orchestrator.plan import DataStats, plan_grid

    g = load(ws, methods={"full": {}}, budgets=[1e9], train__lr_scale=[1, 2])
    plan = plan_grid(g, data=DataStats({"./tiny": 30.0}, None))
    rows = [t.to_json() for t in plan.trials]
    assert "lr" not in rows[0] and rows[1]["lr"] == pytest.approx(2e-4)  # 'auto' x 2: tiny's 1e-3 / 10 x 2
    assert [t.lr for t in plan.trials] == [pytest.approx(1e-4), pytest.approx(2e-4)]  # the store's lr column
    header, auto, doubled = (line.split() for line in render_plan(plan).splitlines()[1:4])
    column = header.index("lr")  # the swept lr is a column of its own (orchestrator/plan_view.py swept_axes)
    assert (auto[column], doubled[column]) == ("-", "0.0002")  # 'auto' at factor 1 stays auto (its id unchanged)


def word_level_model(root) -> str:
    """A model directory whose tokenizer knows two words (anything else is its unknown token)."""
    import json

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    from test_grid import TINY_CONFIG

    tok = Tokenizer(WordLevel({"[UNK]": 0, "q": 1, "d": 2, "</s>": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    path = root / "words"
    path.mkdir()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>").save_pretrained(path)
    (path / "config.json").write_text(json.dumps(TINY_CONFIG))
    return str(path)


@pytest.mark.parametrize("instruction, what", [("Represent this query", "only unknown tokens"),
                                               ("   ", "no token")])
def test_an_instruction_the_tokenizer_cannot_encode_is_one_line_exit_2(ws, capsys, instruction, what):
    import yaml

    from orchestrator.cli import main
    from test_grid import base_grid

    g = base_grid() | {"models": [word_level_model(ws)], "methods": {"full": {}}}
    del g["data"]["eval"]  # the workspace's eval file has one pair
    g["train"] = {"query_instruction": ["", instruction]}
    (ws / "g.yaml").write_text(yaml.safe_dump(g))
    assert main(["plan", str(ws / "g.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.query_instruction: ") and what in err and "\n" not in err
    g["train"] = {"query_instruction": "q d"}  # words it knows: plans
    (ws / "g.yaml").write_text(yaml.safe_dump(g))
    assert main(["plan", str(ws / "g.yaml")]) == 0


def test_bidirectional_cells_of_unsupported_families_are_skipped(ws):
    import json

    from support import tiny_config

    from orchestrator.plan import DataStats, plan_grid

    (ws / "gemma").mkdir()
    (ws / "gemma" / "config.json").write_text(json.dumps({**tiny_config("gemma2").to_dict(), "repurpose_pretrain_lr": 1e-3}))
    g = load(ws, models=["./tiny", "./gemma"], methods={"full": {}}, budgets=[1e9],
             train__attention=["causal", "bidirectional"])
    plan = plan_grid(g, data=DataStats({"./tiny": 30.0, "./gemma": 30.0}, None))
    reasons = {(t.model, t.spec.attention): t.skip_reason for t in plan.trials}
    assert reasons[("./gemma", "bidirectional")].startswith("attention bidirectional: model_type 'gemma2'")
    assert not (reasons[("./gemma", "causal")] or "").startswith("attention")
    assert reasons[("./tiny", "bidirectional")] is None or "attention" not in reasons[("./tiny", "bidirectional")]
