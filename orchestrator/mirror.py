"""Mirrors (``run.mirror``): the store's metric rows copied to experiment trackers — MLflow and Weights & Biases —
through Ray Tune's own logger callbacks (ray.air.integrations). The Parquet store stays the source of truth: a
tracker that fails is one warning line and gets nothing more, never a failed trial. Imported by the driver only
when a grid names a tracker; the trackers' packages are optional extras (imported when their callback is built).
"""
from __future__ import annotations

import logging
import os
import sys
import time

from ray import tune

import fsio as storage
from core import methods
from core.events import TrialEvent
from core.errors import one_line
from core.store import METRIC_NAMES
from core.uris import redact
from orchestrator.grid import Grid, mlflow_tracking_uri, trial_identity
from orchestrator.plan import PlannedTrial
from orchestrator.store import Store
from orchestrator.tuning import tune_scratch_dir

# --- mirrors: the metric rows copied to experiment trackers (run.mirror) ----------------------------------------
# What a tracker gets of a metric row: its metric columns (core/store.py, non-null ones); `step` is the trackers' own
# step axis (MLflow's step, W&B's _step), `sweep` and `trial_id` are the run's params.
MIRRORED_COLUMNS = tuple(c for c in METRIC_NAMES if c not in ("sweep", "trial_id", "step"))
# Ray waits this long at a sweep's end for W&B runs still uploading (its default, 30 min, would hold a sweep whose
# W&B server is down); what is not uploaded by then stays in the run's directory for `wandb sync`.
WANDB_FINISH_TIMEOUT_S = 300


def mirror_callbacks(grid: Grid, store: Store, trials: list[PlannedTrial]) -> list[tune.Callback]:
    """``run.mirror``'s trackers as Ray Tune's own logger callbacks (ray.air.integrations), each fed the store's
    metric rows (``fresh_metrics``) and each one's failures contained (``_Guarded``). One tracker run per trial:
    named by its trial id, grouped by the sweep (MLflow: experiment = sweep name; W&B: group = sweep name), with
    ``mirror_params`` as params / config. Where they write: orchestrator/grid.py ``mlflow_tracking_uri``; W&B's
    project is ``run.wandb_project``, else $WANDB_PROJECT, else the sweep's name, its files go under $WANDB_DIR,
    else the (local) sweep's folder, else the current directory, in the mode $WANDB_MODE says."""
    if not grid.run.mirror:
        return []
    params = {t.trial_id: mirror_params(grid, t) for t in trials}
    out = []
    if "mlflow" in grid.run.mirror:
        uri = mlflow_tracking_uri(grid.run, store.uri)
        out.append(_Guarded("mlflow", lambda: _mlflow_logger(uri, grid.name, params)))
    if "wandb" in grid.run.mirror:
        folder = None if storage.is_remote(store.uri) else storage.local_path(store.uri)
        project = grid.run.wandb_project or os.environ.get("WANDB_PROJECT") or grid.name
        init = {"dir": os.environ.get("WANDB_DIR") or folder or os.getcwd(), "mode": os.environ.get("WANDB_MODE")}
        init = {k: v for k, v in init.items() if v}
        out.append(_Guarded("wandb", lambda: _wandb_logger(project, grid.name, params, **init)))
    return out


def mirror_params(grid: Grid, t: PlannedTrial) -> dict:
    """A trial as a tracker's params / config: its identity with the model and data as written in the grid (not as
    resolved here), its size and plan; LoRA's knobs on LoRA trials only; no runtime knob, no None."""
    spec = t.spec
    params = {"sweep": grid.name, "trial_id": t.trial_id, **trial_identity(grid, t.model, spec),
              "pooling": spec.pooling, "batching": spec.batching, "lr": "auto" if spec.lr is None else spec.lr,
              "family": t.family, "n_params": t.n_params, "n_trainable": t.n_trainable,
              "planned_tokens": t.planned_tokens, "planned_steps": t.steps}
    if not methods.get(t.method).adapters:
        params = {k: v for k, v in params.items() if not k.startswith("lora_")}
    return {k: v for k, v in params.items() if v is not None}


def fresh_metrics(sent: dict[str, tuple[int, frozenset]], trial_id: str, rows: list[dict]) -> list[tuple[int, dict]]:
    """(step, {column: value}) of the event's ``rows`` a tracker has not had yet; ``sent`` (trial_id -> the last step
    sent and the columns sent at it) is updated. A tracker's history only grows (W&B drops a step below its last), so
    each step goes once, in order: a retried trial's replayed history is skipped (the store keeps what the retry
    recomputed, the tracker what it saw first), but the columns a re-sent last row adds (the final evaluation,
    workers/steps.py ``Reporter.finish``) go to that step."""
    out = []
    for row in sorted(rows, key=lambda r: r["step"]):
        step = row["step"]
        last, columns = sent.get(trial_id, (0, frozenset()))
        if step < last:
            continue
        seen = columns if step == last else frozenset()
        metrics = {c: row[c] for c in MIRRORED_COLUMNS if row.get(c) is not None and c not in seen}
        sent[trial_id] = (step, seen | frozenset(metrics))
        if metrics:
            out.append((step, metrics))
    return out


def _trial_id(trial) -> str:
    return trial.config["trial"]["trial_id"]


class _Guarded(tune.Callback):
    """A tracker's logger callback that cannot hurt the sweep: the store is the source of truth, so the first
    exception of any hook (a server down, a bad URI, a missing API key) is one warning line, and the tracker gets
    nothing more. The logger is built at the first ``setup``, so its import's and constructor's failures are
    contained too; one logger serves every Tuner of the sweep (the rungs of an adaptive one)."""

    def __init__(self, name: str, make_logger):
        self.name, self.make_logger = name, make_logger
        self.logger = None
        self.off = False

    def __getstate__(self) -> dict:  # Tune pickles its callbacks into a tuner.pkl it never reads back (no restore)
        return {"name": self.name, "make_logger": None, "logger": None, "off": True}

    def _call(self, fn) -> None:
        if self.off:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - whatever a tracker raises, the sweep goes on
            self.off = True
            problem = redact(one_line(e))
            problem = problem if len(problem) <= 200 else problem[:199] + "…"
            print(f"warning: run.mirror: {self.name}: {problem}; no more rows go to {self.name} (the store has them "
                  "all)", file=sys.stderr, flush=True)

    def setup(self, **info):
        def build_and_set_up():
            self.logger = self.logger or self.make_logger()
            self.logger.setup(**info)

        self._call(build_and_set_up)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._call(lambda: self.logger.on_trial_start(iteration, trials, trial, **info))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._call(lambda: self.logger.on_trial_result(iteration, trials, trial, result, **info))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._call(lambda: self.logger.on_trial_complete(iteration, trials, trial, **info))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._call(lambda: self.logger.on_trial_error(iteration, trials, trial, **info))

    def on_experiment_end(self, trials, **info):
        self._call(lambda: self.logger.on_experiment_end(trials, **info))


def _mlflow_logger(tracking_uri: str, experiment: str, params: dict[str, dict]):
    """Ray's ``MLflowLoggerCallback`` (experiment = the sweep, one run per trial, ended FINISHED or FAILED with the
    trial, KILLED with a stopped sweep) fed ``mirror_params`` and the rows' metrics at their step, one ``log_batch`` per event (Ray's own
    logging is a request per value). Defined here, not at import: Ray's integration imports MLflow."""
    import mlflow
    from mlflow.entities import Metric, Param
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class MLflowMirror(MLflowLoggerCallback):
        def __init__(self):
            super().__init__(tracking_uri=tracking_uri, experiment_name=experiment)
            self.sent: dict[str, tuple[int, frozenset]] = {}
            self.ended: set = set()  # trials whose run ended

        def setup(self, *args, **kwargs):
            # The local default is a SQLite database (orchestrator/grid.py mlflow_tracking_uri): creating its tables
            # logs MLflow's and Alembic's INFO lines, which are not the user's business
            for name in ("mlflow", "alembic"):
                logging.getLogger(name).setLevel(logging.ERROR)
            super().setup(*args, **kwargs)

        def client(self):
            return mlflow.tracking.MlflowClient(tracking_uri=self.tracking_uri)

        def log_trial_start(self, trial):
            if trial in self._trial_runs:  # a retried trial keeps its run
                return
            trial_id = _trial_id(trial)
            run = self.mlflow_util.start_run(run_name=trial_id, tags={"sweep": experiment, "trial_id": trial_id})
            self._trial_runs[trial] = run.info.run_id
            self.client().log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params[trial_id].items()])

        def log_trial_result(self, iteration, trial, result):
            now_ms = int(time.time() * 1000)
            metrics = [Metric(k, float(v), now_ms, step)
                       for step, row in fresh_metrics(self.sent, _trial_id(trial), TrialEvent.from_dict(result).rows)
                       for k, v in row.items()]
            for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
                self.client().log_batch(self._trial_runs[trial], metrics=metrics[i:i + 1000])

        def log_trial_end(self, trial, failed=False):
            super().log_trial_end(trial, failed)
            self.ended.add(trial)

        def on_experiment_end(self, trials, **info):
            # Tune stops the trials of a stopped sweep (SIGINT, a lost lease) without ending them
            for trial in set(self._trial_runs) - self.ended:
                self.mlflow_util.end_run(run_id=self._trial_runs[trial], status="KILLED")
                self.ended.add(trial)

    return MLflowMirror()


def _wandb_logger(project: str, group: str, params: dict[str, dict], **init):
    """Ray's ``WandbLoggerCallback`` (a logging actor per trial on this node, which calls ``wandb.init`` with
    ``init``, fed through a queue actor) fed ``mirror_params`` as the run's config and each row as one history row
    at its step (Ray's actor takes the step from ``training_iteration``, which it therefore also logs). The queue's
    tasks from this one caller run in order, so the rows of an event go in one call that Tune's loop does not wait
    for, and the end marker (a waited ``put``) still comes after them. A run that fails in its actor is reported
    when the actor is cleaned up. Defined here, not at import: Ray's integration imports wandb."""
    import ray
    from ray.air.constants import TRAINING_ITERATION
    from ray.air.integrations.wandb import WandbLoggerCallback, _QueueItem
    from ray.air.util.node import _force_on_current_node
    from ray.util.queue import Queue

    quiet = {"silent": True, "console": "off", "x_disable_stats": True}  # the actor's own process: no samples

    class WandbMirror(WandbLoggerCallback):
        def __init__(self):
            super().__init__(project=project, group=group, upload_timeout=WANDB_FINISH_TIMEOUT_S,
                             settings=quiet, **init)
            self.sent: dict[str, tuple[int, frozenset]] = {}
            self.ended: set = set()  # trials whose run was told to end
            self.failure: str | None = None

        def log_trial_start(self, trial):
            """Ray's, with ``mirror_params`` as the run's config and other actor options. Ray's actors restart forever
            (max_restarts=-1), and Ray 2.60's core worker then prints an error line on our stderr per actor (its
            constructor's arguments live in the object store: ray#53727): here a logging actor that dies ends its
            trial's W&B run. And Ray kills the actors (the logger and its queue, both importing wandb) before wandb
            removes its temp dirs: they go to Tune's scratch dir, which run_tuner clears."""
            if trial in self._trial_logging_futures:  # a retried trial keeps its run
                return
            tmp = os.path.join(tune_scratch_dir(group), "wandb-tmp")
            os.makedirs(tmp, exist_ok=True)
            env = {k: os.environ[k] for k in ("WANDB_API_KEY",) if k in os.environ}
            options = {"num_cpus": 0, **_force_on_current_node(), "runtime_env": {"env_vars": {**env, "TMPDIR": tmp}}}
            self._remote_logger_class = self._remote_logger_class or ray.remote(**options)(self._logger_actor_cls)
            queue = self._trial_queues[trial] = Queue(actor_options=options)
            trial_id = _trial_id(trial)
            actor = self._remote_logger_class.remote(
                logdir=trial.local_path, queue=queue, exclude=[*self._exclude_results, "config"],
                to_config=self.AUTO_CONFIG_KEYS, id=trial.trial_id, name=trial_id, group=self.group,
                project=self.project, config=params[trial_id], **self.kwargs)
            future = actor.run.remote()
            self._trial_logging_actors[trial], self._trial_logging_futures[trial] = actor, future
            self._logging_future_to_trial[future] = trial

        def log_trial_result(self, iteration, trial, result):
            if trial not in self._trial_logging_actors:
                self.log_trial_start(trial)
            items = [(_QueueItem.RESULT, {**row, TRAINING_ITERATION: step})
                     for step, row in fresh_metrics(self.sent, _trial_id(trial), TrialEvent.from_dict(result).rows)]
            if items:  # one call per event, not waited for (Ray's is a round trip per row): Tune's loop goes on
                self._trial_queues[trial].actor.put_nowait_batch.remote(items)

        def _cleanup_logging_actor(self, trial):
            future = self._trial_logging_futures[trial]
            if self.failure is None and ray.wait([future], timeout=0)[0]:
                # Ray logs a warning when the run's exception type cannot be subclassed into a RayTaskError
                errors_log = logging.getLogger("ray.exceptions")
                level = errors_log.level
                errors_log.setLevel(logging.ERROR)
                try:
                    ray.get(future)
                except Exception as e:  # noqa: BLE001 - the run's own failure (wandb.init's), reported once below
                    self.failure = str(getattr(e, "cause", None) or e)
                finally:
                    errors_log.setLevel(level)
            super()._cleanup_logging_actor(trial)

        def log_trial_end(self, trial, failed=False):
            self.ended.add(trial)
            super().log_trial_end(trial, failed)
            self._raise_failure()

        def on_experiment_end(self, trials, **info):
            # Tune stops the trials of a stopped sweep (SIGINT, a lost lease) without ending them: their runs would
            # wait for an end that never comes, and this wait would last the whole upload timeout
            for trial in [t for t in self._trial_logging_actors if t not in self.ended]:
                self.ended.add(trial)
                self._signal_logging_actor_stop(trial)
            super().on_experiment_end(trials, **info)
            self._raise_failure()

        def _raise_failure(self):
            if self.failure is not None:
                raise RuntimeError(self.failure)

    return WandbMirror()
