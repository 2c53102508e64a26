"""Fixtures of the fault tests: a private Ray environment per test (stopped by marker at teardown), grids on the
tiny model, and the session's fault table (printed in the terminal summary, written under pytest's base temp)."""
from __future__ import annotations

import os
import sys

import pytest
import yaml

sys.path.insert(0, os.path.dirname(__file__))  # `import faultkit` whatever pytest's import mode

from faultkit import FaultTable  # noqa: E402

_TABLE: list[FaultTable] = []


@pytest.fixture(scope="session")
def fault_table(tmp_path_factory) -> FaultTable:
    table = FaultTable(str(tmp_path_factory.getbasetemp() / "fault_table.txt"))
    _TABLE.append(table)
    return table


def pytest_terminal_summary(terminalreporter):
    for table in _TABLE:
        if table.rows:
            terminalreporter.write_sep("=", "faults: exactly once after each")
            terminalreporter.write_line(table.render())
            terminalreporter.write_line(f"(written to {table.path})")


@pytest.fixture
def make_grid(tmp_path, tiny_model, pairs_file, eval_file):
    """``make_grid(name, **sections) -> path``: a grid on the tiny model and the fixture data."""

    def make(name: str, **sections) -> str:
        grid = {"name": name, "models": [tiny_model], "methods": {"bias": {}}, "budgets": [5.0e9],
                "data": {"train": pairs_file, "eval": eval_file}, "train": {"batch_size": 16},
                "plan": {"min_steps": 3}}
        grid.update(sections)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(grid, sort_keys=False))
        return str(path)

    return make
