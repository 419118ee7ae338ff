"""Add shards in parallel: each task loads the trained empty index, adds its shards with global ids
(base + row) and writes one part (index + id map)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa

from pipeline import metrics, storage, store
from pipeline.execution import Executor, RayExecutor, Workers
from pipeline.index import io, refine, whitening
from pipeline.index.build_config import BuildConfig
from pipeline.storage import Options


@contextmanager
def faiss_threads(threads: int) -> Iterator[None]:
    """faiss's OpenMP threads for the block, then as they were. The setting belongs to the whole process, and
    torch shares its OpenMP runtime: left behind, it would change torch's threads (hence its float sums) in the
    caller's process after an in-process build, or in a Ray worker that runs other tasks later."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def part_urls(out_url: str, task: int) -> tuple[str, str]:
    name = f"part-{task:05d}"
    return storage.join(out_url, io.PARTS, name + ".faiss"), storage.join(
        out_url, io.PARTS, name + ".ids.parquet"
    )


def add_shards_to(
    index: faiss.Index,
    shard_urls: Sequence[str],
    bases: Sequence[int],
    options: Options = None,
    codes: refine.CodeWriter | None = None,
    space: whitening.Space = whitening.identity,
) -> pa.Table:
    """Add each shard's vectors, mapped by ``space``, with ids base + row (and their refinement codes, given a
    writer); returns the id map of what was added."""
    tables = []
    for url, base in zip(shard_urls, bases, strict=True):
        image_ids, stored = store.read_global_shard(url, options)  # (n,), (n, D)
        vectors = space(stored)  # (n, d)
        ids = base + np.arange(len(vectors), dtype=np.int64)
        index.add_with_ids(vectors, ids)
        if codes is not None:
            codes.write(vectors, int(base))
        tables.append(io.id_map_table(ids, image_ids))
    return pa.concat_tables(tables) if tables else io.ID_MAP_SCHEMA.empty_table()


def _space(out_url: str, whitened: bool, options: Options) -> whitening.Space:
    """The map into the space of the index being built under ``out_url`` (before its params.json exists)."""
    return whitening.load(out_url, options) if whitened else whitening.identity


@dataclass(frozen=True)
class AddWork:
    """One add task of the execution seam: its shards into a copy of OUT's trained index, written as one part
    (index + id map, and the shards' refinement codes when OUT has a quantizer); returns the vectors added."""

    out_url: str
    options: Options
    threads: int  # faiss threads
    whitened: bool

    def setup(self) -> None:
        """Nothing to load once: each batch reads the trained index afresh (its own copy to add to)."""

    def __call__(self, batch: tuple[int, list[str], list[int]]) -> int:
        """``batch``: (task number, its shards' URLs, their id bases)."""
        with faiss_threads(self.threads):
            return self._add(*batch)

    def _add(self, task: int, shard_urls: list[str], bases: list[int]) -> int:
        index = io.read_index(storage.join(self.out_url, io.TRAINED), self.options)
        codes = refine.code_writer(self.out_url, self.options)
        space = _space(self.out_url, self.whitened, self.options)
        table = add_shards_to(index, shard_urls, bases, self.options, codes, space)
        index_url, ids_url = part_urls(self.out_url, task)
        io.write_index(index, index_url, self.options)
        storage.write_parquet(ids_url, table, self.options, compression="zstd")
        return int(index.ntotal)


def add_in_parallel(
    shard_urls: Sequence[str],
    bases: Sequence[int],
    out_url: str,
    config: BuildConfig,
    options: Options = None,
    executor: Executor | None = None,
) -> list[int]:
    """Add tasks to OUT's trained index, run by ``executor`` (default: Ray workers of ``config.task_cpus``
    each, up to ``config.tasks`` at once); task t adds shards t, t+T, t+2T, ... (non-contiguous ids, so
    merging must not shift ids). Returns the vectors each task added."""
    tasks = min(config.tasks, len(shard_urls))
    if executor is None:
        executor = RayExecutor(Workers(cpus_per_worker=config.task_cpus, max_workers=tasks))
    work = AddWork(out_url, options, max(1, int(config.task_cpus)), config.whitening is not None)
    batches = [(t, (t, list(shard_urls[t::tasks]), [int(b) for b in bases[t::tasks]])) for t in range(tasks)]
    added = [0] * tasks
    executor.run(work, batches, added.__setitem__)
    metrics.count("vectors_added", sum(added), stage="build-index")
    return added
