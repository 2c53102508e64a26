"""`repurpose`: the command line (docs/reference.md "Command line").

``plan`` lives here; every other command is a function of another module, imported only when that command
runs (the driver stays light: no torch, no Ray at import). Each such function receives the parsed
``argparse.Namespace`` and returns an exit code (None means 0):

    submit  -> orchestrator.driver.submit(args)    args: grid, name (None: the grid's), storage, address, shared_storage
    resume  -> orchestrator.driver.resume(args)    args: name, storage, address, shared_storage
               (with an http(s) address both go to orchestrator.jobs.run_as_job: the driver runs as a Ray Job)
    status  -> orchestrator.driver.status(args)    args: name, json, storage, address
    fit     -> orchestrator.reporting.fit_command(args)     args: name, out (None: <storage>/<name>/analysis/), storage
    recipe  -> orchestrator.reporting.recipe_command(args)  args: name, budget (float > 0), json, storage
    demo    -> orchestrator.demo.run(args)         args: name ("demo"), storage, address
    export  -> analysis.trial_choice.trial_to_export, then workers.export.export_command(args, row, grid)
    prepare -> orchestrator.prepare.prepare_command(args)  args: grid, json, storage, address
    suite build -> orchestrator.suite_commands.build_command(args)  args: out (None: the suite's default), storage
    suite list  -> orchestrator.suite_commands.list_command(args)   args: json, storage

Errors: a ``UserError`` (or ``core.models.ModelConfigError`` / ``workers.pair_files.DataError``) anywhere becomes
one line on stderr and exit code 2, no traceback; so do argparse errors. Anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import signal
import sys

from core.errors import EXIT_USER_ERROR, UserError

DEFAULT_STORAGE = "./sweeps"



# --- the commands' handlers: imported when the command runs (the driver stays light) ------------------------
def _submit(args):
    if _as_job(args, "submit"):
        from orchestrator.jobs import run_as_job
        return run_as_job(args, "submit")
    from orchestrator.driver import submit
    return submit(args)


def _resume(args):
    if _as_job(args, "resume"):
        from orchestrator.jobs import run_as_job
        return run_as_job(args, "resume")
    from orchestrator.driver import resume
    return resume(args)


def _as_job(args, command: str) -> bool:
    """The address rules (orchestrator/jobs.py: ray:// refused, a local store with a remote cluster only when
    shared); True when the address is a job server: the driver then runs on the cluster as a Ray Job."""
    from orchestrator.jobs import check_address, is_job_server

    check_address(args, command)
    return is_job_server(args.address)


def _lazy(target: str, job: str | None = None):
    """The handler ``module:function``, imported only when its command runs (the CLI starts without torch, Ray or
    pandas); ``job``: the command may run as a Ray Job (the address rules checked first)."""
    module, function = target.split(":")

    def handler(args):
        if job:
            _as_job(args, job)
        return getattr(importlib.import_module(module), function)(args)

    handler.target = (module, function)
    return handler


def _export(args):
    """analysis picks the trial (the one named, or the best at a budget); workers/export.py builds the folder."""
    from analysis.trial_choice import trial_to_export
    from core.store import sweep_uri
    from workers.export import export_command, read_grid

    sweep = sweep_uri(args.storage, args.name)
    grid = read_grid(sweep, args.name)
    row = trial_to_export(sweep, args.name, trial_id=args.trial, budget=args.budget,
                          budgets=grid.get("budgets") or [])
    return export_command(args, row, grid)


COMMANDS = {"submit": _submit, "resume": _resume, "export": _export,
            "status": _lazy("orchestrator.driver:status"),
            "fit": _lazy("orchestrator.reporting:fit_command"),
            "recipe": _lazy("orchestrator.reporting:recipe_command"),
            "replay": _lazy("orchestrator.reporting:replay_command"),
            "demo": _lazy("orchestrator.demo:run", job="demo"),
            "prepare": _lazy("orchestrator.prepare:prepare_command", job="prepare"),
            "suite build": _lazy("orchestrator.suite_commands:build_command"),
            "suite list": _lazy("orchestrator.suite_commands:list_command")}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit code 2, as argparse's own)."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}\n")


# --- argument types ----------------------------------------------------------------------------------------
def _number_arg(ok, what: str):
    """An argparse type: a number that ``ok`` accepts (NaN and infinity never), else "must be a number <what>"."""
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            x = float("nan")
        if not ok(x) or x == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a number {what}, got {text!r}")
        return x
    return parse


_positive_float = _number_arg(lambda x: x > 0, "> 0")
_non_negative_float = _number_arg(lambda x: x >= 0, ">= 0")
_fraction = _number_arg(lambda x: 0 < x <= 1, "in (0, 1]")


def _gpu_count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return int(text)


def _storage_uri(text: str) -> str:
    """A store URI without credentials in it (they belong in the environment; the error masks them)."""
    from fsio import StorageError, check_no_credentials

    try:
        return check_no_credentials(text)
    except StorageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _sweep_name(text: str) -> str:
    from orchestrator.grid import SWEEP_NAME_PATTERN

    if not re.match(SWEEP_NAME_PATTERN, text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a sweep name ({SWEEP_NAME_PATTERN[1:-1]})")
    return text


# --- the parser --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    storage = os.environ.get("REPURPOSE_STORAGE") or DEFAULT_STORAGE
    address = os.environ.get("RAY_ADDRESS") or None

    def common(p: argparse.ArgumentParser, *, sweep: bool = False, runs: bool = True) -> argparse.ArgumentParser:
        p.add_argument("--storage", default=storage, metavar="URI", type=_storage_uri,
                       help=f"the sweep store: a path, s3://… or gs://… (default: $REPURPOSE_STORAGE, "
                       f"else {DEFAULT_STORAGE})")
        if sweep:
            p.add_argument("--address", default=address,
                           help="Ray address (default: $RAY_ADDRESS, else a local Ray started for the run); "
                                "http://HEAD:8265 (the cluster's job server) runs the driver there as a Ray Job; "
                                "ray:// is refused")
        if sweep and runs:
            p.add_argument("--shared-storage", action="store_true",
                           help="a local --storage path with a remote cluster is the same filesystem on every node "
                                "(NFS, a one-machine cluster); without it such a store is refused")
        return p

    parser = _Parser(prog="repurpose", description="Compute-optimal recipes for repurposing LMs into embedding "
                     "models: plan, run and fit a sweep.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = common(sub.add_parser("plan", help="validate a grid and print every trial's plan (starts no Ray)"))
    p.add_argument("grid", metavar="GRID.yaml")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--gpus", type=_gpu_count, default=None, metavar="N",
                   help="plan resources for N GPUs per node (default: the grid's resources.gpus; auto: CPU)")
    p.add_argument("--device", default="H100 SXM", metavar="NAME",
                   help="the accelerator device-hours are estimated for (core/devices.py's table; default H100 SXM)")
    p.add_argument("--mfu", type=_fraction, default=None, metavar="F",
                   help="assumed FLOP utilisation for the estimate (default: per model size, the measured table in "
                        "core/throughput.py)")
    p.set_defaults(handler=cmd_plan)

    p = common(sub.add_parser("submit", help="run (or extend, or finish) a sweep"), sweep=True)
    p.add_argument("grid", metavar="GRID.yaml")
    p.add_argument("--name", type=_sweep_name, default=None, help="sweep name (default: the grid's name)")
    _takeover_flag(p)
    _detach_flag(p)
    p.set_defaults(handler=COMMANDS["submit"])

    p = common(sub.add_parser("prepare", help="build (or reuse) the token caches a grid's trials read"),
               sweep=True)
    p.add_argument("grid", metavar="GRID.yaml")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.set_defaults(handler=COMMANDS["prepare"])

    p = common(sub.add_parser("resume", help="finish an interrupted sweep from its stored grid"), sweep=True)
    p.add_argument("name", type=_sweep_name, metavar="NAME")
    _takeover_flag(p)
    _detach_flag(p)
    p.set_defaults(handler=COMMANDS["resume"])

    p = common(sub.add_parser("status", help="counts, FLOP spent / planned, the trials"), sweep=True, runs=False)
    p.add_argument("name", type=_sweep_name, metavar="NAME")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=COMMANDS["status"])

    p = common(sub.add_parser("fit", help="fit the frontier; write figures and the recipe table"))
    p.add_argument("name", type=_sweep_name, metavar="NAME")
    p.add_argument("--out", default=None, metavar="DIR", help="default: <storage>/<NAME>/analysis/")
    p.add_argument("--metric", default="eval_loss", choices=("eval_loss", "ndcg_at_10"),
                   help="what the frontier is fitted on: the held-out loss (default) or 1 - nDCG@10 "
                        "(written to <out>/ndcg_at_10/ by default)")
    p.set_defaults(handler=COMMANDS["fit"])

    p = common(sub.add_parser("recipe", help="the compute-optimal recipe at a budget"))
    p.add_argument("name", type=_sweep_name, metavar="NAME")
    p.add_argument("--budget", type=_positive_float, required=True, metavar="FLOP")
    p.add_argument("--serve-tokens", type=_non_negative_float, default=None, metavar="T",
                   help="tokens the model will embed in its life: the recipe under training FLOP + 2·N·T <= C")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=COMMANDS["recipe"])

    p = common(sub.add_parser("export", help="a trial's model as a sentence-transformers folder"))
    p.add_argument("name", type=_sweep_name, metavar="NAME")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", default=None, metavar="ID", help="the trial to export")
    which.add_argument("--budget", type=_positive_float, default=None, metavar="FLOP",
                       help="export the best completed trial (lowest eval_loss) at this grid budget")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must not exist or be empty)")
    p.set_defaults(handler=COMMANDS["export"])

    p = common(sub.add_parser("replay", help="what the adaptive strategy would have run on a full sweep"))
    p.add_argument("name", type=_sweep_name, metavar="NAME")
    p.add_argument("--strategy", choices=("adaptive",), default="adaptive")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=COMMANDS["replay"])

    p = common(sub.add_parser("demo", help="offline mini suite, small sweep on a local Ray, fit, recipe"),
               sweep=True)
    p.add_argument("--name", type=_sweep_name, default="demo", help="sweep name (default: demo)")
    p.add_argument("--quick", action="store_true", help="a reduced demo: two tiny models, two methods (CI)")
    p.add_argument("--family", choices=("pythia", "llama"), default="pythia",
                   help="the mini suite's family: pythia (GPT-NeoX, the study's) or llama (RMSNorm, SwiGLU, RoPE)")
    p.set_defaults(handler=COMMANDS["demo"])

    suite = sub.add_parser("suite", help="the offline mini model suite")
    suite_sub = suite.add_subparsers(dest="suite_command", required=True, metavar="{build,list}",
                                     parser_class=_Parser)
    p = common(suite_sub.add_parser("build", help="build (or reuse) the mini suite and its data"))
    p.add_argument("--out", default=None, metavar="DIR", help="default: the suite's cache directory")
    p.set_defaults(handler=COMMANDS["suite build"])
    p = common(suite_sub.add_parser("list", help="list the suite's models"))
    p.add_argument("--out", default=None, metavar="DIR", help="default: the suite's cache directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=COMMANDS["suite list"])
    return parser


def _takeover_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--takeover", action="store_true",
                   help="take the sweep's lease even from a driver whose heartbeat is fresh (it must be gone)")


def _detach_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--detach", action="store_true",
                   help="with --address http://…: return once the job is submitted (prints its id and the commands "
                        "to follow or stop it)")


# --- commands ----------------------------------------------------------------------------------------------
def cmd_plan(args: argparse.Namespace) -> int:
    from orchestrator.grid import load_grid
    from orchestrator.plan import plan_grid

    from core.devices import device_entry, device_memory

    device = getattr(args, "device", "H100 SXM")
    entry = device_entry(device)
    if entry is None:
        raise UserError(f"--device {args.device}: not a device with a bf16 peak in core/devices.py's table")
    plan = plan_grid(load_grid(args.grid), gpus_available=args.gpus, gpu_memory=device_memory(device))
    for warning in plan.warnings:
        print(warning, file=sys.stderr)
    if args.json:
        print(json.dumps(plan.to_json()))
    else:
        from orchestrator.plan_view import render_plan

        print(render_plan(plan, entry, args.mfu))
    return 0


# --- entry point -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # -h (0) or a usage error (2, already printed)
        return e.code if isinstance(e.code, int) else EXIT_USER_ERROR
    previous = signal.signal(signal.SIGTERM, _terminated) if _main_thread() else None
    try:
        code = args.handler(args)
    except KeyboardInterrupt as e:  # before or after a sweep runs (during one, the driver handles both signals)
        print("interrupted", file=sys.stderr)
        return EXIT_SIGTERM if isinstance(e, Terminated) else EXIT_SIGINT
    except UserError as e:
        print(e.one_line(), file=sys.stderr)
        return e.exit_code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0 if code is None else int(code)


# Exit codes of a run stopped by a signal (docs/reference.md): 128 + the signal's number, as a shell reports it.
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM outside a running sweep: unwinds like Ctrl-C (finally blocks run), exit code 143."""


def _terminated(signum, frame):
    raise Terminated()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
