"""Reading the store: contract columns and dtypes (also when empty), clear errors, S3 via a moto server, and no
torch/ray import."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import analysis
import storegen
from analysis import StoreError, load_metrics, load_trials, recipe_at, write_fit_outputs
from analysis.schema import (
    CONTRACT_METRICS_COLUMNS,
    CONTRACT_TRIALS_COLUMNS,
    METRICS_DIR,
    METRICS_SCHEMA,
    TRIALS_FILE,
)


def test_import_pulls_in_neither_torch_nor_ray():
    code = ("import analysis, sys; heavy = {'torch', 'ray', 'transformers', 'peft', 'deepspeed', 'matplotlib'}; "
            "bad = heavy & set(sys.modules); assert not bad, bad")
    repo = Path(analysis.__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(repo))


def test_round_trip_columns_dtypes_and_rows(tmp_path):
    trials = storegen.make_trials(slices={"full": (None,), "lora": (8,)}, models=tuple(storegen.PYTHIA)[:2],
                                  budgets=storegen.BUDGETS[:2], fail=0.25, seed=1)
    uri = storegen.write_store(tmp_path, trials)
    got = load_trials(uri)
    assert list(got.columns[:len(CONTRACT_TRIALS_COLUMNS)]) == list(CONTRACT_TRIALS_COLUMNS)
    # a store written before the family, pooling, retrieval and mfu columns existed reads them as null
    assert got["family"].isna().all() and got["ndcg_at_10"].isna().all() and got["mfu"].dtype == np.float64
    assert "planned_tokens" in got.columns and "bad_lines" not in got.columns  # extensions only if present
    assert len(got) == len(trials)
    assert got["lora_rank"].dtype == "Int64" and got["n_params"].dtype == "Int64"
    assert got["eval_loss"].dtype == np.float64 and got["budget_flops"].dtype == np.float64
    assert got.loc[got["method"] == "full", "lora_rank"].isna().all()
    assert (got.loc[got["method"] == "lora", "lora_rank"] == 8).all()

    metrics = load_metrics(uri)
    assert list(metrics.columns[:len(CONTRACT_METRICS_COLUMNS)]) == list(CONTRACT_METRICS_COLUMNS)
    n_done = int((trials["status"] == "completed").sum())
    assert len(metrics) == 3 * n_done
    assert not metrics.duplicated(["trial_id", "step"]).any()
    assert metrics.equals(metrics.sort_values(["trial_id", "step"]).reset_index(drop=True))
    assert metrics["step"].dtype == "Int64"


def test_empty_sweep_has_the_same_dtypes(tmp_path):
    full = load_trials(storegen.write_store(tmp_path / "a", storegen.make_trials(
        slices={"full": (None,)}, models=tuple(storegen.PYTHIA)[:1], budgets=storegen.BUDGETS[:1])))
    (tmp_path / "b" / "empty").mkdir(parents=True)
    empty = load_trials(str(tmp_path / "b" / "empty"))
    assert empty.empty and list(empty.columns) == list(CONTRACT_TRIALS_COLUMNS)
    assert (empty.dtypes == full[list(CONTRACT_TRIALS_COLUMNS)].dtypes).all()
    metrics = load_metrics(str(tmp_path / "b" / "empty"))
    assert metrics.empty and list(metrics.columns) == list(CONTRACT_METRICS_COLUMNS)
    assert metrics["step"].dtype == "Int64" and metrics["train_loss"].dtype == np.float64


def test_missing_sweep_names_the_path(tmp_path):
    with pytest.raises(StoreError, match="no such sweep") as e:
        load_trials(str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in str(e.value)
    with pytest.raises(StoreError, match="no such sweep"):
        load_metrics(str(tmp_path / "nope"))


def test_missing_contract_column_is_a_store_error(tmp_path):
    (tmp_path / "s").mkdir()
    pq.write_table(pa.table({"sweep": ["s"], "trial_id": ["t"]}), tmp_path / "s" / TRIALS_FILE)
    with pytest.raises(StoreError, match="missing contract column.*model"):
        load_trials(str(tmp_path / "s"))


def test_metrics_tolerate_narrow_types_missing_extensions_and_temp_files(tmp_path):
    base = tmp_path / "s"
    (base / METRICS_DIR).mkdir(parents=True)
    row = {c: [None] for c in CONTRACT_METRICS_COLUMNS}
    row.update(sweep=["s"], trial_id=["b"], step=pa.array([2], pa.int32()), train_loss=[1.5])
    pq.write_table(pa.table(row), base / METRICS_DIR / "b.parquet")  # int32 step, no extension column
    full = pa.Table.from_pylist([{"sweep": "s", "trial_id": "a", "step": 1, "train_loss": 2.0,
                                  "hardware_flops": 3.0}], schema=METRICS_SCHEMA)
    pq.write_table(full, base / METRICS_DIR / "a.parquet")
    (base / METRICS_DIR / ".a.parquet.tmp").write_bytes(b"partial write")
    (base / METRICS_DIR / "_SUCCESS").write_bytes(b"")
    m = load_metrics(str(base))
    assert list(m["trial_id"]) == ["a", "b"] and list(m["step"]) == [1, 2]
    assert "hardware_flops" in m.columns and m["hardware_flops"].iloc[0] == 3.0
    assert m["step"].dtype == "Int64"


def test_s3_store_reads_like_the_local_one(tmp_path, moto_s3):
    trials = storegen.make_trials(slices={"full": (None,)}, models=tuple(storegen.PYTHIA)[:4],
                                  budgets=storegen.BUDGETS[:2], seed=2)
    local = storegen.write_store(tmp_path, trials, sweep="remote-sweep")
    host = moto_s3.endpoint.removeprefix("http://")
    creator = pafs.S3FileSystem(endpoint_override=host, scheme="http", access_key="testing",
                                secret_key="testing", allow_bucket_creation=True, allow_delayed_open=True)
    # allow_delayed_open: one PutObject per file (moto 5.2.1 mangles pyarrow's multipart completion)
    pafs.copy_files(local, "bucket/sweeps/remote-sweep", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=creator)
    uri = "s3://bucket/sweeps/remote-sweep"
    pd.testing.assert_frame_equal(load_trials(uri), load_trials(local))
    pd.testing.assert_frame_equal(load_metrics(uri), load_metrics(local))
    with pytest.raises(StoreError, match="no such sweep"):
        load_trials("s3://bucket/sweeps/absent")

    summary = write_fit_outputs(uri, "s3://bucket/sweeps/remote-sweep/analysis", n_boot=5)
    listed = {i.base_name for i in creator.get_file_info(
        pafs.FileSelector("bucket/sweeps/remote-sweep/analysis", recursive=True))}
    assert {"figure1_frontier.png", "recipe.md", "recipe.csv", "findings.md", "summary.json"} <= listed
    assert summary["files"]["recipe_md"] == "s3://bucket/sweeps/remote-sweep/analysis/recipe.md"
    with creator.open_input_stream("bucket/sweeps/remote-sweep/analysis/summary.json") as f:
        assert json.loads(f.read())["n_usable"] == len(trials)
    assert recipe_at(uri, 3e15, n_boot=5)["method"] == "full"
