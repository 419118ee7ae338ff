"""The re-index lock: ``ROOT/_lock.json`` names the run in progress, its host and process, and its heartbeat.

Taking it is a create-if-absent (:func:`pipeline.storage.write_if_absent`: atomic on local disks and on S3
servers with conditional writes). A held lock is taken over at once when its holder is provably gone:
- it expired (the holder stopped renewing for the whole lease);
- its heartbeat, renewed every ``heartbeat_s`` by a thread of the holder, is :data:`STALE_HEARTBEATS` periods old
  (the holder died or lost the store, on whatever host; compares clocks across hosts);
- it was taken on this host by a process that no longer exists: no such pid, or a pid reused by a process
  started at another time (the start time is recorded where the OS tells it, Linux ``/proc``).
Of several runs that find the same dead lock exactly one replaces it: each first creates
``_lock.json.takeover-<digest of the dead owner>`` with write_if_absent, and only its creator removes and
re-creates the lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from pipeline import storage
from pipeline.storage import Options

log = logging.getLogger(__name__)

LOCK = "_lock.json"
HEARTBEAT_S = 30.0  # how often the holder rewrites heartbeat_at
STALE_HEARTBEATS = 4  # a heartbeat this many periods old marks a dead holder
CLAIM_ATTEMPTS = 3  # creates of a takeover claim that other runs keep creating and dropping in between


class LockHeldError(RuntimeError):
    """Another run holds a live lease on the root."""


def process_started(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot, Linux ``/proc``); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])  # field 22; the name before ")" may hold spaces


def process_alive(pid: int, started: int | None) -> bool:
    """Whether process ``pid`` of this host exists and, when ``started`` is known, is the one started then."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    now_started = process_started(pid)
    return started is None or now_started is None or now_started == started


def takeover_reason(held: Mapping[str, Any], now: float) -> str | None:
    """Why the lock record ``held`` may be taken over at time ``now``, or None while its holder may live."""
    if held.get("expires_at", 0.0) <= now:
        return "expired"
    beat, period = held.get("heartbeat_at"), held.get("heartbeat_s")
    if beat is not None and period is not None and now - beat > STALE_HEARTBEATS * period:
        return f"its heartbeat is {now - beat:.0f} s old (renewed every {period:g} s)"
    pid = held.get("pid")
    local = held.get("host") == socket.gethostname() and pid is not None
    if local and not process_alive(pid, held.get("pid_started")):
        return f"its process {pid} on this host is gone"
    return None


def takeover_claim_url(lock_url: str, dead_owner: str) -> str:
    """The object whose creator alone may replace the lock of ``dead_owner``."""
    return f"{lock_url}.takeover-{hashlib.sha256(dead_owner.encode()).hexdigest()[:16]}"


class Lease:
    """``ROOT/_lock.json``: taken when absent or its holder is gone, renewed while the run goes on, removed
    at the end. Call :meth:`renew_if_due` as work progresses (it extends the lease); a thread keeps the
    heartbeat fresh in between."""

    def __init__(
        self, root_url: str, seconds: float, options: Options = None, heartbeat_s: float = HEARTBEAT_S
    ) -> None:
        self.url = storage.join(root_url, LOCK)
        self.seconds = seconds
        self.options = options
        self.heartbeat_s = heartbeat_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.renewed = 0.0
        self.acquired_at = time.time()
        self.expires_at = 0.0
        self._claim: str | None = None  # the takeover marker this lease created, removed on release
        self._writing = threading.Lock()  # the heartbeat thread and renew_if_due write one at a time
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._lost: LockHeldError | None = None

    def _read(self, url: str | None = None) -> dict[str, Any] | None:
        """The lock's record (or the record at ``url``, a takeover claim); None when there is none."""
        try:
            return json.loads(storage.read_text(url or self.url, self.options))
        except FileNotFoundError:
            return None

    def _record(self) -> bytes:
        record = {
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_started": process_started(os.getpid()),
            "acquired_at": self.acquired_at,
            "expires_at": self.expires_at,
            "heartbeat_at": time.time(),
            "heartbeat_s": self.heartbeat_s,
        }
        return json.dumps(record).encode()

    def acquire(self) -> None:
        """Take the lock or raise :class:`LockHeldError`; then start the heartbeat."""
        self.expires_at = time.time() + self.seconds
        try:
            if not storage.write_if_absent(self.url, self._record(), self.options):
                self._take_from(self._read())
            self._check_ours()
        except LockHeldError:
            self._drop_claim()  # lost after claiming a takeover: another run created the lock in between
            raise
        self.renewed = time.monotonic()
        self._heartbeat = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._heartbeat.start()

    def _take_from(self, held: dict[str, Any] | None) -> None:
        """Create the lock after a failed create found ``held`` there (None: removed since)."""
        if held is not None and held.get("owner") != self.owner:  # equal: our create's answer was lost
            why = takeover_reason(held, time.time())
            if why is None:
                raise LockHeldError(
                    f"{storage.redact(self.url)} is held by {held['owner']} until "
                    f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(held['expires_at']))}; "
                    "another re-index is running (remove the file only if you know that run is dead)"
                )
            self._claim_takeover(held["owner"])
            log.warning("taking over the lock of %s: %s", held["owner"], why)
            storage.remove(self.url, self.options)
        if not storage.write_if_absent(self.url, self._record(), self.options):
            self._check_ours()

    def _claim_takeover(self, dead_owner: str) -> None:
        """Become the one run that replaces ``dead_owner``'s lock, or raise LockHeldError. The claim holds
        our lock record, so a claim whose own taker died is itself taken over by the same rules."""
        claim = takeover_claim_url(self.url, dead_owner)
        for _ in range(CLAIM_ATTEMPTS):
            if storage.write_if_absent(claim, self._record(), self.options):
                break
            taker = self._read(claim)
            if taker is None:  # its creator dropped it between our create and our read: create again
                continue
            if takeover_reason(taker, time.time()) is None:
                raise LockHeldError(
                    f"{taker['owner']} is taking over {storage.redact(self.url)} from {dead_owner}"
                )
            storage.remove(claim, self.options)  # its taker died mid-takeover: the claim is taken over too
        else:
            raise LockHeldError(f"another run is taking over {storage.redact(self.url)} from {dead_owner}")
        current = self._read()
        if current is not None and current.get("owner") != dead_owner:  # replaced before our claim
            storage.remove(claim, self.options)
            raise LockHeldError(f"lost {storage.redact(self.url)} to {current.get('owner')}")
        self._claim = claim

    def _check_ours(self) -> None:
        held = self._read()
        if held is None or held.get("owner") != self.owner:
            other = held.get("owner") if held else "nobody (removed)"
            raise LockHeldError(f"lost {storage.redact(self.url)} to {other}")

    def _rewrite(self, extend: bool) -> None:
        """Check the lock is still ours, then rewrite it with a fresh heartbeat (and expiry when ``extend``)."""
        with self._writing:
            self._check_ours()
            if extend:
                self.expires_at = time.time() + self.seconds
            storage.write_bytes(self.url, self._record(), self.options)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._rewrite(extend=False)
            except LockHeldError as exc:
                self._lost = exc  # renew_if_due raises it in the run's own thread
                return
            except Exception as exc:  # a transient store fault: the next beat tries again
                log.warning("lease heartbeat failed: %s", storage.redact_text(str(exc)))

    def renew_if_due(self) -> None:
        """Extend the lease once a third of it has passed (cheap to call after every chunk)."""
        if self._lost is not None:
            raise self._lost
        if time.monotonic() - self.renewed > self.seconds / 3:
            self._rewrite(extend=True)
            self.renewed = time.monotonic()

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        held = self._read()
        if held is not None and held.get("owner") == self.owner:
            storage.remove(self.url, self.options)
        self._drop_claim()

    def _drop_claim(self) -> None:
        if self._claim is not None:
            storage.remove(self._claim, self.options)
            self._claim = None
