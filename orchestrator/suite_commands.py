"""`repurpose suite build` and `repurpose suite list`: the offline mini suite (workers/suite/) from the CLI."""
from __future__ import annotations

import json
import os

from workers.suite.cache import build_suite, demo_data, list_suite, suite_dir
from workers.suite.models import SUITES, SuiteModel


def build_command(args) -> int:
    """`repurpose suite build [--out DIR]`: builds (or reuses) every model of both families and the demo's pairs."""
    data = demo_data(args.out)
    models = [m for family in SUITES for m in build_suite(args.out, family=family)]
    print(f"pairs: {data['n_train']:,} train, {data['n_eval']:,} eval -> {os.path.dirname(data['train'])}")
    print(_table(models))
    return 0


def list_command(args) -> int:
    """`repurpose suite list [--json]`: the models already built; builds nothing."""
    models = [m for family in SUITES for m in list_suite(getattr(args, "out", None), family=family)]
    if args.json:
        print(json.dumps([m.__dict__ for m in models]))
    elif not models:
        print(f"no suite models built under {suite_dir(getattr(args, 'out', None))} (`repurpose suite build`)")
    else:
        print(_table(models))
    return 0


def _table(models: list[SuiteModel]) -> str:
    return "\n".join(f"{m.name:<20} N={m.n_params:>10,}  layers {m.layers}  hidden {m.hidden}  "
                     f"pretrain loss {m.pretrain_loss:.2f}  {m.path}" for m in models)
