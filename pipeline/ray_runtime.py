"""Ray start-up, shared by every stage that runs on Ray (extraction, index build, reindex).

Ray is imported inside the function so that importing a stage does not import Ray.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to ``address`` or start a local Ray; keep Ray's files out of the home directory."""
    import ray

    if ray.is_initialized():
        return
    if address:  # the cluster's own auth settings apply (KubeRay sets RAY_AUTH_MODE/RAY_AUTH_TOKEN in pods)
        ray.init(address=address, log_to_driver=False)
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
        runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}},
    )


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
