"""Read a sweep's store (docs/reference.md): ``trials.parquet`` and the ``metrics/`` directory.

Local paths, ``file://``, ``s3://`` and ``gs://`` URIs all go through ``pyarrow.fs`` (credentials and endpoints
come from the environment, e.g. ``AWS_ENDPOINT_URL_S3``). Only pyarrow and pandas: no Ray, no torch.

Both readers return exactly the contract columns in contract order, then the extension columns the files hold,
with the same dtypes whether the table is empty or not: strings ``str``, int64 as nullable ``Int64`` (a pending
trial has no ``tokens`` yet, a full fine-tune no ``lora_rank``), float64 as ``float64`` with NaN for null.
"""
from __future__ import annotations

import os

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fsio import StorageError, resolve
from core.store import REQUIRED_METRIC_COLUMNS, REQUIRED_TRIAL_COLUMNS, StoreError, data_cap_tokens

from .schema import (
    GRID_FILE,
    CONTRACT_METRICS_COLUMNS,
    CONTRACT_TRIALS_COLUMNS,
    METRICS_DIR,
    METRICS_SCHEMA,
    TRIALS_FILE,
    TRIALS_SCHEMA,
)


def open_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a ``scheme://`` URI: fsio.resolve (the project's
    one URI -> filesystem function, with its credential check) with a StoreError for the reader."""
    try:
        fs, path = resolve(str(uri))
    except StorageError as e:
        raise StoreError(str(e)) from None
    return fs, path.rstrip("/") or path


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _require_sweep(fs: pafs.FileSystem, root: str, uri: str) -> None:
    try:
        info = fs.get_file_info(root)
    except OSError as e:
        raise StoreError(f"{uri}: cannot reach the store ({e})") from e
    if info.type != pafs.FileType.Directory:
        raise StoreError(f"{uri}: no such sweep (expected a directory holding {TRIALS_FILE} and {METRICS_DIR}/)")


def _conform(table: pa.Table, schema: pa.Schema, contract: tuple[str, ...], where: str) -> pa.Table:
    """Contract columns (in order) then known extension columns present, each cast to its type. The columns every
    store has held since the first (``REQUIRED_*``) must be there; contract columns added later (family,
    pooling, retrieval, mfu) read as null from a store written before them."""
    required = REQUIRED_TRIAL_COLUMNS if contract == CONTRACT_TRIALS_COLUMNS else REQUIRED_METRIC_COLUMNS
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise StoreError(f"{where}: missing contract column(s) {', '.join(missing)}")
    names = list(contract) + [f.name for f in schema if f.name not in contract and f.name in table.column_names]
    columns = []
    for name in names:
        if name not in table.column_names:
            columns.append(pa.nulls(len(table), schema.field(name).type))
            continue
        column = table.column(name)
        try:
            columns.append(column.cast(schema.field(name).type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise StoreError(f"{where}: column {name} has type {column.type}, "
                             f"expected {schema.field(name).type} ({e})") from e
    return pa.table(columns, schema=pa.schema([schema.field(n) for n in names]))


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    return table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)


def _empty(schema: pa.Schema, contract: tuple[str, ...]) -> pa.Table:
    return pa.schema([schema.field(c) for c in contract]).empty_table()


def load_trials(sweep_uri: str) -> pd.DataFrame:
    """One row per trial, its latest state (``<sweep_uri>/trials.parquet``); empty if no trial was written yet."""
    fs, root = open_uri(sweep_uri)
    _require_sweep(fs, root, sweep_uri)
    path = _join(root, TRIALS_FILE)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return _to_pandas(_empty(TRIALS_SCHEMA, CONTRACT_TRIALS_COLUMNS))
    try:
        table = pq.read_table(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as e:
        raise StoreError(f"{sweep_uri}/{TRIALS_FILE}: unreadable Parquet ({e})") from e
    trials = _to_pandas(_conform(table, TRIALS_SCHEMA, CONTRACT_TRIALS_COLUMNS, f"{sweep_uri}/{TRIALS_FILE}"))
    return with_replicates(trials, lambda: _grid_seed(fs, root))


def with_replicates(trials: pd.DataFrame, base_seed) -> pd.DataFrame:
    """A store written before replicates existed holds one run per cell: ``replicate`` 0 and ``seed`` the grid's
    ``train.seed`` (``base_seed()``, read only when needed) fill the columns, or their nulls."""
    if "replicate" not in trials or trials["replicate"].isna().any():
        column = trials["replicate"] if "replicate" in trials else pd.Series(pd.NA, index=trials.index)
        trials = trials.assign(replicate=column.astype("Int64").fillna(0))
    if "seed" not in trials or trials["seed"].isna().any():
        column = trials["seed"] if "seed" in trials else pd.Series(pd.NA, index=trials.index)
        trials = trials.assign(seed=column.astype("Int64").fillna(base_seed() + trials["replicate"]))
    return trials


def _grid_seed(fs: pafs.FileSystem, root: str) -> int:
    """``train.seed`` of the sweep's stored grid (0, the default, where the store holds none)."""
    import yaml

    try:
        with fs.open_input_stream(_join(root, GRID_FILE)) as f:
            doc = yaml.safe_load(f.read().decode())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return 0
    train = doc.get("train") if isinstance(doc, dict) else None
    seed = train.get("seed", 0) if isinstance(train, dict) else 0
    return int(seed) if isinstance(seed, int) and not isinstance(seed, bool) else 0


def _parquet_files(fs: pafs.FileSystem, directory: str) -> list[str]:
    """Data files under ``directory``: ``*.parquet``, skipping hidden/underscore names (``_SUCCESS``, temp files)."""
    infos = fs.get_file_info(pafs.FileSelector(directory, recursive=True))
    files = []
    for info in infos:
        rel = info.path[len(directory):].lstrip("/")
        if info.type != pafs.FileType.File or not info.path.endswith(".parquet"):
            continue
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        files.append(info.path)
    return sorted(files)


def load_metrics(sweep_uri: str) -> pd.DataFrame:
    """Every reported step of every trial (``<sweep_uri>/metrics/*.parquet``), sorted by (trial_id, step)."""
    fs, root = open_uri(sweep_uri)
    _require_sweep(fs, root, sweep_uri)
    directory = _join(root, METRICS_DIR)
    where = f"{sweep_uri}/{METRICS_DIR}"
    if fs.get_file_info(directory).type != pafs.FileType.Directory:
        return _to_pandas(_empty(METRICS_SCHEMA, CONTRACT_METRICS_COLUMNS))
    files = _parquet_files(fs, directory)
    if not files:
        return _to_pandas(_empty(METRICS_SCHEMA, CONTRACT_METRICS_COLUMNS))
    try:
        # One dataset over the listed files with the full schema: a file lacking an extension column reads it
        # as null, narrower types (int32 steps) are cast; pyarrow reads the files in parallel.
        table = pads.dataset(files, schema=METRICS_SCHEMA, filesystem=fs, format="parquet").to_table()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OSError) as e:
        raise StoreError(f"{where}: unreadable metrics ({e})") from e
    for key in ("trial_id", "step"):
        if table.column(key).null_count:
            raise StoreError(f"{where}: {table.column(key).null_count} row(s) without {key} "
                             "(a file lacks the column or holds nulls)")
    # extension columns only where some file holds them (as for trials.parquet)
    keep = [c for c in table.column_names
            if c in CONTRACT_METRICS_COLUMNS or table.column(c).null_count < len(table)]
    table = _conform(table.select(keep), METRICS_SCHEMA, CONTRACT_METRICS_COLUMNS, where)
    table = table.sort_by([("trial_id", "ascending"), ("step", "ascending")])
    return _to_pandas(table)


def load_data_cap(sweep_uri: str) -> int | None:
    """The sweep's one data cap: the real tokens its training data hold over ``max_epochs`` passes, as the planner
    measured them (``<sweep>/grid.yaml``'s ``data``: train pairs x tokens per pair x max_epochs; the largest
    tokens-per-pair over the sweep's models). None when the store holds no measurement (data not counted, or a
    store written without a grid)."""
    import yaml

    fs, root = open_uri(sweep_uri)
    path = _join(root, GRID_FILE)
    try:
        with fs.open_input_stream(path) as f:
            doc = yaml.safe_load(f.read().decode())
    except FileNotFoundError:
        return None
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise StoreError(f"{sweep_uri}/{GRID_FILE}: unreadable ({' '.join(str(e).split())[:200]})") from None
    return data_cap_tokens(doc.get("data") if isinstance(doc, dict) else None)
