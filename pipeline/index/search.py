"""Batched k-NN search of a descriptor store's queries against a built index → search results (pipeline.results)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from pipeline import storage, store
from pipeline.execution import Workers, executor_for
from pipeline.index import io, refine, whitening
from pipeline.results import search_table, write_search_results
from pipeline.storage import Options


def to_device(index: faiss.Index) -> faiss.Index:
    """The index on all GPUs when faiss sees any (an on-disk index stays on CPU), else unchanged."""
    if faiss.get_num_gpus() == 0:
        return index
    return faiss.index_cpu_to_all_gpus(index)


@dataclass(frozen=True)
class SearchConfig:
    k: int = 100  # results per query
    nprobe: int | None = None  # IVF cells visited; None: the one stored with the index by its quality report
    k_factor: float | None = None  # refined shortlist size in multiples of k; None: the stored one
    batch_size: int = 4096  # queries per faiss search call

    def __post_init__(self) -> None:
        if self.k < 1 or self.batch_size < 1:
            raise ValueError(f"k={self.k}, batch_size={self.batch_size}; both must be ≥ 1")
        if self.nprobe is not None and self.nprobe < 1:
            raise ValueError(
                f"nprobe={self.nprobe}; must be ≥ 1; leave it unset for the quality report's choice (0 meant that once)"
            )
        if self.k_factor is not None and not self.k_factor > 0:
            raise ValueError(f"k_factor={self.k_factor}; must be > 0, or unset for the stored one")


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

    def search(self, query_ids: np.ndarray, vectors: np.ndarray, k: int) -> pa.Table:
        """Top-``k`` of (n, input_dim) store ``vectors`` as search results rows (pipeline.results)."""
        scores, ids = self.index.search(np.ascontiguousarray(self.space(vectors)), k)
        return search_table(query_ids, scores, ids, self.id_keys, self.image_ids)


def open_index(index_url: str, config: SearchConfig = SearchConfig(), options: Options = None) -> OpenIndex:
    """Load the index at ``index_url`` once, with ``config``'s (or the stored) nprobe and k_factor."""
    params = io.read_params(index_url, options)
    index = io.load_index(index_url, options)
    chosen = config.nprobe if config.nprobe is not None else params.get("nprobe")
    io.set_search_params(index, chosen)
    index = index if params.get("on_disk") else to_device(index)
    factor = config.k_factor if config.k_factor is not None else params.get("k_factor")
    if factor is not None:  # None: the quality report found the PQ order good enough
        index = refine.attach(index, index_url, params, options)
        refine.configure(index, None, factor)
    id_keys, image_ids = io.read_id_map(index_url, options)
    space = whitening.space(index_url, params, options)
    return OpenIndex(index, id_keys, image_ids, space, whitening.input_dim(params), chosen, factor)


class SearchWork:
    """The executor's work: a batch of queries (ids (n,), stored vectors (n, D)) → its results table. Each
    worker loads the index once (its setup), on its GPUs when faiss sees any."""

    def __init__(self, index_url: str, config: SearchConfig, options: Options) -> None:
        self.index_url, self.config, self.options = index_url, config, options

    def setup(self) -> None:
        self.opened = open_index(self.index_url, self.config, self.options)

    def __getstate__(self) -> dict[str, Any]:  # travels before setup(): settings only
        return {k: self.__dict__[k] for k in ("index_url", "config", "options")}

    def __call__(self, batch: tuple[np.ndarray, np.ndarray]) -> pa.Table:
        query_ids, stored = batch
        return self.opened.search(query_ids, stored, self.config.k)


def _query_batches(
    index_url: str, query_store_url: str, batch_size: int, options: Options
) -> list[tuple[int, tuple[np.ndarray, np.ndarray]]]:
    """(key, (query ids, stored vectors)) batches of the query store, checked against the index's input."""
    store.require_store(query_store_url, options)  # a mistyped query store is an error, not zero queries
    dim = whitening.input_dim(io.read_params(index_url, options))
    batches = []
    for query_ids, stored in store.iter_global(query_store_url, options):  # (n,), (n, D)
        if stored.shape[1] != dim:
            raise ValueError(
                f"queries {storage.redact(query_store_url)} have {stored.shape[1]}-d descriptors but index "
                f"{storage.redact(index_url)} takes {dim}-d ones (extract both with the same preset)"
            )
        for start in range(0, len(stored), batch_size):
            batch = (query_ids[start : start + batch_size], stored[start : start + batch_size])
            batches.append((len(batches), batch))
    return batches


def search(
    index_url: str,
    query_store_url: str,
    out_url: str,
    config: SearchConfig = SearchConfig(),
    options: Options = None,
    *,
    workers: Workers = Workers(),
) -> dict[str, Any]:
    """Top-``config.k`` of every committed query descriptor in ``query_store_url``, written as Parquet to
    ``out_url``. ``workers`` may run the query batches on Ray (each worker loading the index once); the
    results are the same."""
    batches = _query_batches(index_url, query_store_url, config.batch_size, options)
    tables: dict[int, pa.Table] = {}
    work = SearchWork(index_url, config, options)
    executor_for(workers).run(work, batches, tables.__setitem__)
    table = write_search_results(out_url, [tables[k] for k in sorted(tables)], options)
    params = io.read_params(index_url, options)
    return {
        "queries": sum(len(b[0]) for _, b in batches),
        "rows": table.num_rows,
        "k": config.k,
        "nprobe": config.nprobe if config.nprobe is not None else params.get("nprobe"),
        "k_factor": config.k_factor if config.k_factor is not None else params.get("k_factor"),
        "out": storage.redact(out_url),
    }
