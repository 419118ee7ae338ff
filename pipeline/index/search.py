"""Batched k-NN search of a descriptor store's queries against a built index → search results (pipeline.results)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from pipeline import storage, store
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


def search(
    index_url: str,
    query_store_url: str,
    out_url: str,
    config: SearchConfig = SearchConfig(),
    options: Options = None,
) -> dict[str, Any]:
    """Top-``config.k`` of every committed query descriptor in ``query_store_url``, written as Parquet to
    ``out_url``."""
    k, nprobe, k_factor, batch_size = config.k, config.nprobe, config.k_factor, config.batch_size
    store.require_store(query_store_url, options)  # a mistyped query store is an error, not zero queries
    params = io.read_params(index_url, options)
    index = io.load_index(index_url, options)
    chosen = nprobe if nprobe is not None else params.get("nprobe")
    io.set_search_params(index, chosen)
    index = index if params.get("on_disk") else to_device(index)
    factor = k_factor if k_factor is not None else params.get("k_factor")
    if factor is not None:  # None: the quality report found the PQ order good enough
        index = refine.attach(index, index_url, params, options)
        refine.configure(index, None, factor)
    id_keys, image_ids = io.read_id_map(index_url, options)
    space = whitening.space(index_url, params, options)
    tables, queries = [], 0
    for query_ids, stored in store.iter_global(query_store_url, options):  # (n,), (n, D)
        if stored.shape[1] != whitening.input_dim(params):
            raise ValueError(
                f"queries {storage.redact(query_store_url)} have {stored.shape[1]}-d descriptors but index "
                f"{storage.redact(index_url)} takes {whitening.input_dim(params)}-d ones (extract both with the "
                "same preset)"
            )
        vectors = space(stored)  # (n, d)
        for start in range(0, len(vectors), batch_size):
            scores, ids = index.search(np.ascontiguousarray(vectors[start : start + batch_size]), k)
            tables.append(
                search_table(query_ids[start : start + batch_size], scores, ids, id_keys, image_ids)
            )
        queries += len(vectors)
    table = write_search_results(out_url, tables, options)
    return {
        "queries": queries,
        "rows": table.num_rows,
        "k": k,
        "nprobe": chosen,
        "k_factor": factor,
        "out": storage.redact(out_url),
    }
