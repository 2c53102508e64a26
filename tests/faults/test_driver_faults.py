"""The driver SIGKILLed at seeded moments, a damaged checkpoint, then `resume`: nothing lost, nothing counted twice,
no completed trial run again.

One sweep lives through a chain of runs, each a real process killed by the product's own test hook
(``orchestrator.store.fault_point``, armed by ``REPURPOSE_FAULT=<point>:<n>``; the seed picks n):

    submit  --kill before the first report-->  resume --kill mid-trial, once a checkpoint is on disk-->
    resume  --kill during a store flush-->     resume --kill inside a store write (temp written, not renamed)-->
    resume  --kill right after a trial completes-->  resume (clean) -> every trial completed

The mid-trial kill is the test's own SIGKILL, sent once an unfinished trial has written its n-th checkpoint (the
seed picks n): so some kill always leaves an interrupted trial with a checkpoint, however fast or slow the trials
run on the machine. After the first kill that does, that checkpoint's tensors file is cut in half: the trial falls back to the checkpoint before it (or restarts from scratch) and says so.

After every kill the store is checked as it stands (no row twice; every completed trial whole), and the next run
must leave every trial completed before it untouched. At the end every trial is complete and whole, and the rows
of the trials each kill interrupted are counted against that kill. Chained, one Ray start per run: the whole
chain takes about as long as three separate kill-and-resume tests would.
"""
from __future__ import annotations

import os
import random
import signal
from subprocess import CompletedProcess

import pytest

from faultkit import Counts, Snapshot, check, checkpoint_dirs, checkpoint_progress, latest_checkpoint, wait_for

pytestmark = pytest.mark.slow

SEEDS = range(int(os.environ.get("REPURPOSE_FAULT_RUNS", "1")))  # more runs: REPURPOSE_FAULT_RUNS=3
KILLED = -9  # subprocess returncode of a process killed by SIGKILL


def chain(seed: int) -> list[tuple[str, str, str | None]]:
    """(label, command, REPURPOSE_FAULT) per run; the seed picks which occurrence of each point kills."""
    rng = random.Random(seed)
    return [
        ("driver SIGKILL before the first report", "submit", "report:1"),
        ("driver SIGKILL mid-trial", "resume", f"checkpoints:{rng.randint(1, 2)}"),  # sent by the test
        ("driver SIGKILL during a store flush", "resume", f"mid_flush:{rng.randint(2, 3)}"),
        ("driver SIGKILL inside a store write", "resume", f"in_write:{rng.randint(2, 5)}"),
        ("driver SIGKILL right after a trial completes", "resume", "after_complete:1"),
        ("(clean resume)", "resume", None),
    ]


@pytest.mark.parametrize("seed", SEEDS)
def test_driver_killed_at_seeded_moments(seed, make_grid, ray_env, tmp_path, fault_table):
    name = f"chain{seed}"
    grid = make_grid(name, methods={"full": {}, "bias": {}, "lora": {"rank": [4]}}, budgets=[5.0e9, 1.2e10],
                     run={"checkpoint_every_s": 0.3, "max_concurrent_trials": 2, "report_every_s": 0})
    storage = str(tmp_path / "store")
    sweep_dir = os.path.join(storage, name)
    counts: dict[str, Counts] = {}
    interrupted: dict[str, set[str]] = {}  # label -> trials unfinished when that kill struck
    truncated: dict[str, str] = {}  # trial_id -> "previous" | "scratch"
    before = None
    for label, command, fault in chain(seed):
        args = ["submit", grid] if command == "submit" else ["resume", name]
        extra = {"REPURPOSE_FAULT": fault} if fault else {}
        if fault and fault.startswith("checkpoints:"):
            proc = kill_once_checkpointed(ray_env, [*args, "--storage", storage], sweep_dir,
                                          int(fault.partition(":")[2]), tmp_path / f"{command}.log")
        else:
            proc = ray_env.run([*args, "--storage", storage], **extra)
        ray_env.stop()  # what a killed driver leaves (its raylet's agents) goes before the next run starts
        now = Snapshot.take(sweep_dir)
        log = f"{label} ({fault}): rc={proc.returncode}\n{proc.stderr[-3000:]}"
        if fault:
            assert proc.returncode == KILLED, log  # the fault struck: this run did not just finish
        else:
            assert proc.returncode == 0, log
        assert "Traceback" not in proc.stderr, log
        # Completed trials of the previous state are untouched by this run; the store holds no row twice and
        # every completed trial whole, right after the kill.
        step = check(now, before)
        if before is not None:
            counts[previous_label] += Counts(rerun=step.rerun)
        counts[label] = Counts(lost=step.lost, duplicated=step.duplicated)
        interrupted[label] = now.unfinished()
        if fault and not truncated:
            truncated = truncate_latest_checkpoint(sweep_dir, now.unfinished())
            if truncated:
                counts["checkpoint truncated, then resume"] = Counts()
                interrupted["checkpoint truncated, then resume"] = set(truncated)
        before, previous_label = now, label

    final = before
    assert truncated, "no kill left an interrupted trial with a checkpoint to damage"
    assert final.trials and final.completed() == set(final.trials), {k: r["status"] for k, r in final.trials.items()}
    for label, ids in interrupted.items():
        end = check(final, trial_ids=ids)
        counts[label] += Counts(lost=end.lost, duplicated=end.duplicated)
    for trial_id, how in truncated.items():  # the damaged checkpoint is noted on the trial
        assert "unreadable" in (final.trials[trial_id]["reason"] or ""), (how, final.trials[trial_id])
    assert not [f for f in os.listdir(os.path.join(sweep_dir, "metrics")) if f.startswith(".tmp-")]
    assert not [f for f in os.listdir(sweep_dir) if f.startswith(".tmp-")]

    for label, c in counts.items():
        if label != "(clean resume)":
            fault_table.add(label, c)
    for label, c in counts.items():
        assert (c.lost, c.duplicated, c.rerun) == (0, 0, 0), (label, c)
    with open(fault_table.path) as f:  # the table on disk says the same
        assert all(line.split()[-3:] == ["0", "0", "0"] for line in f.read().splitlines()[1:])


def kill_once_checkpointed(ray_env, args: list[str], sweep_dir: str, n: int, log_path) -> CompletedProcess:
    """``repurpose ARGS``, SIGKILLed (the driver only, as the fault hook kills it) as soon as a trial that has not
    finished has n checkpoints on disk; its exit code and output."""
    def checkpointed() -> bool:
        root = os.path.join(sweep_dir, "checkpoints")
        return any(len(checkpoint_dirs(sweep_dir, t)) >= n and latest_checkpoint(sweep_dir, t)
                   and not checkpoint_progress(latest_checkpoint(sweep_dir, t))["done"]
                   for t in (os.listdir(root) if os.path.isdir(root) else []))

    proc = ray_env.start(args, str(log_path))
    try:
        wait_for(lambda: _quietly(checkpointed), timeout_s=240, what=f"a trial's checkpoint #{n}", alive=proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    with open(log_path) as f:
        return CompletedProcess(proc.args, proc.returncode, "", f.read())


def _quietly(condition) -> bool:
    """``condition()``, False while a file it reads is still being written (a checkpoint folder appears before its
    state.json)."""
    try:
        return condition()
    except (OSError, ValueError, KeyError):
        return False


def truncate_latest_checkpoint(sweep_dir: str, unfinished: set[str]) -> dict[str, str]:
    """Cuts the newest checkpoint's tensors file of one interrupted trial in half (one with an older checkpoint
    beside it if there is one: it must fall back to that; else it restarts from scratch). {trial_id: how}, or {}
    when no interrupted trial has a checkpoint yet."""
    candidates = [t for t in sorted(unfinished) if latest_checkpoint(sweep_dir, t)
                  and not checkpoint_progress(latest_checkpoint(sweep_dir, t))["done"]]
    if not candidates:
        return {}
    with_previous = [t for t in candidates if len(checkpoint_dirs(sweep_dir, t)) >= 2]
    trial_id = (with_previous or candidates)[0]
    path = os.path.join(latest_checkpoint(sweep_dir, trial_id), "tensors.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return {trial_id: "previous" if with_previous else "scratch"}
