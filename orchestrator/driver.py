"""The sweep driver: plan -> Ray Tune -> the store. ``submit``, ``resume`` and ``status`` (docs/reference.md).

The store is the source of truth for what is done: a submit runs every runnable trial of the grid that
is not ``completed`` there (so re-submitting finishes a sweep, and a larger grid extends it), and
``resume`` does the same from the grid the store keeps. Each trial keeps its own checkpoint in the store
(``checkpoints/<trial_id>/``), so a trial interrupted in any way (a worker killed, a node lost, the
driver killed) continues from it, whether Tune retries it (``FailureConfig``) or a later submit does.
That is why ``Tuner.restore`` is not needed: Tune's experiment state holds nothing the store lacks.

Everything that can be checked without Ray is checked before Ray starts: the grid, the models' configs,
the data (strict), the store, and the sweep's lease (orchestrator/lease.py: one driver per sweep; a second one
exits 2 before it writes anything). Torch is imported only inside the trial (orchestrator/trainable.py).

Ctrl-C / SIGTERM (``Interrupt``): the first signal stops the sweep — no new trial starts, the running ones are
stopped and keep their last periodic checkpoint (``run.checkpoint_every_s``: a Tune stop saves nothing, and the
trial side knows nothing of the driver), and are recorded ``pending`` with reason ``interrupted``; the store is
flushed, one line says what `resume` will continue, and the exit code is 130 / 143. A second signal exits at once
(the lease released; every store file is whole, so `resume` works as after a killed driver).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import tempfile
import threading
import time

from core.uris import redact
from orchestrator.errors import UserError
from orchestrator.grid import Grid, GridError, check_mirrors, load_grid, parse_grid
from orchestrator.lease import Lease
from orchestrator.plan import Plan, PlannedTrial, knob_columns, plan_grid
from orchestrator.store import INTERRUPTED, Recorder, Store, StoreError

# The store replaces Tune's per-trial JSON/CSV/TensorBoard files: turning them off cuts per-trial overhead.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
EXIT_TRIALS_FAILED = 1


# --- commands ------------------------------------------------------------------------------------------------
def submit(args) -> int:
    grid = load_grid(args.grid)
    if args.name and args.name != grid.name:
        grid = grid.model_copy(update={"name": args.name})
    storage = leave_job_working_dir(args.storage)
    return run_sweep(grid, Store(storage, grid.name), args.address, takeover=getattr(args, "takeover", False))


def resume(args) -> int:
    store = Store(leave_job_working_dir(args.storage), args.name)
    grid = stored_grid(store)
    return run_sweep(grid, store, args.address, takeover=getattr(args, "takeover", False))


def status(args) -> int:
    import json

    store = Store(args.storage, args.name)
    # An unknown sweep is an error, not an empty table. Only the store is read: status works wherever the store
    # is reachable, not only where the grid's models and data are (and answers fast on large stores).
    store.read_grid()
    trials = store.read_trials(columns=STATUS_COLUMNS)
    summary = summarize(args.name, trials) | {"weights_bytes": sum(store.kept_weights_bytes().values())}
    summary["noise_sd"] = measured_noise(trials)
    if args.json:
        print(json.dumps(summary))
    else:
        print(render_status(summary, trials))
    return 0


def leave_job_working_dir(storage: str) -> str:
    """The store's URI as this driver keeps using it. Inside a Ray Job (Ray sets RAY_JOB_CONFIG_JSON_ENV_VAR) the
    driver starts in the job's ``working_dir``, which Ray deletes once the job's workers stop using it (the trials'
    workers exit) while the driver still runs there; Tune then fails on ``os.getcwd()``. So, the grid read, the
    driver moves to the temp dir, its local store made absolute first."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
        return storage
    from core.uris import absolute

    storage = absolute(storage)
    os.chdir(tempfile.gettempdir())
    return storage


def stored_grid(store: Store, *, references: bool = True) -> Grid:
    """The sweep's grid as the store keeps it (resolved: ``base_dir`` absolute). ``references`` checks its models
    and data where this runs (resume trains on them); without, only the grid itself is validated (replay reads
    results, and may run far from the data). A malformed one is one line naming grid.yaml and the field."""
    source = redact(storage_join(store.uri, "grid.yaml"))
    grid = store.read_grid().get("grid")
    if not isinstance(grid, dict):
        raise GridError.at(source, "grid", "required (a mapping: the sweep's resolved grid, as `repurpose submit` "
                           "writes it)")
    base_dir = grid.get("base_dir")
    if not isinstance(base_dir, str) or not base_dir:
        raise GridError.at(source, "grid.base_dir", "required (the directory the grid's relative paths resolve "
                           "against; `repurpose submit` writes it)")
    return parse_grid(grid, source=source, base_dir=base_dir, references=references)


def storage_join(*parts: str) -> str:
    from core.uris import join

    return join(*parts)


# --- the sweep -----------------------------------------------------------------------------------------------
def run_sweep(grid: Grid, store: Store, address: str | None, *, progress: bool = True,
              takeover: bool = False) -> int:
    """Plan, take the sweep's lease, run what is not done, record. Returns 0, 1 when trials failed, 130 / 143
    when a signal stopped it (``LeaseHeld`` / ``LeaseLost``: exit 2)."""
    plan = plan_grid(grid, strict_data=True)  # bad input stops here, before Ray and before any write
    check_mirrors(grid, storage_join(store.uri, "grid.yaml"), store.uri)  # run.mirror's trackers: installed, a place
    store.read_trials()  # an unreadable store too
    store.check_location()
    created = store.first_missing_dir()  # what the lease creates, removed if the run ends before the grid is written
    lease = store.acquire_lease(takeover=takeover)  # a live driver's sweep stops here, nothing written
    try:
        with Interrupt(on_second=lease.release) as interrupt:
            outcome = _run_leased(grid, store, address, plan, lease, interrupt, progress)
    finally:
        lease.release()
        store.remove_unused(created)  # e.g. a bad --address: bad input leaves no store behind
    print(outcome.line, file=sys.stderr)
    return outcome.code


@dataclasses.dataclass
class _Outcome:
    code: int
    line: str


def _run_leased(grid: Grid, store: Store, address: str | None, plan: Plan, lease: Lease, interrupt: "Interrupt",
                progress: bool) -> _Outcome:
    existing = store.read_trials()  # read again under the lease: a driver that finished just before counts
    pending = [t for t in plan.runnable if existing.get(t.trial_id, {}).get("status") != "completed"]
    # Ray starts only when something runs (a finished sweep re-submitted is a no-op), and before the first write
    # but the lease: a bad --address is bad input too.
    with ray_session(address) if pending else contextlib.nullcontext(0) as gpus_per_node:
        interrupt.install()  # again: Ray's core worker installs its own SIGTERM handler (it aborts the process)
        memory = cluster_gpu_memory() if gpus_per_node else None  # sizes trials (core/memory.py)
        if gpus_per_node:  # an explicit count wins (autoscaling from 0); a trial no live node holds is skipped
            gpus = gpus_per_node if grid.resources.gpus == "auto" else grid.resources.gpus
            plan = plan_grid(grid, gpus_available=gpus, data=plan.data, gpu_memory=memory, nodes=cluster_nodes())
        trials = merge_trials(existing, plan)
        store.write_grid(grid.model_dump(mode="json", exclude_none=True),
                         {"train_pairs": plan.data.train_pairs, "tokens_per_pair": dict(plan.data.tokens_per_pair),
                          "max_epochs": grid.plan.max_epochs})
        store.remove_temp_files()  # a killed driver's half-written copies
        recorder = Recorder(store, trials, fence=lease.check)
        recorder.flush()
        todo = [t for t in plan.runnable if trials[t.trial_id]["status"] != "completed"]
        print(f"sweep {grid.name}: {len(plan.trials)} trials, {len(plan.runnable) - len(todo)} already completed, "
              f"{len(todo)} to run, {len(plan.skipped)} skipped -> {store.uri}", file=sys.stderr)
        if todo and not interrupt.signum:
            todo = with_token_caches(todo, grid, store)
            from orchestrator.mirror import mirror_callbacks  # Ray Tune only when something runs
            from orchestrator.tuning import run_tuner

            mirrors = mirror_callbacks(grid, store, plan.trials)  # run.mirror: the rows copied to trackers
            for rung in rungs(grid, todo, recorder, store, plan.runnable):
                if interrupt.signum or lease.lost:
                    break
                run_tuner(rung, recorder, grid, store, progress=Progress(recorder, [t.trial_id for t in rung])
                          if progress else None, callbacks=mirrors, interrupt=interrupt, lease=lease)
            todo = [t for t in todo if trials[t.trial_id]["status"] != "skipped"]  # pruned: not failed
    if interrupt.signum:
        return _Outcome(128 + interrupt.signum, interrupted_line(grid.name, store, trials, todo))
    failed = [t.trial_id for t in todo if trials[t.trial_id]["status"] != "completed"]
    for trial_id in failed:
        print(f"failed {trial_id}: {trials[trial_id]['reason']}", file=sys.stderr)
    return _Outcome(EXIT_TRIALS_FAILED if failed else 0, render_counts(summarize(grid.name, trials)))


def with_token_caches(todo: list[PlannedTrial], grid: Grid, store: Store) -> list[PlannedTrial]:
    """The trials with their token cache (``run.token_cache``): built once per tokenizer on the Ray this driver
    runs on (orchestrator/prepare.py, Ray Data across the cluster's CPUs), reused by every later sweep of the same
    data. Length-bucketed trials read the raw data (the cache serves random batches)."""
    if not grid.run.token_cache or not any(t.spec.batching == "random" for t in todo):
        return todo
    from orchestrator.prepare import caches_for_grid, trial_cache

    caches = caches_for_grid(grid, store.storage_uri)
    return [dataclasses.replace(t, spec=dataclasses.replace(t.spec, token_cache=trial_cache(caches, t.model, t.spec)))
            if t.spec.batching == "random" else t for t in todo]


def rungs(grid: Grid, todo: list[PlannedTrial], recorder: Recorder, store: Store, planned=()):
    """The trials to run, in groups: ``strategy: grid`` one group; ``adaptive`` one rung per budget, ascending,
    each decided (analysis/adaptive.py ``decide``, a pure function of the completed trials) after the rungs below
    it ran: pruned cells become ``skipped`` rows with the reason, the rest run. Decisions are taken per (family,
    pooling): the policy compares methods and model sizes within one family and pooling. A resumed sweep
    re-derives the same decisions from the same completed trials. After a rung ran, the replicates the policy asks
    for (close calls; every cell at the first ``noise_rungs``) run as further groups, until it asks for none."""
    if grid.strategy != "adaptive":
        yield todo
        return
    import pandas as pd

    from analysis.adaptive import decide  # pandas and scipy, no torch

    config = grid.adaptive.config()
    for budget in sorted({t.budget_flops for t in todo}):
        cells = [t for t in todo if t.budget_flops == budget]
        done = pd.DataFrame([r for r in recorder.trials.values() if r.get("sweep", store.sweep) == store.sweep])
        done = done.assign(family=done.get("family"), pooling=done.get("pooling"))  # older rows: no such columns
        pruned = {}
        for (family, pooling), group in _by_variant(cells).items():
            mine = done[(done["family"].fillna(family) == family) & (done["pooling"].fillna("mean") == pooling)]
            table = pd.DataFrame([{"trial_id": t.trial_id, "model": t.model, "method": t.method,
                                   "lora_rank": t.lora_rank, "trainable_fraction": t.trainable_fraction,
                                   "budget_flops": t.budget_flops, "n_params": t.n_params,
                                   "n_trainable": t.n_trainable, "status": "pending"} for t in group])
            pruned |= {d.trial_id: d.reason for d in decide(mine, table, config) if not d.run}
        for trial_id, reason in pruned.items():
            recorder.set_status(trial_id, "skipped", reason)
        recorder.flush()
        run = [t for t in cells if t.trial_id not in pruned]
        if pruned:
            print(f"rung {budget:.2g} FLOP: {len(run)} to run, {len(pruned)} pruned", file=sys.stderr)
        if run:
            yield run
        yield from _replicates(grid, budget, [*planned, *cells], recorder, store, config)


def _replicates(grid: Grid, budget: float, cells: list[PlannedTrial], recorder: Recorder, store: Store, config):
    """The rung's replicates (analysis/adaptive.py ``replicate_requests``, per family and pooling), one group per
    round, each new replicate a row of the store before it runs. At the last rung, ``decide_flops`` lets the recipe
    spend up to that fraction of the one-seed grid's FLOP (the runnable cells' first runs, as planned) in all; a
    pruned cell it asks for (replicate 0) runs as planned."""
    import pandas as pd

    from analysis.adaptive import decide_room, replicate_requests
    from orchestrator.plan import first_run_flops, replicates

    by_id = {t.trial_id: t for t in cells}
    final = budget == max(float(b) for b in grid.budgets)  # the last rung: its runs serve the recipe alone
    grid_flops = first_run_flops(by_id.values())
    while True:
        done = pd.DataFrame([r for r in recorder.trials.values() if r.get("sweep", store.sweep) == store.sweep])
        done = done.assign(family=done.get("family"), pooling=done.get("pooling"))
        room = decide_room(config, grid_flops, _spent_flops(done))
        asked = []
        for family, pooling in sorted({(t.family, t.spec.pooling) for t in cells if t.budget_flops == budget}):
            mine = done[(done["family"].fillna(family) == family) & (done["pooling"].fillna("mean") == pooling)]
            mine_asked = [replicates(by_id[q.trial_id], grid, [q.replicate])[0]
                          for q in replicate_requests(mine, budget, config, final, room) if q.trial_id in by_id]
            room -= sum(t.planned_flops for t in mine_asked)  # the families and poolings share the room
            asked += mine_asked
        if not asked:
            return
        for t in asked:
            recorder.trials[t.trial_id] = initial_row(store.sweep, t)
        recorder.flush()
        print(f"rung {budget:.2g} FLOP: {len(asked)} replicate(s) of close cells", file=sys.stderr)
        yield asked


def _spent_flops(trials) -> float:
    """The FLOP a sweep's trials spent (store rows, a DataFrame): the completed ones' count, a failed one's budget
    where it counted none (it may have spent up to it)."""
    import pandas as pd

    if trials.empty:
        return 0.0
    ended = trials[trials["status"].isin(["completed", "failed"])]
    flops = pd.to_numeric(ended["flops"], errors="coerce")
    budget = pd.to_numeric(ended["budget_flops"], errors="coerce")
    return float(flops.where(flops > 0, budget).fillna(0.0).sum())


def _by_variant(cells: list[PlannedTrial]) -> dict[tuple[str, str], list[PlannedTrial]]:
    out: dict[tuple[str, str], list[PlannedTrial]] = {}
    for t in cells:
        out.setdefault((t.family, t.spec.pooling), []).append(t)
    return out


def interrupted_line(sweep: str, store: Store, trials: dict[str, dict], todo: list[PlannedTrial]) -> str:
    """The one line of an interrupted sweep: the stopped trials that have a checkpoint to continue from, and the
    other trials `resume` will run (not started yet, or stopped before their first checkpoint)."""
    waiting = [t.trial_id for t in todo if trials[t.trial_id]["status"] == "pending"]
    saved = [i for i in waiting if trials[i]["reason"] == INTERRUPTED and store.has_checkpoint(i)]
    return (f"interrupted: {len(saved)} trials saved at their last checkpoint, {len(waiting) - len(saved)} pending; "
            f"`repurpose resume {sweep}` continues")



class Interrupt:
    """SIGINT / SIGTERM while a sweep runs (main thread only). The first sets ``signum``: Tune's stopper stops
    every trial (orchestrator/tuning.py). The second calls ``on_second`` (the lease's release) and exits at once
    with 128 + its number. Ray Tune's own SIGINT handler (which prints ``Tuner.restore`` advice) stays off
    (``TUNE_DISABLE_SIGINT_HANDLER``)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_second=None):
        self.signum: int | None = None
        self.on_second = on_second
        self._saved: dict = {}

    def __getstate__(self) -> dict:  # Tune pickles its stopper, which sees this: the state, not the handlers
        return {"signum": self.signum, "on_second": None, "_saved": {}}

    def __enter__(self) -> "Interrupt":
        self.install()
        return self

    def install(self) -> None:
        """(Re)installs the handlers; the first call keeps the ones to restore."""
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
            self._saved = self._saved or previous

    def __exit__(self, *exc) -> None:
        for s, handler in self._saved.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            return
        try:
            if self.on_second is not None:
                self.on_second()
        finally:
            print("interrupted again: exiting now; the trials keep their last checkpoint, `repurpose resume` "
                  "continues", file=sys.stderr, flush=True)
            os._exit(128 + signum)


def merge_trials(existing: dict[str, dict], plan: Plan) -> dict[str, dict]:
    """The store's rows, completed ones untouched; every other trial of the plan (re)set from the plan."""
    trials = dict(existing)
    for t in plan.trials:
        if existing.get(t.trial_id, {}).get("status") == "completed":
            continue
        trials[t.trial_id] = initial_row(plan.grid.name, t)
    return trials


def initial_row(sweep: str, t: PlannedTrial) -> dict:
    return {
        "sweep": sweep, "trial_id": t.trial_id, "model": t.model, "method": t.method, "lora_rank": t.lora_rank,
        "trainable_fraction": t.trainable_fraction, "budget_flops": t.budget_flops, "n_params": t.n_params,
        "n_trainable": t.n_trainable, "status": "pending" if t.runnable else "skipped", "reason": t.skip_reason,
        "tokens": 0, "steps": 0, "flops": 0.0, "hardware_flops": 0.0, "eval_loss": None, "train_loss": None,
        "wall_s": 0.0, "planned_tokens": t.planned_tokens, "planned_steps": t.steps, "updated_at": time.time(),
        "batching": t.spec.batching, "family": t.family, "pooling": t.spec.pooling,
        **knob_columns(t.spec, t.lr),
        "replicate": t.spec.replicate, "seed": t.spec.seed,
    }


# The trial processes' allocators, bounded (benchmarks/README.md "Memory of a trial process"): a reused actor's RSS grew
# to 4-6 GB on the demo from glibc arenas and fragmentation (activations of many padded lengths) and oneDNN's
# per-shape cache of bf16 matmul kernels. Two arenas and a fixed 128 KiB mmap threshold (mallopt(3)), and a
# 64-entry kernel cache (oneDNN's default 1024; 0 made steps ~27 % slower, 64 as fast as the default), cut
# the peak by ~30 %. They must be in the environment before the process starts.
TRIAL_PROCESS_ENV = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072",
                     "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}


@contextlib.contextmanager
def ray_session(address: str | None):
    """Connects to ``address`` or starts an embedded local Ray (loopback only, no dashboard); yields the
    most GPUs any node has (0 on a CPU-only cluster)."""
    import ray

    if ray.is_initialized():
        yield _gpus_per_node(ray)
        return
    common = dict(include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level="WARNING")
    # Ray (2.60) warns at every start whether its token authentication is on or off (on when ~/.ray/auth_token
    # exists and RAY_AUTH_MODE is unset): the user did not ask; auth itself is unchanged (README, deploy/).
    import logging

    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    for key, value in TRIAL_PROCESS_ENV.items():  # the embedded Ray's workers inherit the raylet's environment
        os.environ.setdefault(key, value)
    if address:  # a cluster's workers get them through the job's runtime environment
        common["runtime_env"] = {"env_vars": {k: os.environ[k] for k in TRIAL_PROCESS_ENV}}
    captured = [""]
    try:
        if address:
            # Ray's C++ client logs every failed connection attempt straight to fd 2 (a line a second for
            # ~20 s): held back, and shown only if the connection succeeds, so that a bad --address or a
            # rejected token stays one line (docs/reference.md, exit code 2).
            with _fd2_captured() as captured:
                ray.init(address=address, **common)
            sys.stderr.write(captured[0])
        else:
            with _loopback_node(ray):
                ray.init(_node_ip_address="127.0.0.1", **common)
    except (ConnectionError, ValueError, RuntimeError) as e:
        hint = ""
        if "InvalidAuthToken" in captured[0] or "Unauthenticated" in captured[0]:
            hint = ("; the cluster rejected our authentication token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
                    "(or RAY_AUTH_TOKEN_PATH) to the cluster's token")
        raise UserError(f"--address {address or '(local)'}: cannot start or reach Ray "
                        f"({' '.join(str(e).split())[:200]}){hint}") from None
    try:
        yield _gpus_per_node(ray)
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _loopback_node(ray):
    """Makes the embedded node really take 127.0.0.1. Ray (2.60, ``services.resolve_ip_for_localhost``) swaps a
    loopback ``_node_ip_address`` for the machine's routable address, and its servers (GCS, raylet, workers,
    agents) then listen there, reachable from the network. It keeps loopback only where it believes clusters
    are unsupported (``ray_constants.ENABLE_RAY_CLUSTER``, env ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``), so that
    is what the embedded start is told, in this process (the constant) and in the processes it starts (the
    variable: the GCS, the raylet and its agents; workers inherit the raylet's environment)."""
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"), ray_constants.ENABLE_RAY_CLUSTER
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved_env


@contextlib.contextmanager
def _fd2_captured():
    """Redirects file descriptor 2 (C++ logs included) into a temporary file; yields a list that holds the
    captured text once the block ends, however it ends."""
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read().decode(errors="replace"))


def cluster_gpu_memory() -> float | None:
    """Bytes of the smallest GPU of the cluster, from the ``accelerator_type:<name>`` resources Ray gives GPU nodes
    (core/devices.py's table; None when no node names a type the table knows)."""
    import ray

    from core.devices import device_memory

    sizes = [device_memory(key.split(":", 1)[1]) for n in ray.nodes() if n.get("Alive")
             for key in n.get("Resources", {}) if key.startswith("accelerator_type:")]
    sizes = [s for s in sizes if s]
    return min(sizes) if sizes else None


def cluster_nodes() -> list[dict]:
    """Each live node's Ray resources (the planner skips a trial that none holds)."""
    import ray

    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def _gpus_per_node(ray) -> int:
    return int(max((n.get("Resources", {}).get("GPU", 0) for n in ray.nodes() if n.get("Alive")), default=0))


class Progress:
    """Live progress on stderr: trials done/running/failed/pending, FLOP spent of planned, ETA."""

    def __init__(self, recorder: Recorder, trial_ids: list[str], every_s: float = 5.0):
        self.recorder, self.ids, self.every_s = recorder, trial_ids, every_s
        self.started = time.monotonic()
        self.last = 0.0
        self.flops0 = self._spent()
        self.tty = sys.stderr.isatty()

    def _spent(self) -> float:
        return sum(self.recorder.trials[i]["flops"] or 0.0 for i in self.ids)

    def update(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        rows = [self.recorder.trials[i] for i in self.ids]
        counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "running", "failed", "pending")}
        planned = sum(r["budget_flops"] for r in rows)
        spent = self._spent()
        rate = (spent - self.flops0) / max(now - self.started, 1e-9)
        eta = (planned - spent) / rate if rate > 0 else math.inf
        line = (f"trials {counts['completed']}/{len(rows)} done, {counts['running']} running, "
                f"{counts['failed']} failed, {counts['pending']} pending | FLOP {spent:.2e}/{planned:.2e} "
                f"({spent / planned:.0%}) | ETA {_duration(eta)}")
        print(("\r" + line + "\x1b[K") if self.tty and not force else line, file=sys.stderr,
              end="" if self.tty and not force else "\n", flush=True)


def _duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# --- status --------------------------------------------------------------------------------------------------
STATUS_COLUMNS = ("trial_id", "model", "method", "lora_rank", "trainable_fraction", "budget_flops", "status",
                  "steps", "flops", "eval_loss", "ndcg_at_10", "mfu", "reason",  # what summarize and render_status read
                  "replicate", "family", "pooling")  # and measured_noise


def measured_noise(trials: dict[str, dict]) -> float | None:
    """The sweep's relative run-to-run noise from its replicates (analysis/noise.py); None without any (no pandas
    is loaded then: most sweeps run one seed)."""
    if not any((r.get("replicate") or 0) > 0 for r in trials.values()):
        return None
    import pandas as pd

    from analysis.noise import noise_sd

    return noise_sd(pd.DataFrame(list(trials.values())))



def summarize(sweep: str, trials: dict[str, dict]) -> dict:
    """`status --json` (docs/reference.md): counts by status, FLOP spent (all trials) and planned (non-skipped)."""
    counts = {s: 0 for s in ("completed", "running", "pending", "failed", "skipped")}
    for r in trials.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return {
        "sweep": sweep, "counts": counts,
        "flops_spent": float(sum(r["flops"] or 0.0 for r in trials.values())),
        "flops_planned": float(sum(r["budget_flops"] for r in trials.values() if r["status"] != "skipped")),
    }


def render_counts(summary: dict) -> str:
    c = summary["counts"]
    share = summary["flops_spent"] / summary["flops_planned"] if summary["flops_planned"] else 0.0
    return (f"sweep {summary['sweep']}: " + ", ".join(f"{n} {s}" for s, n in c.items())
            + f" | FLOP {summary['flops_spent']:.2e} spent of {summary['flops_planned']:.2e} planned ({share:.0%})")


def render_status(summary: dict, trials: dict[str, dict]) -> str:
    header = ("trial_id", "model", "method", "rank/frac", "budget", "status", "steps", "flops", "eval_loss",
              "ndcg@10", "mfu", "reason")
    rows = []
    for r in sorted(trials.values(), key=lambda r: (r["model"], r["method"], r["budget_flops"])):
        hyper = (f"r={r['lora_rank']}" if r["lora_rank"] is not None else
                 f"f={r['trainable_fraction']:g}" if r["trainable_fraction"] is not None else "-")
        loss = f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "-"
        ndcg = f"{r['ndcg_at_10']:.3f}" if r.get("ndcg_at_10") is not None else "-"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        rows.append((r["trial_id"], r["model"], r["method"], hyper, f"{r['budget_flops']:.1e}", r["status"],
                     str(r["steps"] or 0), f"{r['flops'] or 0.0:.2e}", loss, ndcg, mfu, (r["reason"] or "")[:60]))
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in [header, *rows]]
    noise = summary.get("noise_sd")
    noise_line = [f"run-to-run noise {noise:.1%} (relative sd between replicates of a cell)"] if noise is not None else []
    kept = summary.get("weights_bytes")
    weights = [f"kept weights: {_bytes(kept)} under {summary['sweep']}/models/"] if kept else []
    return "\n".join([render_counts(summary), *noise_line, *weights, *lines])


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
