"""How sure a recipe is: the probability that its cell is the best at the budget, the runner-up, and what would
decide a close call.

A candidate is a (family, pooling, method, hyperparameter, model) the fitted surfaces can place at the budget (D =
the budget over its cost per token, capped by the data, as ``recipe.best_in_slice``). Each surface carries
bootstrap refits on its trials resampled with replacement (``fit.fit_surface``): replicates are trials, so a
resample draws over replicates and over cells alike, and the refits carry both the run-to-run noise and the fit's
own uncertainty. Draw b of every surface is one joint draw (the slices' resamples are independent); in each the
candidate with the lowest predicted loss wins:

    p_best = share of draws in which the chosen candidate wins

Where there is no bootstrap (``n_boot`` 0) there is no p_best (None). The runner-up is the best other candidate by
predicted loss, with its relative gap to the choice. A choice with p_best below ``DECISIVE`` is "not decisive":
the candidates that win in at least ``CONTENDER_SHARE`` of the draws are the cells to replicate (one more run
each, at their FLOP) to decide it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from core import methods

from .fit import SurfaceFits, slice_label
from .recipe import _candidates

DECISIVE = 0.8  # p_best below it: the recipe says "not decisive"
CONTENDER_SHARE = 0.05  # a candidate winning this share of draws is worth a replicate
SETTLED_WITHIN = 0.005  # a choice within 0.5 % of the best candidate's loss is close enough (``unsettled``)


@dataclass(frozen=True)
class Candidate:
    method: str
    hparam: float | None
    variant: str
    family: str | None
    pooling: str
    model: str
    n_params: float
    n_trainable: float
    tokens: float
    flops: float  # training FLOP of one run of the cell at this budget
    predicted_loss: float

    @property
    def key(self) -> tuple:
        return self.method, self.hparam, self.variant, self.model

    @property
    def label(self) -> str:
        return slice_label(self.method, self.hparam, self.variant)

    def to_json(self) -> dict:
        return {"method": self.method, "model": self.model,
                **methods.get(self.method).hparam_fields(self.hparam),
                "family": self.family, "pooling": self.pooling, "tokens": int(self.tokens),
                "flops": float(self.flops), "predicted_loss": _finite(self.predicted_loss)}


@dataclass(frozen=True)
class Confidence:
    budget_flops: float
    p_best: float | None
    runner_up: Candidate | None
    gap: float | None  # runner-up's predicted loss over the choice's, minus 1
    contenders: tuple[Candidate, ...]  # not decisive: the cells to replicate (the choice first); else empty
    wins: dict  # candidate key -> share of draws it wins

    @property
    def decisive(self) -> bool | None:
        return None if self.p_best is None else self.p_best >= DECISIVE

    @property
    def decide_flops(self) -> float:
        return float(sum(c.flops for c in self.contenders))

    def to_json(self) -> dict:
        """``recipe --json``'s ``p_best``, ``runner_up`` ({cell..., "gap"}), ``decisive`` and ``to_decide``."""
        runner = None if self.runner_up is None else self.runner_up.to_json() | {"gap": _finite(self.gap)}
        return {"p_best": self.p_best, "runner_up": runner, "decisive": self.decisive,
                "to_decide": {"replicate": [c.to_json() for c in self.contenders], "flops": self.decide_flops}
                if self.contenders else None}


def _finite(x) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def candidates(fits: SurfaceFits, budget_flops: float, max_tokens: int | None = None,
               serve_tokens: float = 0.0) -> tuple[list[Candidate], np.ndarray | None]:
    """Every candidate at the budget and its bootstrap predictions, (candidates, (n_candidates, n_boot)); the
    array is None where a surface has no bootstrap."""
    found, draws = [], []
    for surface in fits.surfaces.values():
        names, n, ntr, cost, tokens, _, _ = _candidates(surface, budget_flops, max_tokens, serve_tokens)
        ok = tokens >= 1
        if not ok.any():
            continue
        d = np.maximum(tokens, 1.0)
        pred = surface.predict_bagged(n, d)
        boot = surface.predict_boot(n, d) if len(surface.boot) else None  # (n_boot, k)
        for i in np.flatnonzero(ok):
            found.append(Candidate(surface.method, surface.hparam, surface.variant, surface.family, surface.pooling,
                                   names[i], float(n[i]), float(ntr[i]), float(d[i]), float(d[i] * cost[i]),
                                   float(pred[i])))
            draws.append(None if boot is None else boot[:, i])
    if not found or any(b is None for b in draws) or len({len(b) for b in draws}) != 1:
        return found, None
    return found, np.stack(draws)


def supported(fits: SurfaceFits, budget_flops: float) -> SurfaceFits:
    """Only the surfaces whose trials reach ``budget_flops`` (their budget range covers it): after an adaptive
    sweep, a slice pruned at a lower rung is an extrapolation there, and a thin one can predict anything. The
    recipe among the cells that ran at a budget is chosen on these."""
    keep = {k: v for k, v in fits.surfaces.items()
            if v.budget_range[0] * (1 - 1e-9) <= budget_flops <= v.budget_range[1] * (1 + 1e-9)}
    return SurfaceFits(keep, fits.refused, fits.n_boot)


def confidence(fits: SurfaceFits, budget_flops: float, chosen: tuple, max_tokens: int | None = None,
               serve_tokens: float = 0.0) -> Confidence:
    """How sure the choice ``chosen`` = (method, hparam, variant, model) is at ``budget_flops``."""
    found, draws = candidates(fits, budget_flops, max_tokens, serve_tokens)
    return judge(found, draws, chosen, budget_flops)


def judge(found: list[Candidate], draws: np.ndarray | None, chosen: tuple, budget_flops: float) -> Confidence:
    """``confidence`` on given candidates and draws (n_candidates, n_boot): the pure part, testable by hand."""
    keys = [c.key for c in found]
    if chosen not in keys:
        return Confidence(float(budget_flops), None, None, None, (), {})
    me = keys.index(chosen)
    others = [i for i in range(len(found)) if i != me]
    runner = min(others, key=lambda i: (found[i].predicted_loss, i)) if others else None
    gap = found[runner].predicted_loss / found[me].predicted_loss - 1 if runner is not None else None
    if draws is None or draws.shape[1] == 0:
        return Confidence(float(budget_flops), None, found[runner] if runner is not None else None, gap, (), {})
    winners = np.argmin(np.where(np.isfinite(draws), draws, np.inf), axis=0)
    share = np.bincount(winners, minlength=len(found)) / draws.shape[1]
    wins = {keys[i]: float(share[i]) for i in np.flatnonzero(share)}
    p_best = float(share[me])
    contenders = ()
    if p_best < DECISIVE:
        rivals = sorted((i for i in others if share[i] >= CONTENDER_SHARE), key=lambda i: (-share[i], i))
        if not rivals and runner is not None:
            rivals = [runner]
        contenders = tuple(found[i] for i in [me, *rivals])
    return Confidence(float(budget_flops), p_best, found[runner] if runner is not None else None, gap, contenders,
                      wins)


def unsettled(draws: np.ndarray, me: int, within: float = SETTLED_WITHIN) -> tuple[float, list[int]]:
    """How far a choice is from settled, on its candidates' bootstrap draws (n_candidates, n_boot): (the share of
    draws in which candidate ``me`` is more than ``within`` behind the draw's best, the candidates that beat it by
    that much in at least CONTENDER_SHARE of the draws, the most often first). A near-tie (every draw within
    ``within``) is settled however low its p_best: choosing either costs less than ``within``, and no replicate
    would tell them apart."""
    draws = np.where(np.isfinite(draws), draws, np.inf)
    behind = draws[me] > draws.min(axis=0) * (1 + within)
    share = (draws * (1 + within) < draws[me]).mean(axis=1)
    beats = np.flatnonzero(share >= CONTENDER_SHARE)
    return float(behind.mean()), sorted((int(i) for i in beats), key=lambda i: (-share[i], i))
