"""Where the driver runs, decided before anything runs or is written (no Ray here): ray:// is refused with one line
naming the supported form; a local store with a remote address needs --shared-storage; an http(s) address sends
submit / resume to the Ray Job path (with the grid validated here first) and is refused for the other commands;
the job's exit code is the driver's."""
from __future__ import annotations

import shlex
import sys
import types

import pytest

from orchestrator import cli, jobs


@pytest.fixture
def ran(monkeypatch):
    """The driver's and the job path's entry points replaced by recorders: what would have run."""
    calls = []
    driver = types.ModuleType("orchestrator.driver")
    driver.submit = lambda args: calls.append(("driver", vars(args))) or 0
    driver.resume = driver.submit
    monkeypatch.setitem(sys.modules, "orchestrator.driver", driver)
    monkeypatch.setattr(jobs, "run_as_job", lambda args, command: calls.append(("job", command)) or 0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def one_line(capsys) -> str:
    (line,) = capsys.readouterr().err.strip().splitlines()
    return line


@pytest.mark.parametrize("argv", [["submit", "g.yaml"], ["resume", "s"], ["prepare", "g.yaml"], ["demo"]])
def test_ray_client_is_refused(ran, capsys, tmp_path, argv):
    assert cli.main([*argv, "--address", "ray://127.0.0.1:10001", "--storage", "s3://b/p"]) == 2
    line = one_line(capsys)
    assert line.startswith("--address ray://127.0.0.1:10001: Ray Client (ray://) is not supported")
    assert "--address http://HEAD:8265" in line and ran == []


def test_ray_client_from_the_environment_is_refused_too(ran, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert cli.main(["submit", "g.yaml", "--storage", "s3://b/p"]) == 2
    assert "Ray Client (ray://) is not supported" in one_line(capsys) and ran == []


@pytest.mark.parametrize("address", ["10.0.0.1:6379", "auto", "http://head:8265"])
def test_a_local_store_with_a_remote_address_needs_shared_storage(ran, capsys, tmp_path, address):
    store = str(tmp_path / "store")
    assert cli.main(["submit", "g.yaml", "--address", address, "--storage", store]) == 2
    line = one_line(capsys)
    assert line.startswith(f"--storage {store}: a local path with a remote cluster") and "--shared-storage" in line
    assert ran == [] and not (tmp_path / "store").exists()
    assert cli.main(["submit", "g.yaml", "--address", address, "--storage", store, "--shared-storage"]) == 0
    assert ran[-1][0] == ("job" if address.startswith("http") else "driver")
    assert cli.main(["submit", "g.yaml", "--address", address, "--storage", "s3://b/p"]) == 0  # object stores: fine


def test_inside_a_ray_job_the_rule_holds(ran, capsys, monkeypatch, tmp_path):
    """A Ray Job's driver sees RAY_ADDRESS (set by Ray): a remote cluster, so a local store needs the flag."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert cli.main(["resume", "s", "--storage", str(tmp_path)]) == 2
    assert "--shared-storage" in one_line(capsys)
    assert cli.main(["resume", "s", "--storage", str(tmp_path), "--shared-storage"]) == 0
    assert ran == [("driver", ran[0][1])] and ran[0][1]["address"] == "127.0.0.1:6379"


def test_the_embedded_ray_takes_any_store(ran, tmp_path):
    assert cli.main(["submit", "g.yaml", "--storage", str(tmp_path)]) == 0 and ran[0][0] == "driver"


@pytest.mark.parametrize("command", [["prepare", "g.yaml"], ["demo"]])
def test_a_job_server_address_is_only_for_submit_and_resume(ran, capsys, command):
    assert cli.main([*command, "--address", "http://head:8265", "--storage", "s3://b/p"]) == 2
    line = one_line(capsys)
    assert f"`repurpose {command[0]}` does not run as a Ray Job" in line and "ray job submit" in line


def test_the_job_entrypoint_carries_the_grid_and_the_flags(tmp_path, make_grid):
    grid = make_grid("jobgrid", methods={"bias": {}})
    args = cli.build_parser().parse_args(["submit", grid, "--address", "http://h:8265", "--storage", "rel/store",
                                          "--shared-storage", "--name", "other", "--takeover"])
    staged = tmp_path / "staged"
    staged.mkdir()
    entry, sweep = jobs._entrypoint(args, "submit", str(staged))
    words = shlex.split(entry)
    assert words[:3] == ["repurpose", "submit", "grid.yaml"] and sweep == "other"
    assert words[words.index("--storage") + 1] == str((tmp_path.cwd() / "rel" / "store").resolve())
    assert "--shared-storage" in words and "--takeover" in words and "--address" not in words
    from orchestrator.grid import load_grid

    shipped, original = load_grid(str(staged / "grid.yaml")), load_grid(grid)
    assert shipped.name == "other" and shipped.base_dir == original.base_dir and shipped.models == original.models


def test_a_bad_grid_is_not_submitted(capsys, tmp_path, monkeypatch):
    submitted = []
    monkeypatch.setattr(jobs, "_client", lambda factory, address: submitted.append(address))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    assert cli.main(["submit", str(bad), "--address", "http://127.0.0.1:1", "--storage", "s3://b/p"]) == 2
    assert one_line(capsys).startswith(f"{bad}: ") and submitted == []


class _Info:
    def __init__(self, status, code=None, message=""):
        self.status, self.driver_exit_code, self.message = types.SimpleNamespace(value=status), code, message


@pytest.mark.parametrize("info,stopped_by,expected", [
    (_Info("SUCCEEDED", 0), None, 0), (_Info("FAILED", 1), None, 1), (_Info("FAILED", 2), None, 2),
    (_Info("FAILED", 143), None, 143), (_Info("STOPPED"), 130, 130), (_Info("STOPPED"), None, 143),
    (_Info("FAILED", None, "runtime env setup failed"), None, 1)])
def test_job_exit_codes(info, stopped_by, expected):
    assert jobs.job_exit_code(info, stopped_by) == expected
