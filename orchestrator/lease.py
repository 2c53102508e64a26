"""One driver per sweep: ``<sweep>/lease`` names the driver that runs it and carries its heartbeat.

    {"sweep", "host", "pid", "started_at", "heartbeat_at", "expiry_s", "token"}     (times: unix seconds)

``submit`` and ``resume`` take the lease before Ray starts and before anything else is written, and hold it to
the end (released on success, error and interrupt alike). A second driver finds it and stops with one line
naming the holder and how fresh its heartbeat is (``LeaseHeld``, exit code 2) — unless the heartbeat is older
than the holder's own ``expiry_s`` (a killed driver, a lost head node), or the holder ran on this machine and its
process is gone (``Holder.gone``: same host, boot id and pid namespace; a driver killed here is taken over at
once): then it takes the lease over, with one line saying so; ``--takeover`` takes it whatever its age. ``status``, ``fit``, ``recipe`` and ``export`` never
look at it.

Two drivers can never both win: the lease is created only if absent and replaced only if unchanged since it was
read (``fsio.create_exclusive`` / ``replace_if``: link(2) and an flock'ed compare-and-swap locally,
``If-None-Match: *`` / ``If-Match`` on S3, generation preconditions on GCS). A background thread renews the
heartbeat every ``renew_every_s`` by the same compare-and-swap; when the lease no longer carries this driver's
token (another driver took it over), or it could not be renewed for ``expiry_s``, the lease is lost: the
Recorder refuses every further write (``check``, the fence, reads the lease before each flush) and the sweep's
trials are stopped (``lost`` is polled by Tune's stopper); the driver exits 2 (``LeaseLost``).

The fence is a check before each write, not a token inside it: a takeover only happens after the holder has not
renewed for ``expiry_s`` (or on ``--takeover``), and a holder that cannot renew for ``expiry_s`` gives up by
itself, so the window is one flush of a driver already past its expiry. Ages compare the holder's clock with the
reader's: hosts are assumed NTP-synchronised (seconds of skew matter little against a 60 s expiry).

``REPURPOSE_LEASE_EXPIRY_S`` (default 60) sets the expiry a driver promises; it renews every sixth of it, at most
every 5 s. Tests use a few seconds to take over from a killed driver quickly.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Callable

import fsio as storage
from core.errors import UserError
from core.store import LEASE_FILE, StoreError
from core.uris import join, redact

EXPIRY_ENV = "REPURPOSE_LEASE_EXPIRY_S"
DEFAULT_EXPIRY_S = 60.0
MAX_RENEW_EVERY_S = 5.0

Clock = Callable[[], float]  # unix seconds now: time.time, or a test's fake clock


class LeaseHeld(UserError):
    """Another live driver runs this sweep."""


class LeaseLost(StoreError):
    """This driver's lease was taken over (or could not be renewed): it must not write again."""


@dataclasses.dataclass(frozen=True)
class Holder:
    sweep: str
    host: str
    pid: int
    started_at: float
    heartbeat_at: float
    expiry_s: float
    token: str
    boot_id: str = ""  # with host and pidns: a holder on this very machine and pid namespace can be checked
    pidns: str = ""

    @classmethod
    def new(cls, sweep: str, expiry_s: float, clock: Clock = time.time) -> "Holder":
        now = clock()
        return cls(sweep, socket.gethostname(), os.getpid(), now, now, expiry_s, uuid.uuid4().hex, *_machine_ids())

    @classmethod
    def parse(cls, data: bytes) -> "Holder | None":
        """None for anything that is not a lease this code wrote."""
        try:
            doc = json.loads(data)
            return cls(str(doc["sweep"]), str(doc["host"]), int(doc["pid"]), float(doc["started_at"]),
                       float(doc["heartbeat_at"]), float(doc["expiry_s"]), str(doc["token"]),
                       str(doc.get("boot_id", "")), str(doc.get("pidns", "")))
        except (ValueError, TypeError, KeyError):
            return None

    def encode(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    def age_s(self, clock: Clock = time.time) -> float:
        return max(clock() - self.heartbeat_at, 0.0)

    def expired(self, clock: Clock = time.time) -> bool:
        return self.age_s(clock) > self.expiry_s

    def gone(self) -> bool:
        """The holder ran on this machine (same host, boot and pid namespace) and its process no longer exists: a
        killed driver here need not wait for its expiry. Anywhere else (a lost head node), only the expiry tells."""
        if not self.boot_id or (self.host, self.boot_id, self.pidns) != (socket.gethostname(), *_machine_ids()):
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # alive, someone else's
            return False
        return False

    def who(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        return f"host {self.host} pid {self.pid} (since {started})"


def _machine_ids() -> tuple[str, str]:
    """(boot id, pid namespace) of this process: ("", "") where /proc does not tell."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip(), str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "", ""


def expiry_from_env() -> float:
    text = os.environ.get(EXPIRY_ENV)
    if not text:
        return DEFAULT_EXPIRY_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"{EXPIRY_ENV}={text!r}: must be a positive number of seconds")
    return value


class Lease:
    """This driver's lease on one sweep: ``acquire`` it, ``start`` the heartbeat, ``check`` before each write,
    ``release`` at the end."""

    def __init__(self, sweep_uri: str, holder: Holder, clock: Clock = time.time):
        self.uri = join(sweep_uri, LEASE_FILE)
        self.holder = holder
        self.clock = clock  # heartbeat times and ages; the renewal gap is measured on time.monotonic
        self.renew_every_s = min(holder.expiry_s / 6, MAX_RENEW_EVERY_S)
        self._lost: str | None = None  # why the lease is lost; sticky
        self._lock = threading.RLock()  # the heartbeat thread against release (a signal handler may release)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renewed = time.monotonic()

    def __getstate__(self) -> dict:
        """Tune pickles its stopper and callbacks (which see the lease) into its experiment state: the state
        without the thread and its locks (never unpickled into a live lease here)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_stop", "_thread")}

    # --- taking it -------------------------------------------------------------------------------------------
    @classmethod
    def acquire(cls, sweep_uri: str, sweep: str, *, takeover: bool = False, expiry_s: float | None = None,
                out=None, clock: Clock = time.time) -> "Lease":
        """The lease, created or taken over (one line on ``out``, default stderr, says so); ``LeaseHeld`` when a
        live driver holds it. A StorageError when the store cannot be reached. ``clock`` tells the time (heartbeats
        and ages: a test passes a fake one to let time pass without waiting)."""
        out = out or sys.stderr
        mine = Holder.new(sweep, expiry_from_env() if expiry_s is None else expiry_s, clock)
        uri = join(sweep_uri, LEASE_FILE)
        for _ in range(5):  # each round lost to a concurrent driver re-reads what it wrote
            if storage.create_exclusive(uri, mine.encode()):
                return cls(sweep_uri, mine, clock)
            current = storage.read_versioned(uri)
            if current is None:
                continue  # released between our create and our read
            data, version = current
            theirs = Holder.parse(data)
            if theirs is not None and not theirs.expired(clock) and not theirs.gone() and not takeover:
                raise LeaseHeld(f"{redact(uri)}: sweep {sweep!r} is being run by another driver, "
                                f"{theirs.who()}, heartbeat {theirs.age_s(clock):.0f} s ago (it expires after "
                                f"{theirs.expiry_s:g} s without one): wait for it to finish, or pass --takeover "
                                "if that driver is gone")
            if storage.replace_if(uri, mine.encode(), version):
                if theirs is None:
                    why = "its lease file was unreadable"
                elif theirs.gone():
                    why = f"{theirs.who()} is gone (no such process on this machine)"
                elif theirs.expired(clock):
                    why = (f"{theirs.who()} sent no heartbeat for {theirs.age_s(clock):.0f} s "
                           f"(expiry {theirs.expiry_s:g} s)")
                else:
                    why = f"--takeover from {theirs.who()}, heartbeat {theirs.age_s(clock):.0f} s ago"
                print(f"taking over sweep {sweep}: {why}", file=out, flush=True)
                return cls(sweep_uri, mine, clock)
        raise LeaseHeld(f"{redact(uri)}: sweep {sweep!r}: another driver keeps changing the lease; try again")

    # --- holding it ------------------------------------------------------------------------------------------
    def start(self) -> "Lease":
        self._thread = threading.Thread(target=self._heartbeat, name="repurpose-lease", daemon=True)
        self._thread.start()
        return self

    @property
    def lost(self) -> str | None:
        """Why the lease is lost (another driver took it over, …), or None while this driver holds it."""
        return self._lost

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.renew_every_s) and self.beat():
            pass

    def beat(self) -> bool:
        """One round of the heartbeat (the thread runs one every ``renew_every_s``): renews the lease, or notices
        that it is lost. False once the heartbeat should stop (released or lost)."""
        with self._lock:
            if self._stop.is_set() or self._lost:
                return False
            try:
                self._renew()
            except storage.StorageError as e:
                if time.monotonic() - self._renewed > self.holder.expiry_s:
                    self._lose(f"could not renew it for {self.holder.expiry_s:g} s ({e})")
            return not self._lost

    def _renew(self) -> None:
        current = self._current()
        if current is None:
            return
        renewed = dataclasses.replace(self.holder, heartbeat_at=self.clock())
        if storage.replace_if(self.uri, renewed.encode(), current[1]):
            self.holder, self._renewed = renewed, time.monotonic()
        # else: changed between our read and our write; the next round (or the fence) reads who holds it

    def _current(self) -> tuple[Holder, str] | None:
        """The stored lease if it is still ours; else marks the lease lost and returns None."""
        found = storage.read_versioned(self.uri)
        theirs = Holder.parse(found[0]) if found else None
        if theirs is None or theirs.token != self.holder.token:
            self._lose(f"taken over by {theirs.who()}" if theirs else "its lease file is gone")
            return None
        return theirs, found[1]

    def _lose(self, why: str) -> None:
        if not self._lost:
            self._lost = why

    def check(self) -> None:
        """The fence, before each write to the store: raises ``LeaseLost`` unless the stored lease is still ours."""
        if not self._lost:
            try:
                self._current()
            except storage.StorageError as e:
                raise StoreError(str(e)) from None  # the store is unreachable: the Recorder's outage handling
        if self._lost:
            raise LeaseLost(self.lost_line())

    def lost_line(self) -> str:
        return (f"{redact(self.uri)}: this driver lost its lease on sweep {self.holder.sweep!r} ({self._lost}): "
                "it stopped its trials and wrote nothing more")

    def release(self) -> None:
        """Stops the heartbeat and deletes the lease if it is still ours (best effort: a lease left behind
        expires by itself)."""
        self._stop.set()
        with self._lock:
            if self._lost:
                return
            try:
                current = self._current()
                if current is not None:
                    storage.delete_if(self.uri, current[1])
                self._lost = self._lost or "released"
            except storage.StorageError as e:
                print(f"warning: could not release {redact(self.uri)} ({e}); it expires after "
                      f"{self.holder.expiry_s:g} s", file=sys.stderr)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.renew_every_s + 1)
