"""`python benchmarks/run.py` says only its own lines: no library noise (DeepSpeed's "Setting accelerator to CPU"
when transformers saves a model, transformers' per-load progress bars), as the CLI (workers/export.py
quiet_model_loading). The store part is the quickest that still builds the benchmark's models."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
def test_benchmark_prints_only_its_own_lines(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DS_ACCELERATOR")}
    env.update(PYTHONPATH=REPO, TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "run.py"), "--quick", "--only", "store"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert lines[:2] == ["preparing data, tokenizer, models", "store rows"], proc.stderr[-3000:]
    assert len(lines) == 3 and re.fullmatch(r" +store_rows_per_s = [0-9.e+]+", lines[2]), proc.stderr[-3000:]
    assert proc.stdout == ""
