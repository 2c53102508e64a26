"""Our own Ray processes in tests: a private temp dir per test, an environment marker every process started
under it inherits (``REPURPOSE_TEST_RAY=<that dir>``), the CLI in a subprocess, and `ray start` nodes on free
ports. Teardown stops exactly the processes that carry the marker: ours, never another session's Ray on this
machine. Unix socket paths must stay under ~107 characters, hence the short temp dirs under /tmp."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
MARKER = "REPURPOSE_TEST_RAY"
CLI_TIMEOUT_S = 300


# --- processes -----------------------------------------------------------------------------------------------
def environ_of(pid: int | str) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def cmdline_of(pid: int | str) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace").strip()


def marked_pids(marker_value: str, **env_match: str) -> list[int]:
    """Live processes (zombies excluded) whose environment has ``REPURPOSE_TEST_RAY=<marker_value>`` and every
    ``env_match`` item."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            env = environ_of(name)
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:  # gone, or not ours to read
            continue
        if env.get(MARKER) == marker_value and state != b"Z" and all(env.get(k) == v for k, v in env_match.items()):
            pids.append(int(name))
    return pids


def kill_all(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class RayEnv:
    """A private Ray temp dir, the environment for CLI subprocesses that use it (marked), and the means to find
    and stop exactly the processes started under it."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="rp", dir="/tmp")
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "REPURPOSE_STORAGE", "REPURPOSE_FAULT")}
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

    def start(self, args: list[str], log_path: str, **extra_env) -> subprocess.Popen:
        """``repurpose ARGS`` in the background, in its own session, stdout+stderr to ``log_path``."""
        with open(log_path, "w") as log:
            return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], env={**self.env, **extra_env},
                                    cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def pids(self, **env_match: str) -> list[int]:
        return marked_pids(self.tmp, **env_match)

    def names(self) -> list[str]:
        names = []
        for pid in self.pids():
            try:
                names.append(cmdline_of(pid)[:200])
            except OSError:
                pass
        return names

    def trial_workers(self, **env_match: str) -> list[int]:
        """Tune's function-trainable workers (process title ``ray::ImplicitFunc...``) of this environment."""
        out = []
        for pid in self.pids(**env_match):
            try:
                if cmdline_of(pid).startswith("ray::ImplicitFunc"):
                    out.append(pid)
            except OSError:
                pass
        return out

    def stop(self, grace_s: float = 3.0) -> None:
        """SIGTERM, then SIGKILL, every process carrying our marker."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.pids()
            kill_all(pids, sig)
            deadline = time.monotonic() + grace_s
            while pids and self.pids() and time.monotonic() < deadline:
                time.sleep(0.1)


def wait_for(condition, *, timeout_s: float, what: str, alive: subprocess.Popen | None = None,
             every_s: float = 0.1):
    """Polls ``condition`` until it returns something true (returned); fails if ``alive`` exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"the driver exited ({alive.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(every_s)


def ctrl_c_when(proc: subprocess.Popen, condition, *, timeout_s: float, what: str, wait_s: float) -> int:
    """Once ``condition`` holds, a terminal's Ctrl-C (SIGINT to the process group ``proc`` leads: raykit.start);
    returns its exit code. The group is SIGKILLed if it outlives ``wait_s`` or anything fails."""
    try:
        wait_for(condition, timeout_s=timeout_s, what=what, alive=proc)
        os.killpg(proc.pid, signal.SIGINT)
        return proc.wait(timeout=wait_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- `ray start` nodes -----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_start(args: list[str], env: dict) -> None:
    """`ray start ARGS`: it daemonises its processes (logs in the temp dir) and returns; they inherit ``env``'s
    marker. Every port a node binds is a free one: two nodes share this machine, other sessions may run Ray."""
    ports = ["--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
             "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    if "--num-cpus" not in args:  # one logical CPU per node unless the test says how many
        ports += ["--num-cpus", "1"]
    proc = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", *args, *ports], env=env,
                          capture_output=True, text=True, timeout=180, start_new_session=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
