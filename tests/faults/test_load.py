"""Load: trivial trials through our driver on the embedded Ray, bounded in the driver's memory and in the
store's bytes per trial. 100 trials here (about 30 s on this machine); ``benchmarks/load_500.py`` runs the full
500 (about 3 minutes here, too long for the suite) and prints the same numbers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from faultkit import REPO, RayEnv

pytestmark = pytest.mark.slow

TRIALS, ROWS = 100, 3
# A metric file of a few rows is mostly Parquet's footer and schema (~2.5 KB); a trial's row in trials.parquet
# and its budget in grid.yaml add little. Nothing else may grow with the trials.
MAX_STORE_BYTES_PER_TRIAL = 4096 + 512 * ROWS
# What grows in the driver per trial is Ray Tune's own record of it (its Trial object: config, last result),
# ~50 KB measured here; the Recorder keeps no finished trial's rows.
MAX_RSS_GROWTH_KB_PER_TRIAL = 200
MAX_PEAK_RSS_MB = 1024


def test_trivial_trials_through_the_driver():
    env = RayEnv()
    try:
        proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "load_500.py"), "--trials",
                               str(TRIALS), "--rows", str(ROWS), "--early", "20", "--json"],
                              env=env.env, cwd=REPO, capture_output=True, text=True, timeout=600)
    finally:
        env.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    print(json.dumps(result, indent=1))
    assert result["completed"] == TRIALS and result["rows_exactly_once"]
    assert result["memory_rows_left"] == 0  # finished trials' rows left the driver's memory
    assert result["ray_nodes"] == ["127.0.0.1"]  # the embedded Ray on loopback
    assert result["store_bytes_per_trial"] <= MAX_STORE_BYTES_PER_TRIAL, result
    assert result["rss_growth_kb_per_trial"] <= MAX_RSS_GROWTH_KB_PER_TRIAL, result
    assert result["peak_rss_mb"] <= MAX_PEAK_RSS_MB, result
