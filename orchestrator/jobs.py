"""Where a sweep's driver runs: the address rules, and ``submit`` / ``resume`` as a Ray Job on a remote cluster.

The one supported way onto a remote cluster is Ray Jobs (docs/reference.md "Remote clusters"): with ``--address
http://HEAD:8265`` (the cluster's job server, the dashboard's address) the CLI does not run the sweep here but
submits the driver itself to the cluster with ``ray.job_submission.JobSubmissionClient`` — the grid travels with
the job (the job's ``working_dir``: a folder holding only the grid, as validated here) and the entrypoint
``repurpose submit grid.yaml --storage URI …`` runs on the head, where ``RAY_ADDRESS`` (set by Ray) points the
driver at the running cluster. The CLI streams the job's log until the job ends and exits with the driver's exit
code. Ctrl-C (or SIGTERM) stops the job: Ray sends the driver SIGTERM, the driver records its running trials
``interrupted``, flushes and exits 143 (the sweep stays resumable); the CLI waits for that, prints the driver's
last lines and exits 130 (143 on SIGTERM). ``--detach`` returns once the job is submitted.

``ray://`` (Ray Client) is refused: under a client connection Ray Tune runs its controller inside the cluster with
pickled copies of the store callback, the lease and the interrupt, so this driver's store never sees an event.

A local ``--storage`` with a remote address (any explicit ``--address`` or ``$RAY_ADDRESS``: only the embedded
local Ray is not remote) is refused unless ``--shared-storage`` says the path is the same filesystem on every node
(NFS, or a one-machine cluster): otherwise each worker would write its checkpoints and kept weights to its own
disk.
"""
from __future__ import annotations

import os
import queue
import secrets
import shlex
import shutil
import sys
import tempfile
import threading
import time

from core.errors import UserError, one_line
from core.uris import absolute, is_remote, redact

JOB_SERVER_SCHEMES = ("http://", "https://")
SUPPORTED = "submit the driver as a Ray Job instead: --address http://HEAD:8265 (the cluster's dashboard address)"
# How long Ray waits, after stopping a job, for its driver to exit before it SIGKILLs it (Ray's default is 3 s):
# the driver stops its trials, flushes the store and releases the lease in that time.
STOP_WAIT_S = 120
EXIT_JOB_FAILED = 1


def is_job_server(address: str | None) -> bool:
    return bool(address) and address.startswith(JOB_SERVER_SCHEMES)


def is_remote_address(address: str | None) -> bool:
    """Any explicit address (``--address`` or ``$RAY_ADDRESS``, a Ray Job's included) is a cluster whose workers
    may run on other machines; only the embedded local Ray (no address, or ``local``) is not."""
    return bool(address) and address != "local"


def check_address(args, command: str) -> None:
    """The address rules, checked before anything runs or is written (one line, exit 2 each)."""
    address = getattr(args, "address", None)
    if not address:
        return
    if address.startswith("ray://"):
        raise UserError(f"--address {address}: Ray Client (ray://) is not supported: Ray Tune would run the sweep's "
                        f"controller inside the cluster, out of this driver's sight, and the store would never see "
                        f"a trial's result; {SUPPORTED}")
    if is_job_server(address) and command not in ("submit", "resume"):
        raise UserError(f"--address {address}: `repurpose {command}` does not run as a Ray Job; run it on the head: "
                        f"ray job submit --address {address} -- repurpose {command} …")
    check_shared_storage(args.storage, address, getattr(args, "shared_storage", False))


def check_shared_storage(storage: str, address: str | None, shared: bool) -> None:
    if is_remote_address(address) and not is_remote(storage) and not shared:
        raise UserError(f"--storage {storage}: a local path with a remote cluster ({address}): each worker would "
                        f"write checkpoints and weights to its own disk; use s3://… or gs://…, or pass "
                        f"--shared-storage if this path is the same filesystem on every node (NFS, one machine)")


# --- submitting the driver as a Ray Job ---------------------------------------------------------------------
def run_as_job(args, command: str) -> int:
    """``submit`` / ``resume`` with an http(s) address: the driver runs on the cluster as a Ray Job."""
    import logging

    from ray.job_submission import JobSubmissionClient

    # Ray's INFO lines (uploading the working_dir, the log stream closing): our own lines say what happens
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)
    staged = tempfile.mkdtemp(prefix="repurpose-job-")
    try:
        entry, sweep = _entrypoint(args, command, staged)
        client = _client(JobSubmissionClient, args.address)
        job_id = f"repurpose-{sweep}-{secrets.token_hex(4)}"
        runtime_env = {"working_dir": staged, "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S)}}
        try:
            client.submit_job(entrypoint=entry, submission_id=job_id, runtime_env=runtime_env)
        except Exception as e:  # noqa: BLE001 -- refused by the job server (auth, bad runtime env): one line
            raise UserError(f"--address {args.address}: the job server refused the job ({_one_line(e)})") from None
    finally:
        shutil.rmtree(staged, ignore_errors=True)  # submit_job uploaded it
    follow = f"ray job logs --follow --address {args.address} {job_id}"
    stop = f"ray job stop --address {args.address} {job_id}"
    if getattr(args, "detach", False):
        print(f"submitted job {job_id} to {args.address}: {entry}\nfollow it: {follow}\nstop it:   {stop}",
              file=sys.stderr)
        return 0
    print(f"submitted job {job_id} to {args.address}: {entry} (Ctrl-C stops it; `{stop}` from elsewhere)",
          file=sys.stderr, flush=True)
    return follow_job(client, job_id)


def _entrypoint(args, command: str, staged: str) -> tuple[str, str]:
    """The job's command line, with the grid (validated here) written into ``staged``; and the sweep's name."""
    words = ["repurpose", command]
    if command == "submit":
        from orchestrator.grid import load_grid

        grid = load_grid(args.grid)  # bad input stops here: one line, exit 2, nothing submitted
        if args.name and args.name != grid.name:
            grid = grid.model_copy(update={"name": args.name})
        # The resolved grid: relative paths keep meaning what they mean here (base_dir is absolute), on a shared
        # filesystem; models by hub name and data on s3:// / gs:// are unchanged by it.
        with open(os.path.join(staged, "grid.yaml"), "w", encoding="utf-8") as f:
            f.write(grid.to_yaml())
        words += ["grid.yaml"]
        sweep = grid.name
    else:
        words += [args.name]
        sweep = args.name
    words += ["--storage", absolute(args.storage)]  # the job runs in its own working directory
    if getattr(args, "shared_storage", False):
        words.append("--shared-storage")
    if getattr(args, "takeover", False):
        words.append("--takeover")
    return shlex.join(words), sweep


def _client(factory, address: str):
    try:
        return factory(address)
    except Exception as e:  # noqa: BLE001 -- unreachable, refused token, not a job server: one line, exit 2
        hint = ""
        if "401" in str(e) or "403" in str(e) or "auth" in str(e).lower():
            hint = "; set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token"
        raise UserError(f"--address {address}: cannot reach the cluster's job server ({_one_line(e)}){hint}") from None


def follow_job(client, job_id: str, poll_s: float = 1.0) -> int:
    """Streams the job's log to stderr until the job ends; returns its exit code. The first Ctrl-C / SIGTERM
    stops the job and keeps streaming until its driver has exited (its interrupted line comes last); a second
    one returns at once (the job goes on stopping on the cluster)."""
    lines: queue.Queue = queue.Queue()
    tail = threading.Thread(target=_tail, args=(client, job_id, lines), daemon=True, name="job-log")
    tail.start()
    stopped_by = None
    while True:
        try:
            _drain(lines, tail, poll_s)
            break
        except KeyboardInterrupt as e:
            if stopped_by is not None:
                print(f"not waiting for job {job_id} to stop; `ray job status {job_id}` shows it",
                      file=sys.stderr, flush=True)
                return stopped_by
            stopped_by = _signal_code(e)
            print(f"stopping job {job_id} (its driver records the running trials as interrupted)",
                  file=sys.stderr, flush=True)
            try:
                client.stop_job(job_id)
            except Exception as err:  # noqa: BLE001 -- the job ended meanwhile, or the server is gone
                print(f"could not stop job {job_id}: {_one_line(err)}", file=sys.stderr, flush=True)
    return job_exit_code(_final_info(client, job_id, poll_s), stopped_by)


def _tail(client, job_id: str, lines: queue.Queue) -> None:
    """The job's log chunks into ``lines``, then None (or the error that ended the stream)."""
    import asyncio

    async def run():
        async for chunk in client.tail_job_logs(job_id):
            lines.put(chunk)

    try:
        asyncio.run(run())
        lines.put(None)
    except Exception as e:  # noqa: BLE001 -- the connection dropped: the job's status still says how it ended
        lines.put(e)


def _drain(lines: queue.Queue, tail: threading.Thread, poll_s: float) -> None:
    while True:
        try:
            chunk = lines.get(timeout=poll_s)  # a timeout, so that a signal reaches this (the main) thread
        except queue.Empty:
            continue
        if chunk is None:
            return
        if isinstance(chunk, Exception):
            print(f"lost the job's log stream ({_one_line(chunk)})", file=sys.stderr, flush=True)
            return
        sys.stderr.write(chunk)
        sys.stderr.flush()


def _final_info(client, job_id: str, poll_s: float):
    while True:
        info = client.get_job_info(job_id)
        if info.status.is_terminal():
            return info
        time.sleep(poll_s)


def job_exit_code(info, stopped_by: int | None) -> int:
    """The driver's own exit code when Ray has it (the entrypoint exited: 0, 1, 2, 130, 143); a job Ray stopped
    has none: 130 / 143 when this CLI stopped it on a signal, else 143 (``ray job stop``: Ray sends SIGTERM); a
    job whose entrypoint never ran (e.g. its runtime environment failed) is 1, with Ray's message."""
    code = getattr(info, "driver_exit_code", None)
    if code is not None:
        return int(code)
    status = str(info.status.value if hasattr(info.status, "value") else info.status)
    if status == "SUCCEEDED":
        return 0
    if status == "STOPPED":
        return stopped_by if stopped_by is not None else 143
    print(f"job failed before its driver ran: {_one_line(info.message or status)[-500:]}", file=sys.stderr)
    return EXIT_JOB_FAILED


def _signal_code(e: KeyboardInterrupt) -> int:
    from orchestrator.cli import EXIT_SIGINT, EXIT_SIGTERM, Terminated

    return EXIT_SIGTERM if isinstance(e, Terminated) else EXIT_SIGINT


def _one_line(e) -> str:
    return redact(one_line(e))[:300]
