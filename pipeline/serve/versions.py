"""Which index version a replica serves, and the parts it has loaded per version.

A request is pinned to one version when the gateway admits it, and every deployment answers it from the
parts of that version: a swap never mixes versions. A replica keeps the parts of the last :data:`KEEP`
versions, so requests admitted just before a swap are still answered from the old one while the new one
serves every later request. Loading happens off the request path: each replica polls LATEST in a thread and
loads a new version before the gateway switches to it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from pipeline import storage
from pipeline.query import IndexVersion, resolve_version

log = logging.getLogger(__name__)

KEEP = 2  # the live version and the one before it (requests admitted before the swap)
Part = TypeVar("Part")


class PartCache(Generic[Part]):
    """Parts (models, indexes, store readers) built once per key, the last KEEP kept; thread-safe."""

    def __init__(
        self, build: Callable[[IndexVersion], Part], key: Callable[[IndexVersion], Hashable]
    ) -> None:
        self._build, self._key = build, key
        self._parts: OrderedDict[Hashable, Part] = OrderedDict()
        self._lock = threading.Lock()  # one load at a time; readers of loaded parts never wait on a load

    def get(self, version: IndexVersion) -> Part:
        key = self._key(version)
        part = self._parts.get(key)
        if part is not None:
            return part
        with self._lock:
            if key not in self._parts:
                part = self._build(version)  # outside the dict: readers see the old parts meanwhile
                self._parts[key] = part
                while len(self._parts) > KEEP:
                    self._parts.popitem(last=False)
            return self._parts[key]


def by_name(version: IndexVersion) -> str:
    return version.name


def by_model(version: IndexVersion) -> tuple:
    """Versions extracted with the same model share one loaded extractor."""
    return (version.extraction, version.weights_sha256, version.weights_url)


class LatestWatcher:
    """Polls a root's live version every ``period_s`` in a daemon thread and calls ``on_new`` when it changes
    (errors are logged and the poll retried: a storage hiccup must not stop a replica)."""

    def __init__(
        self,
        root: str,
        period_s: float,
        on_new: Callable[[IndexVersion], None],
        options: storage.Options = None,
    ) -> None:
        self.root, self.period_s, self.on_new, self.options = root, period_s, on_new, options
        self.current: IndexVersion | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="latest-watcher", daemon=True)

    def check(self) -> IndexVersion:
        """Resolve the live version now; call ``on_new`` first when it changed."""
        version = resolve_version(self.root, self.options)
        if self.current is None or version.name != self.current.name:
            self.on_new(version)
            log.info("serving index version %s", version.name)
            self.current = version
        return version

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.check()
            except Exception as exc:  # keep serving the loaded version; say why the new one is not served
                log.warning(
                    "index version check failed: %s", storage.redact_text(f"{type(exc).__name__}: {exc}")
                )
