"""Writing a shard: its Parquet files first (local: one row group per image, with its index), each atomically,
then its commit marker."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.storage import Options
from pipeline.store.layout import (
    COMMITS_DIR,
    ERROR_SCHEMA,
    ERRORS_DIR,
    GLOBAL_DIR,
    INT8_SCALE,
    LOCAL_DIR,
    LOCAL_INDEX_DIR,
    LOCAL_INDEX_SCHEMA,
    ErrorRecord,
    LocalFeatures,
    ShardCommit,
    StoreSettings,
    _row_group_range,
    _shard_url,
)


def _fixed_size_lists(flat: np.ndarray, width: int, arrow_type: pa.DataType) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=arrow_type), width)


def _ragged(counts: Sequence[int], values: pa.Array) -> pa.ListArray:
    offsets = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _encode_descriptors(descriptors: np.ndarray, dtype: str) -> tuple[np.ndarray, pa.DataType]:
    if dtype == "int8":
        return np.clip(np.rint(descriptors * INT8_SCALE), -127, 127).astype(np.int8), pa.int8()
    return descriptors.astype(dtype), pa.from_numpy_dtype(np.dtype(dtype))


def _global_table(ids: Sequence[str], vectors: np.ndarray, dtype: str) -> pa.Table:
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    column = _fixed_size_lists(vectors.astype(dtype), dim, pa.from_numpy_dtype(np.dtype(dtype)))
    return pa.table({"id": pa.array(list(ids), pa.string()), "global": column})


def _local_table(ids: Sequence[str], local: Sequence[LocalFeatures], dtype: str) -> pa.Table:
    counts = [len(f) for f in local]
    dim = local[0].descriptors.shape[1] if local else 128

    def cat(name: str, width: int) -> np.ndarray:
        parts = [getattr(f, name).reshape(-1, width) for f in local]
        return np.concatenate(parts) if parts else np.zeros((0, width), np.float32)

    descriptors, desc_type = _encode_descriptors(cat("descriptors", dim), dtype)
    return pa.table(
        {
            "id": pa.array(list(ids), pa.string()),
            "keypoints": _ragged(
                counts, _fixed_size_lists(cat("keypoints", 2).astype(np.float32), 2, pa.float32())
            ),
            "scales": _ragged(counts, pa.array(cat("scales", 1).reshape(-1).astype(np.float32))),
            "scores": _ragged(counts, pa.array(cat("scores", 1).reshape(-1).astype(np.float32))),
            "descriptors": _ragged(counts, _fixed_size_lists(descriptors, dim, desc_type)),
        }
    )


def write_shard(
    store_url: str,
    shard: int,
    ids: Sequence[str],
    global_vectors: np.ndarray,
    local: Sequence[LocalFeatures],
    errors: Sequence[ErrorRecord] = (),
    *,
    rows: int | None = None,
    options: Options = None,
    settings: StoreSettings = StoreSettings(),
) -> ShardCommit:
    """Write one shard's descriptors and error records, then commit it.

    ``global_vectors`` is (n, D) float32 for the n successful ``ids``; ``local`` has one entry per id.
    ``rows`` is the number of manifest rows the shard covers (default n + len(errors)); it must equal
    n + len(errors), so that every row is accounted for exactly once.
    """
    n = len(ids)
    if global_vectors.shape[0] != n or len(local) != n:
        raise ValueError(
            f"shard {shard}: {n} ids but {global_vectors.shape[0]} global vectors, {len(local)} local"
        )
    rows = n + len(errors) if rows is None else rows
    if rows != n + len(errors):
        raise ValueError(f"shard {shard}: {rows} manifest rows but {n} ok + {len(errors)} errors")
    seen = set(ids) | {e.id for e in errors}
    if len(seen) != rows:
        raise ValueError(f"shard {shard}: an id appears twice among its ok rows and error records")

    order = np.argsort(np.asarray(ids, dtype=object), kind="stable") if n else np.zeros(0, np.int64)
    sorted_ids = [ids[i] for i in order]  # sorted ids keep row-group statistics selective for readers
    # Messages quote whatever a library said; the store is an output, so no credential may reach it.
    records = [
        {**asdict(e), "url": storage.redact(e.url), "message": storage.redact_text(e.message)} for e in errors
    ]
    files = {  # the local features file is written by _write_local, with its index
        _shard_url(store_url, GLOBAL_DIR, shard): (
            _global_table(sorted_ids, global_vectors[order], settings.global_dtype),
            {"compression": "zstd"},
        ),
        _shard_url(store_url, ERRORS_DIR, shard): (pa.Table.from_pylist(records, schema=ERROR_SCHEMA), {}),
    }
    local_table = _local_table(sorted_ids, [local[i] for i in order], settings.local_dtype)
    commit = ShardCommit(
        shard=shard, rows=rows, ok=n, errors=len(errors), reasons=dict(Counter(e.reason for e in errors))
    )
    written = [*files, _shard_url(store_url, LOCAL_DIR, shard), _shard_url(store_url, LOCAL_INDEX_DIR, shard)]
    try:
        for url, (table, write_options) in files.items():
            storage.write_parquet(url, table, options, **write_options)
        _write_local(store_url, shard, local_table, settings.row_group_size, options)
        return _commit(store_url, commit, options)
    except BaseException:
        _remove_quietly(written, options)  # disk full, read-only, no permission: leave nothing behind
        raise


def _write_local(store_url: str, shard: int, table: pa.Table, row_group_size: int, options: Options) -> None:
    """The shard's local features file, then its local index (both before the commit marker)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_size, compression="zstd", write_statistics=["id"])
    data = sink.getvalue().to_pybytes()
    storage.write_bytes(_shard_url(store_url, LOCAL_DIR, shard), data, options)
    index = _index_table(pq.ParquetFile(pa.BufferReader(data)), table.column("id").to_pylist(), len(data))
    storage.write_parquet(_shard_url(store_url, LOCAL_INDEX_DIR, shard), index, options)


def _commit(store_url: str, commit: ShardCommit, options: Options) -> ShardCommit:
    """Write the shard's commit marker: written last, it makes the shard visible to readers."""
    storage.write_text(
        _shard_url(store_url, COMMITS_DIR, commit.shard, ".json"), json.dumps(asdict(commit)), options
    )
    return commit


def _remove_quietly(urls: Sequence[str], options: Options) -> None:
    """Best-effort removal of a failed shard's data files (the failure that got us here is what matters)."""
    for url in urls:
        with suppress(Exception):  # the caller re-raises the original error
            if storage.exists(url, options):
                storage.remove(url, options)


def write_global_only_shard(
    store_url: str, shard: int, ids: Sequence[str], vectors: np.ndarray, options: Options = None
) -> ShardCommit:
    """A committed shard of float32 global descriptors only, rows as given: all an index build reads of a
    store (reindex's compacted store). It has no local features or error records."""
    storage.write_parquet(
        _shard_url(store_url, GLOBAL_DIR, shard), _global_table(ids, vectors, "float32"), options
    )
    return _commit(store_url, ShardCommit(shard=shard, rows=len(ids), ok=len(ids), errors=0), options)


def _index_table(parquet: pq.ParquetFile, ids: Sequence[str], file_size: int) -> pa.Table:
    """Each image's row group and its byte range (an image in a larger row group shares its range)."""
    meta = parquet.metadata
    groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
    ranges = [_row_group_range(g) for g in groups]
    row_group = np.repeat(np.arange(len(groups), dtype=np.int32), [g.num_rows for g in groups])
    start = np.array([r[0] for r in ranges], dtype=np.int64)[row_group]
    size = np.array([r[1] - r[0] for r in ranges], dtype=np.int64)[row_group]
    footer_offset = file_size - 8 - int(meta.serialized_size)
    table = pa.table({"id": list(ids), "row_group": row_group, "offset": start, "size": size})
    return table.cast(LOCAL_INDEX_SCHEMA).replace_schema_metadata(
        {"file_size": str(file_size), "footer_offset": str(footer_offset)}
    )
