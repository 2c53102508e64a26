"""The layout's one-way doors, checked in fresh interpreters (docs/reference.md "Layout"): core imports nothing
heavy; analysis no torch or ray; the driver side no torch at import, and `status` / `fit` / a driver that plans
and submits never load torch or deepspeed."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "ray", "pandas", "pyarrow", "transformers", "deepspeed", "peft")


def loaded_after(code: str) -> set[str]:
    probe = (code + "\nimport json, sys\n"
             f"print(json.dumps(sorted(m for m in {list(HEAVY)!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_core_imports_nothing_heavy():
    import pkgutil

    import core

    modules = sorted(m.name for m in pkgutil.iter_modules(core.__path__))
    assert set(modules) >= {"errors", "flops", "models", "spec", "store", "strategy", "uris", "devices"}
    assert loaded_after("import " + ", ".join(f"core.{m}" for m in modules)) == set()


def test_the_io_layer_loads_pyarrow_only_when_used(tmp_path):
    """fsio (the I/O beside core) keeps `import fsio` light for the commands that do no I/O."""
    assert loaded_after("import fsio") == set()
    assert loaded_after(f"import fsio; fsio.write_bytes({str(tmp_path / 'x')!r}, b'1')") == {"pyarrow"}


def test_analysis_never_imports_torch_or_ray():
    loaded = loaded_after("import analysis.load, analysis.fit, analysis.recipe, analysis.findings, analysis.report, "
                          "analysis.figures")
    assert not loaded & {"torch", "ray", "transformers", "deepspeed", "peft"}


def test_orchestrator_imports_no_torch_at_module_level():
    loaded = loaded_after("import orchestrator.cli, orchestrator.grid, orchestrator.plan, orchestrator.driver, "
                          "orchestrator.store, orchestrator.reporting, orchestrator.trainable")
    assert not loaded & {"torch", "transformers", "deepspeed", "peft"}


def test_every_module_of_every_package_imports():
    """A broken import anywhere (a module renamed, a name gone, a syntax error) fails here, by module name, in one
    fresh interpreter; the modules are found by walking the packages (tests/support.py)."""
    from support import package_modules

    modules = package_modules()
    assert {"core.flops", "orchestrator.cli", "workers.trial", "analysis.fit", "fsio"} <= set(modules), modules
    probe = ("import importlib, json, traceback\nbroken = {}\n"
             f"for name in {modules!r}:\n"
             "    try:\n        importlib.import_module(name)\n"
             "    except Exception as e:\n        broken[name] = f'{type(e).__name__}: {e}'\n"
             "print(json.dumps(broken))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}


@pytest.mark.parametrize("command", ["status", "fit"])
def test_status_and_fit_never_import_torch(tiny_store, command):
    """The commands that only read the store (tests/analysis/storegen.py writes a real one)."""
    storage, name = tiny_store
    code = (f"from orchestrator import cli\nrc = cli.main([{command!r}, {name!r}, '--storage', {storage!r}])\n"
            "assert rc == 0, rc")
    assert not loaded_after(code) & {"torch", "deepspeed", "ray"}
