"""Accelerators' dense bf16 peak FLOP/s by name, and MFU / HFU: pure (no torch), so the planner and the store share
them.

Two utilisations (PaLM, Chowdhery et al. 2022, appendix B), both FLOP / (time in optimizer steps x the device's
peak): ``mfu`` from the paper's FLOP (core/flops.py ``cost_per_token`` x real tokens: 6·N per token for full
fine-tuning, the method's cost otherwise -- what trains), ``hfu`` from the hardware FLOP actually executed
(``sequence_hardware_flops``: padding, attention and recomputation included). Recomputation raises hfu, never mfu,
so it cannot pass for efficiency. A trial on CPU has no datasheet: workers/device_peak.py measures the machine's
best bf16 matmul once and caches it.

Peaks are dense (no 2:4 sparsity: NVIDIA's datasheets print the sparse figure with an asterisk, twice the dense
one) bf16 tensor-core rates with fp32 accumulation, at boost clock, per GPU.
"""
from __future__ import annotations

import re

# (pattern on the lower-cased device name, canonical name, dense bf16 FLOP/s, source). First match wins, so a name
# that contains another comes first ("gh200" before "h200", "h100 pcie" before "h100", "l40s" before "l40" before
# "l4"); tests/core/test_devices.py checks that every canonical name finds its own row.
PEAKS: tuple[tuple[str, str, float, str], ...] = (
    # NVIDIA GH200 Grace Hopper datasheet: the Hopper GPU at H100 SXM rates
    (r"gh200", "GH200", 989e12, "NVIDIA GH200 datasheet: 1,979 TFLOPS sparse / 2"),
    # NVIDIA H100 Tensor Core GPU datasheet (2023): BF16 1,979 TFLOPS* SXM, 1,513* PCIe, 1,671* NVL (*sparse)
    (r"h100.*pcie", "H100 PCIe", 756e12, "NVIDIA H100 datasheet: 1,513 TFLOPS sparse / 2"),
    (r"h100.*nvl", "H100 NVL", 835e12, "NVIDIA H100 datasheet: 1,671 TFLOPS sparse / 2"),
    (r"h100", "H100 SXM", 989e12, "NVIDIA H100 datasheet: 1,979 TFLOPS sparse / 2"),
    # NVIDIA H200 Tensor Core GPU datasheet (2024): BF16 1,979 TFLOPS* SXM, 1,671* NVL
    (r"h200.*nvl", "H200 NVL", 835e12, "NVIDIA H200 datasheet: 1,671 TFLOPS sparse / 2"),
    (r"h200", "H200 SXM", 989e12, "NVIDIA H200 datasheet: 1,979 TFLOPS sparse / 2"),
    # NVIDIA A100 Tensor Core GPU datasheet (2021): BF16 312 TFLOPS dense (624 sparse), SXM and PCIe alike
    (r"a100", "A100", 312e12, "NVIDIA A100 datasheet: BF16 312 TFLOPS"),
    # NVIDIA L40S datasheet (2023): BF16 733 TFLOPS* -> 362 dense (the datasheet's 362.05)
    (r"l40s", "L40S", 362e12, "NVIDIA L40S datasheet: 733 TFLOPS sparse / 2"),
    # NVIDIA L40 datasheet (2022): BF16 362.1 TFLOPS* -> 181 dense
    (r"l40\b", "L40", 181e12, "NVIDIA L40 datasheet: 362 TFLOPS sparse / 2"),
    # NVIDIA L4 datasheet (2023): BF16 242 TFLOPS* -> 121 dense
    (r"\bl4\b", "L4", 121e12, "NVIDIA L4 datasheet: 242 TFLOPS sparse / 2"),
    # A10G (AWS G5): NVIDIA publishes no datasheet; AWS quotes no bf16 rate. 70 TFLOPS is the commonly cited dense
    # figure (GA102 at the A10G's lower clocks) -- an estimate, not a datasheet number.
    (r"a10g", "A10G", 70e12, "estimate: no NVIDIA datasheet for the A10G"),
    # NVIDIA A10 datasheet (2021): BF16 250 TFLOPS* -> 125 dense
    (r"\ba10\b", "A10", 125e12, "NVIDIA A10 datasheet: 250 TFLOPS sparse / 2"),
    # NVIDIA HGX B200 (Blackwell datasheet, 2024): FP16/BF16 4.5 PFLOPS* per GPU -> 2.25 dense
    (r"b200", "B200", 2250e12, "NVIDIA Blackwell datasheet: 4.5 PFLOPS sparse / 2"),
    # AMD Instinct MI300X data sheet (2023): BF16 1,307.4 TFLOPS dense (2,614.9 with sparsity)
    (r"mi300x", "MI300X", 1307.4e12, "AMD Instinct MI300X data sheet: BF16 1,307.4 TFLOPS"),
)

# A MIG slice ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "A100-MIG-3g.20gb"): <g> of the GPU's 7 compute slices and the
# profile's memory (NVIDIA Multi-Instance GPU user guide: A100, H100, H200 and GH200 split into at most 7 compute
# slices; the profile name is "<compute slices>g.<memory>gb"). Its peak is g/7 of the whole GPU's.
MIG_SLICES = 7
MIG_PROFILE = re.compile(r"mig[\s_-]*(\d)g\.(\d+)gb")

# No bf16 units (V100, T4): bf16 is emulated there, so there is no bf16 peak to divide by; the trial falls back to
# fp16/fp32 and its mfu is left null rather than measured against the wrong unit.
NO_BF16 = (r"v100", r"\bt4\b", r"p100")

# For plan estimates (device-hours at an assumed MFU): 0.40, a working figure. For scale: PaLM 540B
# reached 46.2 % MFU, Megatron-Turing NLG 530B 30.2 % and GPT-3 21.3 % (Chowdhery et al. 2022, "PaLM", Table 3);
# models below ~1B at batch 1024 x 75 tokens are smaller per kernel and will sit lower -- benchmarks/gpu.py
# measures what this code reaches.
TYPICAL_MFU = 0.40
TYPICAL_MFU_SOURCE = "a working figure; PaLM (Chowdhery et al. 2022, Table 3): 46.2 % at 540B"


# Device memory, GB as the datasheets print it (10^9 bytes: a little under what torch reports, e.g. an H100 80GB has
# 85.5e9 bytes), by canonical name (PEAKS). Where a card comes in several sizes (``MEMORY_VARIANTS_GB``) the name
# says which ("A100-SXM4-80GB", "GH200 144G HBM3e"); a bare name (Ray's accelerator_type "A100", "GH200") is taken as
# the smallest, so that a trial is never sized for memory its GPU may lack.
MEMORY_GB = {
    "H100 PCIe": 80, "H100 NVL": 94, "H100 SXM": 80,  # NVIDIA H100 datasheet
    "H200 NVL": 141, "H200 SXM": 141,  # NVIDIA H200 datasheet
    "GH200": 96,  # NVIDIA GH200 datasheet: 96 GB HBM3, or 144 GB HBM3e (MEMORY_VARIANTS_GB)
    "A100": 40,  # NVIDIA A100 datasheet: 40 GB or 80 GB
    "L40S": 48, "L40": 48, "L4": 24,  # NVIDIA L40S, L40 and L4 datasheets
    "A10G": 24, "A10": 24,  # AWS G5 documentation; NVIDIA A10 datasheet
    "B200": 180,  # NVIDIA HGX B200 (Blackwell datasheet): 180 GB per GPU
    "MI300X": 192,  # AMD Instinct MI300X data sheet
}
# The sizes a name may state, smallest first. "NVIDIA GH200 480GB" states the superchip's HBM3 + LPDDR5X total, not
# a GPU size: not a variant, so it reads as the smallest.
MEMORY_VARIANTS_GB = {"A100": (40, 80), "GH200": (96, 144)}


def device_memory(device_name: str) -> float | None:
    """Bytes of memory of one device, by name (core.memory sizes trials against it); None if not in the table. A MIG
    slice has its profile's memory."""
    entry = device_entry(device_name)
    if entry is None:
        return None
    mig = MIG_PROFILE.search(device_name.lower())
    if mig:
        return int(mig.group(2)) * 1e9
    canonical = entry[0]
    stated = [int(g) for g in re.findall(r"(\d+)\s*gb?\b", device_name.lower())]
    variants = [g for g in MEMORY_VARIANTS_GB.get(canonical, ()) if g in stated]
    gb = variants[0] if variants else MEMORY_GB.get(canonical)
    return gb * 1e9 if gb else None


def device_entry(device_name: str) -> tuple[str, float, str] | None:
    """(canonical name, dense bf16 FLOP/s, source) for a device name as ``torch.cuda.get_device_name`` gives it
    ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA L4") or Ray's accelerator type ("H100"); None if
    unknown or without bf16. A MIG slice: its share of the GPU's peak (``MIG_PROFILE``)."""
    name = device_name.lower()
    if any(re.search(p, name) for p in NO_BF16):
        return None
    for pattern, canonical, peak, source in PEAKS:
        if re.search(pattern, name):
            mig = MIG_PROFILE.search(name)
            if mig:
                g = int(mig.group(1))
                return (f"{canonical} MIG {g}g.{mig.group(2)}gb", peak * g / MIG_SLICES,
                        f"{source}; MIG {g}g: {g}/{MIG_SLICES} of the GPU")
            return canonical, peak, source
    return None


def peak_flops(device_name: str) -> float | None:
    """The device's dense bf16 peak FLOP/s from the table, None if it is not there."""
    entry = device_entry(device_name)
    return entry[1] if entry else None


def mfu(flops: float, train_s: float, peak: float | None) -> float | None:
    """FLOP / (seconds in optimizer steps x peak FLOP/s); None without a peak or without time. The paper's FLOP give
    the model FLOPs utilisation (``mfu``), the hardware FLOP the hardware FLOPs utilisation (``hfu``)."""
    if not peak or not train_s or train_s <= 0:
        return None
    return flops / (train_s * peak)


hfu = mfu  # the same ratio over the hardware FLOP


def device_hours(hardware_flops: float, peak: float, mfu_assumed: float = TYPICAL_MFU) -> float:
    """Hours one device needs for ``hardware_flops`` at ``mfu_assumed`` of its peak (the plan's estimate)."""
    return hardware_flops / (peak * mfu_assumed) / 3600.0
