"""Batched k-NN search of a descriptor store's queries against a built index → search results (pipeline.results).

The results are a parts folder, one committed part per query batch: a killed search resumes with the batches
not committed. Query batches run on the executor (pipeline.execution): in this process, or on Ray workers that
each load the index once (replicas). An index too big for one worker is searched as ``shards``: each shard's
workers hold only its id range of the inverted lists, every batch goes through every shard, and the per-shard
top-k are merged exactly (as faiss ``IndexShards`` merges them). Equal scores are ordered by faiss id, in one
index and in shards alike.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from pipeline import storage, store
from pipeline.errors import ConfigError, InputError
from pipeline.execution import Progress, Workers, executor_for
from pipeline.index import io, refine, whitening
from pipeline.ray_runtime import ensure_ray
from pipeline.results import PartsOutput, search_table
from pipeline.storage import Options

log = logging.getLogger(__name__)

Hits = tuple[np.ndarray, np.ndarray]  # (q, k) float32 scores, (q, k) int64 faiss ids (−1: none), best first


def to_device(index: faiss.Index) -> faiss.Index:
    """The index on all GPUs when faiss sees any (an on-disk index stays on CPU), else unchanged; fast-scan
    codes (no GPU kernels in faiss) stay on the CPU, where they are fast."""
    if faiss.get_num_gpus() == 0 or io.packed_in_blocks(index):
        return index
    return faiss.index_cpu_to_all_gpus(index)


@dataclass(frozen=True)
class SearchConfig:
    k: int = 100  # results per query
    nprobe: int | None = None  # IVF cells visited; None: the one stored with the index by its quality report
    k_factor: float | None = None  # refined shortlist size in multiples of k; None: the stored one
    batch_size: int = 4096  # queries per faiss search call and per committed part (what a killed run redoes)
    shards: int = 1  # id ranges of the index, each held by its own workers (an index too big for one worker)

    def __post_init__(self) -> None:
        if self.k < 1 or self.batch_size < 1 or self.shards < 1:
            raise ConfigError(
                f"k={self.k}, batch_size={self.batch_size}, shards={self.shards}; each must be ≥ 1"
            )
        if self.nprobe is not None and self.nprobe < 1:
            raise ConfigError(
                f"nprobe={self.nprobe}; must be ≥ 1; leave it unset for the quality report's choice (0 meant that once)"
            )
        if self.k_factor is not None and not self.k_factor > 0:
            raise ConfigError(f"k_factor={self.k_factor}; must be > 0, or unset for the stored one")


def ordered(scores: np.ndarray, ids: np.ndarray, k: int) -> Hits:
    """The best ``k`` of each row of (q, n) hits: higher score first, equal scores by lower faiss id, −1 last."""
    missing = ids < 0
    rank_scores = np.where(missing, -np.inf, scores)
    rank_ids = np.where(missing, np.iinfo(np.int64).max, ids)
    order = np.lexsort((rank_ids, -rank_scores))[:, :k]  # the last key sorts first
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def merge_shards(parts: list[Hits], k: int) -> Hits:
    """The exact top ``k`` of per-shard top-``k`` hits (shards hold disjoint ids)."""
    scores = np.concatenate([s for s, _ in parts], axis=1)
    ids = np.concatenate([i for _, i in parts], axis=1)
    return ordered(scores, ids, k)


def shard_ranges(id_keys: np.ndarray, shards: int) -> list[tuple[int, int]]:
    """[first, end) faiss id ranges splitting the sorted ``id_keys`` into ``shards`` near-equal parts."""
    if shards > len(id_keys):
        raise ConfigError(f"shards={shards}; the index holds only {len(id_keys)} vectors")
    chunks = np.array_split(id_keys, shards)  # each non-empty
    bounds = [int(chunks[0][0]), *(int(c[-1]) + 1 for c in chunks)]
    return list(itertools.pairwise(bounds))


def keep_ids(index: faiss.Index, first: int, end: int) -> faiss.Index:
    """A copy of ``index`` holding only faiss ids in [first, end); of an IVF index, only those entries of its
    inverted lists are copied (into RAM: an on-disk index's lists are read, never loaded whole)."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # flat (IDMap2)
        ivf = None
    if ivf is None or io.packed_in_blocks(index):  # flat or fast-scan blocks: a copy without the other ids
        part = faiss.clone_index(index)
        part.remove_ids(faiss.IDSelectorNot(faiss.IDSelectorRange(first, end)))
        return part
    lists, owned = ivf.invlists, ivf.own_invlists
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.own_invlists = False
    ivf.replace_invlists(empty, False)  # cloned with empty lists: on-disk lists cannot be cloned
    try:
        part = faiss.clone_index(index)
    finally:
        ivf.replace_invlists(lists, owned)
    part_ivf = faiss.extract_index_ivf(part)
    part_ivf.ntotal = 0
    ivf.copy_subset_to(part_ivf, faiss.InvertedLists.SUBSET_TYPE_ID_RANGE, first, end)
    part.ntotal = part_ivf.ntotal
    return part


@dataclass(frozen=True)
class OpenIndex:
    """An index loaded for searching: what :func:`search` and the query service share."""

    index: Any  # faiss index, on the GPUs when there are any, refined when its params say so
    id_keys: np.ndarray  # (n,) int64 faiss ids, sorted
    image_ids: np.ndarray  # (n,) object: the image id of each faiss id
    space: whitening.Space  # store vectors → index vectors
    input_dim: int  # dimension of the store vectors it takes
    nprobe: int | None  # the nprobe in use
    k_factor: float | None  # the refined shortlist factor in use

    def hits(self, vectors: np.ndarray, k: int) -> Hits:
        """Top-``k`` of (n, input_dim) store ``vectors`` in the order of :func:`ordered`, exactly: a row whose
        k-th score ties with the next is searched deeper until its tie group ends, so the cut falls by id
        (faiss cuts a tie where its scan stops, which differs between one index and shards)."""
        x = np.ascontiguousarray(self.space(vectors))
        rows, depth = np.arange(len(x)), k + 1
        best_scores = np.zeros((len(x), k), np.float32)
        best_ids = np.full((len(x), k), -1, np.int64)
        while len(rows):
            scores, ids = self.index.search(x[rows], depth)
            best_scores[rows], best_ids[rows] = ordered(scores, ids, k)
            tied = (ids[:, -1] >= 0) & (scores[:, -1] == scores[:, k - 1])  # the group may go on
            rows, depth = (rows[tied], 2 * depth) if depth < self.index.ntotal else (rows[:0], depth)
        return best_scores, best_ids

    def search(self, query_ids: np.ndarray, vectors: np.ndarray, k: int) -> pa.Table:
        """Top-``k`` of (n, input_dim) store ``vectors`` as search results rows (pipeline.results)."""
        return search_table(query_ids, *self.hits(vectors, k), self.id_keys, self.image_ids)


def open_index(
    index_url: str,
    config: SearchConfig = SearchConfig(),
    options: Options = None,
    ids: tuple[int, int] | None = None,
) -> OpenIndex:
    """Load the index at ``index_url`` once, with ``config``'s (or the stored) nprobe and k_factor; ``ids``:
    only the faiss ids in this [first, end) range (a shard)."""
    params = io.read_params(index_url, options)
    index = io.load_index(index_url, options)
    if ids is not None:
        index = keep_ids(index, *ids)
    chosen = config.nprobe if config.nprobe is not None else params.get("nprobe")
    io.set_search_params(index, chosen)
    index = index if params.get("on_disk") and ids is None else to_device(index)
    factor = config.k_factor if config.k_factor is not None else params.get("k_factor")
    if factor is not None:  # None: the quality report found the PQ order good enough
        index = refine.attach(index, index_url, params, options)
        refine.configure(index, None, factor)
    id_keys, image_ids = io.read_id_map(index_url, options)
    space = whitening.space(index_url, params, options)
    return OpenIndex(index, id_keys, image_ids, space, whitening.input_dim(params), chosen, factor)


class SearchWork:
    """The executor's work: a batch of queries (ids (n,), stored vectors (n, D)) → its hits. Each worker loads
    the index (or its shard: ``ids``) once, in its setup, on its GPUs when faiss sees any."""

    def __init__(
        self, index_url: str, config: SearchConfig, options: Options, ids: tuple[int, int] | None = None
    ) -> None:
        self.index_url, self.config, self.options, self.ids = index_url, config, options, ids

    def setup(self) -> None:
        self.opened = open_index(self.index_url, self.config, self.options, self.ids)

    def __getstate__(self) -> dict[str, Any]:  # travels before setup(): settings only
        return {k: self.__dict__[k] for k in ("index_url", "config", "options", "ids")}

    def __call__(self, batch: tuple[np.ndarray, np.ndarray]) -> Hits:
        _, stored = batch
        return self.opened.hits(stored, self.config.k)


Batch = tuple[np.ndarray, np.ndarray]  # query ids (n,), stored vectors (n, D)


def _query_batches(
    index_url: str, query_store_url: str, batch_size: int, options: Options
) -> list[tuple[int, Batch]]:
    """(key, (query ids, stored vectors)) batches of the query store, checked against the index's input."""
    store.require_store(query_store_url, options)  # a mistyped query store is an error, not zero queries
    dim = whitening.input_dim(io.read_params(index_url, options))
    batches: list[tuple[int, Batch]] = []
    for query_ids, stored in store.iter_global(query_store_url, options):  # (n,), (n, D)
        if stored.shape[1] != dim:
            raise InputError(
                f"queries {storage.redact(query_store_url)} have {stored.shape[1]}-d descriptors but index "
                f"{storage.redact(index_url)} takes {dim}-d ones (extract both with the same preset)"
            )
        for start in range(0, len(stored), batch_size):
            batch = (query_ids[start : start + batch_size], stored[start : start + batch_size])
            batches.append((len(batches), batch))
    return batches


def _run_identity(
    index_url: str,
    id_map: tuple[np.ndarray, np.ndarray],
    batches: list[tuple[int, Batch]],
    config: SearchConfig,
    options: Options,
) -> dict[str, Any]:
    """What a resumed search must repeat: the index (its params and id map), the queries and the settings
    that shape the output (shards do not: their merge is exact)."""
    digest = hashlib.sha256(json.dumps(io.read_params(index_url, options), sort_keys=True).encode())
    digest.update(id_map[0].tobytes())
    digest.update("\n".join(id_map[1].tolist()).encode())
    for _, (query_ids, stored) in batches:
        digest.update("\n".join(query_ids.tolist()).encode())
        digest.update(np.ascontiguousarray(stored).tobytes())
    settings = {k: v for k, v in asdict(config).items() if k != "shards"}
    return {"index": storage.redact(index_url), "input": digest.hexdigest(), **settings}


class SearchProgress(Progress):
    verb = "searched"


@dataclass(frozen=True)
class SearchSummary:
    """What :func:`search` wrote: counts over every committed part (a resumed run's too), this run's seconds."""

    queries: int
    rows: int  # result rows (query, hit) written
    k: int
    nprobe: int | None  # in use: the given one, else the one stored with the index
    k_factor: float | None  # in use, likewise (None: the PQ order, no refinement)
    shards: int
    parts_resumed: int  # parts an earlier, killed run had committed
    seconds: float
    out: str  # the results URL, redacted


class _Merge:
    """Per batch, the hits of every shard: once all are in, merged and committed (thread-safe: one thread per
    shard delivers them)."""

    def __init__(self, shards: int, k: int, commit: Callable[[int, Hits], None]) -> None:
        self.shards, self.k, self.commit = shards, k, commit
        self.parts: dict[int, list[Hits]] = {}
        self.lock = threading.Lock()

    def __call__(self, key: int, hits: Hits) -> None:
        with self.lock:
            parts = self.parts.setdefault(key, [])
            parts.append(hits)
            if len(parts) == self.shards:
                del self.parts[key]
                self.commit(key, merge_shards(parts, self.k) if self.shards > 1 else parts[0])


def _run_shards(
    ranges: list[tuple[int, int] | None],
    todo: list[tuple[int, Batch]],
    index: tuple[str, SearchConfig, Options],
    workers: Workers,
    merge: _Merge,
) -> None:
    """Every batch of ``todo`` through every shard, each shard on an executor of its own (concurrently)."""
    if len(ranges) == 1:
        executor_for(workers).run(SearchWork(*index, ranges[0]), todo, merge)
        return
    if workers.on_ray:
        ensure_ray(workers.address)  # once, here: the shards' executors would race to start it
    with ThreadPoolExecutor(len(ranges), thread_name_prefix="search-shard") as pool:
        runs = [
            pool.submit(executor_for(workers).run, SearchWork(*index, ids), todo, merge) for ids in ranges
        ]
        for run in runs:
            run.result()  # re-raises a shard's failure


def search(
    index_url: str,
    query_store_url: str,
    out_url: str,
    config: SearchConfig = SearchConfig(),
    options: Options = None,
    *,
    workers: Workers = Workers(),
    on_progress: Callable[[Progress], None] | None = None,
) -> SearchSummary:
    """Top-``config.k`` of every committed query descriptor in ``query_store_url``, written to ``out_url`` as
    a parts folder (pipeline.results), one part per batch of ``config.batch_size`` queries; a rerun with the
    same index, queries and settings redoes only the parts not committed. ``workers`` may run the batches on
    Ray (each worker loading the index, or with ``config.shards`` its shard, once); the results are the same.
    ``on_progress`` is called after each committed part."""
    start = time.perf_counter()
    batches = _query_batches(index_url, query_store_url, config.batch_size, options)
    id_keys, image_ids = io.read_id_map(index_url, options)
    run = _run_identity(index_url, (id_keys, image_ids), batches, config, options)
    output = PartsOutput(out_url, run, options)
    total = sum(len(ids) for _, (ids, _) in batches)
    progress = SearchProgress(
        total, output.resumed_queries, start, len(output.resumed), output.resumed_queries
    )
    query_ids = {key: ids for key, (ids, _) in batches}

    def commit(key: int, hits: Hits) -> None:
        ids = query_ids[key]
        table = search_table(ids, *hits, id_keys, image_ids)
        output.commit(key, table, {"queries": len(ids), "first": str(ids[0]), "last": str(ids[-1])})
        progress.add_queries(len(ids))
        log.info("%s", progress.line())
        if on_progress is not None:
            on_progress(progress)

    ranges = shard_ranges(id_keys, config.shards) if config.shards > 1 else [None]
    _run_shards(
        ranges,
        output.todo(batches),
        (index_url, config, options),
        workers,
        _Merge(len(ranges), config.k, commit),
    )
    params = io.read_params(index_url, options)
    return SearchSummary(
        queries=total,
        rows=sum(m["rows"] for m in output.markers().values()),
        k=config.k,
        nprobe=config.nprobe if config.nprobe is not None else params.get("nprobe"),
        k_factor=config.k_factor if config.k_factor is not None else params.get("k_factor"),
        shards=config.shards,
        parts_resumed=len(output.resumed),
        seconds=round(time.perf_counter() - start, 3),
        out=storage.redact(out_url),
    )
