"""`repurpose prepare GRID.yaml`: the token caches a grid's trials read (workers/token_cache.py), built or reused.

One cache per distinct (tokenizer, data, max_length): the grid has one data section and one max_length, so one
per distinct tokenizer.json among its models (the eight Pythia models share one). ``submit`` calls
``caches_for_grid`` inside its Ray session before the trials start and gives each trial its model's cache URI.

The driver stays light: the cache's modules (orchestrator/cache_build.py, workers/token_cache.py) are imported only
here, inside functions, and building a cache imports no torch (its tokenizer is ``workers.pair_files.load_tokenizer``'s, torch-free).
"""
from __future__ import annotations

import json
import sys

from core.errors import UserError


def caches_for_grid(grid, storage_uri: str, *, address: str | None = None, log=None) -> dict[str, dict]:
    """model (as the grid names it) -> {"uri", "key", "pairs", "real_tokens", "bad_lines", "built"}, each cache
    built on the initialised Ray (else ``address`` / $RAY_ADDRESS / a local one) when it is not there yet."""
    from orchestrator import cache_build
    from workers.pair_files import load_tokenizer

    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    train = grid.resolve(grid.data.train)
    eval_ = grid.resolve(grid.data.eval) if grid.data.eval else None
    by_path: dict[str, dict] = {}
    out = {}
    for model in grid.models:
        path = grid.model_path(model)
        for texts in cache_texts(grid):
            if (path, texts) not in by_path:
                try:
                    tokenizer = load_tokenizer(path)
                except Exception as e:  # noqa: BLE001 -- no tokenizer there (offline hub, no tokenizer files)
                    raise UserError(f"{model}: cannot load its tokenizer ({' '.join(str(e).split())[:200]})") from None
                built: list[str] = []
                uri, manifest = cache_build.ensure(storage_uri, train_uri=train, eval_uri=eval_, tokenizer_path=path,
                                                   tokenizer=tokenizer, max_length=grid.train.max_length,
                                                   address=address, log=lambda line: (built.append(line), log(line)),
                                                   **dict(zip(TEXT_KNOBS, texts)))
                split = manifest["splits"]["train"]
                by_path[path, texts] = {"uri": uri, "key": manifest["key"], "pairs": split["pairs"],
                                        "real_tokens": split["real_tokens"], "bad_lines": split["bad_lines"],
                                        "built": bool(built)}
            # the first text setting under the model's name (what `prepare` lists), every one under "variants"
            entry = out.setdefault(model, {**by_path[path, texts], "variants": {}})
            entry["variants"][texts] = by_path[path, texts]
    return out


# The knobs that change the texts a cache holds (its key and content): a cache per setting and tokenizer.
TEXT_KNOBS = ("query_instruction", "hard_negatives")


def cache_texts(grid) -> list[tuple]:
    """The grid's settings of TEXT_KNOBS, each a tuple in that order (the negatives are one setting per grid)."""
    return [(q, grid.train.hard_negatives()) for q in grid.train.query_instruction]


def trial_cache(caches: dict, model: str, spec) -> str:
    """The URI of the cache a trial reads: its model's, for its setting of TEXT_KNOBS."""
    return caches[model]["variants"][tuple(getattr(spec, k) for k in TEXT_KNOBS)]["uri"]


def prepare_command(args) -> int:
    """args: grid, storage, address, json."""
    from orchestrator.grid import load_grid

    grid = load_grid(args.grid)
    caches = caches_for_grid(grid, args.storage, address=args.address)
    rows: dict[str, dict] = {}
    for model, c in caches.items():
        for v in c["variants"].values():
            rows.setdefault(v["uri"], {**v, "models": []})["models"].append(model)
    if getattr(args, "json", False):
        print(json.dumps({"caches": list(rows.values())}))
        return 0
    for r in rows.values():
        print(f"{r['uri']}  {'built' if r['built'] else 'reused'}: {r['pairs']:,} pairs, {r['real_tokens']:,} real "
              f"tokens, {r['bad_lines']} bad lines; models: {', '.join(r['models'])}")
    return 0
