"""Batched k-NN search of a descriptor store's queries against a built index → search-results Parquet."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage, store
from pipeline.index import io, refine
from pipeline.storage import Options

RESULTS_SCHEMA = pa.schema(
    [("query_id", pa.string()), ("rank", pa.int32()), ("id", pa.string()), ("score", pa.float32())]
)


@dataclass(frozen=True)
class Ranking:
    """One query's results, best first."""

    ids: list[str]
    scores: np.ndarray  # (n,) float64


def read_rankings(results_url: str, options: Options = None) -> dict[str, Ranking]:
    """Per query, its results ordered by ``rank`` (1 first). Raises ValueError on a bad schema."""
    with storage.open_input(results_url, options) as f:
        schema = pq.read_schema(f)
        missing = [c for c in RESULTS_SCHEMA.names if c not in schema.names]
        if missing:
            raise ValueError(
                f"results {storage.redact(results_url)} lack columns {missing}; "
                f"required: {RESULTS_SCHEMA.names}, found: {schema.names}"
            )
        table = pq.read_table(f, columns=RESULTS_SCHEMA.names)
    table = table.sort_by([("query_id", "ascending"), ("rank", "ascending")])
    query_ids = table["query_id"].to_numpy(zero_copy_only=False)  # (R,) object
    ids = table["id"].to_pylist()
    scores = np.asarray(table["score"].to_numpy(zero_copy_only=False), dtype=np.float64)
    starts = np.concatenate([[0], np.flatnonzero(query_ids[1:] != query_ids[:-1]) + 1, [len(ids)]]).tolist()
    return {query_ids[a]: Ranking(ids[a:b], scores[a:b]) for a, b in itertools.pairwise(starts) if b > a}


def to_device(index: faiss.Index) -> faiss.Index:
    """The index on all GPUs when faiss sees any (an on-disk index stays on CPU), else unchanged."""
    if faiss.get_num_gpus() == 0:
        return index
    return faiss.index_cpu_to_all_gpus(index)


def results_table(
    query_ids: np.ndarray, scores: np.ndarray, ids: np.ndarray, id_keys: np.ndarray, image_ids: np.ndarray
) -> pa.Table:
    """Rows (query, rank) for the valid hits of (q, k) ``scores``/``ids``; -1 hits (k > N) are dropped.

    ``id_keys`` (sorted int64) and ``image_ids`` are the index's id map.
    """
    valid = ids >= 0  # (q, k)
    ranks = np.cumsum(valid, axis=1)  # rank among valid hits, 1 = best
    rows, cols = np.nonzero(valid)
    positions = np.searchsorted(id_keys, ids[rows, cols])
    assert np.array_equal(id_keys[positions], ids[rows, cols]), "index holds an id missing from its id map"
    return pa.table(
        {
            "query_id": pa.array(list(query_ids[rows]), pa.string()),
            "rank": pa.array(ranks[rows, cols].astype(np.int32)),
            "id": pa.array(list(image_ids[positions]), pa.string()),
            "score": pa.array(scores[rows, cols].astype(np.float32)),
        },
        schema=RESULTS_SCHEMA,
    )


def search(
    index_url: str,
    query_store_url: str,
    out_url: str,
    k: int = 100,
    nprobe: int | None = None,
    options: Options = None,
    batch_size: int = 4096,
    k_factor: float | None = None,
) -> dict[str, Any]:
    """Top-``k`` of every committed query descriptor in ``query_store_url``, written as Parquet to ``out_url``.

    ``nprobe`` and ``k_factor`` (refined shortlist size in multiples of k) default to the setting stored with
    the index by its quality report.
    """
    if k < 1 or batch_size < 1:
        raise ValueError(f"k={k}, batch_size={batch_size}; both must be ≥ 1")
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
    tables, queries = [], 0
    for query_ids, vectors in store.iter_global(query_store_url, options):  # (n,), (n, D)
        if vectors.shape[1] != params["dim"]:
            raise ValueError(f"query dimension {vectors.shape[1]} != index dimension {params['dim']}")
        for start in range(0, len(vectors), batch_size):
            scores, ids = index.search(np.ascontiguousarray(vectors[start : start + batch_size]), k)
            tables.append(
                results_table(query_ids[start : start + batch_size], scores, ids, id_keys, image_ids)
            )
        queries += len(vectors)
    table = pa.concat_tables(tables) if tables else RESULTS_SCHEMA.empty_table()
    storage.write_parquet(out_url, table, options, compression="zstd")
    return {
        "queries": queries,
        "rows": table.num_rows,
        "k": k,
        "nprobe": chosen,
        "k_factor": factor,
        "out": storage.redact(out_url),
    }
