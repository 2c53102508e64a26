"""The adaptive sweep: budgets run as rungs, cells that cannot be on the frontier are pruned.

Pure functions, no Ray and no torch: the driver calls ``decide`` before each rung, ``repurpose replay`` calls
``replay`` on a sweep that ran every cell; both reach the same decisions through ``_decide``.

The policy, at the next rung r (its budget C_r; rungs = the grid's budgets ascending):

- rungs 1..``full_rungs`` run in full;
- after that, per method, from the completed trials at budgets < C_r (``Assessment``):
  * its hyperparameter slices (LoRA rank, freeze fraction) are kept when their best loss at the method's latest
    rung is within ``margin`` of the method's best slice there (successive halving: a pruned slice has no loss
    at the next rung, so it stays pruned);
  * the best slice's surface L(N, D) = E + A/N^alpha + B/D^beta (``fit.fit_surface``, Chinchilla approach 3)
    predicts the iso-FLOP optimal model at C_r and its loss with a bootstrap interval (``recipe.best_in_slice``);
    where no surface can be fitted the empirical iso-FLOP curve stands in: the best model at the latest rung and
    the next size up (the optimum grows with the budget), its observed loss as the prediction;
  * the best slice runs the predicted optimum and ``neighbours`` model sizes on each side, the other kept slices
    run the predicted optimum only;
  * a method whose interval's low end lies above the predicted frontier (the best method's predicted loss)
    + ``margin`` at the last ``dominated_rungs`` decision points is pruned.
- a rung is never pruned to nothing: the frontier method's predicted optimum cell then runs.

Every decision depends only on the completed trials' content (rows sorted by trial_id before any fit; the
bootstrap is seeded per slice), so a resumed driver re-derives the same decisions from the store.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core.strategy import AdaptiveConfig

from .fit import FitError, fit_surface, hparam_of, slice_label, split_usable
from .recipe import best_in_slice

SKIPPED = "skipped"
PRUNED_PREFIX = "pruned at rung "  # how a pruned cell's reason begins (a later `strategy: grid` submit runs it)
CELL_COLUMNS = ("trial_id", "model", "method", "lora_rank", "trainable_fraction", "budget_flops", "n_params",
                "n_trainable")
AGREEMENT_LOSS = 0.01  # the adaptive recipe's empirical loss within 1 % of the full grid's


@dataclass(frozen=True)
class Decision:
    """Run or prune one planned cell of a rung; ``reason`` is what the store's ``reason`` column says."""

    trial_id: str
    run: bool
    rung: int
    reason: str


@dataclass(frozen=True)
class MethodView:
    """One method at one decision point: what it keeps and what it predicts at the next rung's budget.
    ``optimum_span``: size indices of the predicted optimum (one index from a surface; the empirical best and the
    next size up without one)."""

    method: str
    latest_budget_flops: float
    slice_loss: dict  # hparam (None for no slice) -> best eval_loss at the method's latest rung
    best_slice: float | None
    kept_slices: frozenset
    optimum_model: str
    optimum_span: tuple[int, int]
    predicted_loss: float
    predicted_low: float
    predicted_high: float
    basis: str  # "surface" | "empirical"


@dataclass(frozen=True)
class Assessment:
    """Decision point j: the completed trials at the first j rungs, predicting rung j+1 (``next_budget_flops``)."""

    rung: int
    next_budget_flops: float
    methods: dict  # method -> MethodView
    frontier_method: str
    frontier_loss: float
    dominated: frozenset
    basis: str


@dataclass(frozen=True)
class Pick:
    method: str
    model: str
    eval_loss: float
    trial_id: str

    def to_json(self) -> dict:
        return {"method": self.method, "model": self.model, "eval_loss": self.eval_loss}


@dataclass(frozen=True)
class BudgetComparison:
    budget_flops: float
    full: Pick | None
    adaptive: Pick | None

    def agrees(self, size_index: dict, loss_tolerance: float = AGREEMENT_LOSS) -> bool:
        """The agreement test: same method, a model within one size step, empirical loss within 1 %."""
        if self.full is None or self.adaptive is None:
            return self.full is None and self.adaptive is None
        return (self.full.method == self.adaptive.method
                and abs(size_index[self.full.model] - size_index[self.adaptive.model]) <= 1
                and self.adaptive.eval_loss <= self.full.eval_loss * (1 + loss_tolerance))


@dataclass(frozen=True)
class ReplayResult:
    flops_fraction: float
    trials_run: int
    trial_ids: tuple[str, ...]
    per_budget: tuple[BudgetComparison, ...]
    decisions: tuple[Decision, ...] = field(default_factory=tuple)  # every runnable cell, rung by rung

    def to_json(self) -> dict:
        """docs/reference.md, ``replay --json``."""
        return {
            "flops_fraction": self.flops_fraction,
            "trials_run": self.trials_run,
            "trial_ids": list(self.trial_ids),
            "per_budget": [{"budget_flops": b.budget_flops,
                            "full": b.full.to_json() if b.full else None,
                            "adaptive": b.adaptive.to_json() if b.adaptive else None} for b in self.per_budget],
        }


# ----------------------------------------------------------------------------------------------------------
# Helpers on trial tables

def _hkey(h: float | None) -> float:
    return -1.0 if h is None else float(h)


def size_index(*tables: pd.DataFrame) -> dict[str, int]:
    """Model -> its size step (0 = smallest), by the smallest ``n_params`` any row of it shows (LoRA rows count
    their adapters in N, the other methods' rows show the base model's N)."""
    frames = [t[["model", "n_params"]] for t in tables if len(t)]
    if not frames:
        return {}
    sizes = pd.concat(frames).astype({"n_params": float}).groupby("model")["n_params"].min()
    ordered = sorted(sizes.items(), key=lambda kv: (kv[1], kv[0]))
    return {str(m): i for i, (m, _) in enumerate(ordered)}


def _canonical(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in trial_id order: every fit (and its seeded bootstrap) sees the same rows whatever the input order.
    Store columns the policy does not need (``reason``) are added empty where a caller left them out."""
    df = df.sort_values("trial_id", kind="stable").reset_index(drop=True)
    return df if "reason" in df.columns else df.assign(reason=None)


def _runnable(cells: pd.DataFrame) -> pd.DataFrame:
    if "status" in cells.columns:
        cells = cells[cells["status"].astype("string").fillna("") != SKIPPED]
    return _canonical(cells)


# ----------------------------------------------------------------------------------------------------------
# Assessment at one decision point

class _Cache:
    """Surfaces and assessments keyed by the trial ids they were computed from (pure: same ids, same rows, same
    result), so a replay fits each slice state once."""

    def __init__(self):
        self.surfaces, self.assessments = {}, {}


def _surface(points: pd.DataFrame, method: str, hparam: float | None, n_boot: int, cache: _Cache):
    key = (method, _hkey(hparam), n_boot, tuple(points["trial_id"]))
    if key not in cache.surfaces:
        # the seed fit_surfaces gives the slice: the same resamples whatever else the sweep holds
        seed = zlib.crc32(slice_label(method, hparam).encode())
        try:
            cache.surfaces[key] = fit_surface(points, method=method, hparam=hparam, n_boot=n_boot, seed=seed)
        except FitError:
            cache.surfaces[key] = None
    return cache.surfaces[key]


def _slice_losses(rows: pd.DataFrame) -> dict:
    """hparam -> best eval_loss, over the rows of one method at one budget."""
    out = {}
    for h, loss in zip(rows["hparam"], rows["eval_loss"]):
        key = None if pd.isna(h) else float(h)
        out[key] = min(out.get(key, math.inf), float(loss))
    return out


def _method_view(rows: pd.DataFrame, method: str, next_budget: float, sizes: dict, config: AdaptiveConfig,
                 cache: _Cache) -> MethodView:
    """``rows``: the method's usable trials (split_usable columns), canonical order."""
    latest = float(rows["budget_flops"].max())
    at_latest = rows[rows["budget_flops"] == latest]
    losses = _slice_losses(at_latest)
    best_h = min(losses, key=lambda h: (losses[h], _hkey(h)))
    kept = frozenset(h for h, v in losses.items() if v <= losses[best_h] * (1 + config.margin))
    slice_rows = rows[rows["hparam"].isna()] if best_h is None else rows[rows["hparam"] == best_h]
    surface = _surface(slice_rows, method, best_h, config.n_boot, cache)
    found = best_in_slice(surface, next_budget) if surface is not None else None
    if found is not None:
        choice, _ = found
        i = sizes[choice.model]
        return MethodView(method, latest, losses, best_h, kept, choice.model, (i, i), choice.predicted_loss,
                          choice.predicted_loss_low, choice.predicted_loss_high, "surface")
    # the empirical iso-FLOP curve: the best model at the latest rung; the optimum moves up with the budget
    best_row = at_latest[at_latest["eval_loss"] == losses[best_h]].iloc[0]
    i = sizes[str(best_row["model"])]
    loss = float(best_row["eval_loss"])
    return MethodView(method, latest, losses, best_h, kept, str(best_row["model"]), (i, i + 1), loss, loss, loss,
                      "empirical")


def assess(done: pd.DataFrame, next_budget_flops: float, config: AdaptiveConfig, sizes: dict | None = None,
           cache: _Cache | None = None) -> Assessment | None:
    """Decision point after the rungs below ``next_budget_flops``; None when nothing usable is done."""
    cache = cache or _Cache()
    past = _canonical(done[done["budget_flops"] < next_budget_flops])
    usable, _ = split_usable(past)
    if usable.empty:
        return None
    usable = _canonical(usable)
    rung = int(past["budget_flops"].nunique())
    key = (next_budget_flops, config, tuple(usable["trial_id"]))
    if key in cache.assessments:
        return cache.assessments[key]
    sizes = sizes if sizes is not None else size_index(done)
    views = {str(m): _method_view(rows, str(m), next_budget_flops, sizes, config, cache)
             for m, rows in usable.groupby("method", sort=True)}
    basis = "surface" if all(v.basis == "surface" for v in views.values()) else "empirical"
    if basis == "surface":
        score = {m: (v.predicted_loss, v.predicted_low) for m, v in views.items()}
    else:  # without a surface for every method, compare all on what they scored at the latest common rung
        last = max(v.latest_budget_flops for v in views.values())
        score = {m: (min(v.slice_loss.values()),) * 2 if v.latest_budget_flops == last else (math.inf,) * 2
                 for m, v in views.items()}
    frontier_method = min(score, key=lambda m: (score[m][0], m))
    frontier = score[frontier_method][0]
    dominated = frozenset(m for m, (_, low) in score.items() if low > frontier * (1 + config.margin))
    result = Assessment(rung, float(next_budget_flops), views, frontier_method, float(frontier), dominated, basis)
    cache.assessments[key] = result
    return result


# ----------------------------------------------------------------------------------------------------------
# Decisions for one rung

def decide(done: pd.DataFrame, cells: pd.DataFrame, config: AdaptiveConfig = AdaptiveConfig()) -> list[Decision]:
    """Run or prune each runnable cell of the next rung. ``done``: the sweep's trials (store columns; rows at or
    above the cells' budget and rows that are not completed are ignored by the fits). ``cells``: the rung's
    planned cells (CELL_COLUMNS; rows with ``status`` skipped are infeasible and get no decision). One budget
    per call. Deterministic: the same trials in any row order give the same decisions."""
    return _decide(done, _runnable(cells), config, _Cache())


def _decide(done: pd.DataFrame, cells: pd.DataFrame, config: AdaptiveConfig, cache: _Cache) -> list[Decision]:
    if cells.empty:
        return []
    budgets = cells["budget_flops"].astype(float).unique()
    if len(budgets) != 1:
        raise ValueError(f"decide: the cells of one rung share one budget (got {sorted(budgets)})")
    budget = float(budgets[0])
    past_budgets = sorted(float(b) for b in done["budget_flops"].unique() if b < budget) if len(done) else []
    rung = len(past_budgets) + 1
    if rung <= config.full_rungs:
        return [Decision(t, True, rung, f"run at rung {rung}: rungs 1-{config.full_rungs} run in full")
                for t in cells["trial_id"]]
    sizes = size_index(done, cells)
    history = []  # the decision points for rungs rung, rung-1, ...: assessments after rung-1, rung-2, ...
    for j in range(min(config.dominated_rungs, len(past_budgets))):
        next_budget = budget if j == 0 else past_budgets[-j]
        history.append(assess(done, next_budget, config, sizes, cache))
    current = history[0]
    if current is None:
        return [Decision(t, True, rung, f"run at rung {rung}: no completed trial to prune on")
                for t in cells["trial_id"]]
    rungs = {b: k for k, b in enumerate(past_budgets, start=1)}
    decisions = [_cell_decision(row, rung, current, history, sizes, rungs, config) for row in cells.itertuples()]
    return _never_empty(decisions, cells, rung, current, sizes)


def _dominated_throughout(method: str, history: list, config: AdaptiveConfig) -> bool:
    return (len(history) >= config.dominated_rungs
            and all(a is not None and method in a.dominated for a in history[:config.dominated_rungs]))


def _cell_decision(row, rung: int, current: Assessment, history: list, sizes: dict, rungs: dict,
                   config: AdaptiveConfig) -> Decision:
    method = str(row.method)
    view = current.methods.get(method)
    if view is None:
        return Decision(row.trial_id, True, rung, f"run at rung {rung}: {method} has no completed trial yet")
    if _dominated_throughout(method, history, config):
        return Decision(row.trial_id, False, rung,
                        f"pruned at rung {rung}: predicted {view.predicted_loss:.3f} "
                        f"[{view.predicted_low:.3f}, {view.predicted_high:.3f}] > frontier "
                        f"{current.frontier_loss:.3f} + margin")
    h = hparam_of(row)
    label, best_label = slice_label(method, h), slice_label(method, view.best_slice)
    latest_rung = rungs[view.latest_budget_flops]
    if h not in view.kept_slices:
        if h not in view.slice_loss:
            return Decision(row.trial_id, False, rung,
                            f"pruned at rung {rung}: {label} did not run at rung {latest_rung}, {method}'s latest")
        return Decision(row.trial_id, False, rung,
                        f"pruned at rung {rung}: {label} scored {view.slice_loss[h]:.3f} at rung {latest_rung} > "
                        f"best {best_label} {view.slice_loss[view.best_slice]:.3f} + margin")
    reach = config.neighbours if h == view.best_slice else 0
    lo, hi = view.optimum_span
    i = sizes[str(row.model)]
    steps = max(lo - i, i - hi, 0)
    where = (f"the predicted optimum {view.optimum_model} of {best_label} "
             f"({view.predicted_loss:.3f} [{view.predicted_low:.3f}, {view.predicted_high:.3f}], {view.basis})")
    if steps > reach:
        return Decision(row.trial_id, False, rung,
                        f"pruned at rung {rung}: {row.model} is {steps} size step(s) from {where}")
    return Decision(row.trial_id, True, rung, f"run at rung {rung}: {label}, {steps} size step(s) from {where}")


def _never_empty(decisions: list, cells: pd.DataFrame, rung: int, current: Assessment, sizes: dict) -> list:
    """A rung is never pruned to nothing: run the frontier method's cell nearest its predicted optimum."""
    if any(d.run for d in decisions):
        return decisions
    view = current.methods[current.frontier_method]
    lo, hi = view.optimum_span
    own = cells[cells["method"] == current.frontier_method]
    pool = own if len(own) else cells
    distance = [max(lo - sizes[str(m)], sizes[str(m)] - hi, 0) for m in pool["model"]]
    chosen = pool["trial_id"].iloc[int(np.argmin(distance))]  # cells are in trial_id order: ties are stable
    return [Decision(d.trial_id, True, rung, f"run at rung {rung}: every cell would be pruned; the frontier "
                     f"method {current.frontier_method}'s cell nearest its predicted optimum runs")
            if d.trial_id == chosen else d for d in decisions]


# ----------------------------------------------------------------------------------------------------------
# Replay on a sweep that ran every cell

def _best(rows: pd.DataFrame) -> Pick | None:
    usable, _ = split_usable(rows) if len(rows) else (rows, None)
    if usable is None or usable.empty:
        return None
    top = usable.sort_values(["eval_loss", "trial_id"], kind="stable").iloc[0]
    return Pick(str(top["method"]), str(top["model"]), float(top["eval_loss"]), str(top["trial_id"]))


def replay(full_trials: pd.DataFrame, config: AdaptiveConfig = AdaptiveConfig()) -> ReplayResult:
    """Replay the policy rung by rung as if only its chosen cells had run: each rung's ``_decide`` sees exactly
    the chosen cells of the rungs below (as the live driver's store would hold them). Skipped (infeasible) rows
    are run by neither; failed rows count as run (their FLOP too) but feed no fit, as live."""
    rows = _canonical(full_trials)
    runnable = _runnable(rows)
    cache, chosen, decisions = _Cache(), [], []
    for budget in sorted(runnable["budget_flops"].astype(float).unique()):
        done = runnable[runnable["trial_id"].isin(chosen)]
        rung_decisions = _decide(done, runnable[runnable["budget_flops"] == budget], config, cache)
        decisions += rung_decisions
        chosen += [d.trial_id for d in rung_decisions if d.run]
    ran = runnable[runnable["trial_id"].isin(chosen)]
    flops = lambda t: float(pd.to_numeric(t["flops"], errors="coerce").fillna(0.0).sum())  # noqa: E731
    total = flops(runnable)
    per_budget = tuple(
        BudgetComparison(float(b), _best(runnable[runnable["budget_flops"] == b]), _best(ran[ran["budget_flops"] == b]))
        for b in sorted(runnable["budget_flops"].astype(float).unique()))
    return ReplayResult(flops(ran) / total if total > 0 else float("nan"), len(ran), tuple(sorted(chosen)),
                        per_budget, tuple(decisions))
