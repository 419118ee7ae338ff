"""Ray start-up, shared by every stage that runs on Ray (extraction, index build, reindex).

Ray is imported inside the function so that importing a stage does not import Ray.

A local Ray started here belongs to the command that started it: Ray's own atexit hook shuts it down when
the command ends, and handlers installed here do so on SIGTERM/SIGINT, then end the process by that signal
(a shell sees status 128 + the signal). Not by an exception: Ray turns one raised while the driver waits in
``ray.get`` into ``SystemExit(1)``; ``finally`` blocks do not run, and the re-index lock of a process that
is gone is taken over at once (pipeline.lease). During ``ray.init`` itself Ray's own SIGTERM handler applies
(exit status 15, atexit shutdown). A SIGKILLed driver cannot clean up at all.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TypeVar

from pipeline import storage

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

T = TypeVar("T")

# Every worker of the job sets up its logging as setup_worker_logging says; on a cluster Ray merges this into
# the job's own runtime_env.
WORKER_ENV = {"worker_process_setup_hook": "pipeline.ray_runtime.setup_worker_logging"}
WORKER_LOG = "landmark-index-worker-{pid}.log"  # a worker's full log, in the Ray session's logs folder


class _OncePerMessage(logging.Filter):
    """Passes each distinct (level, message) once: a warning met on every image is one line, not millions."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def setup_worker_logging() -> None:
    """A Ray worker's logging: every record redacted (secrets reach no log); warnings and errors, Python
    warnings included, once each on stderr, which Ray forwards to the driver (and dedups across workers);
    everything from INFO up in the worker's own file in Ray's logs folder."""
    storage.install_log_redaction()
    logging.captureWarnings(True)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    to_driver = logging.StreamHandler(sys.stderr)
    to_driver.setLevel(logging.WARNING)
    to_driver.addFilter(_OncePerMessage())
    to_driver.setFormatter(formatter)
    root.addHandler(to_driver)
    logs = _ray_logs_dir()
    if logs is not None:
        to_file = logging.FileHandler(os.path.join(logs, WORKER_LOG.format(pid=os.getpid())))
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(to_file)


def _ray_logs_dir() -> str | None:
    """The logs folder of the Ray session this worker belongs to (Ray has no public call for it)."""
    import ray

    try:
        return ray._private.worker.global_worker.node.get_logs_dir_path()
    except AttributeError:  # an internal API moved: the records still reach stderr from WARNING up
        return None


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` or start a local Ray; keep Ray's files out of the home directory."""
    import ray

    if ray.is_initialized():
        return
    if address:  # the cluster's own auth settings apply (KubeRay sets RAY_AUTH_MODE/RAY_AUTH_TOKEN in pods)
        ray.init(address=address, log_to_driver=True, runtime_env=WORKER_ENV)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # only the private local cluster started here
    temp_dir = os.environ.get("LANDMARK_INDEX_RAY_TMP") or os.path.join(
        tempfile.gettempdir(), "landmark-index-ray"
    )
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=True,  # workers log only warnings and errors to stderr, once each
        runtime_env={**WORKER_ENV, "env_vars": {"RAY_AUTH_MODE": "disabled"}},
    )
    _stop_ray_with_the_process()


def _stop_ray_with_the_process() -> None:
    """Shut the local Ray down on SIGTERM/SIGINT (Python allows handlers from the main thread only; elsewhere
    Ray's atexit hook alone applies)."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, _shutdown_and_exit)


def _shutdown_and_exit(signum: int, frame: FrameType | None) -> None:
    import ray

    for stop in STOP_SIGNALS:  # a second signal while shutting down must not start a second shutdown
        signal.signal(stop, signal.SIG_IGN)
    ray.shutdown()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)  # ends the process as the signal's default action does


def every(seconds: float, callback: Callable[[T], None]) -> Callable[[T], None]:
    """``callback`` at most once per ``seconds`` (the first call always passes): a job's periodic progress
    lines in `ray job logs` from a stage's per-chunk or per-step progress hook."""
    last = -math.inf

    def throttled(progress: T) -> None:
        nonlocal last
        if time.monotonic() - last >= seconds:
            last = time.monotonic()
            callback(progress)

    return throttled
