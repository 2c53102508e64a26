"""Run-to-run noise, measured from replicates (grid key ``seeds``; the adaptive strategy adds its own).

A cell is everything that defines a run but its seed: (family, pooling, model, method, LoRA rank or trainable
fraction, budget). Its replicates differ only in the seed (data order, initialisation), so their spread is the
noise one run carries. It is measured on the log of the loss, so it reads as a relative spread (0.01: runs of the
same cell differ by about 1 %), pooled over the cells with two or more completed runs:

    noise_sd = sqrt( sum_cells sum_runs (log L - mean_cell log L)^2 / sum_cells (n_cell - 1) )

Without any replicated cell there is no estimate (None), never a guess.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

# what defines a cell but its seed, in the order tables show it (columns a store lacks are left out)
CELL_KEYS = ("family", "pooling", "model", "method", "lora_rank", "trainable_fraction", "budget_flops")


def completed_losses(trials: pd.DataFrame) -> pd.DataFrame:
    """The completed rows with a finite positive loss, and ``log_loss``."""
    if trials.empty:
        return trials.assign(log_loss=pd.Series(dtype=float))
    ok = trials["status"].astype("string").fillna("") == "completed" if "status" in trials else True
    loss = pd.to_numeric(trials["eval_loss"], errors="coerce").astype(float)
    ok = ok & np.isfinite(loss) & (loss > 0)
    rows = trials[ok]
    return rows.assign(log_loss=np.log(loss[ok]))


def cell_keys(trials: pd.DataFrame) -> list[str]:
    return [k for k in CELL_KEYS if k in trials.columns]


def _keyed(trials: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Rows with their cell key columns made groupable (a null rank or fraction is a value, not a missing one)."""
    keys = cell_keys(trials)
    filled = {k: trials[k].astype(object).where(trials[k].notna(), "-") for k in keys}
    return trials.assign(**filled), keys


def cells(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per cell of the completed runs: the cell's keys, ``runs``, ``mean_loss`` (geometric mean over its
    replicates), ``sd`` (relative spread of its runs, NaN with one run) and ``trial_ids`` (sorted)."""
    rows = completed_losses(trials)
    if rows.empty:
        return pd.DataFrame(columns=[*cell_keys(trials), "runs", "mean_loss", "sd", "trial_ids"])
    keyed, keys = _keyed(rows)
    grouped = keyed.groupby(keys, sort=True, dropna=False)
    out = grouped.agg(runs=("log_loss", "size"), mean_log=("log_loss", "mean"), sd=("log_loss", "std"),
                      trial_ids=("trial_id", lambda s: tuple(sorted(s))))
    out = out.reset_index()
    out["mean_loss"] = np.exp(out.pop("mean_log"))
    for k in keys:  # the placeholders back to nulls
        out[k] = out[k].where(out[k] != "-", None)
    return out[[*keys, "runs", "mean_loss", "sd", "trial_ids"]]


def pooled_sd(trials: pd.DataFrame) -> tuple[float | None, int]:
    """(noise_sd, degrees of freedom) over the cells with two or more runs; (None, 0) without any."""
    rows = completed_losses(trials)
    if rows.empty:
        return None, 0
    keyed, keys = _keyed(rows)
    centred = keyed["log_loss"] - keyed.groupby(keys, sort=False, dropna=False)["log_loss"].transform("mean")
    runs = keyed.groupby(keys, sort=False, dropna=False)["log_loss"].transform("size")
    dof = int((keyed.groupby(keys, sort=False, dropna=False).size() - 1).sum())
    if dof <= 0:
        return None, 0
    return float(math.sqrt(float((centred[runs > 1] ** 2).sum()) / dof)), dof


def noise_sd(trials: pd.DataFrame) -> float | None:
    """The sweep's relative run-to-run noise (module docstring); None without a replicated cell."""
    return pooled_sd(trials)[0]


def noise_by_budget(trials: pd.DataFrame) -> dict[float, float]:
    """Budget -> its own noise_sd, for the budgets with a replicated cell (the noise may shrink with longer runs)."""
    rows = completed_losses(trials)
    out = {}
    for budget, group in rows.groupby("budget_flops", sort=True):
        sd, _ = pooled_sd(group)
        if sd is not None:
            out[float(budget)] = sd
    return out


def noise_at(trials: pd.DataFrame, budget_flops: float, min_dof: int = 3) -> float | None:
    """The noise to judge a decision at ``budget_flops`` by: that budget's own where it has ``min_dof`` degrees of
    freedom, else the sweep's pooled estimate (None without any replicate)."""
    rows = completed_losses(trials)
    own, dof = pooled_sd(rows[rows["budget_flops"] == budget_flops]) if len(rows) else (None, 0)
    return own if own is not None and dof >= min_dof else pooled_sd(rows)[0]


def summary(trials: pd.DataFrame) -> dict:
    """What ``status --json`` and findings.md show: ``noise_sd`` (None without replicates), ``noise_dof``,
    ``noise_by_budget`` ({budget: sd}) and ``replicated_cells``."""
    sd, dof = pooled_sd(trials)
    table = cells(trials)
    return {"noise_sd": sd, "noise_dof": dof, "noise_by_budget": noise_by_budget(trials),
            "replicated_cells": int((table["runs"] > 1).sum()) if len(table) else 0}


def describe(s: dict) -> str:
    """One line for people: 'run-to-run noise 1.2 % (sd of log loss, 14 replicated cells, 20 dof)'."""
    if s.get("noise_sd") is None:
        return "run-to-run noise: not measured (no cell has two completed runs; grid key seeds)"
    per = s.get("noise_by_budget") or {}
    by = "; per budget " + ", ".join(f"{b:.2g}: {v:.1%}" for b, v in per.items()) if len(per) > 1 else ""
    return (f"run-to-run noise {s['noise_sd']:.1%} (relative sd of one run; {s['replicated_cells']} replicated "
            f"cells, {s['noise_dof']} dof{by})")
