"""The compute-optimal recipe at a budget C: pure functions over fitted surfaces (``fit.SurfaceFits``).

Per method: over its slices (LoRA rank, trainable fraction) and the sweep's models (discrete: a recipe names a
model that exists), tokens D = C / cost-per-token, capped by the data available (``max_tokens``: training on
fewer tokens than the budget allows beats recommending data that does not exist); the minimum fitted loss wins.
The best method overall is the minimum over methods; its interval is the bootstrap percentile interval of the
fitted loss at the chosen (N, D), and ``win_fraction`` says how often each method wins over bootstrap refits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .fit import COMPLETED, CI_LEVEL, FitError, SurfaceFits, cost_per_token, slice_label

# A completed trial that stopped more than one optimizer step short of its budget ran out of data (the
# worker's only other stop is the budget itself); its token count is then the data's token count.
UNDERSPEND_STEPS = 1.0


@dataclass(frozen=True)
class Choice:
    """One method's best (slice, model, tokens) at a budget. ``data_limited``: D was capped by max_tokens (the
    recipe spends less than the budget). ``extrapolated``: the budget or D lies outside what the slice's
    trials covered."""

    method: str
    hparam: float | None
    model: str
    n_params: float
    n_trainable: float
    cost_per_token: float
    tokens: int
    flops: float
    data_limited: bool
    extrapolated: bool
    predicted_loss: float
    predicted_loss_low: float
    predicted_loss_high: float

    @property
    def label(self) -> str:
        return slice_label(self.method, self.hparam)

    @property
    def lora_rank(self) -> int | None:
        return int(self.hparam) if self.method == "lora" and self.hparam is not None else None

    @property
    def trainable_fraction(self) -> float | None:
        return float(self.hparam) if self.method == "freeze" and self.hparam is not None else None


@dataclass(frozen=True)
class Recipe:
    budget_flops: float
    max_tokens: int | None
    best: Choice
    per_method: dict[str, Choice]
    refused: dict[str, str]  # method -> why it has no fitted surface
    win_fraction: dict[str, float]  # method -> share of bootstrap refits where it is the best method
    ci_level: float = CI_LEVEL


def _candidates(surface, budget_flops: float, max_tokens: int | None):
    """(model names, N, N_tr, cost, tokens, data_limited) over the slice's models, arrays of shape (k,)."""
    names = [m for m, _, _ in surface.models]
    n = np.array([x for _, x, _ in surface.models])
    ntr = np.array([x for _, _, x in surface.models])
    cost = cost_per_token(surface.method, n, ntr)
    tokens = np.floor(budget_flops / cost)
    limited = np.zeros(len(n), dtype=bool)
    if max_tokens is not None:
        limited = tokens > max_tokens
        tokens = np.minimum(tokens, float(max_tokens))
    return names, n, ntr, cost, tokens, limited


def best_in_slice(surface, budget_flops: float, max_tokens: int | None = None):
    """(Choice, bootstrap minima (n_boot,)) for one slice at a budget, or None if no model affords a token.
    The bootstrap minima are each refit's best loss over the slice's models (for win fractions)."""
    names, n, ntr, cost, tokens, limited = _candidates(surface, budget_flops, max_tokens)
    ok = tokens >= 1
    if not ok.any():
        return None
    d = np.maximum(tokens, 1.0)
    pred = np.where(ok, surface.predict(n, d), np.inf)  # (k,)
    i = int(np.argmin(pred))
    low, high = surface.interval(n[i], d[i])
    # A percentile interval can sit beside a skewed point estimate; reported intervals always contain it.
    low, high = min(float(low), float(pred[i])), max(float(high), float(pred[i]))
    lo_b, hi_b = surface.budget_range
    lo_d, hi_d = surface.d_range
    inside = (lo_b * (1 - 1e-9) <= budget_flops <= hi_b * (1 + 1e-9)
              and lo_d * (1 - 1e-9) <= d[i] <= hi_d * (1 + 1e-9))
    choice = Choice(surface.method, surface.hparam, names[i], float(n[i]), float(ntr[i]), float(cost[i]),
                    int(d[i]), float(d[i] * cost[i]), bool(limited[i]), not inside,
                    float(pred[i]), float(low), float(high))
    boot = np.where(ok[None, :], surface.predict_boot(n, d), np.inf).min(axis=1) if len(surface.boot) else None
    return choice, boot


def compute_recipe(fits: SurfaceFits, budget_flops: float, max_tokens: int | None = None) -> Recipe:
    """The recipe at ``budget_flops`` (inside or beyond the grid). FitError if no method has a surface or no
    candidate affords one token."""
    if not (budget_flops > 0 and math.isfinite(budget_flops)):
        raise FitError(f"budget must be a positive number of FLOP (got {budget_flops})")
    if max_tokens is not None and max_tokens <= 0:
        raise FitError(f"max_tokens must be positive (got {max_tokens})")
    per_method, boot_best, refused = {}, {}, {}
    for method in fits.methods():
        found = [r for s in fits.for_method(method) if (r := best_in_slice(s, budget_flops, max_tokens))]
        if not found:
            refused[method] = f"{method}: no model affords one token at {budget_flops:.3g} FLOP"
            continue
        per_method[method] = min((c for c, _ in found), key=lambda c: c.predicted_loss)
        boots = [b for _, b in found if b is not None]
        if boots:
            boot_best[method] = np.min(np.stack(boots), axis=0)
    for (method, _), why in fits.refused.items():
        if method not in per_method and method not in refused:
            refused[method] = why
    if not per_method:
        why = "; ".join(refused.values()) or "no usable trials"
        raise FitError(f"no method has a fitted surface at {budget_flops:.3g} FLOP: {why}")
    best = min(per_method.values(), key=lambda c: c.predicted_loss)
    win = {m: float("nan") for m in per_method}
    if len(boot_best) == len(per_method):
        names = list(boot_best)
        winners = np.argmin(np.stack([boot_best[m] for m in names]), axis=0)
        win = {m: float((winners == j).mean()) for j, m in enumerate(names)}
    return Recipe(float(budget_flops), max_tokens, best, per_method, refused, win)


def infer_max_tokens(trials: pd.DataFrame) -> int | None:
    """The data's token count as the trials show it, or None: the largest ``tokens`` of a completed trial that
    stopped more than one optimizer step short of its budget (it ran out of data)."""
    done = trials[trials["status"] == COMPLETED]
    if done.empty:
        return None
    flops = pd.to_numeric(done["flops"], errors="coerce").astype(float)
    budget = pd.to_numeric(done["budget_flops"], errors="coerce").astype(float)
    steps = pd.to_numeric(done["steps"], errors="coerce").astype(float)
    tokens = pd.to_numeric(done["tokens"], errors="coerce").astype(float)
    per_step = flops / steps.where(steps > 0)
    short = (budget - flops) > UNDERSPEND_STEPS * per_step
    if not short.any():
        return None
    return int(tokens[short].max())
