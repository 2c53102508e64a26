"""benchmarks/gpu.py --smoke in CI, so the GPU check cannot rot between the rare sessions lent a GPU: every path
(full fine-tuning packed flat, padded and in masked rows, one pass against the gradient cache, LoRA, one-rank ZeRO-2
and ZeRO-3, AdamW foreach against fused, training fed from the token cache, small trials sharing the device as
separate processes, the profiler's summary) runs on tiny shapes on CPU and reports a row with real numbers."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
pytestmark = pytest.mark.slow  # runs every path of the GPU check (trainings, ZeRO ranks) on CPU


@pytest.mark.timeout(600)
def test_gpu_smoke_runs_every_path(tmp_path):
    out = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "OUT")}
    ray_tmp = tempfile.mkdtemp(prefix="rp", dir="/tmp")  # Ray's unix socket paths must stay under 107 characters
    env.update(PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false", RAY_TMPDIR=ray_tmp, REPURPOSE_CACHE=str(tmp_path))
    try:
        proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu.py"), "--smoke", "--out", str(out)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] and result["device"] == "cpu" and result["peak_flops"] > 0
    rows = {r["path"]: r for r in result["rows"]}
    assert set(rows) == {"adamw-1b", "full-160m", "full-160m-padded", "full-160m-mask", "full-160m-onepass",
                         "lora-r128-1b", "zero2-1.4b", "zero3-1.4b", "cache-70m", "share-70m-x1", "share-70m-x2"}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    peak = result["peak_flops"]
    for name in ("full-160m", "full-160m-padded", "full-160m-mask", "full-160m-onepass", "lora-r128-1b",
                 "zero2-1.4b", "zero3-1.4b"):
        r = rows[name]
        assert r["steps"] >= 2 and r["tokens"] > 0 and r["hardware_flops"] > 0 and 0 < r["mfu"] < 2, r
        # MFU from the paper's FLOP, HFU from the hardware FLOP, over the same time and peak
        assert r["mfu"] == pytest.approx(r["flops"] / (r["train_s"] * peak))
        assert r["hfu"] == pytest.approx(r["hardware_flops"] / (r["train_s"] * peak))
    # which attention ran: the per-text reference (the varlen kernel's CPU stand-in), the padded SDPA, the mask rows
    assert (rows["full-160m"]["kernel"], rows["full-160m-padded"]["kernel"], rows["full-160m-mask"]["kernel"]) == (
        "segments", "padded", "mask")
    # the same pairs three ways: the same real tokens and paper FLOP; hardware FLOP fall from padded to rows to flat
    # (a flat kernel computes each text's own square only)
    assert rows["full-160m"]["tokens"] == rows["full-160m-padded"]["tokens"] == rows["full-160m-mask"]["tokens"]
    assert rows["full-160m"]["flops"] == rows["full-160m-padded"]["flops"]
    assert (rows["full-160m"]["hardware_flops"] < rows["full-160m-mask"]["hardware_flops"]
            < rows["full-160m-padded"]["hardware_flops"])
    # one pass (the memory model's choice: the batch of 16 fits) against the gradient cache's chunks of 4: no
    # recomputed forward, the same paper FLOP
    assert rows["full-160m-onepass"]["chunk"] == 16 and rows["full-160m"]["chunk"] == 4
    assert rows["full-160m-onepass"]["flops"] == rows["full-160m"]["flops"]
    assert rows["full-160m-onepass"]["hardware_flops"] < 0.8 * rows["full-160m"]["hardware_flops"]
    assert rows["full-160m"]["predicted_memory_gb"] > 0
    # the profiler's summary (smoke: the first row is profiled whatever its MFU)
    assert rows["full-160m"]["profile_top"] and rows["full-160m"]["profile_wall_s"] > 0
    assert rows["adamw-1b"]["foreach_s"] > 0 and rows["adamw-1b"]["fused_s"] > 0
    assert 0 < rows["cache-70m"]["busy_fraction"] <= 1 and rows["cache-70m"]["tokens"] > 0
    # the sharing sweep: separate processes at 1/k of the device each, their aggregate against one alone
    share = rows["share-70m-x2"]
    assert share["trials"] == 2 and share["fraction"] == 0.5 and share["tokens"] > 0 and share["vs_alone"] > 0
    assert rows["share-70m-x1"]["vs_alone"] == 1.0
    # smoke mode leaves benchmarks/README.md alone; the table is printed
    assert "| full-160m | ok |" in proc.stdout
