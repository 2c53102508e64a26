"""Figures from an ``Analysis``: each function returns (matplotlib Figure, DataFrame of the plotted points).

Headless by construction: ``matplotlib.figure.Figure`` is used directly (no pyplot, no backend switch, no global
state); the caller saves. Nothing here writes files.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from core import methods

from .findings import Analysis, hparam_sensitivity, methods_in
from .fit import cost_per_token

METHOD_STYLE = {  # colour-blind-safe (Okabe-Ito), one marker per method
    "full": ("#0072B2", "o"),
    "freeze": ("#009E73", "s"),
    "lora": ("#D55E00", "^"),
    "bias": ("#CC79A7", "D"),
}
BUDGET_CMAP = "viridis"
DPI = 150
FONT = {"axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9, "legend.fontsize": 8}


def _plain_log_y(ax) -> None:
    """Log y axis with plain, evenly stepped labels (0.7, 0.8, ... 1.2, 1.4) instead of 6x10^-1: losses span
    less than a decade, where log ticks leave most of the axis unlabelled. Call after the limits are final."""
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=np.arange(1, 10) / 1.0))
    ax.yaxis.set_minor_formatter(NullFormatter())
    if hi / lo > 10:
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        return
    ticks = [t for t in MaxNLocator(nbins=7, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi) if lo <= t <= hi and t > 0]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _budget_colours(budgets):
    norm = LogNorm(min(budgets) / 1.5, max(budgets) * 1.2)
    cmap = colormaps[BUDGET_CMAP]
    return norm, cmap, {b: cmap(norm(b)) for b in budgets}


def _style(ax) -> None:
    ax.grid(True, which="major", alpha=0.35, lw=0.6)
    ax.grid(True, which="minor", alpha=0.15, lw=0.4)
    for item in [ax.title, ax.xaxis.label, ax.yaxis.label]:
        item.set_fontsize(FONT["axes.labelsize"] if item is not ax.title else FONT["axes.titlesize"])
    ax.tick_params(labelsize=FONT["xtick.labelsize"])
    ax.tick_params(which="minor", labelsize=FONT["xtick.labelsize"] - 1)


# ----------------------------------------------------------------------------------------------------------
# Figure 1: optimal loss vs budget per method, fitted trends, the frontier

def frontier_figure(a: Analysis) -> tuple[Figure, pd.DataFrame]:
    fig = _figure(10.0, 5.4)
    ax = fig.add_subplot()
    rows = []
    best = a.optimum.best
    lo, hi = best["budget_flops"].min(), best["budget_flops"].max()
    dense = np.geomspace(lo, hi, 300) if hi > lo else np.array([lo])
    if a.trends.trends:
        env_method, env_loss = a.trends.envelope(dense)
        ax.plot(dense, env_loss, color="black", lw=7, alpha=0.15, solid_capstyle="round", zorder=1,
                label="optimal frontier (lower envelope of fits)")
        rows += [{"kind": "frontier", "method": m, "budget_flops": b, "loss": v}
                 for b, m, v in zip(dense, env_method, env_loss)]
    for method in methods_in(a):
        colour, marker = METHOD_STYLE.get(method, ("#555555", "x"))  # a method without a style of its own
        pts = best[best["method"] == method]
        ax.scatter(pts["budget_flops"], pts["eval_loss"], color=colour, marker=marker, s=42, zorder=3,
                   edgecolor="white", linewidth=0.6, label=f"{method}: best trial per budget")
        rows += [{"kind": "optimum", "method": method, "budget_flops": r["budget_flops"], "loss": r["eval_loss"],
                  "model": r["model"], "hparam": r["hparam"], "trial_id": r["trial_id"]}
                 for r in pts.to_dict("records")]
        trend = a.trends.trends.get(method)
        if trend is not None:
            xs = dense[trend.covers(dense)]
            ax.plot(xs, trend.predict(xs), color=colour, lw=1.6, zorder=2,
                    label=f"{method} fit: $L \\propto C^{{{trend.slope:.3f}}}$ (R²={trend.r2:.2f})")
            rows += [{"kind": "trend", "method": method, "budget_flops": b, "loss": v}
                     for b, v in zip(xs, trend.predict(xs))]
    fr = a.optimum.frontier
    ax.scatter(fr["budget_flops"], fr["eval_loss"], s=150, facecolors="none", edgecolors="black", lw=1.1,
               zorder=4, label="best method at budget (empirical)")
    _plain_log_y(ax)
    ax.set_xscale("log")
    ymin, ymax = ax.get_ylim()
    for c in a.trends.crossovers:
        ax.axvline(c.budget_flops, color="0.35", ls=":", lw=1.2, zorder=0)
        ax.text(c.budget_flops, ymax, f" {c.below}→{c.above}\n {c.budget_flops:.2g}", va="top", ha="left",
                fontsize=8, color="0.25")
        rows.append({"kind": "crossover", "method": f"{c.below}->{c.above}", "budget_flops": c.budget_flops,
                     "loss": np.nan})
    ax.set_xlabel("compute budget C (FLOP, paper convention)")
    ax.set_ylabel("held-out contrastive loss (best trial)")
    ax.set_title(f"Optimal loss vs compute per method — sweep {a.sweep}")
    _style(ax)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=FONT["legend.fontsize"])
    return fig, pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------
# Iso-FLOP curves per method: loss vs N, one curve per budget (the method's best slice), fitted minima marked

def _n_trainable_curve(surface, n):
    """N_tr for continuous N: log-log interpolation between the slice's models (exact at them)."""
    if all(n_tr == n_model for _, n_model, n_tr in surface.models):  # everything trains
        return n
    xs = np.log([x for _, x, _ in surface.models])
    ys = np.log([max(y, 1.0) for _, _, y in surface.models])
    if len(xs) == 1:
        return n * np.exp(ys[0] - xs[0])
    slope = (ys[-1] - ys[0]) / (xs[-1] - xs[0])
    inside = np.interp(np.log(n), xs, ys)
    outside = ys[0] + slope * (np.log(n) - xs[0])  # extend beyond the sweep with the overall trend
    inner = (np.log(n) >= xs[0]) & (np.log(n) <= xs[-1])
    return np.exp(np.where(inner, inside, outside))


def isoflop_figure(a: Analysis) -> tuple[Figure, pd.DataFrame]:
    methods = methods_in(a)
    ncols = min(2, len(methods))
    nrows = int(np.ceil(len(methods) / ncols))
    fig = _figure(5.6 * ncols + 1.0, 4.3 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    norm, cmap, colour = _budget_colours(a.grid_budgets)
    rows = []
    for ax, method in zip(axes, methods):
        surface = a.best_slices.get(method)
        u = a.usable[a.usable["method"] == method]
        if surface is not None:
            h = surface.hparam
            u = u[u["hparam"].isna()] if h is None else u[np.isclose(u["hparam"], h)]
        label = surface.label if surface is not None else method
        for budget, pts in u.groupby("budget_flops", sort=True):
            ax.scatter(pts["N"], pts["eval_loss"], color=colour[budget], s=22, zorder=3, edgecolor="white", lw=0.4)
            rows += [{"kind": "trial", "method": method, "slice": label, "budget_flops": budget, "n_params": r["N"],
                      "tokens": r["D"], "loss": r["eval_loss"], "model": r["model"]} for r in pts.to_dict("records")]
            if surface is None:
                continue
            n = np.geomspace(surface.n_range[0] / 1.5, surface.n_range[1] * 1.5, 200)
            d = budget / cost_per_token(method, n, _n_trainable_curve(surface, n))
            if a.max_tokens is not None:
                d = np.minimum(d, a.max_tokens)
            loss = surface.predict(n, d)
            ax.plot(n, loss, color=colour[budget], lw=1.4, zorder=2)
            i = int(np.argmin(loss))
            ax.plot(n[i], loss[i], marker="*", ms=13, color=colour[budget], mec="black", mew=0.7, zorder=4)
            rows += [{"kind": "fit", "method": method, "slice": label, "budget_flops": budget, "n_params": x,
                      "tokens": t, "loss": v} for x, t, v in zip(n, d, loss)]
            rows.append({"kind": "fit_min", "method": method, "slice": label, "budget_flops": budget,
                         "n_params": n[i], "tokens": d[i], "loss": loss[i]})
        ax.set_xscale("log")
        if len(u):
            top = np.percentile(u["eval_loss"], 90) * 1.1
            minima = [r["loss"] for r in rows if r["kind"] == "fit_min" and r["method"] == method]
            bottom = min([u["eval_loss"].min(), *minima]) * 0.95
            ax.set_ylim(bottom, max(top, bottom * 1.3))
        _plain_log_y(ax)
        if surface is not None:
            title = f"{label}: α={surface.alpha:.2f}, β={surface.beta:.2f}, rmse {surface.rmse_log:.1%}"
            if surface.A == 0:
                title = f"{label}: one model, β={surface.beta:.2f}, rmse {surface.rmse_log:.1%}"
        else:
            title = f"{label}: no surface fit"
            ax.text(0.5, 0.5, "too few trials for a fit", transform=ax.transAxes, ha="center", color="0.4")
        ax.set_title(title)
        ax.set_xlabel("non-embedding parameters N")
        ax.set_ylabel("held-out contrastive loss")
        _style(ax)
    for ax in axes[len(methods):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color="0.3", marker="o", ls="", label="trial"),
               Line2D([], [], color="0.3", lw=1.4, label="fitted L(N, C/cost(N))"),
               Line2D([], [], color="0.5", marker="*", ms=12, mec="black", ls="", label="fitted minimum")]
    axes[0].legend(handles=handles, loc="upper left", fontsize=FONT["legend.fontsize"])
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes[:len(methods)]), label="budget C (FLOP)",
                 shrink=0.9)
    fig.suptitle(f"Iso-FLOP curves per method (best slice) — sweep {a.sweep}", fontsize=12)
    return fig, pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------
# Hyperparameter sensitivity: LoRA rank, freeze trainable fraction

def hparam_figure(a: Analysis, method: str) -> tuple[Figure, pd.DataFrame] | None:
    """Loss vs the method's hyperparameter, one line per budget: best trial over models (solid) and the
    slice's fitted optimum (dashed); stars mark the best empirical value per budget. None with < 2 values."""
    sens = hparam_sensitivity(a, method)
    if sens["hparam"].nunique() < 2:
        return None
    record = methods.get(method)
    fig = _figure(8.0, 5.0)
    ax = fig.add_subplot()
    budgets = sorted(sens["budget_flops"].unique())
    norm, cmap, colour = _budget_colours(budgets)
    for budget in budgets:
        cell = sens[sens["budget_flops"] == budget].sort_values("hparam")
        emp = cell.dropna(subset=["empirical_loss"])
        ax.plot(emp["hparam"], emp["empirical_loss"], color=colour[budget], marker="o", ms=5, lw=1.5,
                label=f"{budget:.2g}")
        fit = cell.dropna(subset=["fitted_loss"])
        ax.plot(fit["hparam"], fit["fitted_loss"], color=colour[budget], ls="--", lw=1.1, alpha=0.9)
        star = emp[emp["is_best_empirical"]]
        ax.plot(star["hparam"], star["empirical_loss"], marker="*", ms=14, ls="", color=colour[budget],
                mec="black", mew=0.7, zorder=4)
    values = sorted(sens["hparam"].unique())
    if record.hparam_log_axis:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(values))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_xticks(values)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    _plain_log_y(ax)
    ax.set_xlabel(record.hparam_axis)
    ax.set_ylabel("held-out contrastive loss (best over models)")
    ax.set_title(f"{method}: {record.hparam_title} sensitivity — sweep {a.sweep}")
    _style(ax)
    budget_legend = ax.legend(title="budget (FLOP)", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                              fontsize=FONT["legend.fontsize"])
    ax.add_artist(budget_legend)
    ax.legend(handles=[Line2D([], [], color="0.3", marker="o", lw=1.5, label="best trial"),
                       Line2D([], [], color="0.3", ls="--", lw=1.1, label="fitted optimum"),
                       Line2D([], [], color="0.5", marker="*", ms=12, mec="black", ls="", label="best per budget")],
              loc="lower left", bbox_to_anchor=(1.01, 0.0), fontsize=FONT["legend.fontsize"])
    return fig, sens.assign(method=method)
