"""The compute-optimal recipe at a budget C: pure functions over fitted surfaces (``fit.SurfaceFits``).

Per method: over its slices (LoRA rank, trainable fraction) and the sweep's models (discrete: a recipe names a
model that exists), tokens D = C / cost-per-token (core.flops.tokens_for_budget), capped by the data available
(``max_tokens``: the sweep's one data cap, analysis.load.load_data_cap; training on fewer tokens than the budget
allows beats recommending data that does not exist: such a choice is ``data_limited``); the minimum predicted loss
wins, the prediction being the median of the surface's bootstrap refits (``Surface.predict_bagged``; the point fit's
without a bootstrap).
The best method overall is the minimum over methods; its interval is the bootstrap percentile interval of the
fitted loss at the chosen (N, D), and ``win_fraction`` says how often each method wins over bootstrap refits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from core import methods
from core.flops import tokens_for_budget

from .fit import CI_LEVEL, FitError, Slice, SurfaceFits, cost_per_token


class NoSurface(FitError):
    """No method has a fitted surface that answers at the budget; ``why`` is each method's reason, in one line
    (where it is raised the recipe may still answer with the best trial: ``empirical_budget``)."""

    def __init__(self, budget_flops: float, why: str):
        super().__init__(f"no method has a fitted surface at {budget_flops:.3g} FLOP: {why}")
        self.why = why

@dataclass(frozen=True)
class Choice(Slice):
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
    serve_flops: float = 0.0  # 2 N T: embedding T tokens in the model's life (N: the merged model's, no adapters)
    family: str | None = None  # the slice's family (model_type) and pooling (fit.Surface)
    pooling: str = "mean"
    variant: str = ""

    @property
    def lora_rank(self) -> int | None:
        return methods.get(self.method).hparam_fields(self.hparam)["lora_rank"]

    @property
    def trainable_fraction(self) -> float | None:
        return methods.get(self.method).hparam_fields(self.hparam)["trainable_fraction"]


@dataclass(frozen=True)
class Recipe:
    budget_flops: float
    max_tokens: int | None
    best: Choice
    per_method: dict[str, Choice]
    refused: dict[str, str]  # method -> why it has no fitted surface
    win_fraction: dict[str, float]  # method -> share of bootstrap refits where it is the best method
    ci_level: float = CI_LEVEL
    serve_tokens: float = 0.0


def serving_params(method: str, n_params, n_trainable):
    """N of the model that serves: adapters merged into their base (their parameters are gone), else N."""
    return methods.get(method).serving_params(n_params, n_trainable)


def serve_flops(method: str, n_params, n_trainable, serve_tokens: float):
    """Embedding ``serve_tokens`` tokens costs a forward pass, 2 N FLOP per token (docs/study.md, "Where this project departs")."""
    return 2.0 * serving_params(method, n_params, n_trainable) * serve_tokens


def _candidates(surface, budget_flops: float, max_tokens: int | None, serve_tokens: float = 0.0):
    """(model names, N, N_tr, cost, tokens, data_limited, serve FLOP) over the slice's models, arrays of shape
    (k,). With ``serve_tokens`` T the training budget of a model is C - 2 N T (Fang et al. 2024 fold inference
    into the budget): a model whose serving alone exceeds C affords no token."""
    names = [m for m, _, _ in surface.models]
    n = np.array([x for _, x, _ in surface.models])
    ntr = np.array([x for _, _, x in surface.models])
    cost = cost_per_token(surface.method, n, ntr)
    serve = serve_flops(surface.method, n, ntr, serve_tokens)
    tokens = tokens_for_budget(np.maximum(budget_flops - serve, 0.0), cost).astype(float)
    limited = np.zeros(len(n), dtype=bool)
    if max_tokens is not None:
        limited = tokens > max_tokens
        tokens = np.minimum(tokens, float(max_tokens))
    return names, n, ntr, cost, tokens, limited, serve


def best_in_slice(surface, budget_flops: float, max_tokens: int | None = None, serve_tokens: float = 0.0):
    """(Choice, bootstrap minima (n_boot,)) for one slice at a budget, or None if no model affords a token.
    The bootstrap minima are each refit's best loss over the slice's models (for win fractions)."""
    names, n, ntr, cost, tokens, limited, serve = _candidates(surface, budget_flops, max_tokens, serve_tokens)
    ok = tokens >= 1
    if not ok.any():
        return None
    d = np.maximum(tokens, 1.0)
    pred = np.where(ok, surface.predict_bagged(n, d), np.inf)  # (k,)
    i = int(np.argmin(pred))
    low, high = surface.interval(n[i], d[i])
    # A percentile interval can sit beside a skewed point estimate; reported intervals always contain it.
    low, high = min(float(low), float(pred[i])), max(float(high), float(pred[i]))
    lo_b, hi_b = surface.budget_range
    lo_d, hi_d = surface.d_range
    train_flops = budget_flops - serve[i]
    inside = (lo_b * (1 - 1e-9) <= train_flops <= hi_b * (1 + 1e-9)
              and lo_d * (1 - 1e-9) <= d[i] <= hi_d * (1 + 1e-9))
    choice = Choice(surface.method, surface.hparam, names[i], float(n[i]), float(ntr[i]), float(cost[i]),
                    int(d[i]), float(d[i] * cost[i]), bool(limited[i]), not inside,
                    float(pred[i]), float(low), float(high), float(serve[i]), surface.family, surface.pooling,
                    surface.variant)
    boot = np.where(ok[None, :], surface.predict_boot(n, d), np.inf).min(axis=1) if len(surface.boot) else None
    return choice, boot


def compute_recipe(fits: SurfaceFits, budget_flops: float, max_tokens: int | None = None,
                   serve_tokens: float = 0.0) -> Recipe:
    """The recipe at ``budget_flops`` (inside or beyond the grid): training FLOP + 2 N ``serve_tokens`` <= C.
    NoSurface (a FitError) if no method has a surface or no candidate affords one token."""
    if not (serve_tokens >= 0 and math.isfinite(serve_tokens)):
        raise FitError(f"serve tokens must be a number >= 0 (got {serve_tokens})")
    if not (budget_flops > 0 and math.isfinite(budget_flops)):
        raise FitError(f"budget must be a positive number of FLOP (got {budget_flops})")
    if max_tokens is not None and max_tokens <= 0:
        raise FitError(f"max_tokens must be positive (got {max_tokens})")
    per_method, boot_best, refused = {}, {}, {}
    for method in fits.methods():
        found = [r for s in fits.for_method(method)
                 if (r := best_in_slice(s, budget_flops, max_tokens, serve_tokens))]
        if not found:
            serving = f" after serving {serve_tokens:.3g} tokens (2·N·T)" if serve_tokens else ""
            refused[method] = f"{method}: no model affords one token at {budget_flops:.3g} FLOP{serving}"
            continue
        per_method[method] = min((c for c, _ in found), key=lambda c: c.predicted_loss)
        boots = [b for _, b in found if b is not None]
        if boots:
            boot_best[method] = np.min(np.stack(boots), axis=0)
    for (method, _, _), why in fits.refused.items():
        if method not in per_method and method not in refused:
            refused[method] = why
    if not per_method:
        raise NoSurface(budget_flops, "; ".join(refused.values()) or "no usable trials")
    best = min(per_method.values(), key=lambda c: c.predicted_loss)
    win = {m: float("nan") for m in per_method}
    if len(boot_best) == len(per_method):
        names = list(boot_best)
        winners = np.argmin(np.stack([boot_best[m] for m in names]), axis=0)
        win = {m: float((winners == j).mean()) for j, m in enumerate(names)}
    return Recipe(float(budget_flops), max_tokens, best, per_method, refused, win, serve_tokens=float(serve_tokens))


# ----------------------------------------------------------------------------------------------------------
# How far the fitted answer may be trusted

# Points per fitted parameter below which a surface is called thin: 5 parameters from the demo's 9 trials is a
# curve through its points, not a law (Hoffmann et al. 2022 approach 3 fit 5 parameters to ~400 runs;
# Besiroglu et al. 2024 refit them to ~240).
MIN_POINTS_PER_PARAMETER = 3


def fit_doubts(fits: SurfaceFits, choice: Choice, empirical_loss: float | None) -> list[str]:
    """Why a fitted choice should not be taken at its word, as notes (empty: no doubt): its surface is thin, or,
    at a grid budget (``empirical_loss``: the best completed trial there), the fitted best is worse than that
    trial or the trial lies above what the fit promises — each beyond the fit's interval widened by two residuals. Where there is doubt at a grid budget, the recipe table
    and `recipe` answer with the empirical best (analysis/findings.py recipe_table, analysis/report.py)."""
    surface = fits.surfaces[choice.key]
    k, n = surface.fit_parameters, surface.fit_points  # a shared fit: the method's points and parameters
    notes = []
    if n < MIN_POINTS_PER_PARAMETER * k:
        notes.append(f"thin fit: {surface.label} from {n} trials for {k} parameters"
                     + (f" (shared by {', '.join(surface.shared)})" if surface.shared else ""))
    if empirical_loss is not None and math.isfinite(empirical_loss):
        # The interval is the fitted loss's, not one run's: a trial scatters about the surface by its residual
        # (rmse on log loss), so the comparison allows two of those on either side.
        slack = math.exp(2.0 * surface.rmse_log)
        low, high = choice.predicted_loss_low / slack, choice.predicted_loss_high * slack
        if empirical_loss < low:
            notes.append(f"fit's best ({choice.predicted_loss:.4f}) is worse than the best trial "
                         f"({empirical_loss:.4f}) beyond its interval")
        elif empirical_loss > high:
            notes.append(f"best trial ({empirical_loss:.4f}) above the fit's interval "
                         f"[{choice.predicted_loss_low:.4f}, {choice.predicted_loss_high:.4f}]")
    return notes


# ----------------------------------------------------------------------------------------------------------
# Without a surface: the best trial answers

def no_fit_reason(fits: SurfaceFits) -> str:
    """Why the sweep has no surface to answer from, in one line: each refused slice's reason."""
    return "; ".join(fits.refused.values()) or "no method slice has enough trials for a surface"


def empirical_budget(usable, budget_flops: float, serve_tokens: float = 0.0):
    """Where no surface can be fitted, the recipe at C is the best completed trial at the nearest budget at or below
    C: (that budget, the usable trials there). With ``serve_tokens`` T a trial counts only if its budget plus
    serving, 2 N T (N: the merged model's), stays within C. FitError, one line, when no trial's budget is at or below
    C: the trials say nothing about a smaller budget."""
    budgets = usable["budget_flops"].astype(float)
    serving = serve_flops_of(usable, serve_tokens)
    fits = usable[budgets + serving <= budget_flops * (1 + 1e-9)]
    if fits.empty:
        smallest = float(budgets.min())
        if smallest > budget_flops * (1 + 1e-9):
            raise FitError(f"no trial at or below {budget_flops:.3g} FLOP: the sweep's smallest budget is "
                           f"{smallest:.3g} FLOP, and it has no fitted surface to go below it")
        raise FitError(f"no trial at or below {budget_flops:.3g} FLOP leaves room to serve {serve_tokens:.3g} "
                       "tokens (2·N·T), and the sweep has no fitted surface to answer from")
    budget = float(fits["budget_flops"].astype(float).max())
    return budget, fits[fits["budget_flops"].astype(float) == budget]


def serve_flops_of(trials, serve_tokens: float) -> np.ndarray:
    """``serve_flops`` of each trial row (method, n_params, n_trainable), shape (len(trials),)."""
    if not serve_tokens:
        return np.zeros(len(trials))
    rows = zip(trials["method"], trials["n_params"].astype(float), trials["n_trainable"].astype(float))
    return np.array([serve_flops(m, n, ntr, serve_tokens) for m, n, ntr in rows], dtype=float)
