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
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.choices import GLOBAL_DTYPES, LOCAL_DTYPES
from pipeline.storage import Options

log = logging.getLogger(__name__)

GLOBAL_DIR = "global"
LOCAL_DIR = "local"
LOCAL_INDEX_DIR = "local_index"
ERRORS_DIR = "errors"
COMMITS_DIR = "_commits"
RUN_INFO = "_run.json"

INT8_SCALE = 127.0


@dataclass(frozen=True)
class StoreSettings:
    """How descriptors are encoded on storage."""

    global_dtype: str = "float16"  # halves the store; cosine error ~1e-4, far below retrieval noise
    local_dtype: str = "float16"  # "int8" quarters float32 again (≈ 0.13 MB/image at 1000 × 128)
    row_group_size: int = 1  # local rows per row group: 1 prices a read at one image's bytes

    def __post_init__(self) -> None:
        if self.global_dtype not in GLOBAL_DTYPES:
            raise ValueError(f"global_dtype={self.global_dtype!r}; allowed: {', '.join(GLOBAL_DTYPES)}")
        if self.local_dtype not in LOCAL_DTYPES:
            raise ValueError(f"local_dtype={self.local_dtype!r}; allowed: {', '.join(LOCAL_DTYPES)}")
        if self.row_group_size < 1:
            raise ValueError(f"row_group_size={self.row_group_size}; must be ≥ 1")


@dataclass(frozen=True)
class LocalFeatures:
    """The local features of one image."""

    keypoints: np.ndarray  # (N, 2) float32, (x, y) in original-image pixels
    scales: np.ndarray  # (N,) float32, the extraction scale each feature came from
    scores: np.ndarray  # (N,) float32, attention
    descriptors: np.ndarray  # (N, 128) float32, L2-normalised

    def __len__(self) -> int:
        return len(self.scores)


@dataclass(frozen=True)
class ErrorRecord:
    """A manifest row that produced no descriptors, and why."""

    id: str
    url: str
    stage: str  # fetch | decode | extract
    reason: str  # a short code, e.g. "truncated", "missing"
    message: str  # readable detail


@dataclass(frozen=True)
class ShardCommit:
    """The commit marker of one shard: what the shard accounts for."""

    shard: int  # the NNNNN of part-NNNNN.json; optional in the file, which must agree with its name
    rows: int  # manifest rows the shard covers = ok + errors
    ok: int  # rows with descriptors (in global/ and local/)
    errors: int  # rows in errors/
    reasons: dict[str, int] = field(default_factory=dict)  # error reason → count; optional


class StoreFormatError(ValueError):
    """A store file that does not follow the documented format (README, "Descriptor store format")."""


COMMIT_KEYS = ("rows", "ok", "errors")  # required in a commit marker
COMMIT_OPTIONAL = ("shard", "reasons")


ERROR_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("url", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
    ]
)


def shard_name(shard: int) -> str:
    if shard < 0:
        raise ValueError(f"shard={shard}; must be ≥ 0")
    return f"part-{shard:05d}"


def _shard_url(store_url: str, folder: str, shard: int, suffix: str = ".parquet") -> str:
    return storage.join(store_url, folder, shard_name(shard) + suffix)


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


def require_store(store_url: str, options: Options = None) -> None:
    """Raise FileNotFoundError when ``store_url`` holds no descriptor store (a mistyped path reads as
    an error, never as an empty store)."""
    markers = (storage.join(store_url, RUN_INFO), storage.join(store_url, COMMITS_DIR))
    if not any(storage.exists(url, options) for url in markers):
        raise FileNotFoundError(
            f"no descriptor store at {storage.redact(store_url)} (neither {RUN_INFO} nor {COMMITS_DIR}/ exists)"
        )


def write_global_only_shard(
    store_url: str, shard: int, ids: Sequence[str], vectors: np.ndarray, options: Options = None
) -> ShardCommit:
    """A committed shard of float32 global descriptors only, rows as given: all an index build reads of a
    store (reindex's compacted store). It has no local features or error records."""
    storage.write_parquet(
        _shard_url(store_url, GLOBAL_DIR, shard), _global_table(ids, vectors, "float32"), options
    )
    return _commit(store_url, ShardCommit(shard=shard, rows=len(ids), ok=len(ids), errors=0), options)


def _count(marker: Mapping[str, Any], key: str, where: str) -> int:
    value = marker[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StoreFormatError(f"{where}: {key!r} is {value!r}; must be an integer ≥ 0")
    return value


def parse_commit(url: str, text: str) -> ShardCommit:
    """A commit marker, validated; the shard number is taken from the file name ``part-NNNNN.json``."""
    where = f"commit marker {storage.redact(url)}"
    name = url.rsplit("/", 1)[-1]
    if not re.fullmatch(r"part-\d{5,}\.json", name):
        raise StoreFormatError(f"{where}: file name must be part-NNNNN.json (NNNNN = shard number)")
    shard = int(name[len("part-") : -len(".json")])
    try:
        marker = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreFormatError(f"{where}: not JSON ({exc})") from None
    if not isinstance(marker, dict):
        raise StoreFormatError(f"{where}: must be a JSON object, not {type(marker).__name__}")
    missing = [k for k in COMMIT_KEYS if k not in marker]
    unknown = sorted(set(marker) - set(COMMIT_KEYS) - set(COMMIT_OPTIONAL))
    if missing or unknown:
        raise StoreFormatError(
            f"{where}: missing keys {missing}, unknown keys {unknown}; required {list(COMMIT_KEYS)}, "
            f"optional {list(COMMIT_OPTIONAL)}"
        )
    rows, ok, errors = (_count(marker, k, where) for k in COMMIT_KEYS)
    if rows != ok + errors:
        raise StoreFormatError(f"{where}: rows {rows} != ok {ok} + errors {errors}")
    if "shard" in marker and marker["shard"] != shard:
        raise StoreFormatError(f"{where}: says shard {marker['shard']!r} but is named for shard {shard}")
    reasons = marker.get("reasons", {})
    if not isinstance(reasons, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in reasons.items()
    ):
        raise StoreFormatError(f"{where}: 'reasons' must map reason strings to counts ≥ 0, got {reasons!r}")
    return ShardCommit(shard=shard, rows=rows, ok=ok, errors=errors, reasons=dict(reasons))


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


def _fixed_size_to_numpy(column: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """A fixed_size_list column as an (n, width) array."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = array.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(array), width)


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


def _decode_local(table: pa.Table) -> dict[str, LocalFeatures]:
    desc_type = table.schema.field("descriptors").type.value_type
    dim = desc_type.list_size
    out: dict[str, LocalFeatures] = {}
    for row in range(table.num_rows):
        descriptors = _fixed_size_to_numpy(table.column("descriptors")[row].values, dim)
        if desc_type.value_type == pa.int8():
            descriptors = descriptors.astype(np.float32) / INT8_SCALE
            norms = np.linalg.norm(descriptors, axis=1, keepdims=True)
            descriptors = descriptors / np.maximum(norms, 1e-12)
        out[table.column("id")[row].as_py()] = LocalFeatures(
            keypoints=_fixed_size_to_numpy(table.column("keypoints")[row].values, 2).astype(np.float32),
            scales=table.column("scales")[row].values.to_numpy(zero_copy_only=False).astype(np.float32),
            scores=table.column("scores")[row].values.to_numpy(zero_copy_only=False).astype(np.float32),
            descriptors=descriptors.astype(np.float32),
        )
    return out


LOCAL_INDEX_SCHEMA = pa.schema(
    [("id", pa.string()), ("row_group", pa.int32()), ("offset", pa.int64()), ("size", pa.int64())]
)


def _row_group_range(row_group: pq.RowGroupMetaData) -> tuple[int, int]:
    """[start, end) of a row group's column chunks in its file."""
    chunks = [row_group.column(j) for j in range(row_group.num_columns)]
    starts = [c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset for c in chunks]
    ends = [start + c.total_compressed_size for start, c in zip(starts, chunks, strict=True)]
    return min(starts), max(ends)


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


@dataclass
class ReadStats:
    """What reading local features cost: the summary's accounting (one per reader; thread-safe adds)."""

    bytes_read: int = 0  # from the store (range requests and footers)
    requests: int = 0  # range requests to the store
    bytes_wanted: int = 0  # the stored bytes of the images asked for: bytes_read ÷ this is the overhead
    cache_bytes: int = 0  # served by the node-local cache instead
    images: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def __getstate__(self) -> dict[str, int]:  # crosses process boundaries as plain counts
        return self.as_dict()

    def __setstate__(self, state: dict[str, int]) -> None:
        self.__init__(**state)


@dataclass
class _Shard:
    """One committed local shard as a reader addresses it."""

    url: str
    file_size: int
    footer_offset: int
    ranges: dict[int, tuple[int, int]]  # row group → (offset, size)
    rows: dict[int, int]  # row group → images in it
    metadata: pq.FileMetaData | None = None  # the footer, fetched on first use


class _SparseFile(io.RawIOBase):
    """A file of ``size`` bytes of which only fetched ranges exist: pyarrow reads row groups from it with the
    footer given, so reading a row group costs exactly the ranges fetched for it."""

    def __init__(self, size: int, chunks: Mapping[int, bytes], url: str) -> None:
        self.size, self.url, self.position = size, url, 0
        self.chunks: list[tuple[int, bytes]] = []
        for start, data in sorted(chunks.items()):  # neighbours joined: a read may span both
            if self.chunks and self.chunks[-1][0] + len(self.chunks[-1][1]) == start:
                self.chunks[-1] = (self.chunks[-1][0], self.chunks[-1][1] + data)
            else:
                self.chunks.append((start, data))

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = base + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self.size - self.position)
        for start, data in self.chunks:
            if start <= self.position and self.position + n <= start + len(data):
                view[:n] = data[self.position - start : self.position - start + n]
                self.position += n
                return n
        raise StoreFormatError(f"{storage.redact(self.url)}: its local index does not cover a row group read")


def _coalesce(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted (offset, size) ranges with neighbours (end == next start) merged into one request."""
    runs: list[tuple[int, int]] = []
    for offset, size in sorted(set(ranges)):
        if runs and runs[-1][0] + runs[-1][1] == offset:
            runs[-1] = (runs[-1][0], runs[-1][1] + size)
        else:
            runs.append((offset, size))
    return runs


class LocalReader:
    """Random access to local features by image id, reading about the bytes of the images asked for.

    ``stores`` is one store URL or an ordered list (an index built incrementally spans several); an id
    in more than one store is read from the last, newest one. The id → (shard, row group, byte range) map
    comes from each shard's local index (one small file per shard); each request then reads the shard's
    footer once and its images' row groups as coalesced range requests. ``cache_dir``, a node-local folder,
    keeps what was read so that repeat passes read the disk instead of the store. ``stats`` counts the cost.
    Reads may run on a thread beside the compute (the re-ranking work prefetches the next batch).
    """

    def __init__(
        self, stores: str | Sequence[str], options: Options = None, cache_dir: str | None = None
    ) -> None:
        self.stores = [stores] if isinstance(stores, str) else list(stores)
        self.options = options
        self.cache_dir = cache_dir
        self.stats = ReadStats()
        self._shards: list[_Shard] = []
        self._where: dict[str, tuple[int, int]] = {}  # id → (position in _shards, row group)
        for store_url in self.stores:
            indexed = _indexed_shards(store_url, options)
            shards = committed_shards(store_url, options)
            unindexed = [s for s in shards if s not in indexed]
            if unindexed:
                log.warning(
                    "%s: %d local shards have no local index (written before it existed): reading them costs "
                    "whole row groups; `landmark-index migrate-store %s` rewrites them",
                    storage.redact(store_url),
                    len(unindexed),
                    storage.redact(store_url),
                )
            for shard in shards:
                self._add_shard(store_url, shard, shard in indexed)

    def _add_shard(self, store_url: str, shard: int, indexed: bool) -> None:
        url = _shard_url(store_url, LOCAL_DIR, shard)
        index = (
            storage.read_parquet(_shard_url(store_url, LOCAL_INDEX_DIR, shard), self.options)
            if indexed
            else _scan_index(url, self.options)
        )
        meta = index.schema.metadata
        groups = index.column("row_group").to_numpy()
        offsets, sizes = index.column("offset").to_numpy(), index.column("size").to_numpy()
        entry = _Shard(
            url=url,
            file_size=int(meta[b"file_size"]),
            footer_offset=int(meta[b"footer_offset"]),
            ranges={int(g): (int(o), int(s)) for g, o, s in zip(groups, offsets, sizes, strict=True)},
            rows=dict(Counter(groups.tolist())),
        )
        self._shards.append(entry)
        position = len(self._shards) - 1
        for image_id, group in zip(index.column("id").to_pylist(), groups.tolist(), strict=True):
            self._where[image_id] = (position, group)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._where

    def ids(self) -> set[str]:
        return set(self._where)

    def read(self, ids: Sequence[str]) -> dict[str, LocalFeatures]:
        """Local features of ``ids``; an id not in the stores raises KeyError naming it."""
        missing = [i for i in ids if i not in self._where]
        if missing:
            where = ", ".join(storage.redact(s) for s in self.stores)
            raise KeyError(f"{len(missing)} ids not in {where}: {missing[:5]}")
        groups: dict[int, set[int]] = {}
        for image_id in set(ids):
            position, group = self._where[image_id]
            groups.setdefault(position, set()).add(group)
            shard = self._shards[position]
            self.stats.add(images=1, bytes_wanted=shard.ranges[group][1] // shard.rows[group])
        wanted = set(ids)
        out: dict[str, LocalFeatures] = {}
        for position, row_groups in sorted(groups.items()):
            features = _decode_local(self._read_row_groups(self._shards[position], sorted(row_groups)))
            out.update({k: v for k, v in features.items() if k in wanted and self._where[k][0] == position})
        return out

    def _read_row_groups(self, shard: _Shard, row_groups: list[int]) -> pa.Table:
        if shard.metadata is None:
            footer = self._fetch(shard, [(shard.footer_offset, shard.file_size - shard.footer_offset)])
            shard.metadata = pq.read_metadata(pa.BufferReader(b"PAR1" + footer[shard.footer_offset]))
        chunks = self._fetch(shard, [shard.ranges[g] for g in row_groups])
        parquet = pq.ParquetFile(
            _SparseFile(shard.file_size, chunks, shard.url), metadata=shard.metadata, pre_buffer=False
        )
        return parquet.read_row_groups(row_groups)

    def _fetch(self, shard: _Shard, ranges: Sequence[tuple[int, int]]) -> dict[int, bytes]:
        """offset → bytes of each range, from the node-local cache where it has them, else from the store
        in coalesced range requests (then cached)."""
        found = {r: self._cached(shard, r) for r in ranges}
        for offset, size in _coalesce([r for r, data in found.items() if data is None]):
            data = storage.read_range(shard.url, offset, size, self.options)
            self.stats.add(bytes_read=size, requests=1)
            for start, length in [r for r in found if offset <= r[0] < offset + size]:
                found[(start, length)] = data[start - offset : start - offset + length]
                self._cache(shard, (start, length), found[(start, length)])
        return {offset: data for (offset, _), data in found.items() if data is not None}

    def _cache_path(self, shard: _Shard, byte_range: tuple[int, int]) -> str | None:
        if self.cache_dir is None:
            return None
        # the file's size in the key: a rewritten shard (migrate-store) never meets its old bytes
        key = hashlib.sha1(f"{shard.url}|{shard.file_size}".encode()).hexdigest()[:20]
        return os.path.join(self.cache_dir, key, f"{byte_range[0]}-{byte_range[1]}")

    def _cached(self, shard: _Shard, byte_range: tuple[int, int]) -> bytes | None:
        path = self._cache_path(shard, byte_range)
        if path is None or not os.path.exists(path):
            return None
        data = storage.read_bytes(path)
        self.stats.add(cache_bytes=len(data))
        return data

    def _cache(self, shard: _Shard, byte_range: tuple[int, int], data: bytes) -> None:
        path = self._cache_path(shard, byte_range)
        if path is not None:
            storage.write_bytes(path, data)  # atomic: a concurrent reader sees all of it or none


def _indexed_shards(store_url: str, options: Options) -> set[int]:
    """The shards that have a local index (``local_index/part-NNNNN.parquet``)."""
    urls = storage.list_files(storage.join(store_url, LOCAL_INDEX_DIR), options, ".parquet")
    return {int(u.rsplit("/", 1)[-1][len("part-") : -len(".parquet")]) for u in urls}


def _scan_index(url: str, options: Options) -> pa.Table:
    """The local index of a shard written before local indexes existed, built from its footer and ids."""
    size = int(storage.info(url, options)["size"])
    with storage.open_input(url, options) as f:
        parquet = pq.ParquetFile(f)
        return _index_table(parquet, parquet.read(columns=["id"]).column("id").to_pylist(), size)


def read_local(
    stores: str | Sequence[str], ids: Sequence[str], options: Options = None
) -> dict[str, LocalFeatures]:
    """Local features of ``ids`` only (see LocalReader; keep a LocalReader for repeated calls)."""
    return LocalReader(stores, options).read(ids)


@dataclass(frozen=True)
class MigrationSummary:
    shards: int  # committed shards
    migrated: int  # rewritten by this call (the others already had a local index)


def migrate_store(
    store_url: str, options: Options = None, settings: StoreSettings = StoreSettings()
) -> MigrationSummary:
    """Rewrite the local shards of a store written before local indexes existed: one row group per image and
    a local index each. Shard by shard, each rewrite atomic and its index last, so a killed migration is
    resumed by running it again, and a migrated store is left as it is."""
    require_store(store_url, options)
    indexed = _indexed_shards(store_url, options)
    shards = committed_shards(store_url, options)
    todo = [s for s in shards if s not in indexed]
    for done, shard in enumerate(todo, 1):
        table = storage.read_parquet(_shard_url(store_url, LOCAL_DIR, shard), options)
        _write_local(store_url, shard, table, settings.row_group_size, options)
        log.info("migrated local shard %d (%d/%d)", shard, done, len(todo))
    return MigrationSummary(shards=len(shards), migrated=len(todo))


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


def write_run_info(store_url: str, info: Mapping[str, Any], options: Options = None) -> None:
    text = storage.redact_text(json.dumps(info, indent=2, sort_keys=True))  # an output: no credential in it
    storage.write_text(storage.join(store_url, RUN_INFO), text, options)


def read_run_info(store_url: str, options: Options = None) -> dict[str, Any] | None:
    """The store's run metadata, or None for a store not yet started."""
    url = storage.join(store_url, RUN_INFO)
    return json.loads(storage.read_text(url, options)) if storage.exists(url, options) else None
