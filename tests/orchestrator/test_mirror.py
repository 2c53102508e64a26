"""`run.mirror`: the store's metric rows copied to MLflow and Weights & Biases through Ray Tune's logger callbacks.

End to end, offline: a real tiny sweep through the CLI, then MLflow read back from its SQLite database and W&B from
its offline run files, each compared value for value with the Parquet store (the source of truth). Around it: the
grid key's validation, a tracker that is not installed (one line, exit 2, nothing written), and a tracker that
fails (one warning, the sweep unaffected).
"""
from __future__ import annotations

import glob
import json
import os
import struct

import pandas as pd
import pytest

from orchestrator import cli
from orchestrator import grid as grid_module
from orchestrator.errors import GridError
from orchestrator.grid import expand, load_grid
from raykit import free_port

# every metric column of the store but the row's keys: what a tracker must show at each step
ROW_KEYS = ("sweep", "trial_id", "step")


def metric_columns(metrics: pd.DataFrame) -> list[str]:
    return [c for c in metrics.columns if c not in ROW_KEYS]


def store_series(metrics: pd.DataFrame, trial_id: str) -> dict[str, list[tuple[int, float]]]:
    """column -> [(step, value)] of one trial's stored rows, where the value is not null."""
    rows = metrics[metrics.trial_id == trial_id].sort_values("step")
    return {c: [(int(s), float(v)) for s, v in zip(rows.step, rows[c]) if pd.notna(v)] for c in metric_columns(rows)}


def quiet_env(tmp_path) -> dict:
    """The trackers offline and in tmp, whatever this machine's environment says."""
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb-dir"), "WANDB_PROJECT": "",
            "MLFLOW_TRACKING_URI": "", "WANDB_API_KEY": ""}


def test_mlflow_default_is_a_sqlite_database_in_the_sweep(tmp_path, monkeypatch):
    """What `mlflow ui --backend-store-uri` and `MlflowClient` open as they are (docs/reference.md "Mirroring"):
    MLflow 3 opens its file store only when MLFLOW_ALLOW_FILE_STORE says so."""
    from orchestrator.grid import RunConfig, mlflow_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert mlflow_tracking_uri(RunConfig(), "sweeps/s") == f"sqlite:///{tmp_path}/sweeps/s/mlflow.db"
    assert mlflow_tracking_uri(RunConfig(), "s3://bucket/sweeps/s") is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert mlflow_tracking_uri(RunConfig(), "sweeps/s") == "http://mlflow.example:5000"


# --- the grid key --------------------------------------------------------------------------------------------
def test_mirror_key_is_validated_and_never_part_of_an_id(make_grid):
    plain = load_grid(make_grid("m", budgets=[4.0e9, 5.0e9]))
    assert plain.run.mirror == ()
    mirrored = load_grid(make_grid("m", budgets=[4.0e9, 5.0e9], run={"mirror": ["mlflow", "wandb"]}))
    assert mirrored.run.mirror == ("mlflow", "wandb")
    assert [t.trial_id for t in expand(mirrored)] == [t.trial_id for t in expand(plain)]
    assert load_grid(make_grid("m", run={"mirror": "wandb"})).run.mirror == ("wandb",)  # a scalar is a list of one

    cases = {"tensorboard": "run.mirror[0]: must be one of 'mlflow' or 'wandb', got 'tensorboard'",
             ("mlflow", "mlflow"): "run.mirror: 'mlflow' is listed twice"}
    for value, problem in cases.items():
        path = make_grid("m", run={"mirror": list(value) if isinstance(value, tuple) else [value]})
        with pytest.raises(GridError) as e:
            load_grid(path)
        assert str(e.value) == f"{path}: {problem}"
    path = make_grid("m", run={"mirror": ["mlflow"], "mlflow_tracking_uri": "https://me:secret@mlflow.example"})
    with pytest.raises(GridError, match=r"run\.mlflow_tracking_uri: https://\*\*\*@mlflow.example: credentials"):
        load_grid(path)


@pytest.mark.parametrize("command", ["plan", "submit"])
def test_a_tracker_not_installed_is_one_line_exit_2(command, make_grid, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(grid_module, "_installed", lambda module: module != "mlflow")
    path = make_grid("m", run={"mirror": ["wandb", "mlflow"]})
    store = tmp_path / "store"
    args = [command, path] + (["--storage", str(store)] if command == "submit" else [])
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err == f"{path}: run.mirror: mlflow is not installed (pip install 'repurpose[mlflow]')\n"
    assert not store.exists()


def test_mlflow_with_a_remote_store_needs_a_tracking_uri(make_grid, tmp_path, monkeypatch, capsys):
    """Its default file store lives beside a local store's files; a remote store gives it no place: said before
    Ray starts or the store is touched."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = make_grid("m", run={"mirror": ["mlflow"]})
    assert cli.main(["submit", path, "--storage", "s3://no-such-bucket/sweeps"]) == 2
    assert capsys.readouterr().err == ("s3://no-such-bucket/sweeps/m/grid.yaml: run.mirror: mlflow needs a tracking URI "
                                       "with a remote store (s3://no-such-bucket/sweeps/m): set run.mlflow_tracking_uri "
                                       "or MLFLOW_TRACKING_URI\n")


# --- what a tracker is sent ----------------------------------------------------------------------------------
def test_fresh_metrics_sends_each_step_once_and_the_final_evaluation():
    from orchestrator.mirror import fresh_metrics

    sent = {}
    first = [{"step": 1, "tokens": 10, "flops": 1.0, "train_loss": 3.0, "eval_loss": None},
             {"step": 2, "tokens": 20, "flops": 2.0, "train_loss": 2.5, "eval_loss": None}]
    assert fresh_metrics(sent, "t", first) == [(1, {"tokens": 10, "flops": 1.0, "train_loss": 3.0}),
                                               (2, {"tokens": 20, "flops": 2.0, "train_loss": 2.5})]
    # the done event re-sends the last row with the final evaluation: only what it adds goes out, at that step
    final = [{"step": 2, "tokens": 20, "flops": 2.0, "train_loss": 2.5, "eval_loss": 1.5, "ndcg_at_10": 0.5}]
    assert fresh_metrics(sent, "t", final) == [(2, {"eval_loss": 1.5, "ndcg_at_10": 0.5})]
    assert fresh_metrics(sent, "t", final) == []
    # a retry's replayed history (rows up to its checkpoint) is not sent again; its new steps are
    replay = [{"step": 1, "tokens": 10, "flops": 1.0, "train_loss": 3.1}, {"step": 3, "tokens": 30, "flops": 3.0}]
    assert fresh_metrics(sent, "t", replay) == [(3, {"tokens": 30, "flops": 3.0})]
    assert fresh_metrics(sent, "other", first[:1]) == [(1, {"tokens": 10, "flops": 1.0, "train_loss": 3.0})]


def test_a_failing_tracker_warns_once_and_is_dropped(capsys):
    from orchestrator.mirror import _Guarded

    calls = []

    class Broken:
        def setup(self, **info):
            calls.append("setup")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            calls.append("result")
            raise ConnectionError("API request to http://127.0.0.1:9/api failed\nMax retries exceeded (refused)")

    guarded = _Guarded("mlflow", Broken)
    guarded.setup(stop=None)
    for _ in range(3):
        guarded.on_trial_result(1, [], None, {"rows": []})
        guarded.on_trial_complete(1, [], None)
    assert calls == ["setup", "result"]
    assert capsys.readouterr().err == ("warning: run.mirror: mlflow: API request to http://127.0.0.1:9/api failed Max "
                                       "retries exceeded (refused); no more rows go to mlflow (the store has them all)\n")

    def cannot_build():
        raise ValueError("No WandB API key found")

    unbuilt = _Guarded("wandb", cannot_build)
    unbuilt.setup()
    unbuilt.on_experiment_end([])
    assert capsys.readouterr().err.count("warning: run.mirror: wandb: No WandB API key found") == 1


@pytest.mark.slow  # MLflow creates its database's tables (Alembic migrations): seconds
def test_mlflow_logger_writes_its_default_database_and_mlflow_reads_it_as_is(tmp_path, monkeypatch, capsys):
    """The driver's MLflow logger on the default SQLite database, read back as the docs say, with MLflow told
    nothing about file stores; and nothing printed (MLflow's and Alembic's table-creation lines stay out)."""
    from mlflow.tracking import MlflowClient

    from orchestrator.mirror import _mlflow_logger

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)

    class Trial:  # what the logger reads of Tune's trial
        def __init__(self, trial_id):
            self.trial_id, self.config = trial_id, {"trial": {"trial_id": trial_id}}

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = _mlflow_logger(uri, "sweep-a", {"t1": {"sweep": "sweep-a", "method": "bias", "budget_flops": 4e9}})
    logger.setup()
    trial = Trial("t1")
    logger.log_trial_start(trial)
    logger.log_trial_result(1, trial, {"rows": [{"step": 1, "train_loss": 2.5},
                                                {"step": 2, "train_loss": 2.0, "eval_loss": 1.5}]})
    logger.log_trial_end(trial)
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sweep-a").experiment_id])
    assert (run.info.run_name, run.info.status) == ("t1", "FINISHED")
    assert run.data.params == {"sweep": "sweep-a", "method": "bias", "budget_flops": "4000000000.0"}
    history = {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
               for k in ("train_loss", "eval_loss")}
    assert history == {"train_loss": [(1, 2.5), (2, 2.0)], "eval_loss": [(2, 1.5)]}
    out, err = capsys.readouterr()
    assert out == "" and err == ""


# --- end to end ----------------------------------------------------------------------------------------------
@pytest.mark.slow  # runs a sweep on Ray
def test_sweep_mirrors_its_rows_to_mlflow_and_wandb(make_grid, ray_env, tmp_path, tiny_model, monkeypatch):
    grid = make_grid("mirror", budgets=[4.0e9, 5.0e9], run={"mirror": ["mlflow", "wandb"], "token_cache": False})
    storage = tmp_path / "store"
    env = quiet_env(tmp_path)
    # as a user has it: MLflow told nothing about file stores, here or in the driver
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    ray_env.env.pop("MLFLOW_ALLOW_FILE_STORE", None)
    proc = ray_env.run(["submit", grid, "--storage", str(storage)], **env)
    assert proc.returncode == 0, proc.stderr
    # no tracker's banner, log or warning among the driver's lines (Ray Tune's own "may be a performance bottleneck"
    # lines come with a loaded machine, mirrors or not)
    noise = [ln for ln in proc.stderr.splitlines() if any(w in ln.lower() for w in ("mlflow", "wandb", "warn"))
             and "may be a performance bottleneck" not in ln]
    assert not noise, proc.stderr

    assert not glob.glob(os.path.join(ray_env.tmp, "*wandb*"))  # no temp dir of a killed logging actor left
    sweep = storage / "mirror"
    trials = pd.read_parquet(sweep / "trials.parquet")
    metrics = pd.read_parquet(sweep / "metrics")
    assert len(trials) == 2 and (trials.status == "completed").all()

    # MLflow: the default SQLite database beside the store's files, experiment = the sweep, one run per trial
    from mlflow.tracking import MlflowClient

    assert (sweep / "mlflow.db").is_file() and not (sweep / "mlflow").exists()
    client = MlflowClient(f"sqlite:///{sweep / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mirror")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(trials.trial_id)
    for run in runs:
        trial_id = run.info.run_name
        trial = trials.set_index("trial_id").loc[trial_id]
        assert run.info.status == "FINISHED" and run.data.tags["trial_id"] == trial_id
        params = run.data.params
        assert (params["model"], params["method"], float(params["budget_flops"])) == (
            tiny_model, "bias", trial.budget_flops)
        assert int(params["n_params"]) == trial.n_params and params["sweep"] == "mirror"
        assert not [k for k in params if "uri" in k or "resources" in k or k.startswith("trial/")]  # no bookkeeping
        expected = store_series(metrics, trial_id)
        assert expected["eval_loss"] and expected["ndcg_at_10"]  # the final evaluation is among them
        assert set(run.data.metrics) == {c for c, series in expected.items() if series}
        for column, series in expected.items():
            history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, column))
            assert history == series, column

    # W&B: one offline run per trial under WANDB_DIR, its config the trial's, its history the store's rows
    runs = {}
    for path in glob.glob(os.path.join(env["WANDB_DIR"], "wandb", "offline-run-*", "*.wandb")):
        run = read_wandb_run(path)
        runs[run["name"]] = run
    assert sorted(runs) == sorted(trials.trial_id)
    for trial_id, run in runs.items():
        assert (run["project"], run["group"]) == ("mirror", "mirror")
        config = run["config"]
        assert (config["trial_id"], config["model"], config["method"], config["budget_flops"]) == (
            trial_id, tiny_model, "bias", trials.set_index("trial_id").loc[trial_id].budget_flops)
        stored = metrics[metrics.trial_id == trial_id].sort_values("step")
        assert sorted(run["history"]) == stored.step.tolist()
        for _, row in stored.iterrows():
            logged = run["history"][int(row.step)]
            assert set(logged) <= set(metric_columns(stored)), logged  # the row's columns, nothing else
            for column in metric_columns(stored):
                if pd.isna(row[column]):
                    assert column not in logged, (row.step, column)
                else:
                    assert logged[column] == row[column], (row.step, column)


@pytest.mark.slow  # runs a sweep on Ray
def test_a_broken_mlflow_server_does_not_fail_the_sweep(make_grid, ray_env, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens
    grid = make_grid("down", run={"mirror": ["mlflow"], "mlflow_tracking_uri": uri, "token_cache": False})
    storage = tmp_path / "store"
    proc = ray_env.run(["submit", grid, "--storage", str(storage)], **quiet_env(tmp_path),
                       MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    assert proc.returncode == 0, proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if "warn" in ln.lower()]
    assert len(warnings) == 1 and warnings[0].startswith("warning: run.mirror: mlflow: "), proc.stderr
    assert warnings[0].endswith("; no more rows go to mlflow (the store has them all)")
    trials = pd.read_parquet(storage / "down" / "trials.parquet")
    assert (trials.status == "completed").all() and len(pd.read_parquet(storage / "down" / "metrics")) > 1


# --- reading a W&B offline run (the .wandb file: W&B's LevelDB-style log of protobuf records) -------------------
WANDB_HEADER = struct.Struct("<4sHB")  # b":W&B", 0xBEE1, version
WANDB_RECORD = struct.Struct("<IHB")  # checksum, length, type (1 full, 2 first, 3 middle, 4 last)
WANDB_BLOCK = 32 * 1024


def read_wandb_run(path: str) -> dict:
    """{name, project, group, config, history: {step: {column: value}}} of an offline run's .wandb file."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    ident, magic, _ = WANDB_HEADER.unpack_from(data)
    assert (ident, magic) == (b":W&B", 0xBEE1)
    run = {"config": {}, "history": {}}
    pos, chunks = WANDB_HEADER.size, b""
    while pos + WANDB_RECORD.size <= len(data):
        if WANDB_BLOCK - pos % WANDB_BLOCK < WANDB_RECORD.size:  # a block's tail too short for a header: padding
            pos += WANDB_BLOCK - pos % WANDB_BLOCK
            continue
        _, length, kind = WANDB_RECORD.unpack_from(data, pos)
        if kind == 0:
            break
        chunks += data[pos + WANDB_RECORD.size:pos + WANDB_RECORD.size + length]
        pos += WANDB_RECORD.size + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            _read_record(record, run)
    return run


def _read_record(record, run: dict) -> None:
    kind = record.WhichOneof("record_type")
    if kind == "run":
        run.update(name=record.run.display_name, project=record.run.project, group=record.run.run_group)
        run["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    elif kind == "config":
        run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
    elif kind == "history":
        items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
        step = items.pop("_step")
        run["history"].setdefault(step, {}).update({k: v for k, v in items.items()
                                                    if not k.startswith("_") and k != "training_iteration"})
