"""The whole analysis of one sweep as one typed value (``analyze``), and the paper's questions answered from it
as tables (``findings_tables``) and Markdown (``findings_markdown``). Pure: no files, no printing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from core import methods

from .fit import (
    CI_LEVEL,
    N_BOOTSTRAP,
    EmpiricalOptimum,
    Exclusions,
    FitError,
    Surface,
    SurfaceFits,
    TrendFit,
    empirical_optimum,
    fit_surfaces,
    fit_trends,
    hparam_of,
    require_usable,
    slice_label,
)
from . import noise
from .confidence import confidence
from .recipe import Recipe, best_in_slice, compute_recipe, fit_doubts, no_fit_reason

# The recipe table covers the grid's budgets and this many x4 steps beyond its largest (the paper's grid
# steps by 4; extrapolation is marked).
EXTRA_BUDGET_STEPS = 2
BUDGET_STEP = 4.0


@dataclass(frozen=True, eq=False)
class Analysis:
    sweep: str
    trials: pd.DataFrame
    usable: pd.DataFrame
    exclusions: Exclusions
    optimum: EmpiricalOptimum
    trends: TrendFit
    surfaces: SurfaceFits
    grid_budgets: tuple[float, ...]
    table_budgets: tuple[float, ...]
    recipes: dict[float, Recipe]  # budget -> recipe (budgets where no method has a surface are absent)
    max_tokens: int | None
    max_tokens_source: str  # "measured" (the planner's, from the store), "argument" or "none"
    best_slices: dict[str, Surface]  # method -> its best slice (lowest mean fitted optimal loss over the grid)
    warnings: tuple[str, ...]
    metric: str = "eval_loss"  # what `eval_loss` holds: the loss, or 1 - nDCG@10 (`fit --metric ndcg_at_10`)


def analyze(trials: pd.DataFrame, *, sweep: str = "sweep", max_tokens: int | None = None,
            max_tokens_source: str | None = None, n_boot: int = N_BOOTSTRAP, seed: int = 0,
            extra_budget_steps: int = EXTRA_BUDGET_STEPS, metric: str = "eval_loss") -> Analysis:
    """Everything the report shows. FitError only when no trial is usable; every partial refusal (a method
    with one point, a slice with one model size, ...) becomes a warning and an absent fit. ``max_tokens``: the
    sweep's data cap (analysis.load.load_data_cap), None for none."""
    usable, exclusions = require_usable(trials, where=sweep)
    source = "none" if max_tokens is None else (max_tokens_source or "argument")
    optimum = empirical_optimum(usable)
    trends = fit_trends(optimum)
    surfaces = fit_surfaces(usable, n_boot=n_boot, seed=seed)
    grid = tuple(sorted(float(b) for b in pd.unique(trials["budget_flops"].dropna()) if b > 0))
    extra = tuple(grid[-1] * BUDGET_STEP ** k for k in range(1, extra_budget_steps + 1)) if grid else ()
    recipes, warnings = {}, list(exclusions.messages())
    if not surfaces.surfaces:
        warnings.append("no recipe: no method slice has enough trials for a surface")
    else:
        for budget in grid + extra:
            try:
                recipes[budget] = compute_recipe(surfaces, budget, max_tokens)
            except FitError as e:
                warnings.append(f"no recipe at {budget:.3g} FLOP: {e}")
    warnings += [f"trend refused: {why}" for why in trends.refused.values()]
    warnings += [f"surface refused: {why}" for why in surfaces.refused.values()]
    warnings += [f"{s.label}: {w}" for s in surfaces.surfaces.values() for w in s.warnings]
    best = {m: _best_slice(surfaces, m, grid, max_tokens) for m in surfaces.methods()}
    return Analysis(sweep, trials, usable, exclusions, optimum, trends, surfaces, grid, grid + extra, recipes,
                    max_tokens, source, best, tuple(warnings), metric)


def _best_slice(fits: SurfaceFits, method: str, budgets, max_tokens) -> Surface:
    """The slice with the lowest mean log fitted optimal loss over the grid's budgets."""
    def score(surface):
        losses = [r[0].predicted_loss for b in budgets if (r := best_in_slice(surface, b, max_tokens))]
        return np.mean(np.log(losses)) if losses else np.inf
    return min(fits.for_method(method), key=score)


# ----------------------------------------------------------------------------------------------------------
# Tables

def _how_sure_cell(how) -> str:
    """findings.md's verdict on one budget's recipe (a ``recipe_table`` row): decisive, or what would decide it."""
    decisive = how.get("decisive") if how is not None else None
    if not isinstance(decisive, (bool, np.bool_)):
        return "—"
    if decisive:
        return "decisive"
    return f"not decisive: replicate {how['to_decide']} ({how['to_decide_flops']:.2g} FLOP)"


def _runs_of(cells: pd.DataFrame, trial_id: str) -> dict:
    """The best trial's cell over its replicates (``noise.cells``): mean loss, runs and relative spread."""
    mine = cells[[trial_id in ids for ids in cells["trial_ids"]]]
    if mine.empty or int(mine["runs"].iloc[0]) < 2:
        return {"its cell: mean (runs, sd)": "1 run"}
    cell = mine.iloc[0]
    return {"its cell: mean (runs, sd)": f"{cell['mean_loss']:.4f} ({int(cell['runs'])}, {cell['sd']:.1%})"}


def model_label(model: str) -> str:
    """A model as tables show it: a hub name as is, a local path or URI by its last part (the suite's
    ``/home/u/.cache/repurpose/suite/c4e28/mini-pythia-0.1m`` -> ``mini-pythia-0.1m``)."""
    if model.startswith(("/", ".", "~")) or "://" in model or model.count("/") > 1:
        return model.rstrip("/").rsplit("/", 1)[-1]
    return model


def _hp(method: str, h) -> str:
    """``r=8``, ``f=0.25``; "" without a hyperparameter."""
    return methods.get(method).show(h)


def recipe_table(a: Analysis) -> pd.DataFrame:
    """One row per table budget: the recipe (with interval and bootstrap win share) beside the empirical best
    trial at grid budgets. ``source``: ``fit``, or ``empirical`` at a grid budget where the fit is in doubt
    (``notes`` say why: a thin surface, a fitted best worse than a trial, a trial outside the interval) — the
    row's method, model, N and tokens are then the best trial's, and ``predicted_loss`` the fit's value for it. At a
    grid budget no surface answers, the best trial is the row (``_no_fit_answer``)."""
    rows = []
    frontier = a.optimum.frontier.set_index("budget_flops")
    ndcg = (a.trials.set_index("trial_id")["ndcg_at_10"].astype(float).to_dict()
            if "ndcg_at_10" in a.trials else {})
    for budget in a.table_budgets:
        row = {"budget_flops": budget, "on_grid": budget in a.grid_budgets}
        r = a.recipes.get(budget)
        e = frontier.loc[budget] if budget in frontier.index else None
        if r is not None:
            c = r.best
            row.update(method=c.method, lora_rank=c.lora_rank, trainable_fraction=c.trainable_fraction,
                       model=c.model, n_params=int(c.n_params), tokens=c.tokens, flops=c.flops,
                       predicted_loss=c.predicted_loss, predicted_loss_low=c.predicted_loss_low,
                       predicted_loss_high=c.predicted_loss_high, win_fraction=r.win_fraction.get(c.method),
                       data_limited=c.data_limited, extrapolated=c.extrapolated, source="fit",
                       family=c.family, pooling=c.pooling)
            notes = fit_doubts(a.surfaces, c, float(e["eval_loss"]) if e is not None else None)
            row["notes"] = "; ".join(notes)
            if notes and e is not None:
                row.update(_empirical_answer(a, e), source="empirical")
                row["notes"] = "; ".join([f"fit chose {c.label} {model_label(c.model)} at {c.predicted_loss:.4f}",
                                          *notes])
            row.update(_how_sure(a, budget, row, c, e))
        if r is None and e is not None:  # a grid budget no surface answers: its best trial does
            row.update(_no_fit_answer(a, e))
        if e is not None:
            row.update(empirical_method=e["method"], empirical_hparam=_hp(e["method"], e["hparam"]),
                       empirical_model=e["model"], empirical_loss=float(e["eval_loss"]),
                       empirical_trial=e["trial_id"], empirical_ndcg_at_10=ndcg.get(e["trial_id"], np.nan))
            if r is not None:
                row["agree"] = bool(e["method"] == r.best.method and e["model"] == r.best.model)
        rows.append(row)
    return pd.DataFrame(rows)


def _how_sure(a: Analysis, budget: float, row: dict, c, e) -> dict:
    """The row's p_best, runner-up and its gap (analysis/confidence.py) for the cell the row answers with."""
    if row.get("source") == "empirical":
        chosen = (e["method"], None if pd.isna(e["hparam"]) else float(e["hparam"]), e["variant"], e["model"])
    else:
        chosen = (c.method, c.hparam, c.variant, c.model)
    sure = confidence(a.surfaces, budget, chosen, a.max_tokens)
    runner = sure.runner_up
    return {"p_best": np.nan if sure.p_best is None else sure.p_best,
            "runner_up": f"{runner.label} {model_label(runner.model)}" if runner else None,
            "runner_up_gap": np.nan if sure.gap is None else sure.gap, "decisive": sure.decisive,
            "to_decide": "; ".join(f"{x.label} {model_label(x.model)}" for x in sure.contenders) or None,
            "to_decide_flops": sure.decide_flops if sure.contenders else np.nan}


def _empirical_answer(a: Analysis, e: pd.Series) -> dict:
    """The recipe row's fields for the best trial ``e`` (a frontier row), the fit's prediction for that cell where
    its slice has a surface."""
    h = None if pd.isna(e["hparam"]) else float(e["hparam"])
    surface = a.surfaces.surfaces.get((e["method"], h, e["variant"]))
    n, tokens = float(e["n_params"]), float(e["tokens"])
    pred, low, high = np.nan, np.nan, np.nan
    if surface is not None:
        pred = float(surface.predict(n, tokens))
        low, high = (float(x) for x in surface.interval(n, tokens))
    return dict(method=e["method"], family=None if e["family"] == "?" else e["family"], pooling=e["pooling"],
                **methods.get(e["method"]).hparam_fields(h), model=e["model"], n_params=int(n),
                tokens=int(tokens), flops=float(e["flops"]), predicted_loss=pred, predicted_loss_low=low,
                predicted_loss_high=high, win_fraction=np.nan, data_limited=False, extrapolated=False)


def _no_fit_answer(a: Analysis, e: pd.Series) -> dict:
    """The recipe row at a grid budget where no surface can be fitted (too few trials or budgets): the best trial
    ``e`` answers, its measured loss as ``predicted_loss`` and no interval (one run has none), ``source``
    empirical and ``notes`` saying why there is no fit (as `recipe` does: analysis/report.py)."""
    return {**_empirical_answer(a, e), "predicted_loss": float(e["eval_loss"]), "predicted_loss_low": np.nan,
            "predicted_loss_high": np.nan, "source": "empirical", "notes": f"no fit: {no_fit_reason(a.surfaces)}"}


def hparam_sensitivity(a: Analysis, method: str) -> pd.DataFrame:
    """Per (hyperparameter, budget) of ``method``: the best trial over models (empirical) and the slice's
    fitted optimal loss. Columns: hparam, budget_flops, empirical_loss, empirical_model, fitted_loss,
    fitted_model, is_best_empirical, is_best_fitted."""
    u = a.usable[a.usable["method"] == method]
    rows = []
    for (h, budget), cell in u.groupby(["hparam", "budget_flops"], sort=True):
        top = cell.loc[cell["eval_loss"].idxmin()]
        rows.append({"hparam": float(h), "budget_flops": float(budget), "empirical_loss": float(top["eval_loss"]),
                     "empirical_model": top["model"], "empirical_trial": top["trial_id"]})
    df = pd.DataFrame(rows, columns=["hparam", "budget_flops", "empirical_loss", "empirical_model",
                                     "empirical_trial"])
    fitted = []
    for s in a.surfaces.for_method(method):
        for budget in a.grid_budgets:
            if (r := best_in_slice(s, budget, a.max_tokens)) is not None:
                fitted.append({"hparam": s.hparam, "budget_flops": budget, "fitted_loss": r[0].predicted_loss,
                               "fitted_model": r[0].model})
    fitted = pd.DataFrame(fitted, columns=["hparam", "budget_flops", "fitted_loss", "fitted_model"])
    df = df.merge(fitted, on=["hparam", "budget_flops"], how="outer").sort_values(["budget_flops", "hparam"])
    for col, best in (("empirical_loss", "is_best_empirical"), ("fitted_loss", "is_best_fitted")):
        low = df.groupby("budget_flops")[col].transform("min")
        df[best] = df[col].notna() & (df[col] == low)
    return df.reset_index(drop=True)


def bias_comparison(a: Analysis) -> pd.DataFrame:
    """Per budget: bias-only's best loss against the best other method (``gap`` = bias / other - 1)."""
    best = a.optimum.best
    rows = []
    for budget, cell in best.groupby("budget_flops", sort=True):
        is_bias = cell["method"] == methods.BIAS.name
        bias, other = cell[is_bias], cell[~is_bias]
        if bias.empty or other.empty:
            continue
        o = other.loc[other["eval_loss"].idxmin()]
        b = float(bias["eval_loss"].iloc[0])
        rows.append({"budget_flops": float(budget), "bias_loss": b, "best_other": o["method"],
                     "best_other_loss": float(o["eval_loss"]), "gap": b / float(o["eval_loss"]) - 1.0})
    return pd.DataFrame(rows, columns=["budget_flops", "bias_loss", "best_other", "best_other_loss", "gap"])


def surfaces_table(a: Analysis) -> pd.DataFrame:
    """One row per slice: fitted parameters with bootstrap intervals and fit quality, or why it was refused."""
    rows = []
    for s in a.surfaces.surfaces.values():
        row = {"method": s.method, "slice": s.label, "form": s.form, "n_points": s.n_points,
               "n_models": s.n_models, "n_budgets": s.n_budgets}
        for name in ("E", "A", "alpha", "B", "beta"):
            lo, hi = s.param_interval(name)
            row.update({name: getattr(s, name), f"{name}_low": lo, f"{name}_high": hi})
        row.update(rmse_log=s.rmse_log, r2_log=s.r2_log, max_rel_err=s.max_rel_err,
                   best_slice=a.best_slices.get(s.method) is s, warnings="; ".join(s.warnings), refused="",
                   shared_with=", ".join(s.shared))
        rows.append(row)
    for (method, h, v), why in a.surfaces.refused.items():
        rows.append({"method": method, "slice": slice_label(method, h, v), "refused": why})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------
# Markdown

def _f(x, fmt="{:.4f}") -> str:
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else fmt.format(x)


def _md(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (no tabulate dependency)."""
    head = "| " + " | ".join(df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def _ranges(budgets_methods: list[tuple[float, str]]) -> str:
    """'full at 1.5e15–6e15; lora at 2.4e16–1.5e18' from (budget, method) sorted by budget."""
    runs = []
    for b, m in budgets_methods:
        if runs and runs[-1][0] == m:
            runs[-1][2] = b
        else:
            runs.append([m, b, b])
    return "; ".join(f"{m} at {lo:.2g}" + (f"–{hi:.2g}" if hi != lo else "") for m, lo, hi in runs)


def recipe_markdown(a: Analysis) -> str:
    t = recipe_table(a)
    if "method" not in t:
        return "No recipe: no method has a fitted surface (see the warnings).\n"
    level = int(round(CI_LEVEL * 100))
    rows = []
    for r in t.to_dict("records"):
        if not isinstance(r.get("method"), str):
            continue
        hp = _hp(r["method"], hparam_of(r))
        flags = [s for s, on in (("grid", r["on_grid"]), ("empirical", r.get("source") == "empirical"),
                                 ("extrapolated", r.get("extrapolated")),
                                 ("data-limited", r.get("data_limited"))) if on is True]
        flags += [r["notes"]] if isinstance(r.get("notes"), str) and r["notes"] else []
        if r.get("decisive") is False and isinstance(r.get("to_decide"), str):
            flags.append(f"not decisive: replicate {r['to_decide']} ({r['to_decide_flops']:.2g} FLOP)")
        emp = (f"{r['empirical_method']} {r['empirical_hparam']} {model_label(r['empirical_model'])} "
               f"{r['empirical_loss']:.4f}".replace("  ", " ") if isinstance(r.get("empirical_method"), str) else "—")
        varies = bool(a.usable["variant"].astype(bool).any()) if "variant" in a.usable else False
        rows.append({"budget (FLOP)": f"{r['budget_flops']:.2g}", "method": f"{r['method']} {hp}".strip(),
                     **({"family": r.get("family") or "?", "pooling": r.get("pooling")} if varies else {}),
                     "model": model_label(r["model"]), "N": f"{r['n_params']:.3g}", "tokens": f"{r['tokens']:.3g}",
                     "predicted loss": _f(r["predicted_loss"]),
                     f"{level}% CI": f"[{_f(r['predicted_loss_low'])}, {_f(r['predicted_loss_high'])}]",
                     "wins": _f(r.get("win_fraction"), "{:.0%}"), "p_best": _f(r.get("p_best"), "{:.0%}"),
                     "empirical best": emp,
                     "its nDCG@10": _f(r.get("empirical_ndcg_at_10"), "{:.3f}"),
                     "notes": ", ".join(flags)})
    return _md(pd.DataFrame(rows)) + "\n"


def findings_markdown(a: Analysis) -> str:
    out = [f"# Findings: sweep `{a.sweep}`", ""]
    if a.metric != "eval_loss":
        out += [f"Fitted on 1 − {a.metric} (an error rate: 0 is perfect retrieval) in place of the loss: every "
                "\"loss\" below is 1 − " + a.metric + ". A surface the power law cannot carry is refused below, "
                "with why.", ""]
    n_ex = len(a.exclusions.table)
    out += [f"{len(a.usable)} usable trials of {len(a.trials)} ({n_ex} excluded: "
            + (", ".join(f"{n} {c}" for c, n in a.exclusions.counts.items()) or "none") + ").", ""]
    out += [noise.describe(noise.summary(a.usable)) + ".", ""]

    # 1. which method at which budget
    fr = a.optimum.frontier
    out += ["## Which method is compute-optimal at each budget?", ""]
    out.append("Empirically (best completed trial per budget): "
               + _ranges([(b, m) for b, m in zip(fr["budget_flops"], fr["method"])]) + ".")
    if a.trends.crossovers:
        out.append("Fitted trends cross at " + "; ".join(
            f"{c.budget_flops:.2g} FLOP ({c.below} → {c.above}{', coverage edge' if c.kind != 'intersection' else ''})"
            for c in a.trends.crossovers) + ".")
    elif a.trends.trends:
        method, _ = a.trends.envelope([min(a.grid_budgets)])
        out.append(f"Fitted trends do not cross inside the grid: {method[0]} stays on the frontier.")
    if a.recipes:
        out.append("Fitted surfaces (recipe): " + _ranges([(b, r.best.method) for b, r in a.recipes.items()
                                                           if b in a.grid_budgets]) + ".")
    rows = []
    cells = noise.cells(a.usable)
    replicated = bool(len(cells) and (cells["runs"] > 1).any())
    table = recipe_table(a)
    sure = table.set_index("budget_flops") if "p_best" in table else None
    for r in fr.to_dict("records"):
        rec = a.recipes.get(r["budget_flops"])
        how = sure.loc[r["budget_flops"]] if sure is not None and r["budget_flops"] in sure.index else None
        rows.append({"budget (FLOP)": f"{r['budget_flops']:.2g}",
                     "best (empirical)": f"{r['method']} {_hp(r['method'], r['hparam'])}".strip(),
                     "model": model_label(r["model"]), "loss": f"{r['eval_loss']:.4f}",
                     **(_runs_of(cells, r["trial_id"]) if replicated else {}),
                     "runner-up": r["runner_up"] or "—", "margin": _f(r["margin"], "{:.1%}"),
                     "best (fitted)": rec.best.label if rec else "—",
                     "fitted model": model_label(rec.best.model) if rec else "—",
                     "p_best": _f(how["p_best"], "{:.0%}") if how is not None else "—",
                     "how sure": _how_sure_cell(how)})
    out += ["", _md(pd.DataFrame(rows)), ""]

    # 2./3. method hyperparameters
    for method, name, what in _hparam_methods():
        sens = hparam_sensitivity(a, method)
        if sens.empty:
            continue
        out += [f"## Optimal {name} per budget", ""]
        if sens["hparam"].nunique() < 2:
            out += [f"Only one {what} ({_hp(method, sens['hparam'].iloc[0])}) in the sweep: nothing to compare.", ""]
            continue
        rows = []
        for budget, cell in sens.groupby("budget_flops", sort=True):
            emp = cell[cell["is_best_empirical"]]
            fit = cell[cell["is_best_fitted"]]
            losses = cell["empirical_loss"].dropna()
            rows.append({"budget (FLOP)": f"{budget:.2g}",
                         f"best {what} (empirical)": _hp(method, emp["hparam"].iloc[0]) if len(emp) else "—",
                         "loss": _f(float(emp["empirical_loss"].iloc[0]) if len(emp) else None),
                         f"spread over {what}s": _f(losses.max() / losses.min() - 1 if len(losses) > 1 else None,
                                                    "{:.1%}"),
                         f"best {what} (fitted)": _hp(method, fit["hparam"].iloc[0]) if len(fit) else "—"})
        table = pd.DataFrame(rows)
        mode = table[f"best {what} (empirical)"].replace("—", np.nan).dropna().mode()
        if len(mode):
            out.append(f"Most often best: {mode.iloc[0]} (empirical, {len(table)} budgets).")
        out += ["", _md(table), ""]

    # 4. bias-only
    bias = bias_comparison(a)
    if not bias.empty:
        worse = int((bias["gap"] > 0).sum())
        out += ["## How does bias-only tuning compare?", "",
                f"Bias-only is worse than the best other method at {worse} of {len(bias)} budgets "
                f"(median gap {bias['gap'].median():+.1%}).", ""]
        out.append(_md(pd.DataFrame({
            "budget (FLOP)": [f"{b:.2g}" for b in bias["budget_flops"]],
            "bias-only": [f"{x:.4f}" for x in bias["bias_loss"]], "best other": bias["best_other"],
            "its loss": [f"{x:.4f}" for x in bias["best_other_loss"]],
            "gap": [f"{g:+.1%}" for g in bias["gap"]]})))
        out.append("")

    # 5. fits
    out += ["## Fits", "", "Per-method trends (optimal loss ∝ C^slope, least squares in log-log):", ""]
    rows = [{"method": m, "slope": f"{t.slope:.4f}", "R²": _f(t.r2, "{:.3f}"), "points": t.n_points,
             "budgets": f"{t.budget_min:.2g}–{t.budget_max:.2g}"} for m, t in a.trends.trends.items()]
    rows += [{"method": m, "slope": "refused", "R²": "", "points": "", "budgets": why}
             for m, why in a.trends.refused.items()]
    out += [_md(pd.DataFrame(rows)), ""]
    level = int(round(CI_LEVEL * 100))
    out += [f"Surfaces L(N, D) = E + A/N^α + B/D^β (Huber δ=1e-3 on log loss, L-BFGS from a grid of starts; "
            f"{level}% bootstrap intervals over {a.surfaces.n_boot} resamples of trials):", ""]
    rows = []
    for s in a.surfaces.surfaces.values():
        ci = {p: s.param_interval(p) for p in ("alpha", "beta")}
        rows.append({"slice": s.label + (" (best)" if a.best_slices.get(s.method) is s else ""),
                     "E": f"{s.E:.3f}",
                     "α": "—" if s.A == 0 else f"{s.alpha:.3f} [{_f(ci['alpha'][0], '{:.3f}')}, "
                                                f"{_f(ci['alpha'][1], '{:.3f}')}]",
                     "β": f"{s.beta:.3f} [{_f(ci['beta'][0], '{:.3f}')}, {_f(ci['beta'][1], '{:.3f}')}]",
                     "points": s.n_points, "models": s.n_models, "rmse (log)": f"{s.rmse_log:.4f}",
                     "R² (log)": _f(s.r2_log, "{:.3f}"), "fit": "shared" if s.shared else "own"})
    rows += [{"slice": slice_label(m, h, v), "E": "refused", "α": why, "β": "", "points": "", "models": "",
              "rmse (log)": "", "R² (log)": "", "fit": ""} for (m, h, v), why in a.surfaces.refused.items()]
    out += [_md(pd.DataFrame(rows)), ""]
    shared = {s.shared: s for s in a.surfaces.surfaces.values() if s.shared}
    out += [f"Shared fit: {', '.join(labels)} have one E, A, α and β and a B each ({s.fit_parameters} parameters "
            f"from {s.fit_points} trials), kept because its BIC is no higher than their separate fits'." for
            labels, s in shared.items()] + ([""] if shared else [])
    from .agreement import agreement, render_markdown

    out += [render_markdown(agreement(a.trials)).replace("### ", "## ", 1), ""]
    serving = serving_table(a)
    if not serving.empty:
        top = a.grid_budgets[-1]
        out += ["## What serving costs", "",
                f"At the top budget ({top:.2g} FLOP), if the model will also embed T tokens in its life "
                "(2·N FLOP each, training + serving ≤ the budget):", "", _md(serving), ""]
    if a.max_tokens is not None:
        out += [f"Data available: {a.max_tokens:,} tokens ({a.max_tokens_source}); recipes never exceed it.", ""]
    if a.warnings:
        out += ["## Warnings", ""] + [f"- {w}" for w in a.warnings] + [""]
    return "\n".join(out)


SERVE_TOKENS = (0.0, 1e9, 1e11, 1e13)  # the table's lifetimes: nothing, a small corpus, a web index, a service


def serving_table(a: Analysis) -> pd.DataFrame:
    """How the optimal model shrinks as the tokens it will serve grow, at the grid's top budget."""
    if not a.surfaces.surfaces or not a.grid_budgets:
        return pd.DataFrame()
    rows = []
    for t in SERVE_TOKENS:
        try:
            c = compute_recipe(a.surfaces, a.grid_budgets[-1], a.max_tokens, t).best
        except FitError as e:
            rows.append({"serve tokens": f"{t:.0e}", "method": "—", "model": "—", "N": "—", "tokens": "—",
                         "training FLOP": "—", "serving FLOP": "—", "predicted loss": str(e)})
            continue
        rows.append({"serve tokens": f"{t:.0e}", "method": c.label, "model": model_label(c.model),
                     "N": f"{c.n_params:.3g}", "tokens": f"{c.tokens:.3g}", "training FLOP": f"{c.flops:.3g}",
                     "serving FLOP": f"{c.serve_flops:.3g}", "predicted loss": f"{c.predicted_loss:.4f}"})
    return pd.DataFrame(rows)


def _hparam_methods() -> list[tuple[str, str, str]]:
    """(method, its hyperparameter's title, its unit) of every method with a hyperparameter, adapters first (the
    order the findings have always had: LoRA rank, then trainable fraction)."""
    records = [methods.get(m) for m in methods.names() if methods.get(m).hparam]
    records.sort(key=lambda r: not r.adapters)
    return [(r.name, r.hparam_title, r.hparam_unit) for r in records]


def methods_in(a: Analysis) -> list[str]:
    present = set(a.usable["method"])
    return [m for m in methods.names() if m in present]
