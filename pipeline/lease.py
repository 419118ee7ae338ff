"""The re-index lock: ``ROOT/_lock.json`` holds the owner and expiry of the run in progress.

Object stores without conditional writes cannot make taking it atomic; we write, read back and compare owners,
which leaves a window of one round trip in which two runs started at the same instant could both believe they
hold it. Schedule one run at a time (the CronJob's ``concurrencyPolicy: Forbid``); the lock guards against
overlaps, not against simultaneous starts.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from typing import Any

from pipeline import storage
from pipeline.storage import Options

log = logging.getLogger(__name__)

LOCK = "_lock.json"


class LockHeldError(RuntimeError):
    """Another run holds a live lease on the root."""


class Lease:
    """``ROOT/_lock.json``: taken when absent or expired, renewed while the run goes on, removed at the end."""

    def __init__(self, root_url: str, seconds: float, options: Options = None) -> None:
        self.url = storage.join(root_url, LOCK)
        self.seconds = seconds
        self.options = options
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.renewed = 0.0
        self.acquired_at = time.time()

    def _read(self) -> dict[str, Any] | None:
        if not storage.exists(self.url, self.options):
            return None
        return json.loads(storage.read_text(self.url, self.options))

    def _write(self) -> None:
        now = time.time()
        record = {"owner": self.owner, "acquired_at": self.acquired_at, "expires_at": now + self.seconds}
        storage.write_text(self.url, json.dumps(record), self.options)
        self.renewed = time.monotonic()

    def acquire(self) -> None:
        held = self._read()
        if held is not None and held["expires_at"] > time.time():
            raise LockHeldError(
                f"{storage.redact(self.url)} is held by {held['owner']} until "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(held['expires_at']))}; "
                "another re-index is running (remove the file only if you know that run is dead)"
            )
        if held is not None:
            log.warning("taking over the expired lock of %s", held["owner"])
        self._write()
        self._check_ours()

    def _check_ours(self) -> None:
        held = self._read()
        if held is None or held["owner"] != self.owner:
            other = held["owner"] if held else "nobody (removed)"
            raise LockHeldError(f"lost {storage.redact(self.url)} to {other}")

    def renew_if_due(self) -> None:
        """Extend the lease once a third of it has passed (cheap to call after every chunk)."""
        if time.monotonic() - self.renewed > self.seconds / 3:
            self._check_ours()
            self._write()

    def release(self) -> None:
        held = self._read()
        if held is not None and held["owner"] == self.owner:
            storage.remove(self.url, self.options)
