"""The peak a trial's MFU divides by: a GPU's from core/devices.py's datasheet table, a CPU's measured once.

A CPU has no datasheet figure that this code reaches (AVX512-BF16 without AMX here: 0.94 TFLOP/s bf16 against
0.21 fp32, benchmarks/README.md), so the peak is the best square-matmul rate over n = 512..4096 (the best
of several sizes: the peak must not be undersold) in the precision the trial computes in there: bf16 where the CPU
has native bf16 matmuls, else fp32 ('auto' precision trains in fp32 there, and an emulated bf16 matmul can be
100x slower: a 4096 product would take minutes). A size whose one product the last rate says would outlast the
time per size is not timed. Measured once per (CPU model, torch threads, torch version, dtype) and cached as JSON
in the user cache dir (``$REPURPOSE_CACHE`` or platformdirs', as workers/suite/cache.py).
"""
from __future__ import annotations

import json
import os
import platform
import time

import torch

from core.devices import device_entry
from core.hashing import content_hash

SIZES = (512, 1024, 2048, 4096)
SECONDS_PER_SIZE = 0.5  # timed matmuls per size (after one warm-up)
CACHE_FILE = "device_peak.json"


def cpu_model() -> str:
    """/proc/cpuinfo's model name (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_rate(n: int, dtype: torch.dtype = torch.bfloat16, seconds: float = SECONDS_PER_SIZE) -> float:
    """Sustained FLOP/s of an (n, n) @ (n, n) matmul on the CPU: 2·n³ per product."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: packing, thread pool
    reps, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds or reps == 0:
        a @ b
        reps += 1
    return 2 * n ** 3 * reps / elapsed


def _cache_path(cache_dir: str | None) -> str:
    from workers.suite.cache import cache_root

    return os.path.join(cache_root(cache_dir), CACHE_FILE)


def has_bf16(device: torch.device) -> bool:
    """Native bf16 matmuls. On CUDA, emulation does not count (``is_bf16_supported()`` alone is True on T4 and V100,
    which emulate bf16 far slower than fp32): 'auto' then trains in fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_dtype() -> torch.dtype:
    """The dtype a CPU trial's matmuls run in under 'auto' precision (``has_bf16``)."""
    return torch.bfloat16 if has_bf16(torch.device("cpu")) else torch.float32


def best_rate(sizes, dtype: torch.dtype, seconds: float) -> float:
    """The best matmul FLOP/s over ``sizes`` (ascending), skipping a size whose one product would take longer than
    ``seconds`` at the best rate seen so far."""
    best = 0.0
    for n in sizes:
        if best and 2 * n ** 3 / best > seconds:
            break
        best = max(best, matmul_rate(n, dtype, seconds))
    return best


def cpu_peak_flops(*, cache_dir: str | None = None, sizes=SIZES, seconds: float = SECONDS_PER_SIZE,
                   dtype: torch.dtype | None = None) -> float:
    """The best matmul FLOP/s of this CPU at the current torch thread count in ``dtype`` (default ``cpu_dtype``);
    measured on the first call per (CPU model, threads, torch version, dtype), read from the cache after."""
    dtype = dtype or cpu_dtype()
    key = content_hash(f"{cpu_model()}|{torch.get_num_threads()}|{torch.__version__}|{sizes}"
                       + ("" if dtype == torch.bfloat16 else f"|{dtype}"))
    path = _cache_path(cache_dir)
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError):
        table = {}
    if key in table:
        return float(table[key]["peak_flops"])
    peak = best_rate(sizes, dtype, seconds)
    table[key] = {"peak_flops": peak, "cpu": cpu_model(), "threads": torch.get_num_threads(), "dtype": str(dtype),
                  "torch": torch.__version__, "sizes": list(sizes), "measured_at": time.time()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    os.replace(tmp, path)  # concurrent trials: the last writer wins, every entry it read is kept
    return peak


def device_peak(device: torch.device, **cpu_kwargs) -> tuple[float | None, str]:
    """(peak FLOP/s, where it comes from) for the trial's device: the datasheet table for a GPU (None when the
    name is not in it or has no bf16), the measured best bf16 matmul for a CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        entry = device_entry(name)
        return (entry[1], f"{entry[0]}: {entry[2]}") if entry else (None, f"{name}: not in core/devices.py")
    threads = torch.get_num_threads()
    dtype = cpu_kwargs.get("dtype") or cpu_dtype()
    return cpu_peak_flops(**cpu_kwargs), f"measured: best {str(dtype).removeprefix('torch.')} matmul on {cpu_model()}, {threads} threads"


def trial_peak(device: torch.device, share: float = 1.0, world: int = 1, *, peak=device_peak) -> float | None:
    """The peak a trial's MFU divides by: ``share`` of its GPU (a 0.25-GPU trial has a quarter of the GPU's peak to
    itself, so its MFU is over that quarter) times its ``world`` ranks; on a CPU the measured peak of the threads the
    trial runs with, whole. None where the device has no known peak."""
    one, _ = peak(device)
    if not one:
        return None
    return one * world * (share if device.type == "cuda" else 1.0)
