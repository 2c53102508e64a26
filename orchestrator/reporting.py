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
