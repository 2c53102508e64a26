"""The driver end to end, through the CLI in a subprocess, on a real embedded Ray with the tiny model.

What a user relies on (docs/reference.md): the store's tables column for column; every trial spends its
budget and no more; metric rows exactly once per (trial_id, step), whatever crashed; a larger grid runs only
what is new; a failing trial is a row and exit code 1; bad input is one line, exit code 2, and no store.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from analysis.schema import METRICS_SCHEMA, TRIALS_SCHEMA
from raykit import REPO, wait_for
from support import clean_run

ALL_METHODS = {"full": {}, "freeze": {"trainable_fraction": [0.5]}, "bias": {}, "lora": {"rank": [4]}}
# The last step takes only the pairs that fit the budget and needs two of them (in-batch negatives): at most
# two pairs' cost (<= 94 tokens here, 6N = 1.2e6 FLOP per token for full) stay unspent. At 5e9 that is < 2.3 %.
MIN_SPENT = 0.97


# --- checks shared by the tests ------------------------------------------------------------------------------
def read_trials(sweep_dir) -> dict[str, dict]:
    return {r["trial_id"]: r for r in pq.read_table(os.path.join(sweep_dir, "trials.parquet")).to_pylist()}


def read_metrics(sweep_dir):
    import pandas as pd

    return pd.read_parquet(os.path.join(sweep_dir, "metrics"))


def check_store(sweep_dir, runnable_ids: set[str], contract) -> tuple[dict[str, dict], object]:
    """The store matches docs/reference.md and every runnable trial completed within its budget; returns
    (trials by id, metrics DataFrame)."""
    contract_trials, contract_metrics = contract
    trials_schema = pq.read_schema(os.path.join(sweep_dir, "trials.parquet"))
    assert trials_schema.names == TRIALS_SCHEMA.names
    assert {c: trials_schema.field(c).type for c in contract_trials} == contract_trials
    assert trials_schema.names[:len(contract_trials)] == list(contract_trials)
    metric_files = sorted(os.listdir(os.path.join(sweep_dir, "metrics")))
    assert metric_files == sorted(f"{t}.parquet" for t in runnable_ids)  # one file per trial, no temp files
    for name in metric_files:
        schema = pq.read_schema(os.path.join(sweep_dir, "metrics", name))
        assert schema.names == METRICS_SCHEMA.names
        assert {c: schema.field(c).type for c in contract_metrics} == contract_metrics
    assert not [f for _, _, files in os.walk(sweep_dir) for f in files if f.endswith((".pkl", ".pickle"))]

    trials = read_trials(sweep_dir)
    metrics = read_metrics(sweep_dir)
    assert not metrics.duplicated(["trial_id", "step"]).any()
    for trial_id in runnable_ids:
        t = trials[trial_id]
        assert t["status"] == "completed", (trial_id, t["reason"])
        assert MIN_SPENT * t["budget_flops"] <= t["flops"] <= t["budget_flops"], t
        assert t["hardware_flops"] >= t["flops"] > 0 and t["tokens"] > 0 and t["wall_s"] > 0
        assert math.isfinite(t["eval_loss"]) and math.isfinite(t["train_loss"])
        assert t["n_trainable"] <= t["n_params"] and t["node_id"]
        m = metrics[metrics.trial_id == trial_id].sort_values("step")
        assert m.step.tolist() == list(range(1, t["steps"] + 1))  # no step missing, none twice
        last = m.iloc[-1]
        assert (last.tokens, last.flops, last.eval_loss) == (t["tokens"], t["flops"], t["eval_loss"])
        assert m.flops.is_monotonic_increasing and (m.lr > 0).all() and m.eval_loss.iloc[:-1].isna().all()
    return trials, metrics


# --- (a) the whole path --------------------------------------------------------------------------------------
@pytest.mark.slow  # runs a sweep on Ray
def test_submit_all_methods_end_to_end(make_grid, ray_env, tmp_path, contract):
    grid = make_grid("e2e", methods=ALL_METHODS, budgets=[5.0e9])
    # a relative store (as the default ./sweeps): Ray Tune runs each trial in a working directory of its own, so the
    # trials must be given absolute URIs (token cache, checkpoints, kept weights) -- relative ones failed every trial
    storage = os.path.relpath(tmp_path / "store", REPO)  # ray_env runs the CLI in the repository
    plan = ray_env.json(["plan", grid, "--json"])
    runnable = {t["trial_id"] for t in plan["trials"] if t["skip_reason"] is None}
    assert len(runnable) == 4 and {t["method"] for t in plan["trials"]} == set(ALL_METHODS)

    proc = ray_env.run(["submit", grid, "--storage", storage])
    assert proc.returncode == 0, proc.stderr
    assert "sweep e2e: 4 trials, 0 already completed, 4 to run, 0 skipped" in proc.stderr
    assert "Traceback" not in proc.stderr

    sweep_dir = str(tmp_path / "store" / "e2e")
    trials, metrics = check_store(sweep_dir, runnable, contract)
    assert set(trials) == {t["trial_id"] for t in plan["trials"]}  # plan ids == store ids
    for p in plan["trials"]:
        t = trials[p["trial_id"]]
        assert (t["model"], t["method"], t["lora_rank"], t["trainable_fraction"], t["budget_flops"]) == (
            p["model"], p["method"], p["lora_rank"], p["trainable_fraction"], p["budget_flops"])
        assert t["planned_tokens"] == p["planned_tokens"]
        # The worker re-derives planned_steps with round() where the plan floors: they may differ by one.
        assert abs(t["planned_steps"] - p["steps"]) <= 1
    by_method = {t["method"]: t for t in trials.values()}
    assert by_method["full"]["n_trainable"] == by_method["full"]["n_params"]
    assert by_method["bias"]["n_trainable"] < by_method["lora"]["n_trainable"] < by_method["freeze"]["n_trainable"]
    assert sorted(os.listdir(os.path.join(sweep_dir, "checkpoints"))) == sorted(runnable)
    assert sorted(os.listdir(os.path.join(sweep_dir, "models"))) == sorted(runnable)  # kept weights, in the store

    status = ray_env.json(["status", "e2e", "--json", "--storage", storage])
    assert status["sweep"] == "e2e"
    assert status["counts"] == {"completed": 4, "running": 0, "pending": 0, "failed": 0, "skipped": 0}
    assert status["flops_spent"] == pytest.approx(sum(t["flops"] for t in trials.values()), rel=1e-12)
    assert status["flops_planned"] == pytest.approx(sum(t["budget_flops"] for t in trials.values()), rel=1e-12)


# --- (b) extending a sweep -----------------------------------------------------------------------------------
@pytest.mark.slow  # runs a sweep on Ray
def test_larger_grid_runs_only_the_new_trials(make_grid, ray_env, tmp_path, contract):
    storage = str(tmp_path / "store")
    sweep_dir = os.path.join(storage, "ext")
    first = ray_env.run(["submit", make_grid("ext", budgets=[4.0e9, 5.0e9]), "--storage", storage])
    assert first.returncode == 0, first.stderr
    done = read_trials(sweep_dir)
    files = {t: open(os.path.join(sweep_dir, "metrics", f"{t}.parquet"), "rb").read() for t in done}
    assert len(done) == 2 and all(r["status"] == "completed" for r in done.values())

    bigger = make_grid("ext", filename="ext-bigger.yaml", budgets=[4.0e9, 5.0e9, 6.0e9])
    second = ray_env.run(["submit", bigger, "--storage", storage])
    assert second.returncode == 0, second.stderr
    assert "sweep ext: 3 trials, 2 already completed, 1 to run, 0 skipped" in second.stderr

    trials, _ = check_store(sweep_dir, set(read_trials(sweep_dir)), contract)
    assert len(trials) == 3
    for trial_id, row in done.items():
        assert trials[trial_id] == row  # updated_at, wall_s and every other value untouched
        assert open(os.path.join(sweep_dir, "metrics", f"{trial_id}.parquet"), "rb").read() == files[trial_id]
    (new,) = set(trials) - set(done)
    assert trials[new]["budget_flops"] == 6.0e9
    assert ray_env.json(["status", "ext", "--json", "--storage", storage])["counts"]["completed"] == 3
    doc = yaml.safe_load(open(os.path.join(sweep_dir, "grid.yaml")))
    assert [h["grid"]["budgets"] for h in doc["history"]] == [[4.0e9, 5.0e9], [4.0e9, 5.0e9, 6.0e9]]


# --- (c) the driver killed mid-sweep, then resumed -----------------------------------------------------------
TRIAL_WORKER = "ray::ImplicitFunc"  # the Tune function trainable's worker process title


@pytest.mark.slow
def test_driver_killed_then_resumed(make_grid, ray_env, tmp_path, contract):
    # Tune runs the trials in grid order, two at a time: full@5e9 finishes while full@5e10 is mid-run, with
    # enough steps left (~60, several seconds) that it cannot finish in the moments its orphaned worker lives.
    grid = make_grid("crash", methods={"full": {}}, budgets=[5.0e9, 5.0e10, 4.0e9, 4.5e9],
                     run={"checkpoint_every_s": 0.5, "max_concurrent_trials": 2, "report_every_s": 0})
    storage = str(tmp_path / "store")
    sweep_dir = os.path.join(storage, "crash")
    driver = ray_env.start(["submit", grid, "--storage", storage], str(tmp_path / "submit.log"))
    try:
        wait_for(lambda: mid_run(sweep_dir), timeout_s=240, what="a completed and a running trial", alive=driver)
    finally:
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()

    # What the killed driver leaves: its trial workers die with it (within seconds: the embedded Ray's
    # raylet fate-shares with the driver, and workers exit when their raylet is gone).
    killed_at = time.monotonic()
    wait_for(lambda: not workers_left(ray_env), timeout_s=30, what="the killed driver's trial workers to exit")
    orphan_s = time.monotonic() - killed_at
    print(f"trial workers gone {orphan_s:.1f}s after the driver was killed; still alive: "
          f"{ray_env.names()}")
    ray_env.stop()  # leftover agents (they exit on their own after ~60 s): not ours to wait for

    before_trials = read_trials(sweep_dir)
    before_metrics = read_metrics(sweep_dir)
    completed_before = {k: r for k, r in before_trials.items() if r["status"] == "completed"}
    (interrupted,) = [k for k, r in before_trials.items() if r["method"] == "full" and r["budget_flops"] == 5e10]
    assert completed_before and interrupted not in completed_before
    ckpt = load_checkpoint_state(sweep_dir, interrupted)
    assert not ckpt["done"] and ckpt["step"] >= 2, ckpt["step"]

    proc = ray_env.run(["resume", "crash", "--storage", storage])
    assert proc.returncode == 0, proc.stderr
    assert f"{len(completed_before)} already completed" in proc.stderr

    trials, metrics = check_store(sweep_dir, set(before_trials), contract)
    for trial_id, row in completed_before.items():
        assert trials[trial_id] == row  # never run again, row untouched
    m = metrics[metrics.trial_id == interrupted].set_index("step")
    # Continued from its checkpoint: the rows up to it are the ones computed before the kill, not recomputed.
    for row in ckpt["rows"]:
        kept = m.loc[row["step"]]
        assert (kept.wall_s, kept.train_loss, kept.tokens) == (row["wall_s"], row["train_loss"], row["tokens"])
    old = before_metrics[before_metrics.trial_id == interrupted].set_index("step")
    for step in old.index[old.index <= ckpt["step"]]:
        assert m.loc[step].wall_s == old.loc[step].wall_s
    assert trials[interrupted]["steps"] > ckpt["step"]

    # ... and ends where a clean, uninterrupted run of the same trial ends.
    clean = clean_run(grid, interrupted)
    t = trials[interrupted]
    assert (t["steps"], t["tokens"], t["flops"]) == (clean["steps"], clean["tokens"], clean["flops"])
    assert t["eval_loss"] == pytest.approx(clean["eval_loss"], rel=1e-3)


def mid_run(sweep_dir) -> bool:
    """A trial completed, and another is running past step 2 with a checkpoint to continue from."""
    try:
        rows = read_trials(sweep_dir).values()
    except (FileNotFoundError, pa.ArrowInvalid):
        return False
    return (any(r["status"] == "completed" for r in rows)
            and any(r["status"] == "running" and (r["steps"] or 0) >= 2
                    and os.path.exists(os.path.join(sweep_dir, "checkpoints", r["trial_id"], "LATEST"))
                    for r in rows))


def workers_left(ray_env) -> list[str]:
    return [n for n in ray_env.names() if n.startswith(TRIAL_WORKER)]


def load_checkpoint_state(sweep_dir, trial_id: str) -> dict:
    ckpt_dir = os.path.join(sweep_dir, "checkpoints", trial_id)
    with open(os.path.join(ckpt_dir, "LATEST")) as f:
        name = f.read().strip()
    with open(os.path.join(ckpt_dir, name, "state.json")) as f:
        return json.load(f)["progress"]


# --- (d) a trial that cannot train ---------------------------------------------------------------------------
@pytest.mark.slow  # runs a sweep on Ray
def test_failing_trial_is_a_row_and_exit_code_1(make_grid, ray_env, tmp_path, tiny_model):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    # config and tokenizer intact (the plan reads only those), weights unreadable: loading fails on the worker
    (broken / "model.safetensors").write_bytes(b"\0not a safetensors file" * 64)
    grid = make_grid("fail", models=[tiny_model, str(broken)], run={"max_failures": 0})
    storage = str(tmp_path / "store")
    proc = ray_env.run(["submit", grid, "--storage", storage])
    assert proc.returncode == 1, proc.stderr

    trials = read_trials(os.path.join(storage, "fail"))
    by_model = {r["model"]: r for r in trials.values()}
    bad, good = by_model[str(broken)], by_model[tiny_model]
    assert bad["status"] == "failed" and "\n" not in bad["reason"]
    assert "SafetensorError" in bad["reason"]  # the worker's exception, not a generic "the trial failed"
    assert good["status"] == "completed" and good["reason"] is None
    assert f"failed {bad['trial_id']}: {bad['reason']}" in proc.stderr
    status = ray_env.json(["status", "fail", "--json", "--storage", storage])
    assert status["counts"]["failed"] == 1 and status["counts"]["completed"] == 1


# --- (e) bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["unknown-key", "missing-data", "bad-scheme", "unknown-sweep"])
def test_bad_input_is_one_line_exit_2_and_no_store(case, make_grid, ray_env, tmp_path):
    storage = str(tmp_path / "store")
    if case == "unknown-key":
        args = ["submit", make_grid("bad", train={"batch_size": 16, "learning_rate": 1e-4}), "--storage", storage]
        expect = "train.learning_rate: unknown key"
    elif case == "missing-data":
        args = ["submit", make_grid("bad", data={"train": str(tmp_path / "nope.jsonl")}), "--storage", storage]
        expect = "data.train: no file matches"
    elif case == "bad-scheme":
        storage = "ftp://x/sweeps"
        args = ["submit", make_grid("bad"), "--storage", storage]
        expect = "ftp://x/sweeps/bad: cannot read the store"
    else:
        args = ["resume", "nope", "--storage", storage]
        expect = "no sweep named 'nope'"
    proc = ray_env.run(args, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and expect in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not os.path.exists(tmp_path / "store")  # nothing written
    assert not ray_env.pids()  # and no Ray left behind (none should have started)


# --- S3 storage ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_submit_to_s3_store(make_grid, ray_env, moto_s3, tmp_path):
    import pyarrow.fs as pafs

    grid = make_grid("s3", methods={"bias": {}, "lora": {"rank": [4]}})  # data stays local
    storage = "s3://bucket/sweeps"
    proc = ray_env.run(["submit", grid, "--storage", storage], **moto_s3.env())
    assert proc.returncode == 0, proc.stderr
    assert "-> s3://bucket/sweeps/s3" in proc.stderr

    fs = pafs.S3FileSystem(endpoint_override=moto_s3.endpoint, region="us-east-1",
                           access_key="testing", secret_key="testing")
    names = {i.path for i in fs.get_file_info(pafs.FileSelector("bucket/sweeps/s3", recursive=True))}
    assert {"bucket/sweeps/s3/grid.yaml", "bucket/sweeps/s3/trials.parquet"} <= names
    assert not [n for n in names if "/.tmp-" in n]  # temp keys moved into place, none left
    trials_table = pq.read_table("bucket/sweeps/s3/trials.parquet", filesystem=fs)
    assert trials_table.schema.names == TRIALS_SCHEMA.names
    trials = {r["trial_id"]: r for r in trials_table.to_pylist()}
    metrics = pq.read_table("bucket/sweeps/s3/metrics", filesystem=fs).to_pandas()
    assert not metrics.duplicated(["trial_id", "step"]).any()
    assert len(trials) == 2 and set(metrics.trial_id) == set(trials)
    for trial_id, t in trials.items():
        assert t["status"] == "completed" and MIN_SPENT * t["budget_flops"] <= t["flops"] <= t["budget_flops"]
        assert metrics[metrics.trial_id == trial_id].step.sort_values().tolist() == list(range(1, t["steps"] + 1))
        assert f"bucket/sweeps/s3/checkpoints/{trial_id}/LATEST" in names  # workers wrote to S3 too

    status = ray_env.json(["status", "s3", "--json", "--storage", storage], **moto_s3.env())
    assert status["counts"]["completed"] == 2
    assert status["flops_spent"] == pytest.approx(sum(t["flops"] for t in trials.values()), rel=1e-12)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert not os.path.exists(os.path.join(repo, "s3:"))  # the URI was not taken for a local path
