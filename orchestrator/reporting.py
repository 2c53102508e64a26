"""`repurpose fit` and `repurpose recipe`: the CLI layer over analysis/ (which fits and never writes by itself
unless asked to by this layer)."""
from __future__ import annotations

import json
import sys

from orchestrator.store import Store


def max_tokens(store: Store) -> int | None:
    """Real tokens the training data holds (pairs x tokens per pair x max_epochs), as the driver measured it."""
    data = store.read_grid().get("data") or {}
    pairs, per_pair = data.get("train_pairs"), data.get("tokens_per_pair") or {}
    if not pairs or not per_pair:
        return None
    return int(pairs * max(per_pair.values()) * data.get("max_epochs", 1.0))


def fit_command(args) -> int:
    from analysis.report import write_fit_outputs

    store = Store(args.storage, args.name)
    out = args.out or f"{store.uri}/analysis"
    summary = write_fit_outputs(store.uri, out, max_tokens=max_tokens(store))
    for warning in summary.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {len(summary['files'])} files to {out}:")
    for name in summary["files"].values():
        print(f"  {name}")
    return 0


def recipe_command(args) -> int:
    from analysis.report import format_recipe, recipe_at

    store = Store(args.storage, args.name)
    recipe = recipe_at(store.uri, args.budget, max_tokens=max_tokens(store))
    print(json.dumps(recipe) if args.json else format_recipe(recipe))
    return 0
