"""What a GPU delivers to a trial, as pure policy: the utilisation `plan` assumes per model size, the GPU fraction
that small trials share, and when ``torch.compile`` pays. No torch: the planner and the trial both call these.

Every table here says where its numbers come from (benchmarks/README.md, "GPU check"); a table with no measurement
behind it yet holds a conservative default and says so.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

# --- the utilisation `plan` assumes (device-hours = hardware FLOP / (peak x this)) ---------------------------------
# Measured on an NVIDIA H200 (benchmarks/README.md "GPU check, 2026-11-30"; random-weight Pythia shapes, batch 1024,
# max length 75, bf16, eager SDPA): the FLOP the GPU executed (recompute included, so an hfu) over time x its dense
# bf16 peak, the best path of each size. Keyed by N (non-embedding parameters); a size between two rows takes the
# row below it, one below the first row the first row's, one above the last the last row's.
MEASURED_HFU: tuple[tuple[float, float, str], ...] = (
    (85_056_000, 0.18, "pythia-160m, full, padded"),
    (302_311_424, 0.25, "pythia-410m, full, padded"),
    (805_736_448, 0.20, "pythia-1b, full, packed, gradient cache (chunk 512)"),
    (1_208_602_624, 0.21, "pythia-1.4b, full, DeepSpeed ZeRO-2 on one rank"),
)
MEASURED_ON = "NVIDIA H200, benchmarks/README.md GPU check 2026-11-30"


def assumed_utilisation(n_params: float) -> tuple[float, str]:
    """(fraction of the peak, where it comes from) for a trial of ``n_params`` non-embedding parameters."""
    sizes = [n for n, _, _ in MEASURED_HFU]
    i = max(0, bisect.bisect_right(sizes, n_params) - 1)
    _, value, what = MEASURED_HFU[i]
    return value, f"{what}: {value:.2f} measured ({MEASURED_ON})"


# --- small trials sharing a GPU -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sharing:
    """Aggregate real tokens/s of ``1/fraction`` trials on one GPU at ``fraction`` each, relative to one trial alone
    on the whole GPU (1.0 at fraction 1), for models up to ``max_params``; ``measured``: False for a default."""

    max_params: float
    aggregate: tuple[tuple[float, float], ...]  # (fraction, aggregate tokens/s / one trial's alone)
    measured: bool
    source: str


# No GPU measurement of sharing exists yet (benchmarks/gpu.py's sharing sweep measures it): the default claims no
# gain from sharing, so the rule below keeps the grid's own resources.gpu_fraction until a table replaces this one.
SHARING: tuple[Sharing, ...] = (
    Sharing(1e8, ((1.0, 1.0), (0.5, 1.0), (0.25, 1.0), (0.125, 1.0)), False,
            "conservative default: no sharing measured yet (benchmarks/gpu.py sharing sweep)"),
)
MIN_GAIN = 1.10  # a smaller fraction must deliver 10 % more per GPU than the next larger one: below, noise


def best_fraction(aggregate: tuple[tuple[float, float], ...], fits=lambda fraction: True) -> float:
    """The fraction of a GPU per trial that maximises aggregate tokens/s per GPU: from 1 down, a smaller fraction
    is taken only where ``fits`` (the trial's memory holds in it) and it delivers ``MIN_GAIN`` x the best so far."""
    best, best_rate = 1.0, dict(aggregate).get(1.0, 1.0)
    for fraction, rate in sorted(aggregate, reverse=True):
        if fraction < best and fits(fraction) and rate >= MIN_GAIN * best_rate:
            best, best_rate = fraction, rate
    return best


def share_for(n_params: float, grid_fraction: float, below_params: float, fits=lambda fraction: True
              ) -> tuple[float, str]:
    """(fraction of a GPU, why) for a one-process trial of ``n_params``: the measured table's best fraction where
    one covers the size, else the grid's ``gpu_fraction`` below ``gpu_fraction_below_params`` and a whole GPU above."""
    for table in SHARING:
        if n_params <= table.max_params and table.measured:
            fraction = best_fraction(table.aggregate, fits)
            return fraction, f"measured sharing table ({table.source})"
    if n_params < below_params:
        return grid_fraction, "resources.gpu_fraction (no measured sharing table for this size)"
    return 1.0, "a whole GPU (N >= resources.gpu_fraction_below_params)"


# --- torch.compile: on only where it pays -------------------------------------------------------------------------
# Compile seconds per distinct shape and the step-time ratio compiled / eager: assumed until benchmarks/gpu.py's
# compiled-vs-eager rows measure them (benchmarks/README.md): a compile of a Pythia block stack took about a minute
# per shape on the H200 (the first GPU check), and a launch-bound step is assumed 1.25x faster compiled.
COMPILE_S_PER_SHAPE = 60.0
COMPILE_SPEEDUP = 1.25
COMPILE_SHAPES = 3  # bucket lengths a trial's packed chunks fall into (workers/packing.py bucket_length)


def compile_pays(planned_steps: int, eager_step_s: float, *, compile_s_per_shape: float = COMPILE_S_PER_SHAPE,
                 speedup: float = COMPILE_SPEEDUP, shapes: int = COMPILE_SHAPES) -> bool:
    """Whether compiling saves time over the trial: the steps' saving, ``planned_steps x eager_step_s x (1 -
    1/speedup)``, exceeds the compiles, ``shapes x compile_s_per_shape`` (the break-even)."""
    if speedup <= 1.0 or planned_steps <= 0 or eager_step_s <= 0:
        return False
    return planned_steps * eager_step_s * (1.0 - 1.0 / speedup) > shapes * compile_s_per_shape


def compile_decision(switch: str | bool, device_type: str, planned_steps: int, eager_step_s: float) -> bool:
    """``train.compile``: true/false force it; auto compiles on CUDA only, and only past the break-even."""
    if switch is True or switch == "true":
        return True
    if switch is False or switch == "false":
        return False
    return device_type == "cuda" and compile_pays(planned_steps, eager_step_s)
