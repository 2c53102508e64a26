"""Ray Tune glue: one ``Tuner`` per submit, a store callback, the FLOP guard. Imported only when trials run."""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile

from ray import tune

from core.events import TrialEvent
from core.uris import absolute
from orchestrator.grid import Grid
from orchestrator.lease import LeaseLost
from orchestrator.plan import PlannedTrial
from orchestrator.store import INTERRUPTED, Flusher, Recorder, Store, StoreError
from orchestrator.trainable import rank_bundles, run_tune_trial, trial_ranks


def run_tuner(todo: list[PlannedTrial], recorder: Recorder, grid: Grid, store: Store, *, progress=None,
              trainable=run_tune_trial, callbacks=(), interrupt=None, lease=None) -> None:
    """One Tuner over the trials to run; results stream into ``recorder`` as they come.

    ``trainable``: the function each trial runs (benchmarks and load tests pass a trivial one); ``callbacks``:
    extra Tune callbacks (timing). ``interrupt`` (driver.Interrupt: ``signum`` set by the first SIGINT/SIGTERM) and
    ``lease`` (orchestrator/lease.py: ``lost``) stop every trial when set; an interrupted sweep's stopped trials
    are recorded ``pending`` with reason ``interrupted`` and flushed; a lost lease raises ``LeaseLost`` and writes
    nothing more."""
    _keep_credentials_out_of_runtime_env()
    # Our own handler (driver.Interrupt) owns SIGINT: Tune's would end the run with `Tuner.restore` advice, which
    # does not apply here (ray/tune/tune.py ``_setup_signal_catching`` reads this at fit time).
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    # every URI a trial gets absolute: Ray Tune runs each trial in its own working directory
    configs = [{"trial_id": t.trial_id,
                "spec": {**t.spec.to_dict(), "weights_uri": absolute(store.model_uri(t.trial_id)),
                         "token_cache": t.spec.token_cache and absolute(t.spec.token_cache)},
                "checkpoint_uri": absolute(store.checkpoint_uri(t.trial_id)),
                "resources": dict(t.resources), "deepspeed_gpus": t.deepspeed_gpus} for t in todo]
    trainable = tune.with_resources(trainable, trial_placement)
    callback = _StoreCallback(recorder, progress, interrupt=interrupt, lease=lease)
    tune_dir = tune_scratch_dir(grid.name)
    shutil.rmtree(tune_dir, ignore_errors=True)
    try:
        # The store's writes happen on the Flusher's thread: Tune's loop (and so every trial's `report`, which
        # waits for it) never waits on the store.
        with Flusher(recorder) as flusher:
            callback.flusher = flusher
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search(configs)},
                tune_config=tune.TuneConfig(
                    max_concurrent_trials=grid.run.max_concurrent_trials,
                    trial_name_creator=lambda trial: trial.config["trial"]["trial_id"],
                    trial_dirname_creator=lambda trial: trial.config["trial"]["trial_id"],
                    reuse_actors=True,  # a worker process imports torch once, not once per trial
                ),
                run_config=tune.RunConfig(
                    name=grid.name, storage_path=tune_dir, verbose=0, stop=_FlopGuard(callback),
                    failure_config=tune.FailureConfig(max_failures=grid.run.max_failures),
                    callbacks=[callback, *callbacks],
                ),
            )
            # Tune's result analysis looks for the per-trial files the store replaces; it would warn per trial.
            logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
            tuner.fit()
        if lease is not None and lease.lost:
            raise LeaseLost(lease.lost_line())
        if callback.error is not None:  # the store stayed unwritable past the Recorder's max_outage_s
            raise callback.error
        if callback.interrupted():
            callback.mark_interrupted([t.trial_id for t in todo])
        recorder.close()  # the last flush, retried through a store outage
    except LeaseLost:
        raise  # another driver runs the sweep now: not one more write
    except BaseException:
        recorder.flush(tolerate=True)  # best effort (what stays unwritten, `resume` recomputes)
        raise
    finally:
        callback.close()
        shutil.rmtree(tune_dir, ignore_errors=True)


def tune_scratch_dir(sweep: str) -> str:
    """Tune's own experiment files (the store replaces them): one place per sweep, cleared before and after each
    Tuner, so a killed driver leaves nothing that grows."""
    return os.path.join(tempfile.gettempdir(), f"repurpose-tune-{sweep}")


def _keep_credentials_out_of_runtime_env() -> None:
    """Ray Tune copies the driver's AWS_* credentials into every trial actor's runtime_env
    (ray/tune/execution/class_cache.py, ``ENV_VARS_TO_PROPAGATE``, Ray 2.60), and Ray writes runtime envs in
    plain text to ``<session>/logs/runtime_env_agent.log`` and keeps them in the GCS, where the state API shows
    them. Trials need no such copy: on the embedded Ray they inherit the driver's environment through the raylet
    it starts; cluster nodes have their own (instance role, IRSA / Workload Identity: deploy/README.md). So the
    copy is turned off (tests/faults/test_security.py looks for the secret in Ray's logs)."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = {v for v in class_cache.ENV_VARS_TO_PROPAGATE if not v.startswith("AWS_")}


def trial_placement(config: dict) -> tune.PlacementGroupFactory:
    """One bundle per trial; a DeepSpeed trial one per rank, all on one node (its ranks share a checkpoint
    staging dir and NCCL's intra-node links)."""
    trial = config["trial"]
    ranks = trial_ranks(trial)
    if ranks > 1:
        return tune.PlacementGroupFactory(rank_bundles(trial["resources"], ranks), strategy="STRICT_PACK")
    return tune.PlacementGroupFactory([trial["resources"]])


class _FlopGuard(tune.Stopper):
    """Tune-side guard beside the worker's own stop: a trial whose FLOP reach its budget stops; every trial
    stops when the store failed for good (the callback holds its error), on SIGINT / SIGTERM, and when another
    driver took the sweep's lease."""

    def __init__(self, callback: "_StoreCallback"):
        self.callback = callback

    def __call__(self, trial_id, result):
        event = TrialEvent.from_dict(result)
        return event.flops >= (event.budget_flops if event.budget_flops is not None else math.inf)

    def stop_all(self):
        return self.callback.error is not None or self.callback.interrupted() or self.callback.lease_lost()


def _error_line(trial) -> str:
    """The last line of the trial's latest error: the exception's message. Tune writes the error file into the
    trial's local staging dir when the error happens and copies it to ``storage_path`` only later, so
    ``trial.get_error()`` (which reads storage) is still None in ``on_trial_error``: read the local file."""
    path = trial.error_file
    if path and os.path.exists(path):
        with open(path, errors="replace") as f:
            text = f.read()
    else:
        text = trial.get_error() or ""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    reason = lines[-1] if lines else "the trial failed"
    return reason[:500]


class _StoreCallback(tune.Callback):
    """Tune -> the store: every result is a worker event; errors and retries become trial statuses."""

    def __init__(self, recorder: Recorder, progress=None, interrupt=None, lease=None):
        self.recorder = recorder
        self.progress = progress
        self.interrupt, self.lease = interrupt, lease
        self.flusher: Flusher | None = None  # the store's writer beside Tune's loop (run_tuner)
        self._error: StoreError | None = None

    def __getstate__(self) -> dict:  # Tune pickles its callbacks: the Flusher (a thread) stays here
        return {**self.__dict__, "flusher": None}

    @property
    def error(self) -> StoreError | None:
        """The store failed for good (here, or on the Flusher's thread): Tune stops (_FlopGuard.stop_all)."""
        return self._error or (self.flusher.error if self.flusher is not None else None)

    def interrupted(self) -> bool:
        return bool(self.interrupt is not None and self.interrupt.signum)

    def lease_lost(self) -> bool:
        return bool(self.lease is not None and self.lease.lost)

    def _stopping(self) -> bool:
        """The sweep is being stopped: a trial ending now ends because of it, not by its own failure."""
        return self.interrupted() or self.lease_lost() or self.error is not None

    def mark_interrupted(self, trial_ids: list[str]) -> None:
        """Trials a signal stopped mid-run become ``pending`` (reason ``interrupted``): `resume` continues them
        from their last checkpoint. Trials that never started stay ``pending``; completed and failed ones keep
        their status and reason."""
        for trial_id in trial_ids:
            if self.recorder.trials[trial_id]["status"] == "running":
                self.recorder.set_status(trial_id, "pending", INTERRUPTED)

    @staticmethod
    def _id(trial) -> str:
        return trial.config["trial"]["trial_id"]

    def _record(self, fn, *args) -> None:
        """A Recorder call whose StoreError stops the sweep cleanly (raised by run_tuner, one line) instead of
        surfacing from Tune as a TuneError with a traceback."""
        if self.error is not None:
            return
        try:
            fn(*args)
        except StoreError as e:
            self._error = e

    def on_trial_start(self, iteration, trials, trial, **info):
        self.recorder.set_status(self._id(trial), "running")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._record(self.recorder.on_event, self._id(trial), TrialEvent.from_dict(result))

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.recorder.set_status(self._id(trial), "running", f"retrying after: {_error_line(trial)}")

    def on_trial_error(self, iteration, trials, trial, **info):
        if self._stopping():  # the stop killed it (an actor gone mid-call): running, marked below
            return
        self.recorder.set_status(self._id(trial), "failed", _error_line(trial))
        self._record(self.recorder.flush_soon)

    def on_trial_complete(self, iteration, trials, trial, **info):
        row = self.recorder.trials[self._id(trial)]
        if row["status"] != "completed" and not self._stopping():
            last = trial.last_result or {}
            reason = ("stopped by the FLOP guard: flops reached budget_flops before the final report"
                      if last.get("flops", 0.0) >= last.get("budget_flops", math.inf)
                      else "the trial ended without a final report")
            self.recorder.set_status(self._id(trial), "failed", reason)
            self._record(self.recorder.flush_soon)

    def on_step_end(self, iteration, trials, **info):
        self._record(self.recorder.maybe_flush)
        if self.progress and not self._stopping():
            self.progress.update()

    def close(self):
        if self.progress and not self._stopping():  # an interrupted sweep ends with its one line, no more
            self.progress.update(force=True)
