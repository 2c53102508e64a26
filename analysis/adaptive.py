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

import dataclasses
import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core.strategy import AdaptiveConfig

from . import noise
from .confidence import DECISIVE, SETTLED_WITHIN, candidates, supported, unsettled
from .fit import KNOB_DEFAULTS, FitError, fit_surface, fit_surfaces, hparam_of, slice_label, split_usable
from .recipe import best_in_slice

SKIPPED = "skipped"
PRUNED_PREFIX = "pruned at rung "  # how a pruned cell's reason begins (a later `strategy: grid` submit runs it)
CELL_COLUMNS = ("trial_id", "model", "method", "lora_rank", "trainable_fraction", "budget_flops", "n_params",
                "n_trainable")
AGREEMENT_LOSS = 0.01  # the adaptive recipe's empirical loss within 1 % of the full grid's
# Replicates and margins from the measured noise sigma (relative sd of one run, analysis/noise.py): two cells are
# told apart when their means differ by more than NOISE_Z standard errors of the difference; a margin between two
# single runs is NOISE_Z * sqrt(2) * sigma, never below MIN_MARGIN (a noise-free store still has a fit's error)
NOISE_Z = 1.0
MIN_MARGIN = 0.005
DECIDE_N_BOOT = 40  # bootstrap refits behind a rung's p_best (``decide_runs``; the reports use fit.N_BOOTSTRAP)


@dataclass(frozen=True)
class ReplicateRequest:
    """One more run of a cell: ``trial_id`` is the cell's first run, ``replicate`` the number of the new one."""

    trial_id: str
    replicate: int
    reason: str


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
    """The slice's surface on ``points``, started from its surface on the points below their top budget (the
    previous decision's fit, cached in a replay): a rung's points barely move the optimum, and a warm start costs
    two minimisations in place of the grid's ~28. Recursive, so the start, too, depends only on the points."""
    key = (method, _hkey(hparam), n_boot, tuple(points["trial_id"]))
    if key not in cache.surfaces:
        below = points[points["budget_flops"] < points["budget_flops"].max()]
        prior = _surface(below, method, hparam, n_boot, cache) if below["budget_flops"].nunique() >= 2 else None
        # the seed fit_surfaces gives the slice: the same resamples whatever else the sweep holds
        seed = zlib.crc32(slice_label(method, hparam).encode())
        try:
            cache.surfaces[key] = fit_surface(points, method=method, hparam=hparam, n_boot=n_boot, seed=seed,
                                              start=None if prior is None else prior.params)
        except FitError:
            cache.surfaces[key] = None
    return cache.surfaces[key]


def _cell_means(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, hparam) of one method at one budget: its replicates' geometric mean loss, and the
    first trial id (a cell's replicates are one measurement, not several chances to score low)."""
    keyed = rows.assign(_h=rows["hparam"].fillna(-1.0), _log=np.log(rows["eval_loss"].astype(float)))
    means = keyed.groupby(["model", "_h"], sort=True).agg(_log=("_log", "mean"), trial_id=("trial_id", "min"))
    first = keyed.drop_duplicates(["model", "_h"]).set_index(["model", "_h"]).drop(columns=["_log", "trial_id"])
    out = first.join(means).reset_index()
    return out.assign(eval_loss=np.exp(out["_log"])).drop(columns=["_log", "_h"])


def _slice_losses(rows: pd.DataFrame) -> dict:
    """hparam -> best eval_loss over the cells (mean over replicates) of one method at one budget."""
    out = {}
    for h, loss in zip(rows["hparam"], rows["eval_loss"]):
        key = None if pd.isna(h) else float(h)
        out[key] = min(out.get(key, math.inf), float(loss))
    return out


def _method_view(rows: pd.DataFrame, method: str, next_budget: float, sizes: dict, config: AdaptiveConfig,
                 cache: _Cache) -> MethodView:
    """``rows``: the method's usable trials (split_usable columns), canonical order."""
    latest = float(rows["budget_flops"].max())
    at_latest = _cell_means(rows[rows["budget_flops"] == latest])
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
    # the rungs below alone: a resumed driver decides a rung again with its own runs already in the store
    done = done[done["budget_flops"].astype(float) < budget] if len(done) else done
    past_budgets = sorted(float(b) for b in done["budget_flops"].unique()) if len(done) else []
    rung = len(past_budgets) + 1
    if rung <= config.full_rungs:
        return [Decision(t, True, rung, f"run at rung {rung}: rungs 1-{config.full_rungs} run in full")
                for t in cells["trial_id"]]
    config = dataclasses.replace(config, margin=noise_margin(done, config))
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
# Replicates where they decide something

def noise_margin(done: pd.DataFrame, config: AdaptiveConfig) -> float:
    """The relative margin within which slices and methods are kept: ``config.margin`` until replicates measured
    the noise sigma, then NOISE_Z * sqrt(2) * sigma (two single runs' difference), at least MIN_MARGIN."""
    sd = noise.noise_sd(done) if len(done) else None
    return config.margin if sd is None else max(MIN_MARGIN, NOISE_Z * math.sqrt(2.0) * sd)


def _variant_keys(rows: pd.DataFrame) -> list[str]:
    return [k for k in ("family", "pooling") if k in rows.columns]


def replicate_requests(done: pd.DataFrame, budget_flops: float, config: AdaptiveConfig = AdaptiveConfig(),
                       final: bool = False, room: float = 0.0) -> list[ReplicateRequest]:
    """After the rung at ``budget_flops`` ran (``done``: the sweep's trials, store columns with ``replicate``): the
    cells of that rung that get one more run, each at most ``config.replicates`` runs in all. At the first
    ``config.noise_rungs`` rungs every cell runs ``config.noise_runs`` times (cheap: what measures the noise);
    later, a cell whose mean loss lies within NOISE_Z standard errors of the rung's best cell (per family and
    pooling; sigma from ``noise.noise_at``) runs again, so that a close call is not decided by one run's luck; once
    that asks for nothing, the cells of a recipe that is not settled at the rung (``_to_decide``) run again, up to
    ``config.decide_runs`` runs. At the ``final`` rung (the sweep's largest budget) nothing is pruned any more, so
    its runs serve the recipe alone: with ``decide_runs`` > 1 only the recipe asks there; with
    ``config.decide_flops``, once the band asks for nothing there, the recipe's choice and its strongest rival run
    while it is not settled and their FLOP fits in ``room`` (``_to_settle``; ``decide_room`` says what is left).
    ``done`` may hold the rung's pruned rows (status skipped): such a rival's cell is asked for as replicate 0, its
    first run. The driver runs the requests and asks again until none is left. Pure and in trial-id order."""
    if done.empty:
        return []
    done = done.assign(replicate=done["replicate"].fillna(0).astype(int)) if "replicate" in done else \
        done.assign(replicate=0)
    at = _canonical(done[done["budget_flops"].astype(float) == float(budget_flops)])
    runs = noise.completed_losses(at)
    if runs.empty:
        return []
    rung = int((done["budget_flops"].astype(float).unique() <= float(budget_flops)).sum())
    sigma = noise.noise_at(done, float(budget_flops))
    settle = final and config.decide_flops > 0
    if rung > config.noise_rungs and sigma is None and not settle:
        return []
    keys = noise.cell_keys(at)
    # cell -> (runs that ended, completed or failed: a failed one counts against the cap; the highest replicate
    # number); cell -> its first run's id. A pending row (a driver stopped before running it) is asked for again.
    tried, first_id = {}, {}
    ended = at[at["status"].astype("string").isin(["completed", "failed"])] if "status" in at else at
    for row in ended.sort_values(["replicate", "trial_id"]).to_dict("records"):
        key = _cell_key(row, keys)
        size, last = tried.get(key, (0, -1))
        tried[key] = (size + 1, max(last, int(row["replicate"])))
        first_id.setdefault(key, str(row["trial_id"]))
    cells = noise.cells(runs).to_dict("records")
    variant = _variant_keys(runs)
    best = {}
    for cell in cells:
        v = _cell_key(cell, variant)
        if v not in best or cell["mean_loss"] < best[v]["mean_loss"]:
            best[v] = cell
    out = []
    for cell in cells:
        key = _cell_key(cell, keys)
        size, last = tried[key]
        if rung <= config.noise_rungs:
            if size < config.noise_runs:
                out.append(ReplicateRequest(first_id[key], last + 1, f"replicate at rung {rung}: measures the noise"))
            continue
        if sigma is None or size >= config.replicates or (final and config.decide_runs > 1 and not settle):
            continue
        top = best[_cell_key(cell, variant)]
        band = NOISE_Z * sigma * math.sqrt(1.0 / cell["runs"] + 1.0 / top["runs"])
        gap = math.log(cell["mean_loss"] / top["mean_loss"])
        if gap <= band:
            out.append(ReplicateRequest(first_id[key], last + 1, f"replicate at rung {rung}: {gap:.2%} from the "
                                        f"rung's best, within the noise band {band:.2%}"))
    if settle and not out:
        out = _to_settle(done, at, float(budget_flops), rung, room, tried, first_id, keys)
    elif rung > config.noise_rungs and config.decide_runs > 1 and not out:
        out = _to_decide(done, at, float(budget_flops), rung, config, tried, first_id, keys)
    return sorted(out, key=lambda r: r.trial_id)


def decide_room(config: AdaptiveConfig, grid_flops: float, spent_flops: float) -> float:
    """FLOP the last rung's decide runs may still spend: ``config.decide_flops`` of the one-seed full grid's FLOP
    (every runnable cell's first run) less what the sweep has spent, replicates included."""
    return max(0.0, config.decide_flops * float(grid_flops) - float(spent_flops))


def _unsettled_recipe(done: pd.DataFrame, budget: float, pruned_too: bool):
    """The recipe at ``budget``, fitted on the trials up to it with DECIDE_N_BOOT bootstrap draws, where it is not
    settled (its choice more than SETTLED_WITHIN behind the best candidate in more than 1 - DECISIVE of the draws,
    ``confidence.unsettled``): (usable trials, candidates, the choice's index, that share, the rivals' indices,
    most often ahead first); None where it is settled or nothing fits. The choice is among the slices that ran at
    the budget, as ``repurpose recipe`` chooses; with ``pruned_too`` the candidates, rivals included, are every
    slice the fits place there."""
    usable, _ = split_usable(_canonical(done[done["budget_flops"].astype(float) <= budget]))
    if usable.empty:
        return None
    fits = fit_surfaces(_canonical(usable), n_boot=DECIDE_N_BOOT)
    ran = supported(fits, budget)
    found, draws = candidates(fits if pruned_too else ran, budget)
    slices = {(s.method, s.hparam, s.variant) for s in ran.surfaces.values()}
    choosable = [i for i, c in enumerate(found) if (c.method, c.hparam, c.variant) in slices]
    if not choosable or draws is None:
        return None
    me = min(choosable, key=lambda i: (found[i].predicted_loss, i))
    behind, rivals = unsettled(draws, me)
    return None if behind <= 1 - DECISIVE else (usable, found, me, behind, rivals)


def _to_decide(done: pd.DataFrame, at: pd.DataFrame, budget: float, rung: int, config: AdaptiveConfig, tried: dict,
               first_id: dict, keys: list[str]) -> list[ReplicateRequest]:
    """Once the noise band asks for nothing more: where the recipe at ``budget`` (fitted on the trials up to it, on
    the slices that ran there, as ``repurpose recipe`` answers) is not settled -- more than SETTLED_WITHIN behind
    the best candidate in more than 1 - DECISIVE of the bootstrap draws (``confidence.unsettled``) -- the choice
    and the cells that beat it by that much get one more run each (those that ran at this budget), up to
    ``config.decide_runs`` runs. The recipe follows its own advice on what would decide it."""
    recipe = _unsettled_recipe(done, budget, pruned_too=False)
    if recipe is None:
        return []
    usable, found, me, behind, rivals = recipe
    contenders = {found[i].key for i in [me, *rivals]}
    here = usable[usable["budget_flops"].astype(float) == budget]
    slice_of = {str(t): (m, None if pd.isna(h) else float(h), v, str(model))
                for t, m, h, v, model in zip(here["trial_id"], here["method"], here["hparam"], here["variant"],
                                             here["model"])}
    out = []
    for row in at.to_dict("records"):  # the store's rows: their cell keys are the ones ``tried`` holds
        if slice_of.get(str(row["trial_id"])) not in contenders:  # a usable row: completed, so its cell is tried
            continue
        key = _cell_key(row, keys)
        size, last = tried[key]
        if size < config.decide_runs and all(q.trial_id != first_id[key] for q in out):
            out.append(ReplicateRequest(first_id[key], last + 1, f"replicate at rung {rung}: the recipe here is "
                                        f"more than {SETTLED_WITHIN:.1%} behind the best in {behind:.0%} of the "
                                        f"bootstrap draws; this cell is a contender"))
    return out


def _to_settle(done: pd.DataFrame, at: pd.DataFrame, budget: float, rung: int, room: float, tried: dict,
               first_id: dict, keys: list[str]) -> list[ReplicateRequest]:
    """At the last rung (``config.decide_flops``), once the noise band asks for nothing: while the recipe at
    ``budget`` (as ``repurpose recipe`` chooses it, among the slices that ran there) is not settled
    (``confidence.unsettled``), its choice and its strongest rival -- the candidate that beats it by SETTLED_WITHIN
    in the most bootstrap draws, among every slice the fits place at the budget, one pruned before this rung
    included, whose cell the grid has at this budget -- run once more each, in that order, while their FLOP fits in
    ``room``. A rival whose cell has not run at this budget (its row pruned) runs for the first time; without a
    rival to run nothing is asked. The FLOP goes where the recipe's own uncertainty says it decides something: two
    cells run again and again, not every close one once."""
    recipe = _unsettled_recipe(done, budget, pruned_too=True)
    if recipe is None:
        return []
    usable, found, me, behind, rivals = recipe
    rows = {me: _cell_at(usable, at, budget, found[me].key)}
    for i in rivals:  # the strongest rival the grid can run here
        if (row := _cell_at(usable, at, budget, found[i].key)) is not None:
            rows[i] = row
            break
    if len(rows) < 2:
        return []
    out = []
    for i, row in rows.items():
        if row is None or found[i].flops > room:
            continue
        room -= found[i].flops
        key = _cell_key(row, keys)
        replicate = tried[key][1] + 1 if key in tried else 0
        out.append(ReplicateRequest(first_id.get(key, str(row["trial_id"])), replicate,
                                    f"replicate at rung {rung}: the recipe here is more than {SETTLED_WITHIN:.1%} "
                                    f"behind the best in {behind:.0%} of the bootstrap draws; "
                                    f"{'its choice' if i == me else 'its strongest rival'}"))
    return out


def _cell_at(usable: pd.DataFrame, at: pd.DataFrame, budget: float, key: tuple) -> dict | None:
    """The store's row of candidate ``key`` = (method, hparam, variant, model)'s cell at ``budget``: a completed run
    of it, else its row pruned at this rung (found by the slice's other trials' cell columns); None where the grid
    has no such cell there."""
    method, hparam, variant, model = key
    h = -1.0 if hparam is None else float(hparam)
    mine = usable[(usable["method"] == method) & (usable["hparam"].fillna(-1.0) == h) & (usable["variant"] == variant)]
    here = mine[(mine["budget_flops"].astype(float) == budget) & (mine["model"].astype(str) == model)]
    ids = set(here["trial_id"].astype(str))
    rows = at[at["trial_id"].astype(str).isin(ids)] if ids else at.iloc[:0]
    if rows.empty and len(mine):
        columns = [k for k in (*noise.CELL_KEYS, *KNOB_DEFAULTS) if k in at and k not in ("model", "budget_flops")]
        like = _slice_columns(mine.iloc[0].to_dict(), columns)
        reason = at["reason"].astype("string").fillna("") if "reason" in at else pd.Series("", index=at.index)
        pruned = at[(at["status"].astype("string") == SKIPPED) & (at["model"].astype(str) == model)
                    & reason.str.startswith(PRUNED_PREFIX)]
        rows = pruned[[_slice_columns(r, columns) == like for r in pruned.to_dict("records")]]
    return None if rows.empty else rows.sort_values("trial_id").iloc[0].to_dict()


def _slice_columns(row: dict, columns: list[str]) -> tuple:
    """A row's slice-defining values, missing ones read as ``split_usable`` reads them (a store written before a
    column: its default)."""
    defaults = {"family": "?", "pooling": "mean", **KNOB_DEFAULTS}
    filled = {k: defaults[k] if k in defaults and _cell_key(row, [k]) == ("-",) else row.get(k) for k in columns}
    return _cell_key(filled, columns)


def _cell_key(row: dict, keys: list[str]) -> tuple:
    """A cell's key from a row: missing values (no rank, no fraction) as one placeholder, numbers as floats."""
    out = []
    for k in keys:
        v = row.get(k)
        if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
            out.append("-")
        else:
            out.append(float(v) if isinstance(v, (int, float, np.integer, np.floating)) else str(v))
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------
# Replay on a sweep that ran every cell

def _best(rows: pd.DataFrame) -> Pick | None:
    usable, _ = split_usable(rows) if len(rows) else (rows, None)
    if usable is None or usable.empty:
        return None
    top = usable.sort_values(["eval_loss", "trial_id"], kind="stable").iloc[0]
    return Pick(str(top["method"]), str(top["model"]), float(top["eval_loss"]), str(top["trial_id"]))


def replay(full_trials: pd.DataFrame, config: AdaptiveConfig = AdaptiveConfig(), draw=None) -> ReplayResult:
    """Replay the policy rung by rung as if only its chosen cells had run: each rung's ``_decide`` sees exactly
    the chosen cells of the rungs below (as the live driver's store would hold them), then the rung's replicates
    are asked for (``replicate_requests``) until none is left. ``draw(first_row, replicate)`` gives a requested
    replicate's row (a dict of store columns, its own ``trial_id``), or None where there is none; by default the
    store's own rows of that replicate (a sweep run with ``seeds``). Skipped (infeasible) rows are run by neither;
    failed rows count as run (their FLOP too) but feed no fit, as live. A pruned cell the last rung's decide runs
    ask for (``config.decide_flops``) runs its store row. The FLOP fraction is over the one-seed full grid (every
    runnable cell's first run)."""
    rows = _canonical(full_trials)
    runnable = _runnable(rows)
    replicate = runnable["replicate"].fillna(0).astype(int) if "replicate" in runnable else 0
    runnable = runnable.assign(replicate=replicate)
    firsts = runnable[runnable["replicate"] == 0]
    draw = draw or _stored_replicates(runnable)
    cache, ran, decisions = _Cache(), [], []
    by_id = {str(t): r for t, r in zip(firsts["trial_id"], firsts.to_dict("records"))}
    budgets = sorted(firsts["budget_flops"].astype(float).unique())
    flops = lambda t: float(pd.to_numeric(t["flops"], errors="coerce").fillna(0.0).sum())  # noqa: E731
    total = flops(firsts)
    for budget in budgets:
        done = _frame(ran, runnable)
        rung_decisions = _decide(done, firsts[firsts["budget_flops"] == budget], config, cache)
        decisions += rung_decisions
        ran += [by_id[d.trial_id] for d in rung_decisions if d.run]
        while True:
            # as the live store holds them: the rung's pruned cells as skipped rows (one may yet run, see
            # ``_to_settle``), a cell's first run from the store, later ones drawn
            ran_ids = {str(r["trial_id"]) for r in ran}
            pruned = [by_id[d.trial_id] | {"status": SKIPPED, "reason": d.reason, "eval_loss": np.nan, "flops": 0.0,
                                           "tokens": 0} for d in rung_decisions if d.trial_id not in ran_ids]
            room = decide_room(config, total, flops(_frame(ran, runnable)))
            asked = replicate_requests(_frame(ran + pruned, runnable), budget, config, budget == budgets[-1], room)
            drawn = [row for q in asked if (row := by_id[q.trial_id] if q.replicate == 0 else
                                            draw(by_id[q.trial_id], q.replicate)) is not None]
            if not drawn:
                break
            ran += drawn
    ran_frame = _frame(ran, runnable)
    per_budget = tuple(
        BudgetComparison(float(b), _best(firsts[firsts["budget_flops"] == b]),
                         _best_cell(ran_frame[ran_frame["budget_flops"] == b]))
        for b in sorted(firsts["budget_flops"].astype(float).unique()))
    return ReplayResult(flops(ran_frame) / total if total > 0 else float("nan"), len(ran_frame),
                        tuple(sorted(ran_frame["trial_id"].astype(str))), per_budget, tuple(decisions))


def _frame(rows: list[dict], like: pd.DataFrame) -> pd.DataFrame:
    return _canonical(pd.DataFrame(rows, columns=like.columns) if rows else like.iloc[:0])


def _stored_replicates(runnable: pd.DataFrame):
    """``replay``'s default draw: the store's row of that replicate of the cell, if the sweep ran it."""
    keys = noise.cell_keys(runnable)
    stored = {(_cell_key(r, keys), int(r["replicate"])): r for r in runnable.to_dict("records")}
    return lambda first, replicate: stored.get((_cell_key(first, keys), replicate))


def _best_cell(rows: pd.DataFrame) -> Pick | None:
    """The best cell by its replicates' mean loss (a single run's luck does not pick it)."""
    usable, _ = split_usable(rows) if len(rows) else (rows, None)
    if usable is None or usable.empty:
        return None
    table = noise.cells(usable)
    top = table.sort_values(["mean_loss"], kind="stable").iloc[0]
    return Pick(str(top["method"]), str(top["model"]), float(top["mean_loss"]), str(top["trial_ids"][0]))
