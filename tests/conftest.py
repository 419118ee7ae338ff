"""Shared fixtures. Server fixtures (S3-compatible Swift, HTTP) live in tests/servers.py, loaded as a plugin."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Keep torch and BLAS to the machine's cores without oversubscribing Ray workers.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Every Ray the tests start (the session's, those of commands and of tests/raynodes.py) keeps up to 8 workers
# instead of its CPU count (2): a run's decode and writer tasks (0.25 CPU each) then reuse warm workers rather
# than start new ones (each importing torch) while the idle ones beyond the limit are killed after 1 s. The
# SIGKILL extraction test took 93 s with the default and 40 s with this (loaded machine); an idle worker that
# has imported torch holds a few hundred MB.
os.environ.setdefault("RAY_num_workers_soft_limit", "8")
# Ray Train's controller looks at its workers every 2 s by default, so each state change of a run (started,
# finished, failed) waits up to 2 s; the test runs train for seconds. Its preemption watcher, an extra actor
# process per run, watches for node drains, which no test makes. Both are read by the controller, a worker of
# the session's Ray, which inherits this environment.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# The local Rays that commands run by a test start (pipeline.ray_runtime) get a temp dir of this pytest
# process, so concurrent xdist workers never share Ray's session files. Short: Ray's socket paths must fit
# 107 bytes.
os.environ["LANDMARK_INDEX_RAY_TMP"] = tempfile.mkdtemp(prefix="li-cmd-")

pytest_plugins = ["tests.servers", "tests.demo_index"]

SHARED = Path(__file__).resolve().parents[2] / "shared"


# Modules built on one costly session fixture (tests/demo_index.py: a reindex of the demo on Ray), run on one
# xdist worker so that it is built once.
SHARED_SESSION_BUILDS = {"tests/test_query.py": "demo_index", "tests/test_serve.py": "demo_index"}
# Tests that are a scope of their own: each starts a Ray cluster of its own and alone takes about a minute, so
# its module would otherwise be one long scope that no other worker can share.
OWN_SCOPES = (
    "tests/test_extraction.py::test_gpu_extractors_wait_for_gpu_nodes_and_the_pool_grows_as_they_join",
    "tests/test_answers.py::test_search_dba_and_rerank_on_a_two_node_cluster_equal_one_process",
)
# Seconds of the long scopes (their tests' setup + call + teardown summed, from a full run on the 2-core machine,
# quiet at its start, 2026-12-07: 1144 worker-s, 594 s wall), handed out longest first so that none starts last
# and both workers end together. Unlisted scopes are short and follow, most tests first (xdist's own order).
SCOPE_SECONDS = {
    "tests/test_train.py": 202,
    "tests/test_faults.py": 128,
    "demo_index": 121,
    "tests/test_extraction.py": 74,
    "tests/test_jobs.py": 71,
    "tests/test_convert.py": 69,
    OWN_SCOPES[0]: 66,
    "tests/test_dba.py": 54,
    OWN_SCOPES[1]: 46,
    "tests/test_run.py": 41,
    "tests/test_reindex.py": 34,
    "tests/test_ray_runtime.py": 33,
    "tests/test_whitening.py": 31,
    "tests/test_gpu_check.py": 23,
    "tests/test_index.py": 19,
}


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """`--dist loadscope` (pyproject's addopts) with the scopes above: SHARED_SESSION_BUILDS modules as one,
    OWN_SCOPES tests each alone, handed out longest first (SCOPE_SECONDS)."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class LongestFirstScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            own = next((test for test in OWN_SCOPES if nodeid.startswith(test)), None)
            if own is not None:
                return own
            scope = super()._split_scope(nodeid)
            return SHARED_SESSION_BUILDS.get(scope, scope)

        def _assign_work_unit(self, node: object) -> None:
            # sorted() is stable: unlisted scopes keep xdist's order behind the listed ones
            for scope in sorted(self.workqueue, key=lambda scope: -SCOPE_SECONDS.get(scope, 0)):
                self.workqueue.move_to_end(scope)
            super()._assign_work_unit(node)

    return LongestFirstScheduling(config, log)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ["LANDMARK_INDEX_RAY_TMP"], ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray for the whole session (2 CPUs, like the CI machine); yields its GCS address."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="li-ray-")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture
def shared_dir() -> Path:
    """../shared beside the checkout (real data and weights); tests using it skip when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: real-data check skipped")
    return SHARED
