"""Reading a store's committed shards: commit markers, global descriptors (whole or streamed), error records,
statistics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.errors import MissingInputError
from pipeline.storage import Options
from pipeline.store.layout import (
    COMMITS_DIR,
    ERROR_SCHEMA,
    ERRORS_DIR,
    GLOBAL_DIR,
    RUN_INFO,
    ShardCommit,
    _fixed_size_to_numpy,
    _shard_url,
    parse_commit,
)


def require_store(store_url: str, options: Options = None) -> None:
    """Raise FileNotFoundError when ``store_url`` holds no descriptor store (a mistyped path reads as
    an error, never as an empty store)."""
    markers = (storage.join(store_url, RUN_INFO), storage.join(store_url, COMMITS_DIR))
    if not any(storage.exists(url, options) for url in markers):
        raise MissingInputError(
            f"no descriptor store at {storage.redact(store_url)} (neither {RUN_INFO} nor {COMMITS_DIR}/ exists)"
        )


def read_commits(store_url: str, options: Options = None) -> list[ShardCommit]:
    """The commit markers of all committed shards, in shard order; StoreFormatError on a malformed one."""
    urls = storage.list_files(storage.join(store_url, COMMITS_DIR), options, suffix=".json")
    commits = [parse_commit(u, storage.read_text(u, options)) for u in urls]
    return sorted(commits, key=lambda c: c.shard)


def committed_shards(store_url: str, options: Options = None) -> list[int]:
    return [c.shard for c in read_commits(store_url, options)]


def global_shard_urls(store_url: str, options: Options = None) -> list[str]:
    """The global descriptor files of committed shards, in shard order."""
    require_store(store_url, options)
    return [_shard_url(store_url, GLOBAL_DIR, s) for s in committed_shards(store_url, options)]


def read_global_shard(url: str, options: Options = None) -> tuple[np.ndarray, np.ndarray]:
    """One global shard file: ids (n,) object array of str, vectors (n, D) float32."""
    table = storage.read_parquet(url, options)
    dim = table.schema.field("global").type.list_size
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    return ids, _fixed_size_to_numpy(table.column("global"), dim).astype(np.float32)


def iter_global(store_url: str, options: Options = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, vectors) per committed shard, one shard in memory at a time."""
    for url in global_shard_urls(store_url, options):
        yield read_global_shard(url, options)


def read_global(store_url: str, options: Options = None) -> tuple[np.ndarray, np.ndarray]:
    """All global descriptors of a store: ids (N,) and vectors (N, D) float32, in shard order."""
    parts = list(iter_global(store_url, options))
    if not parts:
        return np.zeros(0, dtype=object), np.zeros((0, 0), np.float32)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def read_errors(store_url: str, options: Options = None) -> pa.Table:
    """All error records of committed shards."""
    require_store(store_url, options)
    tables = [
        storage.read_parquet(_shard_url(store_url, ERRORS_DIR, s), options)
        for s in committed_shards(store_url, options)
    ]
    return pa.concat_tables(tables) if tables else ERROR_SCHEMA.empty_table()


def store_stats(store_url: str, options: Options = None) -> dict[str, Any]:
    """Counts over committed shards: rows = ok + errors, errors by reason."""
    require_store(store_url, options)
    commits = read_commits(store_url, options)
    reasons: Counter[str] = Counter()
    for c in commits:
        reasons.update(c.reasons)
    return {
        "shards": len(commits),
        "rows": sum(c.rows for c in commits),
        "ok": sum(c.ok for c in commits),
        "errors": sum(c.errors for c in commits),
        "errors_by_reason": dict(sorted(reasons.items())),
    }
