"""The index build stage: train once on a random sample → add shards in parallel Ray tasks → merge → measure.

Every heavy step is a Ray task with a memory request sized from what it holds
(:func:`~pipeline.index.placement.step_memory_bytes`): the training sample and k-means, the adds, the merge
and the recall measurement run where the scheduler finds that memory, never in the job driver on the head
pod. The driver holds only shard sizes and sample positions.

The steps live in :mod:`~pipeline.index.train`, :mod:`~pipeline.index.add`, :mod:`~pipeline.index.merge` and
:mod:`~pipeline.index.placement`; their names are re-exported here, where callers import them."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from pipeline import metrics, storage
from pipeline.errors import InputError
from pipeline.execution import InProcessExecutor
from pipeline.index import io
from pipeline.index.add import add_in_parallel, add_shards_to, part_urls
from pipeline.index.build_config import BuildConfig
from pipeline.index.merge import (
    check_disk_merge,
    check_disk_output,
    choose_merge,
    merge_and_measure,
    merge_in_ram,
    merge_on_disk,
    merge_parts,
    quality_step,
    recall_queries,
)
from pipeline.index.params import (
    IndexChoice,
)
from pipeline.index.placement import (
    STEP_BASE_MEMORY,
    STEP_MEMORY_FACTOR,
    _merge_task,
    _train_task,
    largest_node,
    memory_request,
    parts_bytes,
    run_step,
    step_memory_bytes,
)
from pipeline.index.train import (
    REFINE_SAMPLE,
    committed_global_shards,
    draw_samples,
    id_bases,
    leave_one_out_queries,
    nlist_of,
    resolve_choice,
    sample_rows,
    sample_sizes,
    shard_dim,
    shard_rows,
    train,
    train_size,
    train_step,
    whitening_step,
)
from pipeline.ray_runtime import ensure_ray
from pipeline.resources import PeakMemory
from pipeline.storage import Options

log = logging.getLogger(__name__)


def checked_inputs(
    descriptors_url: str, out_url: str, config: BuildConfig, options: Options
) -> tuple[list[str], list[int], int]:
    """:func:`committed_global_shards` of the index store, once the output and the recall query store are
    checked: before the expensive steps."""
    if config.merge == "disk":
        check_disk_output(out_url)
    shard_urls, counts, dim = committed_global_shards(descriptors_url, options)
    if config.quality.query_store:
        query_dim = committed_global_shards(config.quality.query_store, options)[2]
        if query_dim != dim:
            raise InputError(
                f"recall query store {storage.redact(config.quality.query_store)} has {query_dim}-d "
                f"descriptors, the index store {dim}-d"
            )
    return shard_urls, counts, dim


BUILD_STEPS = ("train", "add", "merge and recall")


def _step_reporter(on_step: Callable[[str, int, int], None]) -> Callable[[str], float]:
    """Tells ``on_step`` and the build_step gauge of each step as it starts (its index in BUILD_STEPS);
    returns the time it started (``time.perf_counter()``)."""

    def step(name: str) -> float:
        done = BUILD_STEPS.index(name) if name in BUILD_STEPS else len(BUILD_STEPS)
        metrics.gauge("build_step", done)
        on_step(name, done, len(BUILD_STEPS))
        return time.perf_counter()

    return step


def _build_steps(
    choice: IndexChoice,
    shard_urls: list[str],
    counts: list[int],
    out_url: str,
    config: BuildConfig,
    options: Options,
    step: Callable[[str], float],
    in_process: bool,
) -> tuple[int, int, bool, dict[str, Any], dict[str, float], int]:
    """Train, add, merge + recall, as Ray tasks sized by memory or ``in_process``: (training points, indexed
    vectors, on disk, quality, timings, peak bytes summed over this machine's build processes: driver + a
    local Ray's, not a remote cluster's)."""
    timings: dict[str, float] = {}
    with PeakMemory() as memory:
        start = step("train")
        train = train_step if in_process else _train_task
        n_train, query_rows = train(choice, shard_urls, counts, out_url, config, options)
        timings["train_s"] = time.perf_counter() - start
        start = step("add")
        executor = InProcessExecutor() if in_process else None
        added = add_in_parallel(shard_urls, id_bases(counts), out_url, config, options, executor)
        assert sum(added) == sum(counts), (added, counts)
        timings["add_s"] = time.perf_counter() - start
        step("merge and recall")
        if in_process:
            measured = merge_and_measure(
                out_url, len(added), choice, shard_urls, counts, query_rows, config, options
            )
        else:
            measured = _merge_task(
                len(added), choice, shard_urls, counts, query_rows, out_url, config, options
            )
        ntotal, on_disk, quality, step_timings = measured
    return n_train, ntotal, on_disk, quality, timings | step_timings, memory.peak


@dataclass(frozen=True)
class IndexBuildSummary:
    """What :func:`build_index` built: ``OUT/params.json`` (:meth:`params`) and the index folder's size."""

    choice: IndexChoice  # factory, nlist, code bytes, refinement and why
    dim: int  # of the indexed vectors (the whitening's output dimension when whitened)
    input_dim: int  # of the store's global descriptors
    whitening: int  # PCA-whitening output dimension (0: none)
    metric: str  # "inner_product"
    ntotal: int  # vectors in the index
    next_id: int  # the id the next added vector gets
    train_points: int
    trained_from: str | None  # a reused trained index's URL
    shards: list[str]  # the store's shards it holds (redacted URLs)
    on_disk: bool  # inverted lists memory-mapped from disk
    nprobe: int  # chosen by the recall measurement
    k_factor: int
    nprobe_reason: str
    timings: dict[str, float]  # seconds per step
    peak_memory_bytes: int
    index_bytes: int  # the index folder's bytes (io.index_bytes)

    def params(self) -> dict[str, Any]:
        """``OUT/params.json``: the choice's fields, then the build's (without the folder's size)."""
        built = {k: v for k, v in asdict(self).items() if k not in ("choice", "index_bytes")}
        return {**asdict(self.choice), **built}

    def to_dict(self) -> dict[str, Any]:
        """The summary the CLI prints and a run's marker records: params.json's fields and ``index_bytes``."""
        return {**self.params(), "index_bytes": self.index_bytes}


def build_index(
    descriptors_url: str,
    out_url: str,
    *,
    factory: str | None = None,
    memory_budget: str | int | None = None,
    options: Options = None,
    ray_address: str | None = None,
    config: BuildConfig = BuildConfig(),
    on_step: Callable[[str, int, int], None] = lambda step, done, total: None,
    in_process: bool = False,
) -> IndexBuildSummary:
    """Build the index of a descriptor store's committed global descriptors under ``out_url``.

    Returns what was built: ``OUT/params.json`` (choice, nprobe, k_factor, timings, peak memory) and the
    folder's size.
    ``on_step(step, done, total)`` hears each of BUILD_STEPS start, then "done". ``in_process``: every step
    in this process, without Ray (small builds, tests): the same steps through the execution seam's
    in-process executor, the same index.
    """
    shard_urls, counts, dim = checked_inputs(descriptors_url, out_url, config, options)
    total = sum(counts)
    choice = resolve_choice(factory, memory_budget, total, config.whitening or dim, config.refine)
    if config.merge == "disk":
        check_disk_merge(choice.factory, config.whitening or dim)
    log.info("index %s, refine %s: %s", choice.factory, choice.refine, choice.reason)
    if not in_process:
        ensure_ray(ray_address)
    step = _step_reporter(on_step)
    n_train, ntotal, on_disk, quality, timings, peak = _build_steps(
        choice, shard_urls, counts, out_url, config, options, step, in_process
    )
    if not config.keep_intermediate:
        io.remove_intermediate(out_url, options)

    summary = IndexBuildSummary(
        choice=choice,
        dim=config.whitening or dim,
        input_dim=dim,
        whitening=config.whitening,
        metric="inner_product",
        ntotal=ntotal,
        next_id=total,
        train_points=n_train,
        trained_from=config.trained_url,
        shards=[storage.redact(u) for u in shard_urls],
        on_disk=on_disk,
        nprobe=quality["nprobe"],
        k_factor=quality["k_factor"],
        nprobe_reason=quality["nprobe_reason"],
        timings=timings,
        peak_memory_bytes=peak,
        index_bytes=0,
    )
    io.write_params(out_url, summary.params(), options)
    step("done")
    # measured once params.json is written: the folder's size counts it
    return replace(summary, index_bytes=io.index_bytes(out_url, options))


__all__ = [
    "BUILD_STEPS",
    "REFINE_SAMPLE",
    "STEP_BASE_MEMORY",
    "STEP_MEMORY_FACTOR",
    "BuildConfig",
    "IndexBuildSummary",
    "add_in_parallel",
    "add_shards_to",
    "build_index",
    "check_disk_merge",
    "check_disk_output",
    "checked_inputs",
    "choose_merge",
    "committed_global_shards",
    "draw_samples",
    "id_bases",
    "largest_node",
    "leave_one_out_queries",
    "memory_request",
    "merge_and_measure",
    "merge_in_ram",
    "merge_on_disk",
    "merge_parts",
    "nlist_of",
    "part_urls",
    "parts_bytes",
    "quality_step",
    "recall_queries",
    "resolve_choice",
    "run_step",
    "sample_rows",
    "sample_sizes",
    "shard_dim",
    "shard_rows",
    "step_memory_bytes",
    "train",
    "train_size",
    "train_step",
    "whitening_step",
]  # the build's steps: callers import them from here
