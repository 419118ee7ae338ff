"""Add shards in parallel: each task loads the trained empty index, adds its shards with global ids
(base + row) and writes one part (index + id map)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import faiss
import numpy as np
import pyarrow as pa

from pipeline import metrics, storage, store
from pipeline.index import io, refine, whitening
from pipeline.index.build_config import BuildConfig
from pipeline.storage import Options

T = TypeVar("T")


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


def _add_part(
    out_url: str,
    shard_urls: list[str],
    bases: list[int],
    out: tuple[str, str],
    options: Options,
    threads: int,
    whitened: bool,
) -> int:
    faiss.omp_set_num_threads(threads)
    index = io.read_index(storage.join(out_url, io.TRAINED), options)
    table = add_shards_to(
        index,
        shard_urls,
        bases,
        options,
        refine.code_writer(out_url, options),
        _space(out_url, whitened, options),
    )
    io.write_index(index, out[0], options)
    storage.write_parquet(out[1], table, options, compression="zstd")
    return int(index.ntotal)


def _space(out_url: str, whitened: bool, options: Options) -> whitening.Space:
    """The map into the space of the index being built under ``out_url`` (before its params.json exists)."""
    return whitening.load(out_url, options) if whitened else whitening.identity


def add_in_parallel(
    shard_urls: Sequence[str],
    bases: Sequence[int],
    out_url: str,
    config: BuildConfig,
    options: Options = None,
) -> list[int]:
    """Ray tasks adding to OUT's trained index; task t adds shards t, t+T, t+2T, ... (non-contiguous ids, so
    merging must not shift ids). Each task also writes its shards' refinement codes when OUT has a quantizer."""
    import ray

    tasks = min(config.tasks, len(shard_urls))
    task = ray.remote(_add_part)
    threads = max(1, int(config.task_cpus))
    refs = [
        task.options(num_cpus=config.task_cpus).remote(
            out_url,
            list(shard_urls[t::tasks]),
            [int(b) for b in bases[t::tasks]],
            part_urls(out_url, t),
            options,
            threads,
            config.whitening is not None,
        )
        for t in range(tasks)
    ]
    added = ray.get(refs)
    metrics.count("vectors_added", sum(added), stage="build-index")
    return added
