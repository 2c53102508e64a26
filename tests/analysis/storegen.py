"""Synthetic sweeps from known loss surfaces, written as a real store (schema.py) for the analysis tests.

Truth per (method, slice): L(N, D) = E + A/N^alpha + B/D^beta with N = the trial's ``n_params`` (LoRA adapters
included, as the fitter sees it) and D = floor(budget / cost-per-token), capped by the data (``max_tokens``).
The planner's behaviour is mimicked: cells needing more tokens than the data hold are ``skipped``.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core.models import PYTHIA_SHAPES, model_shape
from analysis.fit import Law
from analysis.schema import GRID_FILE, METRICS_DIR, METRICS_SCHEMA, TRIALS_FILE, TRIALS_SCHEMA

# Pythia (docs/study.md): non-embedding N, hidden size, layers
PYTHIA = {f"EleutherAI/pythia-{size}": (model_shape(f"EleutherAI/pythia-{size}").n_params(), d, layers)
          for size, (d, layers, _) in PYTHIA_SHAPES.items()}
BUDGETS = (1.5e15, 6e15, 2.4e16, 9.6e16, 3.8e17, 1.5e18)
TOKENS_PER_STEP = 1024 * 78  # a batch of 1024 pairs at ~78 tokens (docs/study.md)


# Paper-like truth: full learns fastest per token (small B), LoRA has the lower floor, so full wins small
# budgets and LoRA large ones; freeze is between; bias-only is worst everywhere. Higher LoRA rank helps a bit.
LAWS = {
    "full": Law(E=0.50, A=40.0, alpha=0.32, B=60.0, beta=0.28),
    "freeze": Law(E=0.46, A=40.0, alpha=0.32, B=90.0, beta=0.28),
    "lora": Law(E=0.40, A=40.0, alpha=0.32, B=100.0, beta=0.28),
    "bias": Law(E=0.70, A=50.0, alpha=0.30, B=150.0, beta=0.27),
}
# A second truth with other exponents (data-hungrier: beta > alpha) and the crossover elsewhere.
LAWS_B = {
    "full": Law(E=0.30, A=25.0, alpha=0.25, B=400.0, beta=0.36),
    "freeze": Law(E=0.285, A=25.0, alpha=0.25, B=560.0, beta=0.36),
    "lora": Law(E=0.15, A=25.0, alpha=0.25, B=650.0, beta=0.36),
    "bias": Law(E=0.45, A=30.0, alpha=0.24, B=900.0, beta=0.34),
}
SLICES = {"full": (None,), "freeze": (0.5,), "lora": (8, 128), "bias": (None,)}


def slice_law(laws: dict, method: str, hparam) -> Law:
    law = laws[method]
    if method == "lora" and hparam is not None:  # rank 8 learns 15 % slower per token than rank >= 128
        return replace(law, B=law.B * (1 + 0.15 * math.sqrt(8 / hparam) * (hparam < 128)))
    if method == "freeze" and hparam is not None:  # training fewer blocks learns slower
        return replace(law, B=law.B * (0.5 / hparam) ** 0.3)
    return law


def params(method: str, hparam, model: str) -> tuple[int, int]:
    """(N, N_tr) as the workers count them: LoRA adapters (16 d r per block) join N."""
    n, d, layers = PYTHIA[model]
    if method == "full":
        return n, n
    if method == "freeze":
        return n, int(round(n * math.ceil(hparam * layers - 1e-9) / layers))
    if method == "lora":
        adapters = 16 * d * int(hparam) * layers
        return n + adapters, adapters
    if method == "bias":
        return n, 15 * d * layers
    raise ValueError(method)


def cost(method: str, n: int, ntr: int) -> float:
    return {"full": 6.0 * n, "freeze": 2.0 * n + 4.0 * ntr}.get(method, 4.0 * n + 2.0 * ntr)


def make_trials(*, laws=LAWS, slices=SLICES, models=tuple(PYTHIA)[:6], budgets=BUDGETS, noise=0.01, seed=0,
                drop=0.0, fail=0.0, nan=0, max_tokens=None, min_steps=1, sweep="synthetic") -> pd.DataFrame:
    """One row per trial (TRIALS_SCHEMA); ``drop`` of the cells vanish, ``fail`` become failed, ``nan`` completed
    rows get a NaN eval_loss; cells with fewer than ``min_steps`` batches or more tokens than ``max_tokens``
    are skipped."""
    rng = np.random.default_rng(seed)
    rows = []
    for method, hparams in slices.items():
        for h in hparams:
            law = slice_law(laws, method, h)
            for model in models:
                n, ntr = params(method, h, model)
                c = cost(method, n, ntr)
                for budget in budgets:
                    tokens = int(budget // c)
                    row = dict(sweep=sweep, trial_id=f"{method}-{h}-{model.split('-')[-1]}-{budget:.2g}",
                               model=model, method=method, lora_rank=int(h) if method == "lora" else None,
                               trainable_fraction=h if method == "freeze" else None, budget_flops=budget,
                               n_params=n, n_trainable=ntr, status="completed", reason=None, tokens=tokens,
                               steps=max(1, tokens // TOKENS_PER_STEP), flops=tokens * c, hardware_flops=tokens * c,
                               eval_loss=float(law.loss(n, tokens) * math.exp(noise * rng.standard_normal())),
                               train_loss=None, wall_s=1.0, planned_tokens=tokens)
                    if tokens < min_steps * TOKENS_PER_STEP:
                        row.update(status="skipped", reason="degenerate: fewer than one batch", tokens=0, steps=0,
                                   flops=0.0, hardware_flops=0.0, eval_loss=None)
                    elif max_tokens is not None and tokens > max_tokens:
                        row.update(status="skipped", reason="needs more tokens than the data hold", tokens=0,
                                   steps=0, flops=0.0, hardware_flops=0.0, eval_loss=None)
                    rows.append(row)
    df = pd.DataFrame(rows)
    done = np.flatnonzero(df["status"] == "completed")
    if drop:
        df = df.drop(index=rng.choice(done, int(drop * len(done)), replace=False)).reset_index(drop=True)
        done = np.flatnonzero(df["status"] == "completed")
    if fail:
        idx = rng.choice(done, int(fail * len(done)), replace=False)
        df.loc[idx, ["status", "reason", "eval_loss"]] = ["failed", "CUDA out of memory", None]
        done = np.flatnonzero(df["status"] == "completed")
    if nan:
        df.loc[rng.choice(done, nan, replace=False), "eval_loss"] = float("nan")
    return df


def to_table(df: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    cols = [c for c in schema.names if c in df.columns]
    return pa.Table.from_pandas(df[cols], schema=pa.schema([schema.field(c) for c in cols]), preserve_index=False)


def write_store(root, trials: pd.DataFrame, *, sweep: str = "synthetic", metrics: bool = True) -> str:
    """Write ``<root>/<sweep>/`` like the driver: trials.parquet, metrics/<trial_id>.parquet, grid.yaml."""
    base = root / sweep
    (base / METRICS_DIR).mkdir(parents=True, exist_ok=True)
    (base / GRID_FILE).write_text(f"name: {sweep}\n")
    pq.write_table(to_table(trials, TRIALS_SCHEMA), base / TRIALS_FILE)
    if metrics:
        for row in trials.itertuples():
            if row.status != "completed":
                continue
            steps = np.arange(1, 4)
            m = pd.DataFrame(dict(sweep=sweep, trial_id=row.trial_id, step=steps, tokens=steps * 1000,
                                  flops=steps * 1e12, train_loss=2.0 / steps, lr=1e-4, wall_s=steps * 0.1,
                                  eval_loss=[None, None, row.eval_loss], tokens_per_s=1e4))
            pq.write_table(to_table(m, METRICS_SCHEMA), base / METRICS_DIR / f"{row.trial_id}.parquet")
    return str(base)


def true_recipe(budget: float, *, laws=LAWS, slices=SLICES, models=tuple(PYTHIA)[:6], max_tokens=None):
    """Sorted [(true loss, method, hparam, model, tokens)] over every candidate at ``budget``."""
    out = []
    for method, hparams in slices.items():
        for h in hparams:
            law = slice_law(laws, method, h)
            for model in models:
                n, ntr = params(method, h, model)
                tokens = int(budget // cost(method, n, ntr))
                if max_tokens is not None:
                    tokens = min(tokens, max_tokens)
                if tokens >= 1:
                    out.append((float(law.loss(n, tokens)), method, h, model, tokens))
    return sorted(out)


def true_method_curve(budgets, *, laws=LAWS, slices=SLICES, models=tuple(PYTHIA)[:6]):
    """{method: optimal true loss per budget} (min over slices and models)."""
    curves = {}
    for method in slices:
        sub = {method: slices[method]}
        curves[method] = np.array([true_recipe(b, laws=laws, slices=sub, models=models)[0][0] for b in budgets])
    return curves
