"""Read a sweep's store, fit the compute-optimal frontier, write the report.

No Ray, no torch: the names below load pandas and pyarrow on first use; scipy loads on the first fit and
matplotlib on the first figure.

    trials = load_trials("s3://bucket/sweeps/paper-grid")
    write_fit_outputs("s3://bucket/sweeps/paper-grid", "./report")   # repurpose fit
    recipe_at("./sweeps/paper-grid", 1e17)                            # repurpose recipe --json
"""
import importlib

# Loaded on first use (PEP 562), so that `import analysis.schema` (the store writer's, `repurpose status`'s)
# does not pay for pandas: `status` answers in ~0.5 s instead of ~0.7.
_WHERE = {
    "findings": ("Analysis", "analyze"),
    "fit": ("EmpiricalOptimum", "Exclusions", "FitError", "Surface", "SurfaceFits", "TrendFit",
            "empirical_optimum", "fit_surface", "fit_surfaces", "fit_trends", "split_usable"),
    "load": ("StoreError", "load_data_cap", "load_metrics", "load_trials"),
    "recipe": ("Recipe", "compute_recipe"),
    "report": ("format_recipe", "recipe_at", "write_fit_outputs"),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'analysis' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
