"""core/devices.py by hand: the datasheet table by the names torch reports, MFU and device-hours; and the CPU's
measured peak (workers/device_peak.py), measured once and cached."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from core.devices import PEAKS, TYPICAL_MFU, device_entry, device_hours, device_memory, mfu, peak_flops


@pytest.mark.parametrize("name,canonical,peak", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989e12),  # torch.cuda.get_device_name on an SXM5 board
    ("NVIDIA H100 PCIe", "H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", "H100 NVL", 835e12),
    ("NVIDIA H200", "H200 SXM", 989e12),
    ("NVIDIA A100-SXM4-80GB", "A100", 312e12),
    ("NVIDIA A100 80GB PCIe", "A100", 312e12),
    ("NVIDIA L40S", "L40S", 362e12),
    ("NVIDIA L40", "L40", 181e12),
    ("NVIDIA L4", "L4", 121e12),
    ("NVIDIA A10G", "A10G", 70e12),
    ("NVIDIA A10", "A10", 125e12),
    ("AMD Instinct MI300X", "MI300X", 1307.4e12),
])
def test_peak_by_device_name(name, canonical, peak):
    assert device_entry(name)[:2] == (canonical, peak) and peak_flops(name) == peak


@pytest.mark.parametrize("name", ["Tesla V100-SXM2-16GB", "Tesla T4", "NVIDIA GeForce GTX 1080", "cpu"])
def test_no_peak_without_bf16_or_entry(name):
    assert peak_flops(name) is None


def test_mfu_by_hand():
    # 6·N·D for N = 70M, D = 1M tokens = 4.2e17 FLOP in 1,000 s on an H100 SXM: 4.2e14 / 9.89e14 = 0.4247
    assert mfu(6 * 70e6 * 1e9, 1000.0, 989e12) == pytest.approx(4.2e17 / (1000 * 989e12))
    assert mfu(6 * 70e6 * 1e9, 1000.0, 989e12) == pytest.approx(0.42467, abs=1e-5)
    assert mfu(1e12, 0.0, 989e12) is None and mfu(1e12, 10.0, None) is None


def test_device_memory_by_name():
    from core.devices import device_memory

    assert device_memory("NVIDIA H100 80GB HBM3") == 80e9 and device_memory("H100") == 80e9  # Ray's accelerator_type
    assert device_memory("A100") == 40e9 and device_memory("NVIDIA A100-SXM4-80GB") == 80e9
    assert device_memory("NVIDIA L4") == 24e9 and device_memory("NVIDIA H200") == 141e9
    assert device_memory("Tesla T4") is None and device_memory("no such card") is None


def test_every_canonical_name_finds_its_own_row():
    """Table order: a name that contains another (GH200 / H200, L40S / L40 / L4) must reach its own row first."""
    for _, canonical, peak, _ in PEAKS:
        assert device_entry(f"NVIDIA {canonical}")[:2] == (canonical, peak), canonical


@pytest.mark.parametrize("name,gb", [
    ("NVIDIA GH200 480GB", 96),  # torch's name on the 96 GB HBM3 superchip (480 GB is its LPDDR5X + HBM3 total)
    ("NVIDIA GH200 144G HBM3e", 144),
    ("GH200", 96),  # Ray's accelerator_type says no size: the smaller, never the H200's 141
    ("NVIDIA H200", 141), ("H200", 141),
])
def test_gh200_is_not_an_h200(name, gb):
    assert device_entry(name)[0] == ("GH200" if "GH" in name else "H200 SXM")
    assert device_memory(name) == gb * 1e9


@pytest.mark.parametrize("name,canonical,peak,gb", [
    # 989 TFLOPS x 1/7 = 141.286 TFLOPS; the profile's 10 GB
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "H100 SXM MIG 1g.10gb", 141.2857142857e12, 10),
    # 312 x 3/7 = 133.714 TFLOPS; 20 GB
    ("NVIDIA A100-SXM4-40GB MIG 3g.20gb", "A100 MIG 3g.20gb", 133.7142857143e12, 20),
    # 989 x 7/7: the whole GPU as one slice
    ("NVIDIA H200 MIG 7g.141gb", "H200 SXM MIG 7g.141gb", 989e12, 141),
    ("A100-MIG-2g.10gb", "A100 MIG 2g.10gb", 89.1428571429e12, 10),  # a custom Ray accelerator label
])
def test_mig_slice_gets_its_share(name, canonical, peak, gb):
    got = device_entry(name)
    assert got[0] == canonical and got[1] == pytest.approx(peak, rel=1e-10)
    assert device_memory(name) == gb * 1e9


def test_device_hours_by_hand():
    # 1e21 FLOP at 40 % of 989e12: 1e21 / 3.956e14 = 2,527,805 s = 702.2 h
    assert TYPICAL_MFU == 0.40
    assert device_hours(1e21, 989e12) == pytest.approx(1e21 / (0.4 * 989e12) / 3600)
    assert device_hours(1e21, 989e12) == pytest.approx(702.17, abs=0.01)


def test_core_devices_is_pure():
    out = subprocess.run([sys.executable, "-c", "import core.devices, sys; print(sorted(m for m in "
                          "('torch', 'ray', 'pyarrow', 'pandas') if m in sys.modules))"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cpu_peak_measured_once_and_cached(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from workers import device_peak

    torch.set_num_threads(1)
    first = device_peak.cpu_peak_flops(cache_dir=str(tmp_path), sizes=(64, 128), seconds=0.05)
    assert first > 1e8  # even one loaded core multiplies 128 x 128 bf16 faster than 0.1 GFLOP/s
    monkeypatch.setattr(device_peak, "matmul_rate", lambda *a, **k: pytest.fail("measured again"))
    assert device_peak.cpu_peak_flops(cache_dir=str(tmp_path), sizes=(64, 128), seconds=0.05) == first
    (entry,) = json.loads((tmp_path / device_peak.CACHE_FILE).read_text()).values()
    assert entry["cpu"] == device_peak.cpu_model() and entry["threads"] == 1
    peak, source = device_peak.device_peak(torch.device("cpu"), cache_dir=str(tmp_path), sizes=(64, 128))
    assert peak == first and source.startswith("measured")


def test_cpu_peak_skips_sizes_that_would_outlast_their_time(monkeypatch):
    """A size whose one product would take longer than the time per size at the best rate so far is not timed (an
    emulated bf16 4096 product takes minutes on a CPU without native bf16)."""
    pytest.importorskip("torch")
    from workers import device_peak

    timed = []

    def rate(n, dtype, seconds):
        timed.append(n)
        return 1e9  # 1 GFLOP/s: 2*512^3 = 0.27 GFLOP (0.27 s), 2*1024^3 = 2.1 GFLOP (2.1 s > 1 s)
    monkeypatch.setattr(device_peak, "matmul_rate", rate)
    assert device_peak.best_rate((256, 512, 1024, 2048), None, seconds=1.0) == 1e9
    assert timed == [256, 512]


def test_cpu_peak_is_taken_in_the_dtype_auto_trains_in(monkeypatch, tmp_path):
    """Without native bf16 'auto' trains in fp32, so the peak MFU divides by is fp32's."""
    torch = pytest.importorskip("torch")
    from workers import device_peak

    seen = []
    monkeypatch.setattr(device_peak, "matmul_rate", lambda n, dtype, seconds: seen.append(dtype) or 1e9)
    monkeypatch.setattr(device_peak, "has_bf16", lambda device: False)
    device_peak.cpu_peak_flops(cache_dir=str(tmp_path), sizes=(64,), seconds=0.01)
    monkeypatch.setattr(device_peak, "has_bf16", lambda device: True)
    device_peak.cpu_peak_flops(cache_dir=str(tmp_path), sizes=(64,), seconds=0.01)
    assert seen == [torch.float32, torch.bfloat16]
    assert len(json.loads((tmp_path / device_peak.CACHE_FILE).read_text())) == 2  # one entry per dtype
