"""How a sweep spends its grid: ``grid`` runs every cell; ``adaptive`` runs the budgets as rungs and prunes the cells
that cannot be on the frontier (analysis/adaptive.py decides; the driver runs rung after rung). Pure: the grid
reads the knobs' defaults here without loading the analysis.
"""
from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("grid", "adaptive")
# The FLOP an adaptive sweep typically spends, as a fraction of the full grid's: the median over the simulation's
# ground truths and noise levels (benchmarks/adaptive.py, benchmarks/README.md "Adaptive sweep": 0.06-0.17).
TYPICAL_FLOP_FRACTION = 0.15


@dataclass(frozen=True)
class AdaptiveConfig:
    """The strategy's knobs (grid keys under ``strategy``). Defaults chosen by benchmarks/adaptive.py
    (benchmarks/README.md, "Adaptive sweep")."""

    margin: float = 0.02  # relative loss: slices and methods within it of the best are kept
    neighbours: int = 1  # model size steps kept on each side of the predicted optimum (best slice)
    full_rungs: int = 3  # rungs run in full before any pruning (the first 3 of 6 x4 budgets: 1.5 % of the FLOP)
    dominated_rungs: int = 2  # decision points in a row a method must be dominated at before it is pruned
    n_boot: int = 10  # bootstrap refits per surface for the interval (fit.N_BOOTSTRAP = 100 for reports; the
    # fits dominate a decision: 10 refits cost ~15 % of one, 100 would cost 2.5x)
    # runs of one cell the strategy may ask for where its loss is within the noise of the rung's best (1: none),
    # once the noise is measured: by grid key seeds >= 2, or by the first noise_rungs rungs running every cell
    # twice (cheap; benchmarks/adaptive.py runs 1). 0 by default: a one-seed sweep decides as it always did.
    replicates: int = 2
    noise_rungs: int = 0
    noise_runs: int = 2  # runs of every cell at the noise rungs (their FLOP is small: the paper grid's first two
    # rungs are 0.4 % of it)
    # most runs of a cell the recipe at its rung is not settled on (analysis/adaptive.py ``_to_decide``: its choice
    # there more than 0.5 % behind another cell in over 20 % of the bootstrap draws), once the noise band asks for
    # nothing more; 1: no such runs
    decide_runs: int = 1
    # the last rung's decide runs (analysis/adaptive.py ``_to_settle``): while the recipe at the largest budget is not
    # settled, its choice and its strongest rival (a pruned cell too) run again, as long as the sweep's FLOP stays
    # within this fraction of the one-seed full grid's; 0: no such runs. Set, it decides the last rung in place of
    # ``decide_runs`` (which then serves the rungs below)
    decide_flops: float = 0.0

    def __post_init__(self):
        if not (0.0 <= self.margin < 1.0):
            raise ValueError(f"strategy.margin: a relative loss in [0, 1) (got {self.margin})")
        if not (isinstance(self.decide_flops, (int, float)) and self.decide_flops >= 0.0):
            raise ValueError(f"strategy.decide_flops: a non-negative fraction of the grid's FLOP "
                             f"(got {self.decide_flops!r})")
        for name in ("neighbours", "full_rungs", "dominated_rungs", "n_boot", "replicates", "noise_rungs",
                     "noise_runs", "decide_runs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"strategy.{name}: a non-negative integer (got {value!r})")
        if self.full_rungs < 1:
            raise ValueError(f"strategy.full_rungs: at least 1, the first rung has nothing to prune on "
                             f"(got {self.full_rungs})")
        if self.replicates < 1:
            raise ValueError(f"strategy.replicates: at least 1, a cell's first run (got {self.replicates})")
        if self.decide_runs < 1:
            raise ValueError(f"strategy.decide_runs: at least 1, a cell's first run (got {self.decide_runs})")
        if self.noise_runs < 2:
            raise ValueError(f"strategy.noise_runs: at least 2, what measures the noise (got {self.noise_runs})")
        if self.dominated_rungs < 1:
            raise ValueError(f"strategy.dominated_rungs: at least 1 (got {self.dominated_rungs})")
