"""`repurpose recipe` and the recipe table on a sweep too small for any surface: the best completed trial at the
nearest budget at or below C answers, marked empirical with why there is no fit; below every trial's budget, one
line and exit 2."""
from __future__ import annotations

import json

import storegen
from orchestrator import cli

MODELS = tuple(storegen.PYTHIA)[:2]
# (model, budget) -> eval_loss, chosen by hand: at 1e15 the larger model is best, at 4e15 the smaller
LOSSES = {(MODELS[0], 1e15): 2.5, (MODELS[1], 1e15): 2.25, (MODELS[0], 4e15): 2.0, (MODELS[1], 4e15): 2.125}


def small_sweep(tmp_path) -> str:
    """Four trials (2 models x 2 budgets, full): a 5-parameter surface needs 7, so none is fitted."""
    trials = storegen.make_trials(slices={"full": (None,)}, models=MODELS, budgets=(1e15, 4e15), sweep="small")
    trials["eval_loss"] = [LOSSES[m, b] for m, b in zip(trials["model"], trials["budget_flops"])]
    storegen.write_store(tmp_path, trials, sweep="small")
    return str(tmp_path)


def recipe(capsys, storage, *args) -> tuple[int, str, str]:
    code = cli.main(["recipe", "small", "--storage", storage, *args])
    out, err = capsys.readouterr()
    return code, out, err


def trial_id(model: str, budget: float) -> str:
    return f"full-None-{model.split('-')[-1]}-{budget:.2g}"


def test_recipe_answers_with_the_best_trial_where_nothing_is_fitted(tmp_path, capsys):
    storage = small_sweep(tmp_path)
    code, out, err = recipe(capsys, storage, "--budget", "4e15")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "Recipe at 4e+15 FLOP"
    assert lines[1].startswith("  source          empirical (no fit: full: too few points")
    assert "4 trial(s) at 2 budget(s) over 2 model(s)" in lines[1]
    assert lines[2].split() == ["method", "full"]
    assert lines[3].split()[:2] == ["model", MODELS[0]]
    assert lines[5] == f"  eval loss       2.0000  (measured: trial {trial_id(MODELS[0], 4e15)} at 4e+15 FLOP; no " \
                       "interval without a fit)"
    assert len(lines) == 6  # at a trial budget: no note

    # between the budgets: the nearest one below answers, and says so
    code, out, _ = recipe(capsys, storage, "--budget", "3e15")
    assert code == 0
    assert f"trial {trial_id(MODELS[1], 1e15)} at 1e+15 FLOP" in out and "2.2500" in out
    assert out.splitlines()[-1] == ("  note            the best trial at 1e+15 FLOP, the largest budget at or below "
                                    "3e+15 with trials")


def test_recipe_json_without_a_fit(tmp_path, capsys):
    """The contract's keys stay: predicted_loss is the trial's eval_loss, its interval null; `source` and
    `no_fit` say what answered and why."""
    storage = small_sweep(tmp_path)
    code, out, _ = recipe(capsys, storage, "--budget", "1e20", "--json")
    assert code == 0
    d = json.loads(out)
    assert (d["budget_flops"], d["method"], d["model"], d["predicted_loss"]) == (1e20, "full", MODELS[0], 2.0)
    assert d["predicted_loss_low"] is None and d["predicted_loss_high"] is None
    assert d["source"] == "empirical" and d["no_fit"].startswith("full: too few points")
    assert d["empirical"]["trial_id"] == trial_id(MODELS[0], 4e15) and d["empirical"]["budget_flops"] == 4e15
    assert {"n_params", "tokens", "lora_rank", "trainable_fraction", "family", "pooling"} <= set(d)


def test_recipe_below_every_trial_budget_is_one_line_exit_2(tmp_path, capsys):
    storage = small_sweep(tmp_path)
    code, out, err = recipe(capsys, storage, "--budget", "5e14")
    assert code == 2 and out == ""
    assert err == ("no trial at or below 5e+14 FLOP: the sweep's smallest budget is 1e+15 FLOP, and it has no fitted "
                   "surface to go below it\n")


def test_recipe_table_answers_at_every_trial_budget(tmp_path, capsys):
    """`repurpose fit`'s recipe table (recipe.md) on the same sweep: one empirical row per budget, the best trial's."""
    storage = small_sweep(tmp_path)
    out_dir = tmp_path / "report"
    assert cli.main(["fit", "small", "--storage", storage, "--out", str(out_dir)]) == 0
    capsys.readouterr()
    rows = [line.split(" | ") for line in (out_dir / "recipe.md").read_text().splitlines() if line.startswith("| 1e")
            or line.startswith("| 4e")]
    assert [(r[0], r[1], r[2], r[5]) for r in rows] == [("| 1e+15", "full", MODELS[1], "2.2500"),
                                                       ("| 4e+15", "full", MODELS[0], "2.0000")]
    assert all(r[-1].startswith("grid, empirical, no fit: full: too few points") for r in rows)
