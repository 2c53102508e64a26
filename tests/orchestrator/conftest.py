"""Fixtures for the driver's end-to-end tests: the CLI in a subprocess, a private Ray temp dir per test, grids.

Every test that starts Ray gets its own short temp dir (unix socket paths must stay under ~107 chars) and a
marker in the environment its processes inherit (``REPURPOSE_TEST_RAY=<that dir>``). Teardown stops exactly
the processes that carry the marker: ours, never another session's Ray on this machine.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pytest
import yaml

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MARKER = "REPURPOSE_TEST_RAY"
CLI_TIMEOUT_S = 300


# --- processes -----------------------------------------------------------------------------------------------
def marked_pids(marker_value: str) -> list[int]:
    """PIDs of live processes whose environment has ``REPURPOSE_TEST_RAY=<marker_value>`` (zombies excluded)."""
    needle = f"{MARKER}={marker_value}".encode()
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:  # gone, or not ours to read
            continue
        if needle in env and state != b"Z":
            pids.append(int(name))
    return pids


def process_names(pids: list[int]) -> list[str]:
    names = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                names.append(f.read().replace(b"\0", b" ").decode(errors="replace")[:200])
        except OSError:
            pass
    return names


def stop_marked(marker_value: str, grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL, every process carrying our marker."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = marked_pids(marker_value)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while pids and marked_pids(marker_value) and time.monotonic() < deadline:
            time.sleep(0.1)


class RayEnv:
    """A private Ray temp dir and the environment for CLI subprocesses that use it; finds and stops the
    processes started under it (they all inherit ``REPURPOSE_TEST_RAY=<tmp>``)."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="rp", dir="/tmp")
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "REPURPOSE_STORAGE")}
        # TMPDIR too: Tune's scratch dir (tempfile.mkdtemp) of a killed driver lands here, not in /tmp
        env.update(RAY_TMPDIR=self.tmp, TMPDIR=self.tmp, PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false",
                   PYTHONUNBUFFERED="1", **{MARKER: self.tmp})
        self.env = env

    def run(self, args: list[str], timeout: float = CLI_TIMEOUT_S, **extra_env) -> subprocess.CompletedProcess:
        """``repurpose ARGS`` in a subprocess (Ray is started and shut down by the product itself)."""
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env={**self.env, **extra_env},
                              cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def json(self, args: list[str], **extra_env) -> dict:
        proc = self.run(args, **extra_env)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def start(self, args: list[str], log_path: str) -> subprocess.Popen:
        """``repurpose ARGS`` in the background, in its own session, stdout+stderr to ``log_path``."""
        with open(log_path, "w") as log:
            return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], env=self.env, cwd=REPO,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def pids(self) -> list[int]:
        return marked_pids(self.tmp)

    def names(self) -> list[str]:
        return process_names(self.pids())

    def stop(self) -> None:
        stop_marked(self.tmp)


@pytest.fixture
def ray_env():
    """A RayEnv; teardown stops every process started under it and removes its temp dir."""
    ray = RayEnv()
    yield ray
    ray.stop()
    shutil.rmtree(ray.tmp, ignore_errors=True)


# --- grids and the store -------------------------------------------------------------------------------------
@pytest.fixture
def make_grid(tmp_path, tiny_model, pairs_file, eval_file):
    """``make_grid(name, **sections) -> path``: a grid on the tiny model and the fixture data; keyword
    arguments replace top-level keys (``methods=…``, ``budgets=…``, ``run=…``)."""

    def make(name: str, filename: str | None = None, **sections) -> str:
        grid = {"name": name, "models": [tiny_model], "methods": {"bias": {}}, "budgets": [5.0e9],
                "data": {"train": pairs_file, "eval": eval_file}, "train": {"batch_size": 16},
                "plan": {"min_steps": 3}}
        grid.update(sections)
        path = tmp_path / (filename or f"{name}.yaml")
        path.write_text(yaml.safe_dump(grid, sort_keys=False))
        return str(path)

    return make


# CONTRACTS.md "The store", written out here (not imported from analysis.schema) so that drift fails a test.
CONTRACT_TRIALS = {
    "sweep": pa.string(), "trial_id": pa.string(), "model": pa.string(), "method": pa.string(),
    "lora_rank": pa.int64(), "trainable_fraction": pa.float64(), "budget_flops": pa.float64(),
    "n_params": pa.int64(), "n_trainable": pa.int64(), "status": pa.string(), "reason": pa.string(),
    "tokens": pa.int64(), "steps": pa.int64(), "flops": pa.float64(), "hardware_flops": pa.float64(),
    "eval_loss": pa.float64(), "train_loss": pa.float64(), "wall_s": pa.float64(),
}
CONTRACT_METRICS = {
    "sweep": pa.string(), "trial_id": pa.string(), "step": pa.int64(), "tokens": pa.int64(),
    "flops": pa.float64(), "train_loss": pa.float64(), "lr": pa.float64(), "wall_s": pa.float64(),
    "eval_loss": pa.float64(), "tokens_per_s": pa.float64(),
}


@pytest.fixture(scope="session")
def contract() -> tuple[dict, dict]:
    """(trials.parquet, metrics/) column -> Arrow type, in the contract's order."""
    return CONTRACT_TRIALS, CONTRACT_METRICS
