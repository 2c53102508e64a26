"""`repurpose plan`'s table: every trial of a ``Plan`` as an aligned text row, then the totals. Pure (a string
out); the CLI prints it.

The columns are the trial's fixed ones (model, method, rank or fraction, budget, tokens, steps, hours, resources,
memory, status) plus one per axis the grid sweeps beyond those: ``family`` where the grid holds more than one, and
any field of the trials' identity (core/spec.py ``TrialSpec.identity``: what the trial id hashes) that takes more
than one value among trials of the same model, method, rank or fraction and budget — pooling today, and whatever
axis a grid adds (seeds, negatives, attention, ...) without this module naming it. Two rows therefore never look
alike: what tells two trials apart is on their rows.
"""
from __future__ import annotations

import json
from collections import defaultdict

# Identity fields that the fixed columns already show (or that are the same for every trial of a grid).
SHOWN = ("model", "method", "lora_rank", "trainable_fraction", "budget_flops", "train_data", "eval_data")


def sci(x: float) -> str:
    """1.5e15 -> '1.5e15'."""
    mantissa, exp = f"{x:.1e}".split("e")
    return f"{mantissa}e{int(exp)}"


def swept_axes(trials) -> list[str]:
    """The identity fields that vary among trials of the same cell (model, method, rank or fraction, budget), in
    the identity's own order: the grid's axes beyond the fixed columns."""
    identities = [t.spec.identity() for t in trials]
    keys = list(dict.fromkeys(k for identity in identities for k in identity if k not in SHOWN))
    seen: dict[tuple, set] = defaultdict(set)
    for t, identity in zip(trials, identities):
        cell = tuple(_cell(identity.get(k)) for k in SHOWN)
        for key in keys:
            seen[cell, key].add(axis_value(t, identity, key))
    varying = {key for (_, key), values in seen.items() if len(values) > 1}
    return [k for k in keys if k in varying]


def axis_value(t, identity: dict, key: str) -> str:
    """A trial's value of an identity field as a cell; a field the identity leaves out at its default (one added
    after sweeps existed: core/spec.py ADDED_FIELDS) is read from the spec."""
    return _cell(identity[key] if key in identity else getattr(t.spec, key, None))


def _cell(value) -> str:
    """An identity value as a table cell: None '-', numbers as %g, lists and objects as compact JSON."""
    if value is None:
        return "-"
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, (int, float)):
        return f"{value:g}"
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


def render_plan(plan, device=("H100 SXM", 989e12, ""), mfu: float | None = None) -> str:
    """The dry run as an aligned text table (deterministic; no terminal width games), then the totals."""
    from orchestrator.plan import short, utilisation_note, utilisation_of

    axes = swept_axes(plan.trials)
    families = len({t.family for t in plan.trials}) > 1
    header = ("trial_id", "model", *(["family"] if families else []), "method", "rank/frac", *axes, "budget",
              "tokens", "steps", "hours", "resources", "memory", "status")
    name, peak, _ = device
    hours = {t.trial_id: t.hardware_flops / (peak * utilisation_of(t, mfu)) / 3600 for t in plan.trials}
    rows = []
    g = plan.grid
    adaptive = g.strategy == "adaptive"
    rung_of = {b: i + 1 for i, b in enumerate(sorted(g.budgets))} if adaptive else {}
    full_rungs = g.adaptive.full_rungs if adaptive else 0
    for t in plan.trials:
        hyper = f"r={t.lora_rank}" if t.lora_rank is not None else (
            f"f={t.trainable_fraction:g}" if t.trainable_fraction is not None else "-")
        identity = t.spec.identity()
        resources = " ".join(f"{k}={v:g}" for k, v in t.display_resources().items())
        status = "ok" if t.runnable else f"SKIP {t.skip_reason}"
        if t.runnable and rung_of.get(t.budget_flops, 0) > full_rungs:
            status = f"rung {rung_of[t.budget_flops]}: decided after rung {rung_of[t.budget_flops] - 1}"
        memory = "-" if t.memory_bytes is None else f"{t.memory_bytes / 1e9:.1f}GB" + ("+ckpt" if t.checkpointing else "")
        rows.append((t.trial_id, t.model, *([t.family] if families else []), t.method, hyper,
                     *(axis_value(t, identity, a) for a in axes), sci(t.budget_flops), short(t.planned_tokens),
                     str(t.steps), f"{hours[t.trial_id]:.2g}" if t.runnable else "-", resources, memory, status))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    swept = "".join(f" x {len({row[header.index(a)] for row in rows})} {a} values" for a in axes)
    lines.insert(0, f"sweep {g.name}: {len(g.models)} models x {len(g.methods.cells())} method settings{swept} x "
                    f"{len(g.budgets)} budgets; resources for "
                    + (f"{plan.gpus_available} GPUs per node" if plan.gpus_available else "a CPU-only cluster")
                    + (f" of {plan.gpu_memory / 1e9:.0f} GB each (memory: estimated peak per GPU, core/memory.py; "
                       "+ckpt: with gradient checkpointing)" if plan.gpu_memory else ""))
    lines += utilisation_note(plan, mfu)
    lines.append(f"{len(plan.trials)} trials: {len(plan.runnable)} runnable, {len(plan.skipped)} skipped; "
                 f"{sci(plan.total_flops)} FLOP planned (runnable trials); about "
                 f"{sum(hours[t.trial_id] for t in plan.runnable):.3g} {name}-hours "
                 f"({peak / 1e12:.0f} TFLOP/s bf16 peak; hours: per trial, recomputation included)")
    per_pair = plan.data.tokens_per_pair  # measured once per tokenizer: the same text costs each family its own tokens
    lines.append("tokens per pair (measured per tokenizer): " + ", ".join(
        f"{model} {per_pair[model]:.1f}" for model in g.models if model in per_pair))
    if adaptive:
        from core.strategy import TYPICAL_FLOP_FRACTION

        first = sum(t.planned_flops for t in plan.runnable if rung_of[t.budget_flops] <= full_rungs)
        lines.append(f"strategy adaptive: rungs 1-{min(full_rungs, len(rung_of))} run in full ({sci(first)} FLOP); "
                     f"later rungs run only the cells that can still be on the frontier, decided after the rung "
                     f"below. Worst case {sci(plan.total_flops)} FLOP (every cell); expected about "
                     f"{sci(TYPICAL_FLOP_FRACTION * plan.total_flops)} ({TYPICAL_FLOP_FRACTION:.0%}, the simulation's "
                     "typical fraction: benchmarks/adaptive.py)")
        if g.adaptive.decide_flops > 0:
            from orchestrator.plan import first_run_flops

            cap = g.adaptive.decide_flops * first_run_flops(plan.runnable)
            lines.append(f"the last rung settles the recipe within {sci(cap)} FLOP in all (adaptive.decide_flops "
                         f"{g.adaptive.decide_flops:g} of the one-seed grid's)")
    return "\n".join(lines)
