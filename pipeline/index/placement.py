"""Where the heavy build steps run: a Ray task each, with a memory request sized from what it holds, so
they run where the scheduler finds that memory, never in the job driver."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from pipeline.index.add import faiss_threads, part_urls
from pipeline.index.build_config import BuildConfig
from pipeline.index.merge import merge_and_measure, parts_bytes
from pipeline.index.params import (
    IndexChoice,
)
from pipeline.index.train import sample_sizes, shard_dim, train_step
from pipeline.storage import Options

log = logging.getLogger(__name__)
T = TypeVar("T")
STEP_MEMORY_FACTOR = 2  # k-means adds residuals as large as the sample; a RAM merge holds merged + one part
STEP_BASE_MEMORY = 512 * 2**20  # a worker's interpreter, faiss and pyarrow


def step_memory_bytes(vectors: int, dim: int, index_bytes: int = 0) -> int:
    """Memory a build step requests from Ray: it holds ``vectors`` float32 vectors of ``dim`` and an index of
    ``index_bytes``, times :data:`STEP_MEMORY_FACTOR` for faiss's working copies, plus a worker's own footprint."""
    return STEP_MEMORY_FACTOR * (vectors * dim * 4 + index_bytes) + STEP_BASE_MEMORY


def run_step(step: Callable[..., T], memory: int, cpus: float | None, gpus: int, *args: Any) -> T:
    """``step(*args)`` as a Ray task that requests ``memory`` bytes (the scheduler places it on a node that has
    them) and ``cpus`` faiss threads (None: every CPU of the largest node, as a single-process build would use
    every core: k-means and the merge are the build's serial steps); returns its (small) result."""
    import ray

    cpus = cpus or largest_node("CPU") or 1
    task = ray.remote(_threaded).options(num_cpus=cpus, num_gpus=gpus, memory=memory_request(memory))
    return ray.get(task.remote(step, max(1, int(cpus)), *args))


def largest_node(resource: str) -> float:
    """The most of ``resource`` one live node of the Ray cluster has (0 when none has any)."""
    import ray

    return max((n["Resources"].get(resource, 0) for n in ray.nodes() if n["Alive"]), default=0)


def memory_request(estimate: int) -> int:
    """``estimate``, but never more than the largest live node offers: a request no node can meet would wait
    forever (on a local Ray, or a cluster whose nodes are all that size); there the step runs as it always did."""
    largest = largest_node("memory")
    if largest and estimate > largest:
        log.warning(
            "a build step needs ~%d B, more than any node's %d B: requesting %d B", estimate, largest, largest
        )
        return int(largest)
    return estimate


def _threaded(step: Callable[..., T], threads: int, *args: Any) -> T:
    with faiss_threads(threads):  # Ray sets OMP_NUM_THREADS from num_cpus; be explicit as the adds are
        return step(*args)


def _train_task(
    choice: IndexChoice,
    shard_urls: Sequence[str],
    counts: Sequence[int],
    out_url: str,
    config: BuildConfig,
    options: Options,
) -> tuple[int, np.ndarray]:
    """:func:`train_step` on Ray, requesting the memory of its sample and the index's centroids."""
    dim = shard_dim(shard_urls[0], options)
    memory = step_memory_bytes(sample_sizes(choice, sum(counts), dim, config)[1], dim, choice.nlist * dim * 4)
    args = (choice, shard_urls, counts, out_url, config, options)
    return run_step(train_step, memory, config.step_cpus, config.train_gpus, *args)


def _merge_task(
    tasks: int,
    choice: IndexChoice,
    shard_urls: Sequence[str],
    counts: Sequence[int],
    query_rows: np.ndarray,
    out_url: str,
    config: BuildConfig,
    options: Options,
) -> tuple[int, bool, dict[str, Any], dict[str, float]]:
    """:func:`merge_and_measure` on Ray, requesting the memory of the merged parts, the recall queries and
    one shard (exact search reads the shards one at a time)."""
    parts = [part_urls(out_url, t)[0] for t in range(tasks)]
    dim = shard_dim(shard_urls[0], options)
    memory = step_memory_bytes(config.quality.queries + max(counts), dim, parts_bytes(parts, options))
    args = (out_url, tasks, choice, shard_urls, counts, query_rows, config, options)
    return run_step(merge_and_measure, memory, config.step_cpus, 0, *args)
