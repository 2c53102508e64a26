"""Fits: pure functions from a trials DataFrame (``load_trials``) to frozen, typed results.

No file I/O and no printing here; ``report.py`` writes. Three fits:

1. ``empirical_optimum``: per (method, budget) the best completed trial; the frontier = best method per budget.
2. ``fit_trends``: per method the optimal loss vs budget as a power law (a line in log-log, Figure 1 of Ziarko
   et al. 2024), its lower envelope over methods and the budgets where the best method changes.
3. ``fit_surfaces``: per (method, hyperparameter slice) L(N, D) = E + A/N^alpha + B/D^beta, fitted as in
   Hoffmann et al. 2022 (Chinchilla) approach 3 and Besiroglu et al. 2024 (the Epoch AI refit): Huber loss
   (delta = 1e-3) on log-loss residuals, L-BFGS from a grid of starts, bootstrap over trials for intervals.
"""
from __future__ import annotations

import contextlib
import functools
import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core.errors import UserError
from core import methods
from core.flops import cost_per_token  # pure arithmetic, no torch; works elementwise on arrays
from core.store import COMPLETED  # the store's status of a finished trial

# Hoffmann et al. 2022, approach 3; Besiroglu et al. 2024 (arXiv 2404.10102) keep delta = 1e-3.
HUBER_DELTA = 1e-3
# The Chinchilla/Epoch grid of L-BFGS starts: alpha, beta in {0, .5, ..., 2}; e = log E in {-1, -.5, ..., 1};
# a = log A, b = log B in {0, 5, ..., 25}.
START_EXPONENTS = np.arange(0.0, 2.01, 0.5)
START_LOG_E = np.arange(-1.0, 1.01, 0.5)
START_LOG_COEF = np.arange(0.0, 25.1, 5.0)
# Multi-start in two stages (see _fit_from_grid): a short L-BFGS run from the best grid point of each exponent
# pair, then convergence from the best few; same optimum as converging every start, a third of the work.
SCOUT_ITERATIONS, N_CONVERGED_STARTS = 30, 3
# Bounds keep L-BFGS-B away from overflow; a fit that ends on one is reported in Surface.warnings.
EXPONENT_BOUNDS = (0.0, 4.0)
LOG_E_BOUNDS = (-12.0, 6.0)
LOG_COEF_BOUNDS = (-200.0, 200.0)  # on the centred coefficients (see _terms)
# Minimum data for a surface: a 5-parameter fit needs >= 2 model sizes and >= 2 budgets (with one budget N and
# D are collinear) and 2 points of slack; the 3-parameter one-model form E + B/D^beta needs >= 3 budgets.
MIN_POINTS_ND, MIN_POINTS_D = 7, 4
N_BOOTSTRAP = 100
CI_LEVEL = 0.95


class FitError(UserError):
    """Too little (or no usable) data for a fit; the message is one line naming what is missing."""


# ----------------------------------------------------------------------------------------------------------
# Which trials a fit may use

def hparam_of(row) -> float | None:
    """The method hyperparameter that defines a trial's slice (LoRA rank, freeze trainable fraction, else None),
    from a row with ``method`` and the hyperparameter columns: a dict, a pandas row or an itertuples tuple."""
    method = row["method"] if hasattr(row, "get") else row.method
    return methods.get(str(method)).hparam_value(row)


def slice_label(method: str, hparam: float | None, variant: str = "") -> str:
    """``lora r=8``, ``freeze f=0.5``; with a variant (a sweep over several families or poolings) ``lora r=8
    [llama last]``."""
    label = methods.get(method).label(hparam)
    return f"{label} [{variant}]" if variant else label


class Slice:
    """A slice's key (method, hyperparameter, variant) and label, for the records that name one (a fitted
    surface, a recipe's choice): they have ``method``, ``hparam`` and ``variant`` fields."""

    method: str
    hparam: float | None
    variant: str

    @property
    def key(self) -> tuple[str, float | None, str]:
        return self.method, self.hparam, self.variant

    @property
    def label(self) -> str:
        return slice_label(self.method, self.hparam, self.variant)


def variant_of(family, pooling, varies: bool) -> str:
    """A slice's family and pooling as its key's third part: "" when the sweep has one family and mean pooling
    (every sweep before the families and the pooling axis), else ``"llama last"``."""
    return f"{family} {pooling}" if varies else ""


@dataclass(frozen=True, eq=False)
class Exclusions:
    """Trials not used by any fit, one row each with the reason (``table``: trial_id, method, model,
    budget_flops, status, why)."""

    table: pd.DataFrame
    n_total: int

    @property
    def counts(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.table["category"].value_counts().sort_index().items()}

    def messages(self) -> list[str]:
        """One line per category, naming up to 5 trial ids."""
        lines = []
        for category, group in self.table.groupby("category", sort=True):
            ids = ", ".join(group["trial_id"].astype(str).head(5)) + (", ..." if len(group) > 5 else "")
            lines.append(f"{len(group)} of {self.n_total} trials excluded from fits: {category} ({ids})")
        return lines


def split_usable(trials: pd.DataFrame) -> tuple[pd.DataFrame, Exclusions]:
    """(usable trials, exclusions). Usable = completed with a finite positive ``eval_loss``, tokens > 0 and a
    known N; every other row is reported with why, never silently dropped or used.

    The usable frame gains ``hparam`` (float, NaN when the method has none), ``N`` and ``D`` (floats)."""
    df = trials.reset_index(drop=True)
    status = df["status"].astype("string").fillna("missing")
    reason = df["reason"].astype("string").fillna("")
    loss = pd.to_numeric(df["eval_loss"], errors="coerce").astype(float)
    tokens = pd.to_numeric(df["tokens"], errors="coerce").astype(float)
    n_params = pd.to_numeric(df["n_params"], errors="coerce").astype(float)
    n_trainable = pd.to_numeric(df["n_trainable"], errors="coerce").astype(float)

    category = pd.Series("", index=df.index, dtype=object)
    detail = pd.Series("", index=df.index, dtype=object)
    done = status == COMPLETED
    category[~done] = "status " + status[~done]
    detail[~done] = reason[~done]
    checks = [
        (~df["method"].isin(methods.names()), "unknown method"),
        (~np.isfinite(loss.to_numpy()), "completed with NaN/missing eval_loss"),
        (loss <= 0, "completed with eval_loss <= 0"),
        (~(tokens > 0), "completed with no tokens"),
        (~(n_params > 0) | ~(n_trainable >= 0), "completed without n_params/n_trainable"),
    ]
    for bad, name in checks:
        hit = done & bad & (category == "")
        category[hit] = name
    bad = category != ""
    excluded = pd.DataFrame({
        "trial_id": df["trial_id"], "method": df["method"], "model": df["model"],
        "budget_flops": df["budget_flops"], "status": status, "category": category, "reason": detail,
    })[bad.to_numpy()].reset_index(drop=True)

    usable = df[~bad.to_numpy()].copy()
    columns = ["method", *methods.HPARAM_FIELDS]
    usable["hparam"] = [np.nan if (h := hparam_of(r)) is None else h for r in usable[columns].to_dict("records")]
    usable["N"] = n_params[~bad].to_numpy()
    usable["D"] = tokens[~bad].to_numpy()
    usable["eval_loss"] = loss[~bad].to_numpy()
    # family and pooling: surfaces are fitted per (family, method, slice, pooling); a store written before those
    # columns holds one family (unknown) and mean pooling
    family = usable["family"].astype(object).where(usable["family"].notna(), "?") if "family" in usable else "?"
    pooling = usable["pooling"].astype(object).where(usable["pooling"].notna(), "mean") if "pooling" in usable \
        else "mean"
    usable = usable.assign(family=family, pooling=pooling)
    varies = usable["family"].nunique() > 1 or set(usable["pooling"]) != {"mean"}
    usable["variant"] = [variant_of(f, p, varies) for f, p in zip(usable["family"], usable["pooling"])]
    usable = with_knob_variants(usable)
    usable, other_lrs = best_lr_per_cell(usable)
    excluded = pd.concat([excluded, other_lrs], ignore_index=True) if len(other_lrs) else excluded
    return usable.reset_index(drop=True), Exclusions(excluded, len(df))


# -- the knobs: negatives, attention and the query instruction split slices; the lr is tuned within a cell

KNOB_DEFAULTS = {"negatives": 0, "attention": "causal", "query_instruction": ""}
INSTRUCTION_LABEL_CHARS = 24


def knob_label(negatives, attention, instruction, varying: tuple[str, ...]) -> str:
    """A slice's knobs as words for its variant, only those the sweep varies: ``neg=4 bidirectional
    instr='Find the passage'``."""
    parts = []
    if "negatives" in varying:
        parts.append(f"neg={int(negatives)}")
    if "attention" in varying:
        parts.append(str(attention))
    if "query_instruction" in varying:
        text = str(instruction).strip()
        parts.append(f"instr={text[:INSTRUCTION_LABEL_CHARS]!r}" if text else "no instr")
    return " ".join(parts)


def with_knob_variants(usable: pd.DataFrame) -> pd.DataFrame:
    """The knob columns filled with their defaults (a store written before them: nulls), and each knob the sweep
    varies, or sets away from its default, appended to the slice's ``variant``: a surface is fitted per knob
    setting, as per family and pooling."""
    out = usable.copy()
    for name, value in KNOB_DEFAULTS.items():
        column = out[name] if name in out else pd.Series(pd.NA, index=out.index, dtype=object)
        out[name] = column.astype(object).where(column.notna(), value)
    out["lr"] = pd.to_numeric(out["lr"], errors="coerce").astype(float) if "lr" in out else np.nan
    varying = tuple(n for n, v in KNOB_DEFAULTS.items() if set(out[n]) - {v})
    if varying:
        labels = [knob_label(n, a, q, varying) for n, a, q in
                  zip(out["negatives"], out["attention"], out["query_instruction"])]
        out["variant"] = [" ".join(filter(None, (v, k))) for v, k in zip(out["variant"], labels)]
    return out


CELL = ["method", "hparam", "variant", "model", "budget_flops"]
CELL_EXTRAS = ("seed", "replicate", "batching")


def best_lr_per_cell(usable: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the lowest-``eval_loss`` trial of each cell = slice x model x budget, the other trials as exclusion rows).
    The lr is a hyperparameter tuned within a cell, not an axis of the law: each point of a surface is the best
    the sweep found at that (N, D), so the fitted optimum is the lr-tuned one, and a sweep over 3 lrs leaves
    every slice as many points as without it. ``n_lr``: the lrs tried in the cell."""
    if usable.empty:
        return usable.assign(n_lr=pd.Series(dtype="int64")), pd.DataFrame()
    keyed = usable.assign(_h=usable["hparam"].fillna(-1.0), _lr=usable["lr"].fillna(-1.0))
    # what else may repeat a cell (a replicate's seed, the batching) stays apart: only the lr is tuned away
    cell = ["_h" if c == "hparam" else c for c in CELL] + [c for c in CELL_EXTRAS if c in usable]
    order = keyed.sort_values(["eval_loss", "trial_id"], kind="stable")
    groups = order.groupby(cell, sort=False, dropna=False)
    n_lr = groups["_lr"].transform("nunique")
    first = order.index.isin(groups.head(1).index)
    keep = (n_lr <= 1) | first  # a cell with one lr keeps all its trials, as before
    best = order[keep].assign(n_lr=n_lr[keep].astype("int64")).drop(columns=["_h", "_lr"]).sort_index()
    others = usable.loc[~usable.index.isin(best.index)]
    dropped = pd.DataFrame({
        "trial_id": others["trial_id"], "method": others["method"], "model": others["model"],
        "budget_flops": others["budget_flops"], "status": COMPLETED,
        "category": "another lr of its cell did better", "reason": [f"lr {x:g}" for x in others["lr"]],
    }).reset_index(drop=True)
    return best, dropped


def require_usable(trials: pd.DataFrame, where: str = "the sweep") -> tuple[pd.DataFrame, Exclusions]:
    """``split_usable`` that raises FitError when nothing is left."""
    usable, excluded = split_usable(trials)
    if usable.empty:
        what = ", ".join(f"{n} {c}" for c, n in excluded.counts.items()) or "no trials at all"
        raise FitError(f"{where}: no completed trial with a finite eval_loss to fit ({what})")
    return usable, excluded


# ----------------------------------------------------------------------------------------------------------
# 1. Empirical optimum

BEST_COLUMNS = ["method", "budget_flops", "trial_id", "model", "n_params", "n_trainable", "lora_rank",
                "trainable_fraction", "hparam", "tokens", "flops", "eval_loss", "family", "pooling", "variant",
                "n_trials"]


@dataclass(frozen=True, eq=False)
class EmpiricalOptimum:
    """``best``: one row per (method, budget), the min-``eval_loss`` trial over models and hyperparameters
    (``n_trials`` = usable trials in that cell). ``frontier``: one row per budget, the best method, with the
    runner-up method and its relative gap ``margin`` = loss_2nd / loss_best - 1 (NaN with one method)."""

    best: pd.DataFrame
    frontier: pd.DataFrame

    def methods(self) -> list[str]:
        return [m for m in methods.names() if m in set(self.best["method"])]


def empirical_optimum(usable: pd.DataFrame) -> EmpiricalOptimum:
    """``usable`` from ``split_usable``."""
    if usable.empty:
        raise FitError("no usable trials for an empirical optimum")
    order = usable.sort_values(["eval_loss", "trial_id"], kind="stable")
    grouped = order.groupby(["method", "budget_flops"], sort=True)
    best = grouped.head(1).copy()
    best = best.merge(grouped.size().rename("n_trials").reset_index(), on=["method", "budget_flops"])
    best = best[BEST_COLUMNS].sort_values(["budget_flops", "eval_loss"]).reset_index(drop=True)

    rows = []
    for budget, cell in best.groupby("budget_flops", sort=True):
        cell = cell.sort_values("eval_loss")
        top = cell.iloc[0].to_dict()
        top["runner_up"] = cell.iloc[1]["method"] if len(cell) > 1 else None
        top["margin"] = cell.iloc[1]["eval_loss"] / top["eval_loss"] - 1.0 if len(cell) > 1 else np.nan
        top["n_methods"] = len(cell)
        rows.append(top)
    frontier = pd.DataFrame(rows).reset_index(drop=True)
    return EmpiricalOptimum(best=best, frontier=frontier)


# ----------------------------------------------------------------------------------------------------------
# 2. Per-method power-law trends (Figure 1)

@dataclass(frozen=True)
class Trend:
    """log10 L = intercept + slope * log10 C over the method's optimal losses, valid on [budget_min, budget_max].
    ``r2`` and ``rmse_log10`` in log10 space; with 2 points the line is exact (r2 = 1, says nothing)."""

    method: str
    slope: float
    intercept: float
    r2: float
    rmse_log10: float
    n_points: int
    budget_min: float
    budget_max: float

    def predict(self, budget_flops):
        return 10.0 ** (self.intercept + self.slope * np.log10(np.asarray(budget_flops, dtype=float)))

    def covers(self, budget_flops):
        b = np.asarray(budget_flops, dtype=float)
        return (b >= self.budget_min * (1 - 1e-9)) & (b <= self.budget_max * (1 + 1e-9))


@dataclass(frozen=True)
class Crossover:
    """The best method (by fitted trend) changes from ``below`` to ``above`` at ``budget_flops``. ``kind``:
    ``intersection`` (two trends cross) or ``coverage`` (a method's trend starts or ends: its budgets differ)."""

    budget_flops: float
    below: str
    above: str
    kind: str


@dataclass(frozen=True)
class TrendFit:
    trends: dict[str, Trend]
    refused: dict[str, str]
    crossovers: tuple[Crossover, ...]

    def envelope(self, budget_flops) -> tuple[np.ndarray, np.ndarray]:
        """(best method per budget, its fitted loss): the lower envelope over methods whose trend covers the
        budget; method '' and NaN where none does."""
        b = np.atleast_1d(np.asarray(budget_flops, dtype=float))
        loss = np.full(b.shape, np.inf)
        method = np.full(b.shape, "", dtype=object)
        for name, trend in self.trends.items():
            pred = np.where(trend.covers(b), trend.predict(b), np.inf)
            better = pred < loss
            loss[better], method[better] = pred[better], name
        return method, np.where(np.isfinite(loss), loss, np.nan)


def fit_trend(method: str, budgets, losses) -> Trend:
    """Least squares line through (log10 C, log10 L); FitError with fewer than 2 budgets."""
    x, y = np.log10(np.asarray(budgets, dtype=float)), np.log10(np.asarray(losses, dtype=float))
    if len(np.unique(x)) < 2:
        raise FitError(f"{method}: a trend needs optimal losses at >= 2 budgets (has {len(np.unique(x))})")
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (intercept + slope * x)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    return Trend(method, float(slope), float(intercept), r2, float(np.sqrt((resid ** 2).mean())), len(x),
                 float(10 ** x.min()), float(10 ** x.max()))


def fit_trends(optimum: EmpiricalOptimum) -> TrendFit:
    trends, refused = {}, {}
    for method in optimum.methods():
        rows = optimum.best[optimum.best["method"] == method]
        try:
            trends[method] = fit_trend(method, rows["budget_flops"], rows["eval_loss"])
        except FitError as e:
            refused[method] = str(e)
    return TrendFit(trends, refused, _crossovers(trends))


def _crossovers(trends: dict[str, Trend]) -> tuple[Crossover, ...]:
    """Exact: the envelope of lines is piecewise one line between breakpoints (pairwise intersections and
    coverage edges), so testing each piece's midpoint finds every change of the best method."""
    if len(trends) < 2:
        return ()
    items = list(trends.values())
    lo, hi = min(t.budget_min for t in items), max(t.budget_max for t in items)
    points = {math.log10(lo), math.log10(hi)}
    intersections = set()
    for t in items:
        points |= {math.log10(t.budget_min), math.log10(t.budget_max)}
    for i, s in enumerate(items):
        for t in items[i + 1:]:
            if s.slope != t.slope:
                x = (t.intercept - s.intercept) / (s.slope - t.slope)
                if math.log10(lo) < x < math.log10(hi):
                    points.add(x)
                    intersections.add(x)
    xs = sorted(points)
    fit = TrendFit(trends, {}, ())
    mids = [(a + b) / 2 for a, b in zip(xs[:-1], xs[1:])]
    methods, _ = fit.envelope(10.0 ** np.array(mids))
    out = []
    for k in range(1, len(mids)):
        if methods[k] != methods[k - 1] and methods[k] and methods[k - 1]:
            x = xs[k]
            kind = "intersection" if any(abs(x - y) < 1e-12 for y in intersections) else "coverage"
            out.append(Crossover(float(10 ** x), str(methods[k - 1]), str(methods[k]), kind))
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------
# 3. Parametric surface L(N, D) = E + A/N^alpha + B/D^beta per (method, slice)

FORM_ND = "E + A/N^alpha + B/D^beta"
FORM_D = "E + B/D^beta (one model: its N term is inside E)"
PARAM_NAMES = ("E", "A", "alpha", "B", "beta")


@dataclass(frozen=True, eq=False)
class Surface(Slice):
    """A fitted L(N, D) for one method slice. ``boot``: (n_boot, 5) bootstrap refits of (E, A, alpha, B, beta)
    (A = 0, alpha = 0 for the one-model form). ``models``: the slice's models as (model, N, N_tr), the only
    candidates a recipe may pick. Fit quality on the log loss: ``rmse_log``, ``r2_log``; ``max_rel_err`` on
    the loss itself."""

    method: str
    hparam: float | None
    form: str
    E: float
    A: float
    alpha: float
    B: float
    beta: float
    boot: np.ndarray
    n_points: int
    n_models: int
    n_budgets: int
    n_range: tuple[float, float]
    d_range: tuple[float, float]
    budget_range: tuple[float, float]
    rmse_log: float
    r2_log: float
    max_rel_err: float
    models: tuple[tuple[str, float, float], ...]
    warnings: tuple[str, ...] = field(default_factory=tuple)
    family: str | None = None  # the slice's model family (model_type); None: not known to the store
    pooling: str = "mean"
    variant: str = ""  # "" unless the sweep varies family or pooling (then "<family> <pooling>")
    # the fit this surface comes from: its own slice's, or (``shared``) one fit over the method's slices
    fit_points: int = 0
    fit_parameters: int = 0
    shared: tuple[str, ...] = ()  # the slices (labels) sharing E, A, alpha, beta with this one; () when alone

    @property
    def params(self) -> np.ndarray:
        return np.array([self.E, self.A, self.alpha, self.B, self.beta])

    def predict(self, n_params, tokens):
        return _surface(self.params, np.asarray(n_params, dtype=float), np.asarray(tokens, dtype=float))

    def predict_boot(self, n_params, tokens) -> np.ndarray:
        """(n_boot, *shape) predictions of the bootstrap refits."""
        n, d = np.asarray(n_params, dtype=float), np.asarray(tokens, dtype=float)
        p = self.boot.reshape(self.boot.shape + (1,) * np.broadcast(n, d).ndim)
        return _surface(np.moveaxis(p, 1, 0), n, d)

    def predict_bagged(self, n_params, tokens):
        """The loss the recipe goes by: the median of the bootstrap refits' predictions (bagging: one fit's optimum
        follows a few noisy points, the median of many refits does not), the point fit's without a bootstrap."""
        if len(self.boot) == 0:
            return self.predict(n_params, tokens)
        return np.median(self.predict_boot(n_params, tokens), axis=0)

    def interval(self, n_params, tokens, level: float = CI_LEVEL) -> tuple[np.ndarray, np.ndarray]:
        """Percentile bootstrap interval of the fitted loss (not of one noisy run); NaN without bootstrap."""
        if len(self.boot) == 0:
            nan = np.full(np.broadcast(np.asarray(n_params), np.asarray(tokens)).shape, np.nan)
            return nan, nan
        q = self.predict_boot(n_params, tokens)
        return np.quantile(q, (1 - level) / 2, axis=0), np.quantile(q, (1 + level) / 2, axis=0)

    def param_interval(self, name: str, level: float = CI_LEVEL) -> tuple[float, float]:
        if len(self.boot) == 0:
            return float("nan"), float("nan")
        col = self.boot[:, PARAM_NAMES.index(name)]
        return float(np.quantile(col, (1 - level) / 2)), float(np.quantile(col, (1 + level) / 2))


def _surface(p, n, d):
    E, A, alpha, B, beta = p
    return E + A / n ** alpha + B / d ** beta


@dataclass(frozen=True)
class Law:
    """A loss surface's parameters, L(N, D) = E + A/N^alpha + B/D^beta: the ground truths synthetic stores are drawn
    from (benchmarks/adaptive.py, the analysis tests)."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float

    def loss(self, n, d):
        return _surface((self.E, self.A, self.alpha, self.B, self.beta), np.asarray(n, float), np.asarray(d, float))


@dataclass(frozen=True, eq=False)
class SurfaceFits:
    """All slices of a sweep: fitted ``surfaces`` and ``refused`` (reason) keyed by (method, hparam, variant)
    (``Surface.key``; the variant is "" unless the sweep varies family or pooling)."""

    surfaces: dict[tuple[str, float | None, str], Surface]
    refused: dict[tuple[str, float | None, str], str]
    n_boot: int

    def for_method(self, method: str) -> list[Surface]:
        """Every slice of ``method``, over its hyperparameters, families and poolings."""
        return [s for (m, _, _), s in self.surfaces.items() if m == method]

    def methods(self) -> list[str]:
        return [m for m in methods.names() if self.for_method(m)]


# -- the objective: Huber on log residuals, log L_hat = logsumexp(e, a - alpha log N, b - beta log D)

def _terms(form_nd: bool, logn, logd):
    """(coefficient index, exponent index, centred log variable) per power-law term. Params x = (e, a', alpha,
    b', beta) for the N,D form, (e, b', beta) for the one-model form, with log A = a' + alpha * mean(log N) (and
    likewise b'): centring decorrelates coefficient and exponent, so L-BFGS needs ~40 % fewer evaluations."""
    logn, logd = logn - logn.mean(), logd - logd.mean()
    return [(1, 2, logn), (3, 4, logd)] if form_nd else [(1, 2, logd)]


def _centres(form_nd: bool, logn, logd) -> list[tuple[int, int, float]]:
    return [(1, 2, logn.mean()), (3, 4, logd.mean())] if form_nd else [(1, 2, logd.mean())]


def _centre(x, centres, sign: float = -1.0):
    """Natural (e, a, alpha, ...) -> centred (sign -1) or back (sign +1); rows of x are parameter vectors."""
    x = np.array(x, dtype=float, copy=True)
    for c, k, m in centres:
        x[..., c] += sign * x[..., k] * m
    return x


def _objective(x, terms, logl, weight, delta):
    """Huber(delta) of log-loss residuals, divided by delta (same minimiser; keeps L-BFGS's gradient tests
    meaningful when delta = 1e-3), weighted by bootstrap counts. Returns (value, gradient)."""
    t = [np.full_like(logl, x[0])] + [x[c] - x[k] * v for c, k, v in terms]  # each (n,)
    value, dr, share = _huber_logsumexp(np.stack(t), logl, weight, delta)
    grad = np.zeros_like(x)
    grad[0] = (dr * share[0]).sum()
    for j, (c, k, v) in enumerate(terms, start=1):
        grad[c] = (dr * share[j]).sum()
        grad[k] = -(dr * share[j] * v).sum()
    return value, grad


def _huber_logsumexp(t, logl, weight, delta):
    """log L_hat = logsumexp of the terms ``t`` (terms, n): (the weighted Huber value, d(value)/d(residual) per
    point, d(log L_hat)/d(term) per term and point)."""
    top = t.max(axis=0)
    ex = np.exp(t - top)
    total = ex.sum(axis=0)
    r = top + np.log(total) - logl
    absr = np.abs(r)
    h = np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta)) / delta
    dr = weight * np.clip(r, -delta, delta) / delta
    return float((weight * h).sum()), dr, ex / total


def _grid_values(starts, terms, logl, delta):
    """Objective at every grid start at once: (n_starts,)."""
    t = [np.broadcast_to(starts[:, :1], (len(starts), len(logl)))]
    t += [starts[:, c:c + 1] - starts[:, k:k + 1] * v[None, :] for c, k, v in terms]
    t = np.stack(t)  # (terms, n_starts, n)
    top = t.max(axis=0)
    r = top + np.log(np.exp(t - top).sum(axis=0)) - logl[None, :]
    absr = np.abs(r)
    return np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta)).sum(axis=1) / delta


def _start_grid(form_nd: bool) -> np.ndarray:
    if form_nd:
        mesh = np.meshgrid(START_LOG_E, START_LOG_COEF, START_EXPONENTS, START_LOG_COEF, START_EXPONENTS,
                           indexing="ij")
    else:
        mesh = np.meshgrid(START_LOG_E, START_LOG_COEF, START_EXPONENTS, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


def _diverse_starts(starts, values, form_nd: bool) -> list[int]:
    """Indices of the best grid start for each pair of exponents (25 for the N,D form): the lowest values alone
    tend to sit in one basin, and the surface has a few (e.g. a huge A with alpha = 2)."""
    exponents = starts[:, [2, 4]] if form_nd else starts[:, [2]]
    best = {}
    for i in np.argsort(values, kind="stable"):
        best.setdefault(tuple(np.round(exponents[i], 6)), int(i))
    return sorted(best.values(), key=lambda i: values[i])


def _bounds(form_nd: bool):
    coef_exp = [LOG_COEF_BOUNDS, EXPONENT_BOUNDS]
    return [LOG_E_BOUNDS] + coef_exp * (2 if form_nd else 1)


@functools.lru_cache(maxsize=1)
def _blas_controller():
    import scipy.optimize  # noqa: F401  -- load scipy's own OpenBLAS first, or the controller misses it

    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()  # scans the loaded libraries once


def _one_blas_thread():
    """L-BFGS-B calls BLAS on 10x10 matrices; OpenBLAS threads spinning on those made each iteration 30-100x
    slower on a shared 2-core machine (measured: 46 us vs 1.6-4.8 ms). threadpoolctl ships with scikit-learn;
    without it nothing changes."""
    controller = _blas_controller()
    return contextlib.nullcontext() if controller is None else controller.limit(limits=1, user_api="blas")


def _minimize(x0, terms, logl, weight, delta, bounds, maxiter: int = 2000):
    return _lbfgs(_objective, x0, (terms, logl, weight, delta), bounds, maxiter)


def _lbfgs(objective, x0, args, bounds, maxiter: int):
    """(x, value) of L-BFGS-B on ``objective(x, *args) -> (value, gradient)``."""
    from scipy.optimize import minimize  # lazy: `import analysis` stays light for readers

    res = minimize(objective, x0, args=args, jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"maxiter": maxiter, "ftol": 1e-13, "gtol": 1e-9})
    return res.x, float(res.fun)


def _to_natural(x, form_nd: bool, centres) -> np.ndarray:
    """Centred (e, a', alpha, b', beta) or (e, b', beta) -> (E, A, alpha, B, beta)."""
    x = _centre(x, centres, +1.0)
    if form_nd:
        return np.array([math.exp(x[0]), math.exp(x[1]), x[2], math.exp(x[3]), x[4]])
    return np.array([math.exp(x[0]), 0.0, 0.0, math.exp(x[1]), x[2]])


def _fit_from_grid(form_nd, terms, centres, logl, delta, bounds) -> np.ndarray:
    """The best L-BFGS-B optimum over the diverse grid starts (centred parameters)."""
    starts = _centre(_start_grid(form_nd), centres)
    values = _grid_values(starts, terms, logl, delta)
    ones = np.ones_like(logl)
    # two stages: a short L-BFGS from every diverse start, then convergence from the best few (3x fewer
    # evaluations than converging all 25, same optimum on the test surfaces)
    scouts = [_minimize(starts[i], terms, logl, ones, delta, bounds, maxiter=SCOUT_ITERATIONS)
              for i in _diverse_starts(starts, values, form_nd)]
    scouts.sort(key=lambda xf: xf[1])
    best_x, best_f = None, np.inf
    for x0, _ in scouts[:N_CONVERGED_STARTS]:
        x, f = _minimize(x0, terms, logl, ones, delta, bounds)
        if f < best_f - 1e-12:
            best_x, best_f = x, f
    return best_x


def _from_natural(params, form_nd: bool, centres) -> np.ndarray | None:
    """(E, A, alpha, B, beta) -> centred parameters of ``form_nd``'s form, clipped into the bounds; None where a
    coefficient is not positive (no log)."""
    E, A, alpha, B, beta = (float(v) for v in params)
    if E <= 0 or B <= 0 or (form_nd and A <= 0):
        return None
    x = np.array([math.log(E), math.log(A), alpha, math.log(B), beta] if form_nd else [math.log(E), math.log(B), beta])
    lo, hi = np.array(_bounds(form_nd), dtype=float).T
    return np.clip(_centre(x, centres), lo, hi)


def _fit_warm(start, form_nd, terms, centres, logl, delta, bounds) -> np.ndarray:
    """The optimum from a nearby fit (``start``: natural parameters, e.g. the same slice's fit before the last
    rung's points): converged from there and from the best grid start, the better kept. Two minimisations in
    place of the grid's ~28, where the points barely moved the surface."""
    starts = _centre(_start_grid(form_nd), centres)
    values = _grid_values(starts, terms, logl, delta)
    ones = np.ones_like(logl)
    tries = [_minimize(starts[int(np.argmin(values))], terms, logl, ones, delta, bounds)]
    x0 = _from_natural(start, form_nd, centres)
    if x0 is not None:
        tries.append(_minimize(x0, terms, logl, ones, delta, bounds))
    return min(tries, key=lambda xf: xf[1])[0]


def _bootstrap(best_x, form_nd, terms, centres, logl, delta, bounds, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, 5) natural parameters refitted on trials resampled with replacement (as multiplicity weights),
    each started from the full-data optimum; seeded, so deterministic."""
    rng = np.random.default_rng(seed)
    boot = np.empty((n_boot, 5))
    for k in range(n_boot):
        weight = np.bincount(rng.integers(0, len(logl), len(logl)), minlength=len(logl)).astype(float)
        x, _ = _minimize(best_x, terms, logl, weight, delta, bounds)
        boot[k] = _to_natural(x, form_nd, centres)
    return boot


def _check_enough(points: pd.DataFrame, label: str) -> bool:
    """``form_nd`` of the slice's fit; FitError when it has too few points, model sizes or budgets."""
    n_models = points["N"].nunique()
    n_budgets = points["budget_flops"].nunique()
    form_nd = n_models >= 2
    need = MIN_POINTS_ND if form_nd else MIN_POINTS_D
    need_budgets = 2 if form_nd else 3
    if len(points) < need or n_budgets < need_budgets:
        raise FitError(f"{label}: too few points for {FORM_ND if form_nd else 'E + B/D^beta'}: "
                       f"{len(points)} trial(s) at {n_budgets} budget(s) over {n_models} model(s); "
                       f"need >= {need} trials at >= {need_budgets} budgets")
    return form_nd


def _log_points(points: pd.DataFrame):
    return (np.log(points["N"].to_numpy(float)), np.log(points["D"].to_numpy(float)),
            np.log(points["eval_loss"].to_numpy(float)))


def _point_fit(points: pd.DataFrame, form_nd: bool, delta: float, start=None):
    """The slice's optimum: (natural params, centred x, terms, centres, logl, bounds)."""
    logn, logd, logl = _log_points(points)
    terms, centres, bounds = _terms(form_nd, logn, logd), _centres(form_nd, logn, logd), _bounds(form_nd)
    with _one_blas_thread():
        if start is None:
            best_x = _fit_from_grid(form_nd, terms, centres, logl, delta, bounds)
        else:
            best_x = _fit_warm(start, form_nd, terms, centres, logl, delta, bounds)
    return _to_natural(best_x, form_nd, centres), best_x, terms, centres, logl, bounds


def fit_surface(points: pd.DataFrame, *, method: str = "?", hparam: float | None = None,
                n_boot: int = N_BOOTSTRAP, seed: int = 0, delta: float = HUBER_DELTA, variant: str = "",
                start=None) -> Surface:
    """Fit one slice. ``points``: usable trials (``N``, ``D``, ``eval_loss``, ``budget_flops``, ``model``,
    ``n_trainable``; ``family``, ``pooling`` when split_usable made them). Raises FitError when the slice has too
    few points, model sizes or budgets. ``start``: natural parameters of a nearby fit (the adaptive policy's
    previous rung) to start from in place of the full grid of starts (``_fit_warm``)."""
    form_nd = _check_enough(points, slice_label(method, hparam, variant))
    params, best_x, terms, centres, logl, bounds = _point_fit(points, form_nd, delta, start)
    with _one_blas_thread():
        boot = _bootstrap(best_x, form_nd, terms, centres, logl, delta, bounds, n_boot, seed)
    return _make_surface(points, params, boot, form_nd, method, hparam, variant,
                         warnings=_fit_warnings(best_x, bounds, form_nd, points["N"].nunique()))


def _make_surface(points: pd.DataFrame, params, boot, form_nd: bool, method: str, hparam, variant: str, *,
                  warnings, form: str | None = None, fit_points: int | None = None,
                  fit_parameters: int | None = None, shared: tuple[str, ...] = ()) -> Surface:
    logl = np.log(points["eval_loss"].to_numpy(float))
    pred = _surface(params, points["N"].to_numpy(float), points["D"].to_numpy(float))
    resid = np.log(pred) - logl
    ss_tot = float(((logl - logl.mean()) ** 2).sum())
    models = (points.groupby("model", sort=False)[["N", "n_trainable"]].median().sort_values("N"))
    return Surface(
        method=method, hparam=hparam, form=form or (FORM_ND if form_nd else FORM_D),
        E=float(params[0]), A=float(params[1]), alpha=float(params[2]), B=float(params[3]), beta=float(params[4]),
        boot=boot, n_points=len(points), n_models=int(points["N"].nunique()),
        n_budgets=int(points["budget_flops"].nunique()),
        n_range=(float(points["N"].min()), float(points["N"].max())),
        d_range=(float(points["D"].min()), float(points["D"].max())),
        budget_range=(float(points["budget_flops"].min()), float(points["budget_flops"].max())),
        rmse_log=float(np.sqrt((resid ** 2).mean())),
        r2_log=1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan"),
        max_rel_err=float(np.abs(pred / np.exp(logl) - 1).max()),
        models=tuple((str(m), float(r["N"]), float(r["n_trainable"])) for m, r in models.iterrows()),
        warnings=tuple(warnings),
        family=_only(points, "family"), pooling=_only(points, "pooling") or "mean", variant=variant,
        fit_points=len(points) if fit_points is None else fit_points,
        fit_parameters=(5 if form_nd else 3) if fit_parameters is None else fit_parameters, shared=shared,
    )


def _squared_log_residuals(points: pd.DataFrame, params) -> float:
    """The sum of squared log residuals of ``params`` on ``points`` (a Surface's rmse_log squared times its points)."""
    pred = _surface(params, points["N"].to_numpy(float), points["D"].to_numpy(float))
    return float(((np.log(pred) - np.log(points["eval_loss"].to_numpy(float))) ** 2).sum())


def _only(points: pd.DataFrame, column: str) -> str | None:
    values = set(points[column].dropna()) - {"?"} if column in points else set()
    return str(values.pop()) if len(values) == 1 else None


def _fit_warnings(x, bounds, form_nd: bool, n_models: int) -> list[str]:
    names = ("log E", "log A", "alpha", "log B", "beta") if form_nd else ("log E", "log B", "beta")
    out = _bound_warnings(names, x, bounds)
    if form_nd and n_models == 2:
        out.append("2 model sizes: A and alpha are not separately identified (predictions at the sweep's "
                   "models still are)")
    return out


def _bound_warnings(names, x, bounds) -> list[str]:
    """A fit whose floor or exponent ended on its bound (the coefficients' wide bounds are never meaningful)."""
    return [f"{name} at its bound {v:g}" for name, v, (lo, hi) in zip(names, x, bounds)
            if min(abs(v - lo), abs(v - hi)) < 1e-6 and name in ("log E", "alpha", "beta")]


# -- one fit over a method's slices: E, A, alpha, beta shared, B per hyperparameter ---------------------------
#
# A method's slices (LoRA's ranks, freeze's fractions) differ in how fast they learn per token more than in the
# floor they reach or in how the model's size pays: one surface per slice fits 5 parameters to the few cells each
# slice ran at the large budgets, and follows their noise there. The shared form fits E, A, alpha, beta once over
# every slice of the method and one B per slice (4 + R parameters in place of 5 R), and is kept where the data
# back it: a lower BIC than the separate fits (Gaussian on the log residuals, over the points both describe). A
# sweep whose ranks reach different floors keeps its separate fits.

FORM_SHARED = "E + A/N^alpha + B_h/D^beta (E, A, alpha, beta shared by the method's slices)"
FORM_SHARED_D = "E + B_h/D^beta (one model; E, beta shared by the method's slices)"
JOINT_MIN_SLICE_POINTS = 2  # a slice joins the shared fit with >= 2 trials (its B needs one; one of slack)
BIC_FLOOR = 1e-12  # mean squared log residual below which two fits are equally exact (noise-free stores)


def _joint_x(start, form_nd: bool, n_slices: int) -> np.ndarray:
    """A one-slice start (e, a', alpha, b', beta) or (e, b', beta) -> the shared layout (e, a', alpha, beta,
    b'_1..b'_R) or (e, beta, b'_1..b'_R), every slice at b'."""
    if form_nd:
        return np.concatenate([start[[0, 1, 2, 4]], np.full(n_slices, start[3])])
    return np.concatenate([start[[0, 2]], np.full(n_slices, start[1])])


def _joint_objective(x, form_nd, ln, ld, group, n_slices, logl, weight, delta):
    """``_objective`` for the shared layout: ``group`` maps each point to its slice's b'."""
    shared = 4 if form_nd else 2
    beta = x[3] if form_nd else x[1]
    b = x[shared:]
    t = [np.full_like(logl, x[0])]
    if form_nd:
        t.append(x[1] - x[2] * ln)
    t.append(b[group] - beta * ld)
    value, dr, share = _huber_logsumexp(np.stack(t), logl, weight, delta)
    grad = np.zeros_like(x)
    grad[0] = (dr * share[0]).sum()
    if form_nd:
        grad[1] = (dr * share[1]).sum()
        grad[2] = -(dr * share[1] * ln).sum()
    d_b = dr * share[-1]
    grad[3 if form_nd else 1] = -(d_b * ld).sum()
    grad[shared:] = np.bincount(group, weights=d_b, minlength=n_slices)
    return value, grad


def _joint_minimize(x0, args, bounds, maxiter: int = 2000):
    return _lbfgs(_joint_objective, x0, args, bounds, maxiter)


def _joint_bounds(form_nd: bool, n_slices: int):
    return ([LOG_E_BOUNDS, LOG_COEF_BOUNDS, EXPONENT_BOUNDS, EXPONENT_BOUNDS] if form_nd
            else [LOG_E_BOUNDS, EXPONENT_BOUNDS]) + [LOG_COEF_BOUNDS] * n_slices


def _joint_natural(x, form_nd: bool, mean_ln: float, mean_ld: float, n_slices: int) -> np.ndarray:
    """Centred shared x -> (R, 5) natural (E, A, alpha, B_h, beta) per slice."""
    out = np.empty((n_slices, 5))
    if form_nd:
        e, a, alpha, beta = x[:4]
        out[:, 1], out[:, 2] = math.exp(a + alpha * mean_ln), alpha
    else:
        (e, beta), out[:, 1], out[:, 2] = x[:2], 0.0, 0.0
    out[:, 0], out[:, 4] = math.exp(e), beta
    out[:, 3] = np.exp(x[4 if form_nd else 2:] + beta * mean_ld)
    return out


@dataclass(frozen=True, eq=False)
class _Joint:
    """A shared fit's optimum (``x``, centred) and what its bootstrap needs."""

    x: np.ndarray
    form_nd: bool
    args: tuple  # _joint_objective's arguments after x, weight and delta excluded: (form_nd, ln, ld, group, R, logl)
    means: tuple[float, float]
    bounds: list
    delta: float
    pred_log: np.ndarray  # the fitted log loss of each point, in the points' order

    @property
    def n_slices(self) -> int:
        return self.args[4]

    @property
    def n_parameters(self) -> int:
        return (4 if self.form_nd else 2) + self.n_slices

    @property
    def residuals(self) -> np.ndarray:
        return self.pred_log - self.args[5]

    def natural(self, x) -> np.ndarray:
        return _joint_natural(x, self.form_nd, *self.means, self.n_slices)

    def bootstrap(self, n_boot: int, seed: int) -> np.ndarray:
        """(n_boot, R, 5): refits on the points resampled with replacement, each from the optimum; seeded."""
        rng = np.random.default_rng(seed)
        logl = self.args[5]
        boot = np.empty((n_boot, self.n_slices, 5))
        with _one_blas_thread():
            for k in range(n_boot):
                weight = np.bincount(rng.integers(0, len(logl), len(logl)), minlength=len(logl)).astype(float)
                x, _ = _joint_minimize(self.x, (*self.args, weight, self.delta), self.bounds)
                boot[k] = self.natural(x)
        return boot

    def warnings(self) -> tuple[str, ...]:
        names = ("log E", "log A", "alpha", "beta") if self.form_nd else ("log E", "beta")
        return tuple(_bound_warnings(names, self.x, self.bounds))


def _fit_joint(points: pd.DataFrame, hparams: list, delta: float) -> _Joint:
    """One shared fit over ``points`` (one method's slices, each hparam in ``hparams``): B per hparam."""
    group = pd.Categorical(points["hparam"].astype(float), categories=[float(h) for h in hparams]).codes
    group = np.asarray(group, dtype=np.intp)
    n_slices = len(hparams)
    form_nd = points["N"].nunique() >= 2  # as a slice's: LoRA's ranks of one model differ in N by their adapters
    logn, logd, logl = _log_points(points)
    means = float(logn.mean()), float(logd.mean())
    args = (form_nd, logn - means[0], logd - means[1], group, n_slices, logl)
    bounds = _joint_bounds(form_nd, n_slices)
    ones = np.ones_like(logl)
    # the one-slice grid of starts, every slice at the same B: the shared optimum's basin is the pooled one's
    terms, centres = _terms(form_nd, logn, logd), _centres(form_nd, logn, logd)
    starts = _centre(_start_grid(form_nd), centres)
    values = _grid_values(starts, terms, logl, delta)
    with _one_blas_thread():
        scouts = [_joint_minimize(_joint_x(starts[i], form_nd, n_slices), (*args, ones, delta), bounds,
                                  SCOUT_ITERATIONS) for i in _diverse_starts(starts, values, form_nd)]
        scouts.sort(key=lambda xf: xf[1])
        best_x, best_f = None, np.inf
        for x0, _ in scouts[:N_CONVERGED_STARTS]:
            x, f = _joint_minimize(x0, (*args, ones, delta), bounds)
            if f < best_f - 1e-12:
                best_x, best_f = x, f
    params = _joint_natural(best_x, form_nd, *means, n_slices)
    pred = _surface(params[group].T, points["N"].to_numpy(float), points["D"].to_numpy(float))
    return _Joint(best_x, form_nd, args, means, bounds, delta, np.log(pred))


def _bic(sq_residuals_sum: float, n: int, k: int) -> float:
    return n * math.log(max(sq_residuals_sum / n, BIC_FLOOR)) + k * math.log(n)


def fit_method(points: pd.DataFrame, method: str, variant: str, n_boot: int, seed: int, delta: float):
    """One method's slices (a variant of it): {key: Surface}, {key: refusal}. Separate fits per slice, or one
    shared fit where the method has >= 2 slices and the shared form's BIC is no higher."""
    slices = {}
    for h, sub in points.groupby(points["hparam"].fillna(-1.0), sort=True):
        hparam = None if h == -1.0 else float(h)
        slices[(method, hparam, variant)] = sub
    separate, refused, fits = {}, {}, {}
    for key, sub in slices.items():
        try:
            form_nd = _check_enough(sub, slice_label(*key))
        except FitError as e:
            refused[key] = str(e)
            continue
        fits[key] = form_nd, _point_fit(sub, form_nd, delta)

    def bootstrapped(keys):
        """The separate fits of ``keys`` with their bootstrap (the point fits above: no refit)."""
        for key in keys:
            form_nd, (params, best_x, terms, centres, logl, bounds) = fits[key]
            # a per-slice seed: the same slice gets the same resamples whatever else the sweep holds
            with _one_blas_thread():
                boot = _bootstrap(best_x, form_nd, terms, centres, logl, delta, bounds, n_boot,
                                  seed + zlib.crc32(slice_label(*key).encode()))
            separate[key] = _make_surface(slices[key], params, boot, form_nd, method, key[1], variant,
                                          warnings=_fit_warnings(best_x, bounds, form_nd, slices[key]["N"].nunique()))
        return separate, refused

    joinable = [k for k, sub in slices.items() if k[1] is not None and len(sub) >= JOINT_MIN_SLICE_POINTS]
    if len(joinable) < 2:
        return bootstrapped(fits)
    pooled = pd.concat([slices[k] for k in joinable])
    hparams = [k[1] for k in joinable]
    shared_parameters = (4 if pooled["N"].nunique() >= 2 else 2) + len(joinable)
    if len(pooled) < shared_parameters + 2 or pooled["budget_flops"].nunique() < 2:
        return bootstrapped(fits)
    joint = _fit_joint(pooled, hparams, delta)
    # BIC over the points both forms describe: the slices that have a separate fit
    compared = [k for k in joinable if k in fits]
    if compared:
        rows = np.concatenate([np.full(len(slices[k]), k in fits) for k in joinable])
        n = int(rows.sum())
        sep_sq = sum(_squared_log_residuals(slices[k], fits[k][1][0]) for k in compared)
        sep_k = sum(5 if fits[k][0] else 3 for k in compared)
        joint_k = (4 if joint.form_nd else 2) + len(compared)
        if _bic(float((joint.residuals[rows] ** 2).sum()), n, joint_k) > _bic(sep_sq, n, sep_k):
            return bootstrapped(fits)
    bootstrapped([k for k in fits if k not in joinable])  # a method's slice without a hyperparameter, if any
    labels = tuple(slice_label(*k) for k in joinable)
    params = joint.natural(joint.x)
    boot = joint.bootstrap(n_boot, seed + zlib.crc32(f"{method} shared [{variant}]".encode()))
    for i, key in enumerate(joinable):
        refused.pop(key, None)
        separate[key] = _make_surface(
            slices[key], params[i], boot[:, i, :], joint.form_nd, method, key[1], variant,
            warnings=joint.warnings(), form=FORM_SHARED if joint.form_nd else FORM_SHARED_D,
            fit_points=len(pooled), fit_parameters=joint.n_parameters, shared=labels)
    return separate, refused


def fit_surfaces(usable: pd.DataFrame, *, n_boot: int = N_BOOTSTRAP, seed: int = 0,
                 delta: float = HUBER_DELTA) -> SurfaceFits:
    """Every (method, hparam, variant) slice of the usable trials (split_usable's ``variant``: family and pooling
    where the sweep varies them); slices with too few points go to ``refused``. A method's slices share E, A,
    alpha and beta where that form fits them as well (``fit_method``)."""
    surfaces, refused = {}, {}
    keyed = usable if "variant" in usable else usable.assign(variant="")
    groups = keyed.groupby(["method", "variant"], sort=True) if len(keyed) else []
    for (method, variant), points in groups:
        fitted, why = fit_method(points, str(method), str(variant), n_boot, seed, delta)
        surfaces.update(fitted)
        refused.update(why)
    order = {m: i for i, m in enumerate(methods.names())}
    sort = lambda kv: (order.get(kv[0][0], 99), -1 if kv[0][1] is None else kv[0][1], kv[0][2])  # noqa: E731
    return SurfaceFits(dict(sorted(surfaces.items(), key=sort)), dict(sorted(refused.items(), key=sort)), n_boot)
