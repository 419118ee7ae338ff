"""The descriptor store: sharded Parquet files of global and local descriptors, readable with pyarrow alone.

Layout under a store URL ``OUT``::

    OUT/global/part-00000.parquet   id: string, global: fixed_size_list<float16|float32, D>
    OUT/local/part-00000.parquet    id, keypoints: list<fixed_size_list<float32, 2>>  (x, y original pixels),
                                    scales: list<float32>, scores: list<float32> (attention),
                                    descriptors: list<fixed_size_list<float16|int8|float32, 128>>
    OUT/local_index/part-00000.parquet  id, row_group: int32, offset: int64, size: int64 — where each image's
                                    row group lies in local/part-00000.parquet (metadata: file_size,
                                    footer_offset), written with the shard so readers never scan for ids
    OUT/errors/part-00000.parquet   id, url, stage, reason, message
    OUT/_commits/part-00000.json    commit marker {"rows", "ok", "errors"[, "reasons", "shard"]}: written last;
                                    a shard without one does not exist; its number comes from the file name
    OUT/_run.json                   what produced the store (preset, weights checksum, version, manifest)

A shard holds many images (one per manifest shard, never one object per image). Its three Parquet files are
written first and its commit marker last, each atomically, so a killed writer leaves no shard a reader would
take: readers list commit markers, never data files. Local shards hold one row group per image, so reading an
image costs one range request of about its own bytes (plus the shard's footer, once per reader). Stores written
before the local index existed are still read (by scanning their id columns, with a warning);
``migrate_store`` (``landmark-index migrate-store``) rewrites them in this layout. int8 local descriptors are ``round(127 · x)`` of the
L2-normalised float descriptor; readers decode and re-normalise.

Rooms: :mod:`~pipeline.store.layout` (names, schemas, commit markers, run metadata), :mod:`~pipeline.store.write`,
:mod:`~pipeline.store.read`, :mod:`~pipeline.store.local` (random access to local features) and
:mod:`~pipeline.store.migrate`. Callers import from ``pipeline.store``.
"""

from __future__ import annotations

from pipeline.store.layout import (
    COMMIT_KEYS,
    COMMIT_OPTIONAL,
    COMMITS_DIR,
    ERROR_SCHEMA,
    ERRORS_DIR,
    GLOBAL_DIR,
    INT8_SCALE,
    LOCAL_DIR,
    LOCAL_INDEX_DIR,
    LOCAL_INDEX_SCHEMA,
    RUN_INFO,
    ErrorRecord,
    LocalFeatures,
    ShardCommit,
    StoreFormatError,
    StoreSettings,
    parse_commit,
    read_run_info,
    shard_name,
    write_run_info,
)
from pipeline.store.local import LocalReader, ReadStats, read_local
from pipeline.store.migrate import MigrationSummary, migrate_store
from pipeline.store.read import (
    committed_shards,
    global_shard_urls,
    iter_global,
    read_commits,
    read_errors,
    read_global,
    read_global_shard,
    require_store,
    store_stats,
)
from pipeline.store.write import write_global_only_shard, write_shard

__all__ = [
    "COMMITS_DIR",
    "COMMIT_KEYS",
    "COMMIT_OPTIONAL",
    "ERRORS_DIR",
    "ERROR_SCHEMA",
    "GLOBAL_DIR",
    "INT8_SCALE",
    "LOCAL_DIR",
    "LOCAL_INDEX_DIR",
    "LOCAL_INDEX_SCHEMA",
    "RUN_INFO",
    "ErrorRecord",
    "LocalFeatures",
    "LocalReader",
    "MigrationSummary",
    "ReadStats",
    "ShardCommit",
    "StoreFormatError",
    "StoreSettings",
    "committed_shards",
    "global_shard_urls",
    "iter_global",
    "migrate_store",
    "parse_commit",
    "read_commits",
    "read_errors",
    "read_global",
    "read_global_shard",
    "read_local",
    "read_run_info",
    "require_store",
    "shard_name",
    "store_stats",
    "write_global_only_shard",
    "write_run_info",
    "write_shard",
]
