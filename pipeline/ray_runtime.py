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

import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TypeVar

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

T = TypeVar("T")

# Every worker of the job redacts its log records as the command does (secrets never reach Ray's log files);
# on a cluster Ray merges this into the job's own runtime_env.
WORKER_ENV = {"worker_process_setup_hook": "pipeline.storage.install_log_redaction"}


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` or start a local Ray; keep Ray's files out of the home directory."""
    import ray

    if ray.is_initialized():
        return
    if address:  # the cluster's own auth settings apply (KubeRay sets RAY_AUTH_MODE/RAY_AUTH_TOKEN in pods)
        ray.init(address=address, log_to_driver=False, runtime_env=WORKER_ENV)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # only the private local cluster started here
    temp_dir = os.environ.get("LANDMARK_INDEX_RAY_TMP") or os.path.join(
        tempfile.gettempdir(), "landmark-index-ray"
    )
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=False,
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
