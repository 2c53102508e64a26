"""The learning-rate schedule: linear warmup, then a cosine decay. Pure arithmetic; the fine-tuning trial runs it on
the fraction of its FLOP budget spent (workers/steps.py), the mini suite's pretraining on its step count
(workers/suite/pretraining.py)."""
from __future__ import annotations

import math


def warmup_cosine(before: float, after: float, warmup: float, total: float = 1.0, floor: float = 0.0) -> float:
    """The lr factor of one step that covers ``before`` .. ``after`` of ``total`` (budget fractions, or steps).

    Warmup rises linearly to 1 at ``warmup``, reached at the end of the step (so never an lr of 0 on the first one);
    then a cosine from 1 down to ``floor`` at ``total``, taken at the step's start (never ``floor`` on the last step),
    as a step-indexed schedule does.
    """
    warm = after / warmup if warmup > 0 else 1.0
    span = total - warmup
    progress = min(1.0, max(0.0, before - warmup) / span) if span > 0 else 0.0
    return min(warm, floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
