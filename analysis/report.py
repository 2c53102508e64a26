"""The layer the CLI calls: read the store, run the pure fits, write files (``repurpose fit``) or return the
recipe (``repurpose recipe``). The only module of ``analysis`` that writes.

- ``write_fit_outputs(sweep_uri, out_dir)``: figures (PNG + CSV of the plotted points), the recipe table
  (Markdown + CSV), findings (Markdown), surfaces.csv, excluded.csv, summary.json; returns the summary.
- ``recipe_at(sweep_uri, budget_flops)``: the docs/reference.md ``recipe --json`` document (+ ``per_method``,
  ``empirical``); ``format_recipe`` renders it for humans.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from core import methods

from .findings import (Analysis, analyze, findings_markdown, model_label, recipe_markdown, recipe_table,
                       surfaces_table)
from .fit import CI_LEVEL, KNOB_DEFAULTS, N_BOOTSTRAP, FitError, fit_surfaces, hparam_of, require_usable, slice_label
from .load import StoreError, load_data_cap, load_trials, open_uri
from .confidence import confidence
from .noise import noise_at
from .recipe import Choice, NoSurface, compute_recipe, empirical_budget, fit_doubts, serve_flops

RECIPE_KEYS = ("budget_flops", "method", "model", "n_params", "tokens", "lora_rank", "trainable_fraction",
               "predicted_loss", "predicted_loss_low", "predicted_loss_high")  # docs/reference.md
SAME_BUDGET_RTOL = 1e-6  # a requested budget this close to a grid budget is that budget


def _sweep_name(sweep_uri: str) -> str:
    return str(sweep_uri).rstrip("/").rsplit("/", 1)[-1] or str(sweep_uri)


def _num(x):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if x is None:
        return None
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if x is pd.NA:
        return None
    return x


# ----------------------------------------------------------------------------------------------------------
# recipe

def _choice_dict(c: Choice) -> dict:
    return {"method": c.method, "model": c.model, "n_params": int(c.n_params), "n_trainable": int(c.n_trainable),
            "tokens": int(c.tokens), "flops": _num(c.flops), "lora_rank": c.lora_rank,
            "trainable_fraction": c.trainable_fraction, "predicted_loss": _num(c.predicted_loss),
            "predicted_loss_low": _num(c.predicted_loss_low), "predicted_loss_high": _num(c.predicted_loss_high),
            "data_limited": c.data_limited, "extrapolated": c.extrapolated}


def _empirical_at(usable: pd.DataFrame, budget_flops: float) -> dict | None:
    at = usable[np.isclose(usable["budget_flops"].astype(float), budget_flops, rtol=SAME_BUDGET_RTOL, atol=0)]
    if at.empty:
        return None
    r = at.loc[at["eval_loss"].idxmin()]
    return {"trial_id": r["trial_id"], "method": r["method"], "model": r["model"], "n_params": _num(r["n_params"]),
            "tokens": _num(r["tokens"]), "lora_rank": _num(r["lora_rank"]),
            "trainable_fraction": _num(r["trainable_fraction"]), "eval_loss": _num(r["eval_loss"]),
            "budget_flops": _num(r["budget_flops"]), "family": None if r["family"] == "?" else r["family"],
            "pooling": r["pooling"], "variant": r["variant"], **_knobs(r)}


KNOB_KEYS = ("lr", "negatives", "attention", "query_instruction")


def _knobs(row) -> dict:
    """A usable trial's knob columns, JSON-safe: the lr it trained with where the store knows it, the other knobs
    where they are not at their defaults (a sweep without knobs answers with the keys it always had)."""
    values = {"lr": _num(row["lr"]), "negatives": int(row["negatives"]), "attention": str(row["attention"]),
              "query_instruction": str(row["query_instruction"])}
    return {k: v for k, v in values.items() if v is not None and v != KNOB_DEFAULTS.get(k)}


def knobs_of_choice(usable: pd.DataFrame, method: str, hparam, variant: str, model: str, budget_flops: float) -> dict:
    """The knobs of a fitted choice: its slice fixes negatives, attention and instruction; the lr is the best
    lr of the slice's trials of that model at the budget nearest (in log) to ``budget_flops`` (best_lr_per_cell
    kept one trial per cell). Empty when the slice has no trial of that model."""
    h = usable["hparam"].fillna(-1.0)
    rows = usable[(usable["method"] == method) & (h == (-1.0 if hparam is None else hparam))
                  & (usable["variant"] == variant) & (usable["model"] == model)]
    if rows.empty:
        return {}
    distance = (np.log(rows["budget_flops"].astype(float)) - math.log(budget_flops)).abs()
    return _knobs(rows.loc[distance.idxmin()])


def recipe_at(sweep_uri: str, budget_flops: float, max_tokens: int | None = None, *, n_boot: int = N_BOOTSTRAP,
              seed: int = 0, serve_tokens: float | None = None) -> dict:
    """The compute-optimal recipe at ``budget_flops`` (docs/reference.md ``recipe --json`` keys) plus
    ``per_method`` ({method: choice, or {"refused": why}}, with each method's bootstrap ``win_fraction`` and
    excluded-trial counts) and ``empirical`` (the best completed trial at that budget if it is a grid budget,
    else None). ``max_tokens``: the training data's token count; default: the sweep's data cap as the planner
    measured it (``load_data_cap``), else no cap. Raises StoreError (no such sweep) or FitError (too few trials),
    each one line. ``serve_tokens`` T: the model will also embed T tokens in its life; the recipe minimises the loss
    under training FLOP + 2 N T <= C (N: the merged model's), and the answer gains ``serve_tokens``,
    ``train_flops`` and ``serve_flops``."""
    budget_flops = float(budget_flops)
    if not (budget_flops > 0 and math.isfinite(budget_flops)):
        raise FitError(f"budget must be a positive number of FLOP (got {budget_flops:g})")
    trials = load_trials(sweep_uri)
    usable, exclusions = require_usable(trials, where=str(sweep_uri))
    if max_tokens is None:
        max_tokens = load_data_cap(sweep_uri)
    fits = fit_surfaces(usable, n_boot=n_boot, seed=seed)
    try:
        r = compute_recipe(fits, budget_flops, max_tokens, serve_tokens or 0.0)
    except NoSurface as e:  # one run per answer, nothing to bootstrap: p_best and the runner-up are unknown
        return _no_fit_recipe(usable, budget_flops, e.why, serve_tokens) | {
            "p_best": None, "runner_up": None, "noise_sd": noise_at(trials, budget_flops)}
    c = r.best
    out = {"budget_flops": budget_flops, "method": c.method, "model": c.model, "n_params": int(c.n_params),
           "tokens": int(c.tokens), "lora_rank": c.lora_rank, "trainable_fraction": c.trainable_fraction,
           "predicted_loss": _num(c.predicted_loss), "predicted_loss_low": _num(c.predicted_loss_low),
           "predicted_loss_high": _num(c.predicted_loss_high)}
    excluded = exclusions.table.groupby("method").size().to_dict() if len(exclusions.table) else {}
    per_method = {}
    ranked = sorted(r.per_method, key=lambda m: r.per_method[m].predicted_loss) + sorted(r.refused)
    for method in ranked:
        if method in r.per_method:
            entry = _choice_dict(r.per_method[method]) | {"win_fraction": _num(r.win_fraction.get(method))}
        else:
            entry = {"refused": r.refused[method]}
        entry["excluded_trials"] = int(excluded.get(method, 0))
        per_method[method] = entry
    out["per_method"] = per_method
    out["empirical"] = emp = _empirical_at(usable, budget_flops)
    out["family"], out["pooling"] = c.family, c.pooling
    out.update(knobs_of_choice(usable, c.method, c.hparam, c.variant, c.model, budget_flops))
    if serve_tokens is not None:  # the trials spent the whole budget on training: no empirical answer to compare
        out.update(serve_tokens=float(serve_tokens), train_flops=_num(c.flops), serve_flops=_num(c.serve_flops))
        emp = None
    out["notes"] = fit_doubts(fits, c, emp["eval_loss"] if emp else None)
    out["source"] = "fit"
    if out["notes"] and emp:  # at a grid budget the fit is in doubt: the best trial answers (notes say why)
        out["notes"].insert(0, f"fit chose {c.label} {model_label(c.model)} at {c.predicted_loss:.4f}")
        surface = fits.surfaces.get((emp["method"], hparam_of(emp), emp["variant"]))
        pred = low = high = None
        if surface is not None:
            pred = _num(float(surface.predict(emp["n_params"], emp["tokens"])))
            low, high = (_num(float(x)) for x in surface.interval(emp["n_params"], emp["tokens"]))
        out.update({k: emp[k] for k in ("method", "model", "n_params", "tokens", "lora_rank", "trainable_fraction",
                                        "family", "pooling", *KNOB_KEYS) if k in emp},
                   predicted_loss=pred, predicted_loss_low=low, predicted_loss_high=high, source="empirical")
    chosen = ((c.method, c.hparam, c.variant, c.model) if out["source"] == "fit"
              else (emp["method"], hparam_of(emp), emp["variant"], emp["model"]))
    out.update(how_sure(fits, trials, budget_flops, chosen, max_tokens, serve_tokens or 0.0))
    return out


def how_sure(fits, trials: pd.DataFrame, budget_flops: float, chosen: tuple, max_tokens: int | None,
             serve_tokens: float = 0.0) -> dict:
    """``recipe --json``'s ``p_best``, ``runner_up``, ``decisive``, ``to_decide`` (analysis/confidence.py) and
    ``noise_sd`` (analysis/noise.py: the budget's own where measured, else the sweep's; None without replicates)."""
    sure = confidence(fits, budget_flops, chosen, max_tokens, serve_tokens)
    return sure.to_json() | {"noise_sd": noise_at(trials, budget_flops)}


def sure_lines(d: dict) -> list[str]:
    """The recipe's p_best, runner-up, noise and, when not decisive, what would decide it (``how_sure``)."""
    if "p_best" not in d:
        return []
    lines = []
    if d["p_best"] is not None:
        lines.append(f"p_best {d['p_best']:.0%} (share of bootstrap refits in which this cell is the best)")
    r = d.get("runner_up")
    if r:
        hp = (f" r={r['lora_rank']}" if r.get("lora_rank") is not None else
              f" f={r['trainable_fraction']:g}" if r.get("trainable_fraction") is not None else "")
        gap = f" (+{r['gap']:.2%})" if r.get("gap") is not None else ""
        lines.append(f"runner-up {r['method']}{hp} {model_label(r['model'])}{gap}")
    noise = d.get("noise_sd")
    lines.append(f"run-to-run noise {noise:.1%}" if noise is not None else "run-to-run noise not measured (seeds: 1)")
    todo = d.get("to_decide")
    if d.get("decisive") is False and todo:
        cells = ", ".join(
            f"{c['method']}{'' if c.get('lora_rank') is None else ' r=' + str(c['lora_rank'])}"
            f"{'' if c.get('trainable_fraction') is None else ' f=' + format(c['trainable_fraction'], 'g')} "
            f"{model_label(c['model'])}" for c in todo["replicate"])
        lines.append(f"not decisive: replicate {cells} ({todo['flops']:.3g} FLOP) to decide it")
    return lines


def _no_fit_recipe(usable: pd.DataFrame, budget_flops: float, why: str, serve_tokens: float | None) -> dict:
    """`recipe` where no surface can be fitted: the best completed trial at the nearest budget at or below C
    (analysis.recipe.empirical_budget), with ``source`` "empirical" and ``no_fit`` saying why. The contract's keys
    stay: ``predicted_loss`` is the trial's measured eval_loss, and ``predicted_loss_low`` / ``_high`` are null
    (one run has no interval)."""
    budget, at = empirical_budget(usable, budget_flops, serve_tokens or 0.0)
    emp = _empirical_at(at, budget)
    out = {"budget_flops": budget_flops, **{k: emp[k] for k in ("method", "model", "n_params", "tokens", "lora_rank",
                                                                 "trainable_fraction")},
           "predicted_loss": emp["eval_loss"], "predicted_loss_low": None, "predicted_loss_high": None,
           "per_method": {}, "empirical": emp, "family": emp["family"], "pooling": emp["pooling"],
           **{k: emp[k] for k in KNOB_KEYS if k in emp}}
    if serve_tokens is not None:
        row = at.set_index("trial_id").loc[emp["trial_id"]]
        out.update(serve_tokens=float(serve_tokens), train_flops=_num(float(row["flops"])),
                   serve_flops=_num(float(serve_flops(row["method"], float(row["n_params"]),
                                                      float(row["n_trainable"]), serve_tokens))))
    below = not np.isclose(budget, budget_flops, rtol=SAME_BUDGET_RTOL, atol=0)
    out["notes"] = [f"the best trial at {budget:.3g} FLOP, the largest budget at or below {budget_flops:.3g} with "
                    "trials"] if below else []
    out.update(source="empirical", no_fit=why)
    return out


def knob_lines(d: dict) -> list[str]:
    """The recipe's knobs for humans: the best lr always (when known), the others where they are not today's."""
    lines = [f"  lr              {d['lr']:.3g}"] if d.get("lr") is not None else []
    if d.get("negatives"):
        lines.append(f"  negatives       {d['negatives']} hard negatives per pair")
    if d.get("attention") not in (None, "causal"):
        lines.append(f"  attention       {d['attention']}")
    if d.get("query_instruction"):
        lines.append(f"  instruction     {d['query_instruction']!r} before each query")
    return lines


def format_recipe(d: dict) -> str:
    """A ``recipe_at`` document for humans."""
    def hp(e):
        if e.get("lora_rank") is not None:
            return f" (rank {e['lora_rank']})"
        if e.get("trainable_fraction") is not None:
            return f" (trainable fraction {e['trainable_fraction']:g})"
        return ""

    def interval(e):
        lo, hi = e.get("predicted_loss_low"), e.get("predicted_loss_high")
        return f"[{lo:.4f}, {hi:.4f}]" if lo is not None and hi is not None else "[no bootstrap]"

    if d.get("no_fit"):
        return _format_no_fit(d, hp)
    best = d["per_method"].get(d["method"], {})
    notes = [n for n, on in (("data-limited: spends less than the budget", best.get("data_limited")),
                             ("extrapolated beyond the sweep's trials", best.get("extrapolated"))) if on]
    if d.get("source") == "empirical":
        notes = ["the best trial at this grid budget answers: the fit is in doubt", *d.get("notes", [])]
    else:
        notes += d.get("notes", [])
    level = int(round(CI_LEVEL * 100))
    lines = [f"Compute-optimal recipe at {d['budget_flops']:.3g} FLOP",
             f"  method          {d['method']}{hp(d)}",
             f"  model           {model_label(d['model'])}  (N = {d['n_params']:,} non-embedding parameters)",
             f"  tokens          {d['tokens']:,}",
             *knob_lines(d),
             *([f"  serving         {d['serve_tokens']:.3g} tokens embedded: {d['serve_flops']:.3g} FLOP "
                f"(training {d['train_flops']:.3g} FLOP)"] if d.get("serve_tokens") is not None else []),
             f"  predicted loss  " + (f"{d['predicted_loss']:.4f}  {interval(d)} {level}% bootstrap CI"
                                      if d.get("predicted_loss") is not None else "— (no surface for this slice)")]
    lines += [f"  note            {n}" for n in notes]
    lines += [f"  how sure        {line}" for line in sure_lines(d)]
    table = [("method", "predicted loss", f"{level}% CI", "model", "tokens", "wins")]
    for method, e in d["per_method"].items():
        if "refused" in e:
            continue
        win = e.get("win_fraction")
        table.append((method + hp(e), f"{e['predicted_loss']:.4f}", interval(e), model_label(e["model"]),
                      f"{e['tokens']:.3g}", f"{win:.0%}" if win is not None else "—"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines += ["", "  per method (wins: share of bootstrap refits where the method is best)"]
    lines += ["    " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    lines += [f"    {m}: refused: {e['refused']}" for m, e in d["per_method"].items() if "refused" in e]
    emp = d.get("empirical")
    if emp:
        lines += ["", f"  empirical best trial at this budget: {emp['method']}{hp(emp)} {model_label(emp['model'])} "
                      f"tokens {emp['tokens']:,} loss {emp['eval_loss']:.4f} ({emp['trial_id']})"]
    return "\n".join(lines)


def _format_no_fit(d: dict, hp) -> str:
    """A ``recipe_at`` answer without a fitted surface (``_no_fit_recipe``): the best trial, said to be one."""
    emp = d["empirical"]
    lines = [f"Recipe at {d['budget_flops']:.3g} FLOP",
             f"  source          empirical (no fit: {d['no_fit']})",
             f"  method          {d['method']}{hp(d)}",
             f"  model           {model_label(d['model'])}  (N = {d['n_params']:,} non-embedding parameters)",
             f"  tokens          {d['tokens']:,}",
             *([f"  serving         {d['serve_tokens']:.3g} tokens embedded: {d['serve_flops']:.3g} FLOP "
                f"(training {d['train_flops']:.3g} FLOP)"] if d.get("serve_tokens") is not None else []),
             f"  eval loss       {emp['eval_loss']:.4f}  (measured: trial {emp['trial_id']} at "
             f"{emp['budget_flops']:.3g} FLOP; no interval without a fit)"]
    return "\n".join(lines + [f"  note            {n}" for n in d.get("notes", [])])


# ----------------------------------------------------------------------------------------------------------
# fit outputs

def _is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def _upload(local_dir: str, out_uri: str) -> None:
    """Copy ``local_dir`` to a remote directory. S3 objects go up as one PutObject each (allow_delayed_open):
    fewer requests for small files, and it works against S3 emulators whose multipart support lags."""
    uri = out_uri
    if uri.startswith("s3://") and "?" not in uri:
        uri += "?allow_delayed_open=true"
    fs, path = open_uri(uri)
    try:
        fs.create_dir(path, recursive=True)
        pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    except OSError as e:
        raise StoreError(f"{out_uri}: cannot write the analysis outputs ({e})") from e


def _write_outputs(a: Analysis, out: str) -> tuple[dict[str, str], list[str]]:
    """Every file into local directory ``out``; returns ({name: file name}, notes)."""
    from . import figures  # lazy: matplotlib only when figures are drawn

    files, notes = {}, []

    def save_figure(name, made):
        fig, points = made
        fig.savefig(os.path.join(out, f"{name}.png"))
        points.to_csv(os.path.join(out, f"{name}.csv"), index=False)
        files[f"{name}_png"], files[f"{name}_csv"] = f"{name}.png", f"{name}.csv"

    save_figure("figure1_frontier", figures.frontier_figure(a))
    save_figure("isoflop", figures.isoflop_figure(a))
    for method, name in ((m, methods.get(m).hparam) for m in methods.names() if methods.get(m).hparam):
        made = figures.hparam_figure(a, method)
        if made is None:
            notes.append(f"no {name} figure: the sweep has fewer than 2 {method} hyperparameter values")
        else:
            save_figure(name, made)
    tables = {"recipe.csv": recipe_table(a), "surfaces.csv": surfaces_table(a), "excluded.csv": a.exclusions.table}
    for name, df in tables.items():
        df.to_csv(os.path.join(out, name), index=False)
        files[name.replace(".", "_")] = name
    for name, text in (("recipe.md", f"# Recipe table: sweep `{a.sweep}`\n\n" + recipe_markdown(a)),
                       ("findings.md", findings_markdown(a))):
        with open(os.path.join(out, name), "w") as f:
            f.write(text)
        files[name.replace(".", "_")] = name
    return files, notes


def _summary(a: Analysis, sweep_uri: str, out_dir: str, files: dict[str, str], notes: list[str]) -> dict:
    join = (lambda n: f"{out_dir.rstrip('/')}/{n}") if _is_remote(out_dir) else (lambda n: os.path.join(out_dir, n))
    fr = a.optimum.frontier
    return {
        "sweep_uri": str(sweep_uri), "out_dir": str(out_dir),
        "files": {k: join(v) for k, v in files.items()},
        "n_trials": len(a.trials), "n_usable": len(a.usable), "excluded": a.exclusions.counts,
        "warnings": list(a.warnings) + notes,
        "max_tokens": a.max_tokens, "max_tokens_source": a.max_tokens_source,
        "frontier": [{"budget_flops": _num(r["budget_flops"]), "method": r["method"], "model": r["model"],
                      "eval_loss": _num(r["eval_loss"]), "trial_id": r["trial_id"]} for r in fr.to_dict("records")],
        "crossovers": [{"budget_flops": c.budget_flops, "below": c.below, "above": c.above, "kind": c.kind}
                       for c in a.trends.crossovers],
        "trends": {m: {"slope": t.slope, "intercept_log10": t.intercept, "r2": _num(t.r2), "n_points": t.n_points}
                   for m, t in a.trends.trends.items()},
        "surfaces": {s.label: {"E": s.E, "A": s.A, "alpha": s.alpha, "B": s.B, "beta": s.beta,
                               "n_points": s.n_points, "rmse_log": s.rmse_log, "r2_log": _num(s.r2_log),
                               "form": s.form, "shared_with": list(s.shared)}
                     for s in a.surfaces.surfaces.values()},
        "refused": {"trends": dict(a.trends.refused),
                    "surfaces": {slice_label(m, h, v): why for (m, h, v), why in a.surfaces.refused.items()}},
        "recipes": [{"budget_flops": b, "method": r.best.method, "model": r.best.model, "tokens": r.best.tokens,
                     "lora_rank": r.best.lora_rank, "trainable_fraction": r.best.trainable_fraction,
                     "predicted_loss": _num(r.best.predicted_loss), "on_grid": b in a.grid_budgets}
                    for b, r in a.recipes.items()],
    }


METRICS = ("eval_loss", "ndcg_at_10")  # what `fit --metric` may fit: the loss, or 1 - nDCG@10


def as_loss(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The trials with ``eval_loss`` replaced by the quantity to fit: 1 - nDCG@10 is an error rate that falls with
    compute like a loss (0 is perfect retrieval); trials without nDCG@10 become unusable, and say so."""
    if metric == "eval_loss":
        return trials
    if metric not in METRICS:
        raise FitError(f"--metric: {metric!r} is not one of {', '.join(METRICS)}")
    if metric not in trials or trials[metric].isna().all():
        raise FitError(f"--metric {metric}: no completed trial has {metric} (a sweep from before the retrieval "
                       "metrics, or without data.eval)")
    return trials.assign(eval_loss=1.0 - pd.to_numeric(trials[metric], errors="coerce"))


def write_fit_outputs(sweep_uri: str, out_dir: str, *, max_tokens: int | None = None, n_boot: int = N_BOOTSTRAP,
                      seed: int = 0, metric: str = "eval_loss") -> dict:
    """Fit the sweep and write its report to ``out_dir`` (local or remote). Returns the summary (also written
    as summary.json): file paths, warnings (excluded trials, refused fits), frontier, crossovers, fits.
    Raises StoreError / FitError (nothing usable) before writing anything."""
    trials = as_loss(load_trials(sweep_uri), metric)
    require_usable(trials, where=str(sweep_uri))  # the one-line FitError names the store, not just the sweep
    source = "argument" if max_tokens is not None else "measured"
    max_tokens = load_data_cap(sweep_uri) if max_tokens is None else max_tokens
    a = analyze(trials, sweep=_sweep_name(sweep_uri), max_tokens=max_tokens, max_tokens_source=source,
                n_boot=n_boot, seed=seed, metric=metric)
    remote = _is_remote(out_dir)
    if remote:  # write locally, then upload
        local = tempfile.mkdtemp(prefix="repurpose-fit-")
    else:
        local = os.path.abspath(str(out_dir).removeprefix("file://"))
    try:
        os.makedirs(local, exist_ok=True)
        files, notes = _write_outputs(a, local)
        files["summary_json"] = "summary.json"
        summary = _summary(a, sweep_uri, out_dir, files, notes) | {"metric": metric}
        with open(os.path.join(local, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=_num)
        if remote:
            _upload(local, out_dir)
    finally:
        if remote:
            shutil.rmtree(local, ignore_errors=True)
    return summary


__all__ = ["FitError", "StoreError", "format_recipe", "recipe_at", "write_fit_outputs"]
