"""`train.attention` at the CLI's edge: a value that is neither causal nor bidirectional is one line on stderr
naming the file and the field, exit 2, for `plan` and for `submit` (which refuses it before anything is written or started)."""
from __future__ import annotations

import os
import sys

import pytest
import yaml

sys.path.insert(0, os.path.dirname(__file__))  # `import test_grid` whatever pytest's import mode
from test_grid import base_grid, make_workspace  # noqa: E402

from orchestrator.cli import main


@pytest.mark.parametrize("command", ["plan", "submit"])
def test_attention_sideways_is_one_line_exit_2(tmp_path, capsys, command):
    make_workspace(tmp_path)
    ws = tmp_path
    g = base_grid() | {"methods": {"full": {}}}
    g["train"] = {"attention": ["causal", "sideways"]}
    (ws / "g.yaml").write_text(yaml.safe_dump(g))
    storage = tmp_path / "store"
    argv = [command, str(ws / "g.yaml")] + (["--storage", str(storage)] if command == "submit" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"{ws / 'g.yaml'}: train.attention[1]: must be one of 'causal' or 'bidirectional', got "
                   "'sideways'"), err
    assert not storage.exists()
