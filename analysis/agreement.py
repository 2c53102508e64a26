"""The study's two views side by side: does the held-out loss pick the same recipe as retrieval (nDCG@10)?

Per grid budget, over the completed trials that have both an ``eval_loss`` and an ``ndcg_at_10``:
- the best trial by loss (lowest ``eval_loss``) and the best by nDCG@10 (highest), each as its recipe
  (method, model, method hyperparameter, pooling), and whether the two recipes are the same;
- what the loss's pick gives up in retrieval: ``ndcg_regret`` = best nDCG@10 - nDCG@10 of the loss's pick (>= 0);
- Spearman's rank correlation between ``eval_loss`` and ``ndcg_at_10`` over those trials (Pearson's r of the
  ranks, ties given their average rank, as ``scipy.stats.spearmanr``). Lower loss should mean higher nDCG, so
  full agreement is rho = -1; None with fewer than 3 trials or a constant column (the correlation is undefined).

A pure function of the trials DataFrame (``analysis.load_trials``) returning typed rows, and a markdown renderer;
no torch, no ray, no file I/O. Trials without nDCG@10 (a store from before the retrieval columns, an evaluation
that did not run) are counted per budget (``n_without_ndcg``), never silently mixed in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from analysis.fit import hparam_of, slice_label
from core.store import COMPLETED

MIN_TRIALS_FOR_RHO = 3


@dataclass(frozen=True)
class Pick:
    """One trial as a recipe, with both of its scores."""

    trial_id: str
    method: str
    model: str
    hparam: float | None  # LoRA rank, freeze trainable fraction, else None (analysis.fit.hparam_of)
    pooling: str
    eval_loss: float
    ndcg_at_10: float

    @property
    def recipe(self) -> tuple:
        return (self.method, self.model, self.hparam, self.pooling)


@dataclass(frozen=True)
class BudgetAgreement:
    budget_flops: float
    n_trials: int  # completed trials with both scores: what the picks and rho are over
    n_without_ndcg: int  # completed trials with an eval_loss but no nDCG@10, left out
    by_loss: Pick
    by_ndcg: Pick
    same_recipe: bool
    ndcg_regret: float  # by_ndcg.ndcg_at_10 - by_loss.ndcg_at_10, >= 0
    spearman: float | None  # rho(eval_loss, ndcg_at_10); -1 = the loss orders trials exactly as retrieval does


def agreement(trials: pd.DataFrame) -> list[BudgetAgreement]:
    """One row per budget (ascending) with at least one completed trial holding both scores."""
    if trials.empty or "ndcg_at_10" not in trials.columns:
        return []
    df = trials[trials["status"] == COMPLETED].copy()
    df["eval_loss"] = pd.to_numeric(df["eval_loss"], errors="coerce").astype(float)
    df["ndcg_at_10"] = pd.to_numeric(df["ndcg_at_10"], errors="coerce").astype(float)
    df = df[df["eval_loss"].map(math.isfinite)]
    rows = []
    for budget, cell in df.groupby("budget_flops", sort=True):
        scored = cell[cell["ndcg_at_10"].map(math.isfinite)]
        if scored.empty:
            continue
        by_loss = _pick(scored.sort_values(["eval_loss", "trial_id"], kind="stable").iloc[0])
        by_ndcg = _pick(scored.assign(neg=-scored["ndcg_at_10"])
                        .sort_values(["neg", "eval_loss", "trial_id"], kind="stable").iloc[0])
        rows.append(BudgetAgreement(
            budget_flops=float(budget), n_trials=len(scored), n_without_ndcg=len(cell) - len(scored),
            by_loss=by_loss, by_ndcg=by_ndcg, same_recipe=by_loss.recipe == by_ndcg.recipe,
            ndcg_regret=by_ndcg.ndcg_at_10 - by_loss.ndcg_at_10,
            spearman=spearman(scored["eval_loss"], scored["ndcg_at_10"])))
    return rows


def spearman(x: pd.Series, y: pd.Series) -> float | None:
    """Spearman's rho: Pearson's r of average ranks; None below MIN_TRIALS_FOR_RHO points or for a constant."""
    if len(x) < MIN_TRIALS_FOR_RHO:
        return None
    rx, ry = x.rank(method="average"), y.rank(method="average")
    if rx.nunique() < 2 or ry.nunique() < 2:
        return None
    return float(rx.corr(ry))


def _pick(r) -> Pick:
    pooling = r.get("pooling")
    return Pick(trial_id=str(r["trial_id"]), method=str(r["method"]), model=str(r["model"]),
                hparam=hparam_of(r),
                pooling="mean" if pooling is None or pd.isna(pooling) else str(pooling),
                eval_loss=float(r["eval_loss"]), ndcg_at_10=float(r["ndcg_at_10"]))


def render_markdown(rows: list[BudgetAgreement]) -> str:
    """A findings.md section: one table row per budget."""
    from analysis.findings import model_label  # lazily: findings may import this module

    title = "### Does the loss pick the same recipe as nDCG@10?"
    if not rows:
        return (f"{title}\n\nNo completed trial has nDCG@10 (a sweep from before the retrieval metrics, or no eval "
                "data): nothing to compare.\n")

    def recipe(p: Pick) -> str:
        pooling = "" if p.pooling == "mean" else f", {p.pooling}"
        return f"{slice_label(p.method, p.hparam)}, {model_label(p.model)}{pooling}"

    lines = [title, "",
             "Per budget, over completed trials with both scores: the best trial by eval loss and by nDCG@10, what "
             "the loss's pick gives up in nDCG@10, and Spearman's rho between eval loss and nDCG@10 (-1: the loss "
             "orders the trials exactly as retrieval does).", "",
             "| budget (FLOP) | trials | best by loss (loss, nDCG@10) | best by nDCG@10 (loss, nDCG@10) | same | "
             "nDCG@10 given up | rho |",
             "|---|---|---|---|---|---|---|"]
    for a in rows:
        rho = "n/a" if a.spearman is None else f"{a.spearman:+.2f}"
        trials = f"{a.n_trials}" + (f" (+{a.n_without_ndcg} without nDCG)" if a.n_without_ndcg else "")
        lines.append(f"| {a.budget_flops:.2g} | {trials} | {recipe(a.by_loss)} ({a.by_loss.eval_loss:.3f}, "
                     f"{a.by_loss.ndcg_at_10:.3f}) | {recipe(a.by_ndcg)} ({a.by_ndcg.eval_loss:.3f}, "
                     f"{a.by_ndcg.ndcg_at_10:.3f}) | {'yes' if a.same_recipe else 'no'} | {a.ndcg_regret:.3f} | "
                     f"{rho} |")
    same = sum(a.same_recipe for a in rows)
    lines += ["", f"The loss picks the nDCG@10 recipe at {same} of {len(rows)} budgets."]
    return "\n".join(lines) + "\n"
