"""Read a sweep's store, fit the compute-optimal frontier, write the report (issue #4).

No Ray, no torch: ``import analysis`` loads pandas and pyarrow only; scipy loads on the first fit and
matplotlib on the first figure.

    trials = load_trials("s3://bucket/sweeps/paper-grid")
    write_fit_outputs("s3://bucket/sweeps/paper-grid", "./report")   # repurpose fit
    recipe_at("./sweeps/paper-grid", 1e17)                            # repurpose recipe --json
"""
from .findings import Analysis, analyze
from .fit import (
    EmpiricalOptimum,
    Exclusions,
    FitError,
    Surface,
    SurfaceFits,
    TrendFit,
    empirical_optimum,
    fit_surface,
    fit_surfaces,
    fit_trends,
    split_usable,
)
from .load import StoreError, load_metrics, load_trials
from .recipe import Recipe, compute_recipe, infer_max_tokens
from .report import format_recipe, recipe_at, write_fit_outputs

__all__ = [
    "Analysis", "EmpiricalOptimum", "Exclusions", "FitError", "Recipe", "StoreError", "Surface", "SurfaceFits",
    "TrendFit", "analyze", "compute_recipe", "empirical_optimum", "fit_surface", "fit_surfaces", "fit_trends",
    "format_recipe", "infer_max_tokens", "load_metrics", "load_trials", "recipe_at", "split_usable",
    "write_fit_outputs",
]
