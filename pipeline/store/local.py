"""Random access to local features by image id: one range request of about the image's own bytes, through
the shard's local index (stores without one are scanned, with a warning)."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.storage import Options
from pipeline.store.layout import (
    LOCAL_DIR,
    LOCAL_INDEX_DIR,
    LocalFeatures,
    StoreFormatError,
    _decode_local,
    _shard_url,
)
from pipeline.store.read import committed_shards
from pipeline.store.write import _index_table

log = logging.getLogger(__name__)


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
