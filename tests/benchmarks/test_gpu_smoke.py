"""benchmarks/gpu.py --smoke in CI, so the GPU check cannot rot between the rare sessions lent a GPU: every path
(full fine-tuning through the gradient cache, packed and padded, LoRA, one-rank ZeRO-2 and ZeRO-3, AdamW foreach
against fused, training fed from the token cache) runs on tiny shapes on CPU and reports a row with real numbers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
pytestmark = pytest.mark.slow  # runs every path of the GPU check (trainings, ZeRO ranks) on CPU


@pytest.mark.timeout(600)
def test_gpu_smoke_runs_every_path(tmp_path):
    out = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "OUT")}
    env.update(PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false", RAY_TMPDIR=str(tmp_path), REPURPOSE_CACHE=str(tmp_path))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu.py"), "--smoke", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] and result["device"] == "cpu" and result["peak_flops"] > 0
    rows = {r["path"]: r for r in result["rows"]}
    assert set(rows) == {"adamw-1b", "full-160m", "full-160m-padded", "lora-r128-1b", "zero2-1.4b", "zero3-1.4b",
                         "cache-70m"}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    for name in ("full-160m", "full-160m-padded", "lora-r128-1b", "zero2-1.4b", "zero3-1.4b"):
        r = rows[name]
        assert r["steps"] >= 2 and r["tokens"] > 0 and r["hardware_flops"] > 0 and 0 < r["mfu"] < 2, r
        assert r["mfu"] == pytest.approx(r["hardware_flops"] / (r["train_s"] * result["peak_flops"]))
    # the same pairs packed and padded: the same real tokens, fewer hardware FLOP packed (no padding runs)
    assert rows["full-160m"]["tokens"] == rows["full-160m-padded"]["tokens"]
    assert rows["full-160m"]["hardware_flops"] < rows["full-160m-padded"]["hardware_flops"]
    # single-device rows carry the memory model's prediction: the chunk the trial chose (fixed at 4 in smoke)
    assert rows["full-160m"]["chunk"] == 4 and rows["full-160m"]["predicted_memory_gb"] > 0
    assert rows["adamw-1b"]["foreach_s"] > 0 and rows["adamw-1b"]["fused_s"] > 0
    assert 0 < rows["cache-70m"]["busy_fraction"] <= 1 and rows["cache-70m"]["tokens"] > 0
    # smoke mode leaves benchmarks/README.md alone; the table is printed
    assert "| full-160m | ok |" in proc.stdout
