"""Which trial `repurpose export` takes: the one named, or the empirical best at a grid budget (the completed trial
with the lowest eval_loss there: the frontier's own pick, analysis.fit.empirical_optimum, over every slice).
Read from the store through analysis.load; the CLI passes the row to workers/export.py."""
from __future__ import annotations

import math

import pandas as pd

from core.errors import UserError
from core.store import COMPLETED

from .load import load_trials


class TrialChoiceError(UserError):
    """No trial answers the question; the message names the sweep and why."""


def trial_to_export(sweep_uri: str, name: str, *, trial_id: str | None, budget: float | None, budgets) -> dict:
    """The store's row of the trial to export (``select_trial`` over the sweep's trials)."""
    rows = [_plain(r) for r in load_trials(sweep_uri).to_dict("records")]
    return select_trial(rows, trial_id=trial_id, budget=budget, budgets=budgets, sweep=name)


def select_trial(rows: list[dict], *, trial_id: str | None, budget: float | None, budgets, sweep: str) -> dict:
    """``trial_id``'s row (completed), or the completed trial with the lowest eval_loss at grid budget ``budget``
    (ties: the smaller trial id). Exactly one of the two is given."""
    if (trial_id is None) == (budget is None):
        raise TrialChoiceError("export: give exactly one of --trial ID and --budget C")
    if trial_id is not None:
        row = next((r for r in rows if r["trial_id"] == trial_id), None)
        if row is None:
            raise TrialChoiceError(f"{sweep}: no trial {trial_id!r} in the sweep")
        if row["status"] != COMPLETED:
            raise TrialChoiceError(f"{sweep}: trial {trial_id} is {row['status']}; only a completed trial keeps "
                                   "weights")
        return row
    if not any(math.isclose(float(b), budget, rel_tol=1e-9) for b in budgets):
        shown = ", ".join(f"{float(b):g}" for b in budgets) or "none"
        raise TrialChoiceError(f"{sweep}: --budget {budget:g} is not a budget of the grid (its budgets: {shown})")
    done = [r for r in rows if r["status"] == COMPLETED and math.isclose(r["budget_flops"], budget, rel_tol=1e-9)
            and r.get("eval_loss") is not None and math.isfinite(r["eval_loss"])]
    if not done:
        raise TrialChoiceError(f"{sweep}: no completed trial with an eval_loss at budget {budget:g}")
    return min(done, key=lambda r: (r["eval_loss"], r["trial_id"]))


def _plain(row: dict) -> dict:
    """A pandas record with its missing values as None (a store from before a column has NaN / NA there)."""
    return {k: None if v is pd.NA or (isinstance(v, float) and math.isnan(v)) else v for k, v in row.items()}
