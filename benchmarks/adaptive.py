"""The adaptive sweep on synthetic full stores: FLOP fraction and recipe agreement. No Ray.

    python benchmarks/adaptive.py [--seeds 20] [--jobs 2] [--json] [--margin .. --neighbours .. --full-rungs ..]

A paper-shaped grid (docs/study.md): 8 Pythia sizes x {full, freeze f=0.25/0.5, bias, LoRA r=8..2048}
x 6 budgets 1.5e15..1.5e18 (x4). Each cell's true loss comes from a ground-truth surface per method slice,
L = E + A/N^alpha + B/D^beta (N and N_tr as the store counts them, LoRA adapters included: the N of docs/study.md's
law, which every fit uses, so the truth is a surface the analysis can represent; D = budget / cost per token),
times log-normal noise. Cells the planner
skips (fewer than 10 optimizer steps of 1024 pairs x 78 tokens, or more tokens than the data hold) are skipped
rows. ``analysis.adaptive.replay`` then runs the policy on each store; per (truth, noise) the script reports
the median and worst FLOP fraction, how often the adaptive recipe equals the full grid's at every budget (same
method, a model within one size step, empirical loss within 1 %), and whether the noise-free store ever has
its top-budget optimum pruned. Targets: FLOP fraction <= 0.25, agreement >= 95 % of seeds at 0.5 %
noise, the noise-free top-budget optimum never pruned.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from analysis.adaptive import AdaptiveConfig, ReplayResult, replay, size_index  # noqa: E402
from analysis.confidence import confidence, supported  # noqa: E402
from analysis.fit import FitError, Law, cost_per_token, fit_surfaces, hparam_of, split_usable  # noqa: E402
from analysis.recipe import compute_recipe  # noqa: E402
from core import methods  # noqa: E402
from core.models import PYTHIA_SHAPES, model_shape  # noqa: E402

# The study's Pythia suite, shaped by core.models (its table), N and N_tr as the store counts them (core.methods).
PYTHIA = {f"EleutherAI/pythia-{size}": model_shape(f"EleutherAI/pythia-{size}") for size in PYTHIA_SHAPES}
BUDGETS = (1.5e15, 6e15, 2.4e16, 9.6e16, 3.8e17, 1.5e18)  # docs/study.md, x4 steps
SLICES = {"full": (None,), "freeze": (0.25, 0.5), "bias": (None,), "lora": (8, 32, 128, 512, 2048)}  # grids/paper.yaml
TOKENS_PER_STEP = 1024 * 78  # a batch of 1024 pairs at the authors' 78 tokens per pair (docs/study.md)
MIN_STEPS = 10  # grids/paper.yaml plan.min_steps
# No data limit: `repurpose plan grids/paper.yaml` without the data at hand checks min_steps only and finds 391
# runnable cells of 432 (the paper-shaped grid's count); this grid skips the same 41.
DATA_TOKENS = None
NOISES = (0.0, 0.002, 0.005, 0.01, 0.02)  # sigma of the log-normal noise on the loss; 0 = the noise-free store


@dataclass(frozen=True)
class Truth:
    """Ground truth: a Law per method; LoRA's B grows by ``rank_slope`` per octave away from rank 128 (the
    paper's best), freeze's B by (0.5 / f)^``freeze_power`` (fewer trained blocks learn slower per token)."""

    name: str
    laws: dict
    rank_slope: float
    freeze_power: float = 0.3

    def law(self, method: str, hparam) -> Law:
        law = self.laws[method]
        effect = {"lora": self._rank_effect, "freeze": self._fraction_effect}.get(method)
        return law if effect is None else replace(law, B=law.B * effect(hparam))

    def _rank_effect(self, rank) -> float:
        return 1 + self.rank_slope * abs(math.log2(rank / 128))

    def _fraction_effect(self, fraction) -> float:
        return (0.5 / fraction) ** self.freeze_power


# Three shapes of ground truth (`--truths` prints each one's optimum per budget). Bias-only is 20-30 % worse
# everywhere; the optimum model grows from 70m at 1.5e15 to 1b at 1.5e18.
BIAS_A = Law(0.56, 150.0, 0.32, 110.0, 0.28)
TRUTHS = (
    # full wins the small budgets and LoRA the large ones, crossing between 9.6e16 and 3.8e17 (full, freeze and
    # LoRA within 0.4 % at 9.6e16); LoRA's rank matters little (+0.3 % of B per octave from rank 128; the ranks'
    # best cells span 2-5 %, high ranks' adapters counted in N)
    Truth("mid-cross, flat rank", {
        "full": Law(0.50, 150.0, 0.32, 60.0, 0.28), "freeze": Law(0.47, 150.0, 0.32, 72.0, 0.28),
        "bias": BIAS_A, "lora": Law(0.3991, 150.0, 0.32, 85.0, 0.28)}, 0.003),
    # other exponents (beta > alpha); full wins the first budget by 0.9 %, LoRA takes over at the second (2.0 %
    # ahead, 1.1-4.0 % above) and its rank matters (+8 % of B per octave: rank 8 is 32 % slower per token than 128)
    Truth("early-cross, steep rank", {
        "full": Law(0.30, 100.0, 0.25, 400.0, 0.36), "freeze": Law(0.29, 100.0, 0.25, 520.0, 0.36),
        "bias": Law(0.36, 100.0, 0.25, 700.0, 0.36), "lora": Law(0.2413, 100.0, 0.25, 470.0, 0.36)}, 0.08),
    # full wins every budget but the top one, where LoRA (low floor, slow start) overtakes it by 1.1 %; LoRA is
    # 12 % behind at the first budget, 2.2 % at the fifth; freeze trails full by 0.3-1.4 %
    Truth("late winner", {
        "full": Law(0.50, 150.0, 0.32, 60.0, 0.28), "freeze": Law(0.50, 150.0, 0.32, 68.0, 0.28),
        "bias": BIAS_A, "lora": Law(0.3743, 150.0, 0.32, 100.0, 0.28)}, 0.02),
)


# ----------------------------------------------------------------------------------------------------------
# The synthetic full store

def params(method: str, hparam, model: str) -> tuple[int, int]:
    """(N, N_tr) as the store counts them (core.methods.param_counts on the model's shape)."""
    fields = methods.get(method).hparam_fields(hparam)
    return methods.param_counts(PYTHIA[model], method, fields["lora_rank"], fields["trainable_fraction"])


def grid_cells() -> pd.DataFrame:
    """Every cell of the paper-shaped grid with its tokens and whether the planner would skip it."""
    rows = []
    for method, hparams in SLICES.items():
        for h in hparams:
            for model in PYTHIA:
                n, ntr = params(method, h, model)
                cost = float(cost_per_token(method, n, ntr))
                for budget in BUDGETS:
                    tokens = int(budget // cost)
                    skip = ("fewer than plan.min_steps optimizer steps" if tokens < MIN_STEPS * TOKENS_PER_STEP
                            else "more tokens than one pass over the data" if DATA_TOKENS and tokens > DATA_TOKENS
                            else None)
                    rows.append(dict(
                        trial_id=f"{method}-{'' if h is None else h}-{model.split('-')[-1]}-{budget:.2g}",
                        model=model, method=method, **methods.get(method).hparam_fields(h), budget_flops=budget, n_params=n,
                        n_trainable=ntr, tokens=tokens, flops=tokens * cost, hparam=h, skip=skip))
    return pd.DataFrame(rows)


def true_loss(truth: Truth, cells: pd.DataFrame) -> np.ndarray:
    """The truth's loss of each cell, at N as the store counts it (``params``: LoRA's adapters included, the N of
    docs/study.md's law and of every fit), so the truth lies in the family of surfaces the analysis fits."""
    out = np.empty(len(cells))
    for i, (method, h, model, tokens) in enumerate(zip(cells["method"], cells["hparam"], cells["model"],
                                                        cells["tokens"])):
        h = None if pd.isna(h) else h
        out[i] = truth.law(method, h).loss(params(method, h, model)[0], max(tokens, 1))
    return out


def make_store(truth: Truth, noise: float, seed: int, cells: pd.DataFrame | None = None) -> pd.DataFrame:
    """A full store (store columns): every runnable cell completed with eval_loss = truth x exp(noise z)."""
    cells = grid_cells() if cells is None else cells
    rng = np.random.default_rng(seed)
    loss = true_loss(truth, cells) * np.exp(noise * rng.standard_normal(len(cells)))
    skipped = cells["skip"].notna().to_numpy()
    store = cells.drop(columns=["hparam", "skip"]).assign(
        sweep="synthetic", status=np.where(skipped, "skipped", "completed"), reason=cells["skip"],
        eval_loss=np.where(skipped, np.nan, loss))
    store.loc[skipped, ["tokens", "flops"]] = [0, 0.0]
    return store


# ----------------------------------------------------------------------------------------------------------
# Scoring one replay

def score(store: pd.DataFrame, result: ReplayResult) -> dict:
    sizes = size_index(store)
    agree = [b.agrees(sizes) for b in result.per_budget]
    top = result.per_budget[-1]
    return {"flops_fraction": result.flops_fraction, "trials_run": result.trials_run,
            "agree_all": all(agree), "agree_per_budget": agree,
            "top_optimum_kept": top.full is not None and top.full.trial_id in set(result.trial_ids)}


def run_one(job) -> dict:
    truth_i, noise, seed, config = job
    store = make_store(TRUTHS[truth_i], noise, seed)
    return {"truth": TRUTHS[truth_i].name, "noise": noise, "seed": seed, **score(store, replay(store, config))}


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    keys = sorted({(r["truth"], r["noise"]) for r in rows}, key=lambda k: ([t.name for t in TRUTHS].index(k[0]), k[1]))
    for truth, noise in keys:
        group = [r for r in rows if r["truth"] == truth and r["noise"] == noise]
        fractions = [r["flops_fraction"] for r in group]
        out.append({"truth": truth, "noise": noise, "seeds": len(group),
                    "flops_fraction_median": statistics.median(fractions), "flops_fraction_worst": max(fractions),
                    "trials_run_median": statistics.median(r["trials_run"] for r in group),
                    "agreement": sum(r["agree_all"] for r in group) / len(group),
                    "top_optimum_kept": sum(r["top_optimum_kept"] for r in group) / len(group)})
    return out


def table(summary: list[dict]) -> str:
    lines = [f"{'truth':<24} {'noise':>6} {'seeds':>5} {'FLOP med':>8} {'worst':>6} {'trials':>6} "
             f"{'agree':>6} {'top kept':>8}"]
    for s in summary:
        lines.append(f"{s['truth']:<24} {s['noise']:>6.1%} {s['seeds']:>5} {s['flops_fraction_median']:>8.3f} "
                     f"{s['flops_fraction_worst']:>6.3f} {s['trials_run_median']:>6.0f} {s['agreement']:>6.0%} "
                     f"{s['top_optimum_kept']:>8.0%}")
    return "\n".join(lines)


def truths_report() -> str:
    """Per truth: the true best (method, model) at each budget over the runnable cells."""
    cells = grid_cells()
    runnable = cells[cells["skip"].isna()].reset_index(drop=True)
    lines = [f"runnable cells: {len(runnable)} of {len(cells)}"]
    for truth in TRUTHS:
        loss = true_loss(truth, runnable)
        frame = runnable.assign(loss=loss)
        picks = []
        for budget, group in frame.groupby("budget_flops"):
            per_method = group.groupby("method")["loss"].min().sort_values()
            best = group.loc[group["loss"].idxmin()]
            gap = per_method.iloc[1] / per_method.iloc[0] - 1
            lora = group[group["method"] == methods.LORA.name].groupby("lora_rank")["loss"].min()
            picks.append(f"{budget:.1e}: {best['trial_id']} {best['loss']:.3f} (2nd {per_method.index[1]} "
                         f"+{gap:.1%}; LoRA ranks span {lora.max() / lora.min() - 1:.1%})")
        lines.append(f"{truth.name}:\n  " + "\n  ".join(picks))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# An answer you can trust: replicates drawn on demand, regret and p_best against the truth

TRUST_NOISES = (0.01, 0.02)
# the first two rungs run every cell 4 times (0.4 % of the grid's FLOP per run): the noise and the small budgets'
# fits measured sharply; later rungs give a close cell one more run (benchmarks/README.md)
# and at the last rung, while the recipe is not settled, its choice and strongest rival run within 0.30 of the grid's
# FLOP in all (``decide_flops``)
TRUST_CONFIG = AdaptiveConfig(noise_rungs=2, noise_runs=4, decide_flops=0.30)
REGRET_TARGET = 0.005  # the recipe's true loss within 0.5 % of the true optimum
TRUST_N_BOOT = 40  # bootstrap refits behind p_best (the reports use fit.N_BOOTSTRAP = 100)


def replicate_draw(truth: Truth, noise: float, seed: int, drawn: list):
    """Replicate r of a cell: the truth times its own log-normal noise, seeded by (seed, cell, r), so every
    replay of a store draws the same runs; each drawn row is appended to ``drawn``."""
    def draw(first: dict, replicate: int) -> dict:
        rng = np.random.default_rng([seed, zlib.crc32(first["trial_id"].encode()), replicate])
        frame = pd.DataFrame([first]).assign(hparam=[hparam_of(first)])
        loss = float(true_loss(truth, frame)[0]) * math.exp(noise * rng.standard_normal())
        row = first | {"trial_id": f"{first['trial_id']}~{replicate}", "replicate": replicate, "eval_loss": loss}
        drawn.append(row)
        return row
    return draw


def recipe_choices(trials: pd.DataFrame, n_boot: int = TRUST_N_BOOT) -> dict:
    """Budget -> (method, hparam, model, p_best) of the fitted recipe (`repurpose recipe`'s fit answer) on
    ``trials``; budgets without a recipe are left out."""
    usable, _ = split_usable(trials)
    fits = fit_surfaces(usable, n_boot=n_boot)
    out = {}
    for budget in BUDGETS:
        here = supported(fits, budget)  # the slices that ran at this budget (analysis/confidence.py)
        try:
            best = compute_recipe(here, budget).best
        except FitError:
            continue
        sure = confidence(here, budget, (best.method, best.hparam, best.variant, best.model))
        out[budget] = (best.method, best.hparam, best.model, sure.p_best)
    return out


def _true_at(truth: Truth, method: str, hparam, model: str, budget: float) -> float:
    n, ntr = params(method, hparam, model)
    tokens = int(budget // float(cost_per_token(method, n, ntr)))
    frame = pd.DataFrame([{"method": method, "hparam": hparam, "model": model, "tokens": tokens}])
    return float(true_loss(truth, frame)[0])


def _judged(truth: Truth, cells: pd.DataFrame, choices: dict) -> list[dict]:
    """Per budget: the choice's regret against the true optimum over the runnable cells, and whether it is it."""
    runnable = cells[cells["skip"].isna()]
    truth_loss = runnable.assign(loss=true_loss(truth, runnable))
    rows = []
    for budget in BUDGETS:
        at = truth_loss[truth_loss["budget_flops"] == budget]
        optimum = float(at["loss"].min())
        if budget not in choices:
            rows.append({"budget": budget, "regret": math.inf, "best": False, "p_best": None})
            continue
        method, h, model, p_best = choices[budget]
        loss = _true_at(truth, method, None if h is None or pd.isna(h) else h, model, budget)
        rows.append({"budget": budget, "regret": loss / optimum - 1, "best": loss <= optimum * (1 + 1e-12),
                     "p_best": p_best})
    return rows


def trust_one(job) -> dict:
    truth_i, noise, seed, config = job
    truth, cells = TRUTHS[truth_i], grid_cells()
    store = make_store(truth, noise, seed, cells).assign(replicate=0)
    drawn: list = []
    start = time.perf_counter()
    result = replay(store, config, draw=replicate_draw(truth, noise, seed, drawn))
    replay_s = time.perf_counter() - start
    ran = pd.concat([store[store["trial_id"].isin(result.trial_ids)], pd.DataFrame(drawn)], ignore_index=True)
    adaptive = _judged(truth, cells, recipe_choices(ran))
    grid = _judged(truth, cells, recipe_choices(store))
    empirical = {b.budget_flops: (b.full.method, None, b.full.model, None) for b in result.per_budget if b.full}
    for b in result.per_budget:  # the one-seed grid's best trial: its hparam from its row
        if b.full:
            row = store[store["trial_id"] == b.full.trial_id].iloc[0]
            empirical[b.budget_flops] = (row["method"], hparam_of(row), row["model"], None)
    grid_best_trial = _judged(truth, cells, empirical)
    return {"truth": truth.name, "noise": noise, "seed": seed, "config": dataclasses.asdict(config),
            "flops_fraction": result.flops_fraction,
            "replicates": len(drawn), "replay_s": replay_s, "adaptive": adaptive, "grid_fit": grid,
            "grid_trial": grid_best_trial}


def summarise_rows(path: str) -> str:
    """The table of the JSON lines ``--rows`` wrote (a run stopped early still reports what it finished)."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return f"{trust_table(trust_summary(rows))}\n{pooled_line(trust_pooled(rows))}"


def trust_pooled(rows: list[dict]) -> dict:
    """Over every store: the FLOP fraction's median and worst, p_best's calibration (of the adaptive choices
    reported with p_best >= 0.8, the share truly best) and, per kind, how many single budget choices have regret
    within the target."""
    sure = [b for r in rows for b in r["adaptive"] if b["p_best"] is not None and b["p_best"] >= 0.8]
    fractions = [r["flops_fraction"] for r in rows]
    per_budget = {kind: (sum(b["regret"] <= REGRET_TARGET for r in rows for b in r[kind]),
                         sum(len(r[kind]) for r in rows)) for kind in ("adaptive", "grid_fit", "grid_trial")}
    return {"stores": len(rows), "flops_median": statistics.median(fractions), "flops_worst": max(fractions),
            "sure_choices": len(sure), "sure_truly_best": sum(b["best"] for b in sure) / len(sure) if sure else None,
            "per_budget_within": per_budget}


def pooled_line(p: dict) -> str:
    within = ", ".join(f"{k} {a} of {n}" for k, (a, n) in p["per_budget_within"].items())
    sure = "n/a" if p["sure_truly_best"] is None else f"{p['sure_truly_best']:.0%}"
    return (f"pooled over {p['stores']} stores: FLOP fraction median {p['flops_median']:.3f}, worst "
            f"{p['flops_worst']:.3f}; p_best >= 0.8 on {p['sure_choices']} choices, {sure} truly best; "
            f"budget choices with regret <= {REGRET_TARGET:.1%}: {within}")


def trust_summary(rows: list[dict]) -> list[dict]:
    out = []
    for truth, noise in sorted({(r["truth"], r["noise"]) for r in rows},
                               key=lambda k: ([t.name for t in TRUTHS].index(k[0]), k[1])):
        group = [r for r in rows if r["truth"] == truth and r["noise"] == noise]

        def within(kind):
            return sum(all(b["regret"] <= REGRET_TARGET for b in r[kind]) for r in group) / len(group)

        def worst(kind):
            return max(b["regret"] for r in group for b in r[kind])

        sure = [b for r in group for b in r["adaptive"] if b["p_best"] is not None and b["p_best"] >= 0.8]
        out.append({"truth": truth, "noise": noise, "seeds": len(group),
                    "adaptive_within": within("adaptive"), "adaptive_worst": worst("adaptive"),
                    "grid_fit_within": within("grid_fit"), "grid_fit_worst": worst("grid_fit"),
                    "grid_trial_within": within("grid_trial"), "grid_trial_worst": worst("grid_trial"),
                    "flops_median": statistics.median(r["flops_fraction"] for r in group),
                    "flops_worst": max(r["flops_fraction"] for r in group),
                    "replicates_median": statistics.median(r["replicates"] for r in group),
                    "sure_choices": len(sure), "sure_truly_best": (sum(b["best"] for b in sure) / len(sure)
                                                                   if sure else float("nan")),
                    "choices": sum(len(r["adaptive"]) for r in group),
                    "replay_s_median": statistics.median(r["replay_s"] for r in group)})
    return out


def trust_table(summary: list[dict]) -> str:
    lines = [f"{'truth':<24} {'noise':>5} {'seeds':>5} {'adaptive<=0.5%':>14} {'worst':>6} {'grid fit':>8} "
             f"{'worst':>6} {'grid trial':>10} {'worst':>6} {'FLOP med':>8} {'worst':>6} {'reps':>5} "
             f"{'p>=.8':>6} {'truly best':>10} {'replay s, loaded':>16}"]
    for s in summary:
        lines.append(
            f"{s['truth']:<24} {s['noise']:>5.1%} {s['seeds']:>5} {s['adaptive_within']:>14.0%} "
            f"{s['adaptive_worst']:>6.2%} {s['grid_fit_within']:>8.0%} {s['grid_fit_worst']:>6.2%} "
            f"{s['grid_trial_within']:>10.0%} {s['grid_trial_worst']:>6.2%} {s['flops_median']:>8.3f} "
            f"{s['flops_worst']:>6.3f} {s['replicates_median']:>5.0f} {s['sure_choices']:>3}/{s['choices']:<3}"
            f"{s['sure_truly_best']:>9.0%} {s['replay_s_median']:>16.1f}")
    return "\n".join(lines)


def _finished(rows_path: str | None) -> list[dict]:
    """The stores an earlier run with the same ``--rows`` file finished (a stopped run resumes where it was)."""
    if not rows_path or not os.path.exists(rows_path):
        return []
    with open(rows_path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_trust(seeds: int, jobs: int, truths, noises, as_json: bool, rows_path: str | None = None,
              first_seed: int = 0, config: AdaptiveConfig = TRUST_CONFIG) -> int:
    # seed by seed over every setting: a run stopped early has every setting at fewer seeds
    work = [(t, noise, seed, config) for seed in range(first_seed, first_seed + seeds) for t in truths
            for noise in noises]
    wanted = {(TRUTHS[t].name, noise, seed) for t, noise, seed, _ in work}
    # rows of another config (or from before rows named theirs) are not this run's
    rows = [r for r in _finished(rows_path) if (r["truth"], r["noise"], r["seed"]) in wanted
            and r.get("config") == dataclasses.asdict(config)]
    done = {(r["truth"], r["noise"], r["seed"]) for r in rows}
    work = [w for w in work if (TRUTHS[w[0]].name, w[1], w[2]) not in done]
    start = time.perf_counter()
    with ProcessPoolExecutor(jobs) as pool:
        for row in pool.map(trust_one, work, chunksize=1):
            rows.append(row)
            if rows_path:  # one JSON line per store as it finishes
                with open(rows_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
    wall_s = time.perf_counter() - start
    summary = trust_summary(rows)
    if as_json:
        print(json.dumps({"config": dataclasses.asdict(config), "wall_s": wall_s, "summary": summary,
                          "pooled": trust_pooled(rows)}))
    else:
        print(f"config: {config}\n{trust_table(summary)}\n{pooled_line(trust_pooled(rows))}\n"
              f"{len(work)} stores in {wall_s:.1f} s "
              f"({jobs} processes; {len(done)} more read back from {rows_path})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="--trust: seeds first-seed .. first-seed+seeds-1 (two runs can split the seeds)")
    parser.add_argument("--summarise", metavar="ROWS", help="--trust: print the tables of a --rows file and exit")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--noise", type=float, nargs="*", default=list(NOISES))
    parser.add_argument("--truth", type=int, nargs="*", default=list(range(len(TRUTHS))))
    parser.add_argument("--margin", type=float, default=AdaptiveConfig.margin)
    parser.add_argument("--neighbours", type=int, default=AdaptiveConfig.neighbours)
    parser.add_argument("--full-rungs", type=int, default=AdaptiveConfig.full_rungs)
    parser.add_argument("--dominated-rungs", type=int, default=AdaptiveConfig.dominated_rungs)
    parser.add_argument("--n-boot", type=int, default=AdaptiveConfig.n_boot)
    parser.add_argument("--replicates", type=int, help=f"--trust: (default {TRUST_CONFIG.replicates})")
    parser.add_argument("--noise-rungs", type=int, help=f"--trust: (default {TRUST_CONFIG.noise_rungs})")
    parser.add_argument("--noise-runs", type=int, help=f"--trust: (default {TRUST_CONFIG.noise_runs})")
    parser.add_argument("--decide-runs", type=int, help=f"--trust: (default {TRUST_CONFIG.decide_runs})")
    parser.add_argument("--decide-flops", type=float, help=f"--trust: (default {TRUST_CONFIG.decide_flops})")
    parser.add_argument("--truths", action="store_true", help="print each truth's optimum per budget and exit")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rows", help="--trust: append each store's result to this file as a JSON line; the "
                        "stores it already holds are read back, not run again (a stopped run resumes)")
    parser.add_argument("--trust", action="store_true",
                        help="replicates on demand at 1 and 2 %% noise: regret, FLOP and p_best against the truth")
    args = parser.parse_args(argv)
    if args.truths:
        print(truths_report())
        return 0
    if args.summarise:
        print(summarise_rows(args.summarise))
        return 0
    if args.trust:
        noises = [n for n in args.noise if n > 0] if args.noise != list(NOISES) else list(TRUST_NOISES)
        given = {k: v for k, v in (("replicates", args.replicates), ("noise_rungs", args.noise_rungs),
                                   ("noise_runs", args.noise_runs), ("decide_runs", args.decide_runs),
                                   ("decide_flops", args.decide_flops))
                 if v is not None}
        return run_trust(args.seeds, args.jobs, args.truth, noises, args.json, args.rows, args.first_seed,
                         dataclasses.replace(TRUST_CONFIG, **given))
    config = AdaptiveConfig(margin=args.margin, neighbours=args.neighbours, full_rungs=args.full_rungs,
                            dominated_rungs=args.dominated_rungs, n_boot=args.n_boot)
    jobs = [(t, noise, seed if noise > 0 else 0, config) for t in args.truth for noise in args.noise
            for seed in (range(args.seeds) if noise > 0 else [0])]
    start = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(run_one, jobs, chunksize=4))
    else:
        rows = [run_one(job) for job in jobs]
    wall_s = time.perf_counter() - start
    summary = summarise(rows)
    if args.json:
        print(json.dumps({"config": config.__dict__, "wall_s": wall_s, "summary": summary}))
    else:
        print(f"config: {config}\n{table(summary)}\n{len(jobs)} replays in {wall_s:.1f} s ({args.jobs} processes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
