"""Merge the parts (in RAM, or on disk for local outputs), then measure recall against exact search on the
merged index: quality.json."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.errors import ConfigError
from pipeline.index import io, refine
from pipeline.index.add import _space, part_urls
from pipeline.index.build_config import BuildConfig
from pipeline.index.params import (
    IndexChoice,
)
from pipeline.index.quality import exact_knn, quality_report
from pipeline.index.train import committed_global_shards, id_bases, sample_rows
from pipeline.resources import available_memory_bytes
from pipeline.storage import Options


def parts_bytes(parts: Sequence[str], options: Options = None) -> int:
    return sum(storage.info(p, options)["size"] for p in parts)


def merge_in_ram(trained: faiss.Index, parts: Sequence[str], options: Options = None) -> faiss.Index:
    """merge_from with add_id=0: the parts' ids are kept as they are."""
    for url in parts:
        trained.merge_from(io.read_index(url, options), 0)
    return trained


def merge_on_disk(trained: faiss.Index, parts: Sequence[str], out_url: str) -> faiss.Index:
    """Inverted lists merged into OUT/index.ivfdata (faiss.contrib.ondisk); needs a local out_url."""
    from faiss.contrib.ondisk import merge_ondisk

    os.makedirs(out_url, exist_ok=True)
    merge_ondisk(trained, list(parts), os.path.abspath(storage.join(out_url, io.IVFDATA)), shift_ids=False)
    return trained


def check_disk_output(out_url: str) -> None:
    if not storage.is_local(out_url):
        raise ConfigError(
            f"on-disk merge needs a local output, not {storage.redact(out_url)}; use merge='ram'"
        )


def check_disk_merge(factory: str, dim: int) -> None:
    """ConfigError for merge='disk' with a fast-scan factory: faiss keeps only per-entry lists on disk."""
    if io.packed_in_blocks(faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)):
        raise ConfigError(
            f"on-disk merge cannot hold the fast-scan lists of {factory!r} (codes packed in blocks); "
            "use merge='ram' or 'auto' (its codes take a few dozen bytes per vector)"
        )


def choose_merge(
    config: BuildConfig, parts: Sequence[str], out_url: str, options: Options, packed: bool = False
) -> bool:
    """True to merge on disk: asked for, or (auto) the parts would take too much of the memory this container
    may still use (its cgroup limit, not the host's RAM). Never for ``packed`` (fast-scan) lists."""
    if packed:
        return False
    if config.merge == "auto":
        on_disk = parts_bytes(parts, options) > config.ram_fraction * available_memory_bytes()
    else:
        on_disk = config.merge == "disk"
    if on_disk:
        check_disk_output(out_url)
    return on_disk


def merge_parts(out_url: str, tasks: int, config: BuildConfig, options: Options) -> tuple[faiss.Index, bool]:
    """Merge the tasks' partial indexes into OUT/index.faiss and their id maps into OUT/ids.parquet.

    Starts from the stored trained index, like the add tasks: faiss merges only indexes of identical types.
    """
    trained_url = storage.join(out_url, io.TRAINED)
    index_urls, id_urls = zip(*(part_urls(out_url, t) for t in range(tasks)), strict=True)
    trained = io.read_index(trained_url, options)
    on_disk = choose_merge(config, index_urls, out_url, options, io.packed_in_blocks(trained))
    if on_disk:
        index = merge_on_disk(trained, index_urls, out_url)
        faiss.write_index(index, storage.join(out_url, io.INDEX))
    else:
        index = merge_in_ram(trained, index_urls, options)
        io.write_index(index, storage.join(out_url, io.INDEX), options)
    id_map = pa.concat_tables(storage.read_parquet(u, options) for u in id_urls)
    io.write_id_map(out_url, id_map, options)
    return index, on_disk


def recall_queries(
    shard_urls: Sequence[str],
    counts: Sequence[int],
    query_rows: np.ndarray,
    config: BuildConfig,
    options: Options,
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """The recall report's queries (q, D) as stored, the ids to leave out (None for a query store) and what
    they are: a seeded sample of ``config.quality.query_store``, else the index's own rows ``query_rows``
    (their ids: a fresh build numbers rows 0..N-1 in shard order)."""
    url = config.quality.query_store
    if url is None:
        where = f"leave-one-out: {len(query_rows)} stored vectors drawn at random, own id excluded"
        return sample_rows(shard_urls, counts, query_rows, options), query_rows, where
    urls, query_counts, _ = committed_global_shards(url, options)
    total = sum(query_counts)
    rows = np.sort(
        np.random.default_rng(config.seed).choice(total, min(total, config.quality.queries), False)
    )
    return sample_rows(urls, query_counts, rows, options), None, f"query store {storage.redact(url)}"


def quality_step(
    index: faiss.Index,
    choice: IndexChoice,
    shard_urls: Sequence[str],
    counts: Sequence[int],
    query_rows: np.ndarray,
    out_url: str,
    options: Options,
    config: BuildConfig,
) -> dict[str, Any]:
    """quality.json: recall of the index alone and refined, per nprobe (× k_factor), and the chosen setting."""
    space = _space(out_url, config.whitening is not None, options)
    stored, exclude, query_set = recall_queries(shard_urls, counts, query_rows, config, options)
    queries = space(stored)
    total = sum(counts)
    depth = max(1, min(config.quality.target_k, total - (exclude is not None)))
    _, exact_ids = exact_knn(queries, shard_urls, id_bases(counts), depth, options, space, exclude)
    state = {"refine": choice.refine, "next_id": total, "dim": queries.shape[1]}
    refined = refine.attach(index, out_url, state, options) if choice.refine != "none" else None
    quality = quality_report(
        index, queries, exact_ids, choice.nlist, config.quality, refined, exclude, query_set
    )
    io.write_quality(out_url, quality, options)
    return quality


def merge_and_measure(
    out_url: str,
    tasks: int,
    choice: IndexChoice,
    shard_urls: Sequence[str],
    counts: Sequence[int],
    query_rows: np.ndarray,
    config: BuildConfig,
    options: Options,
) -> tuple[int, bool, dict[str, Any], dict[str, float]]:
    """Merge, then measure recall, in one step: both need the merged index in memory.

    Returns (vectors in the index, merged on disk, quality.json's content, {merge_s, quality_s})."""
    start = time.perf_counter()
    index, on_disk = merge_parts(out_url, tasks, config, options)
    merged = time.perf_counter()
    quality = quality_step(index, choice, shard_urls, counts, query_rows, out_url, options, config)
    timings = {"merge_s": merged - start, "quality_s": time.perf_counter() - merged}
    return int(index.ntotal), on_disk, quality, timings
