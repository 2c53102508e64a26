"""Security promises, checked on real runs:

- no pickle in the store, and nothing read from the store is unpickled (every file of a real S3 sweep scanned for
  pickle's magic, and of a DeepSpeed trial's checkpoint read back as JSON and safetensors; the code that reads the
  store scanned for unpickling calls);
- credentials come from the environment and appear nowhere: not in the store, not in the driver's output, not in
  Ray's logs or Tune's scratch files (the secret of an S3 run searched in all of them); a URI carrying them is
  refused with the secret masked (tests/bad_inputs covers those errors);
- the embedded Ray listens on loopback only (every TCP listener of every process it started), with no dashboard,
  and with Ray's token authentication on; the cluster path keeps token auth on (tests/orchestrator/test_cluster.py
  refuses a wrong token; tests/deploy checks every manifest; deploy/README.md documents it).
"""
from __future__ import annotations

import ast
import json
import os
import secrets
import socket

import pytest

from faultkit import REPO, cmdline_of, environ_of, wait_for
from support import package_files

PICKLE_MAGIC = tuple(bytes([0x80, proto]) for proto in (2, 3, 4, 5))  # pickle protocols 2-5 start with PROTO


def listeners(pids: list[int]) -> list[tuple[str, int, str]]:
    """(local address, port, process) of every listening TCP socket the processes hold."""
    inodes: dict[str, str] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes[link[8:-1]] = cmdline_of(pid)
        except OSError:
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.read().splitlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and parts[9] in inodes:  # 0A: LISTEN
                    addr, port = parts[1].split(":")
                    out.append((_address(addr), int(port, 16), inodes[parts[9]]))
    return out


def _address(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))  # /proc writes each 32-bit word little-endian
    return socket.inet_ntop(socket.AF_INET6, words)


def serves_dashboard(cmdline: str) -> bool:
    """Whether a listening process serves Ray's dashboard (its UI or its modules). Ray starts its API server
    (ray/dashboard/dashboard.py) even with ``include_dashboard=False``, then with no frontend and only the usage-stats
    module; and with ray[default] installed (Ray Jobs) each node runs its dashboard agent (ray::DashboardAgent). Both
    listen on loopback like everything else; neither serves the dashboard."""
    words = cmdline.split()
    program = words[1] if len(words) > 1 and os.path.basename(words[0]).startswith("python") else words[0]
    if program.endswith("dashboard/dashboard.py"):
        return "--disable-frontend" not in words or "--modules-to-load=UsageStatsHead" not in words
    agent = program == "ray::DashboardAgent" or program.endswith("dashboard/agent.py")
    return "dashboard" in program.lower() and not agent


def is_loopback(address: str) -> bool:
    return address in ("127.0.0.1", "::1", "::ffff:127.0.0.1")


@pytest.mark.slow
def test_s3_sweep_keeps_no_pickle_no_secret_and_ray_on_loopback(make_grid, ray_env, moto_s3, tmp_path):
    secret = "Sx" + secrets.token_hex(20)  # this run's secret: must be found nowhere
    env = moto_s3.env("AKIATESTKEY", secret)  # moto checks no signature: any key pair is accepted
    client = moto_s3.client("AKIATESTKEY", secret)
    grid = make_grid("sec", methods={"bias": {}}, budgets=[1.0e10], run={"checkpoint_every_s": 0.3})
    log_path = str(tmp_path / "submit.log")
    ray_env.env.update(env)
    driver = ray_env.start(["submit", grid, "--storage", "s3://bucket/sweeps"], log_path)
    try:
        # While the trial runs: what the embedded Ray listens on, and how.
        wait_for(ray_env.trial_workers, timeout_s=240, what="a trial worker", alive=driver)
        pids = ray_env.pids()
        ears = listeners(pids)
        raylets = [p for p in pids if "raylet" in cmdline_of(p).split(" ")[0]]
        auth_modes = {environ_of(p).get("RAY_AUTH_MODE") for p in raylets}
        assert driver.wait(timeout=300) == 0, open(log_path).read()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    ray_env.stop()

    assert ears, "found no listening socket of the embedded Ray"
    assert all(is_loopback(addr) for addr, _, _ in ears), [e for e in ears if not is_loopback(e[0])]
    assert not [e for e in ears if e[1] == 8265 or serves_dashboard(e[2])], ears  # no dashboard
    assert raylets and auth_modes == {"token"}, auth_modes  # Ray's token auth on for the embedded node too

    # The store: every object, no pickle, no secret.
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket="bucket")
            for o in page.get("Contents", [])]
    assert any(k.endswith("trials.parquet") for k in keys) and any("/checkpoints/" in k for k in keys)
    for key in keys:
        body = client.get_object(Bucket="bucket", Key=key)["Body"].read()
        assert not body.startswith(PICKLE_MAGIC), key
        assert secret.encode() not in body, key
    # Logs and scratch: the driver's output, Ray's session logs, Tune's files (all under the test's temp dir).
    assert secret not in open(log_path).read()
    leaked = []
    for root, _, files in os.walk(ray_env.tmp):
        for name in files:
            path = os.path.join(root, name)
            try:
                with open(path, "rb") as f:
                    if secret.encode() in f.read():
                        leaked.append(path)
            except OSError:
                pass
    assert not leaked, leaked


# --- the code that reads the store unpickles nothing -------------------------------------------------------------
UNPICKLING = {("pickle", "load"), ("pickle", "loads"), ("cloudpickle", "load"), ("cloudpickle", "loads"),
              ("dill", "load"), ("dill", "loads"), ("torch", "load"), ("pd", "read_pickle"),
              ("pandas", "read_pickle"), ("joblib", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load")}


def unpickling_calls(path: str) -> list[str]:
    """Calls that unpickle (or run arbitrary YAML tags) in one source file: ``module.func(...)`` from the list
    above, ``np.load(..., allow_pickle=True)``, ``yaml.load`` with a loader that is not a safe one."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)):
            continue
        mod, func = node.func.value.id, node.func.attr
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if (mod, func) == ("torch", "load") and kw.get("weights_only") == "True":
            continue  # tensors only: torch's restricted unpickler refuses anything else
        if (mod, func) in UNPICKLING or (kw.get("allow_pickle") == "True") or \
                (mod == "yaml" and func in ("load", "load_all") and "Safe" not in kw.get("Loader", "")
                 and kw.get("Loader") != "_YAML_LOADER"):
            found.append(f"{os.path.relpath(path, REPO)}:{node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_nothing_that_reads_the_store_unpickles():
    from orchestrator import store

    assert "Safe" in store._YAML_LOADER.__name__  # the grid is read with a safe loader
    files = package_files()
    relative = {os.path.relpath(f, REPO) for f in files}
    assert {"orchestrator/store.py", "workers/checkpoint.py", "fsio/__init__.py", "analysis/load.py",
            "core/store.py"} <= relative, sorted(relative)  # the walk reaches every package
    found = [hit for path in files for hit in unpickling_calls(path)]
    assert not found, found


def test_the_scan_finds_an_unpickling_call(tmp_path):
    """The scanner itself: each kind of call it must flag, in a file it has never seen; and what it lets pass."""
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle, torch, yaml, numpy as np\n"
                   "pickle.loads(b'')\ntorch.load('x')\nyaml.load(s, Loader=yaml.Loader)\n"
                   "np.load('x', allow_pickle=True)\n")
    assert [hit.rsplit(":", 2)[1] for hit in unpickling_calls(str(bad))] == ["2", "3", "4", "5"]
    good = tmp_path / "good.py"
    good.write_text("import torch, yaml\ntorch.load('x', weights_only=True)\nyaml.load(s, Loader=yaml.SafeLoader)\n")
    assert unpickling_calls(str(good)) == []


class Stop(Exception):
    pass


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_deepspeed_trials_keep_no_pickle_in_the_store(tiny_model, pairs_file, tmp_path):
    """A 2-rank DeepSpeed trial (ZeRO 3, CPU) killed mid-run: every file of its checkpoint is JSON or safetensors,
    read back here with parsers that run no code, none a pickle or torch.save's zip. Its code calls neither
    DeepSpeed's checkpoint functions (torch.save / torch.load underneath) nor any that unpickles."""
    from safetensors.torch import load as safetensors_load

    from workers.distributed import run_local
    from core.spec import TrialSpec

    path = os.path.join(REPO, "workers", "distributed.py")
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    calls = {node.func.attr for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert not calls & {"save_checkpoint", "load_checkpoint"}
    assert not unpickling_calls(path)

    spec = TrialSpec(model=tiny_model, method="full", budget_flops=6.5e9, train_data=str(pairs_file), batch_size=16,
                     precision="fp32", num_threads=1, chunk_size=4, checkpoint_every_s=0.0,
                     deepspeed_config=json.dumps({"zero_optimization": {"stage": 3}}))
    uri = str(tmp_path / "ckpt")

    def kill_at_step_2(event):
        if event.step >= 2:
            raise Stop  # run_local kills the ranks: what a running trial keeps in the store stays there

    with pytest.raises(Stop):
        run_local(spec, 2, checkpoint_uri=uri, report=kill_at_step_2, timeout_s=300)
    bodies = {}
    for root, _, names in os.walk(uri):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                bodies[os.path.relpath(os.path.join(root, name), uri)] = f.read()
    pickled = [name for name, body in bodies.items() if body.startswith(PICKLE_MAGIC + (b"PK\x03\x04",))]
    assert not pickled, pickled  # PK: a zip, torch.save's format (a pickle and the tensors' bytes)
    for name, body in bodies.items():
        if name.endswith(".safetensors"):
            assert safetensors_load(body), name
        elif name.endswith(".json"):
            assert json.loads(body)["progress"]["step"] >= 1, name
        else:
            assert name == "LATEST" and body.decode().startswith("step-"), name
    assert any(name.endswith("tensors.safetensors") for name in bodies), sorted(bodies)
