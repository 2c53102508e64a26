"""`repurpose fit` and `repurpose recipe`: the CLI layer over analysis/ (which fits and never writes by itself
unless asked to by this layer). The data cap both use is the sweep's own (analysis.load.load_data_cap), the same
one `repurpose demo` uses."""
from __future__ import annotations

import json
import sys

from orchestrator.store import Store


def fit_command(args) -> int:
    from analysis.report import write_fit_outputs

    store = Store(args.storage, args.name)
    store.read_grid()  # an unknown sweep is one line naming the store
    metric = getattr(args, "metric", "eval_loss")
    out = args.out or f"{store.uri}/analysis" + ("" if metric == "eval_loss" else f"/{metric}")
    summary = write_fit_outputs(store.uri, out, metric=metric)
    for warning in summary.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {len(summary['files'])} files to {out}:")
    for name in summary["files"].values():
        print(f"  {name}")
    return 0


def recipe_command(args) -> int:
    from analysis.report import format_recipe, recipe_at

    store = Store(args.storage, args.name)
    store.read_grid()
    recipe = recipe_at(store.uri, args.budget, serve_tokens=getattr(args, "serve_tokens", None))
    print(json.dumps(recipe) if args.json else format_recipe(recipe))
    return 0


def replay_command(args) -> int:
    """`repurpose replay NAME --strategy adaptive [--json]`: on a sweep that ran every cell, the cells the adaptive
    strategy would have run (its decisions re-made rung by rung from those cells' results alone), its FLOP
    fraction, and its recipe beside the full grid's at every grid budget."""
    from analysis.adaptive import PRUNED_PREFIX, replay
    from analysis.load import load_trials
    from core.errors import UserError
    from orchestrator.driver import stored_grid

    store = Store(args.storage, args.name)
    grid = stored_grid(store, references=False)  # the results are in the store: the data need not be reachable
    trials = load_trials(store.uri)
    unfinished = trials[trials["status"].isin(["pending", "running"])]
    pruned = trials[trials["reason"].fillna("").str.startswith(PRUNED_PREFIX)]
    if len(unfinished) or len(pruned):
        raise UserError(f"{store.uri}: replay needs a sweep that ran every cell ({len(unfinished)} pending or "
                        f"running, {len(pruned)} pruned): `repurpose submit` it with strategy: grid first")
    result = replay(trials, grid.adaptive.config())
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    chosen = trials[trials["trial_id"].isin(result.trial_ids)]
    print(render_replay(args.name, result, _predicted(trials), _predicted(chosen)))
    return 0


def _predicted(trials) -> dict[float, float]:
    """budget -> the fitted recipe's predicted loss from these trials (point fits: no bootstrap)."""
    from analysis.fit import FitError, fit_surfaces, split_usable
    from analysis.recipe import compute_recipe

    usable, _ = split_usable(trials)
    if usable.empty:
        return {}
    fits = fit_surfaces(usable, n_boot=0)
    out = {}
    for budget in sorted(set(trials["budget_flops"].astype(float))):
        try:
            out[budget] = compute_recipe(fits, budget).best.predicted_loss
        except FitError:
            pass
    return out


def render_replay(name: str, result, full_pred: dict, adaptive_pred: dict) -> str:
    from analysis.findings import model_label

    def cell(pick, pred) -> str:
        if pick is None:
            return "—"
        fitted = f"{pred:.4f}" if pred is not None else "—"
        return f"{pick.method} {model_label(pick.model)} {pick.eval_loss:.4f} (fit {fitted})"

    lines = [f"sweep {name}: the adaptive strategy would have run {result.trials_run} trials, "
             f"{result.flops_fraction:.1%} of the grid's FLOP", "",
             f"{'budget':>9}  {'full grid: best trial (fitted recipe loss)':<52}  adaptive"]
    for b in result.per_budget:
        lines.append(f"{b.budget_flops:>9.2g}  {cell(b.full, full_pred.get(b.budget_flops)):<52}  "
                     f"{cell(b.adaptive, adaptive_pred.get(b.budget_flops))}")
    ids = list(result.trial_ids)
    lines += ["", f"cells it would have run ({len(ids)}):"]
    lines += ["  " + " ".join(ids[i:i + 6]) for i in range(0, len(ids), 6)]
    return "\n".join(lines)
