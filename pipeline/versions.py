"""Versions of a re-indexed root: LATEST, versions/vN and the files beside each version's index.

Layout under a root URL ``ROOT``::

    ROOT/LATEST                      the live version's name ("v000003"), moved by one small atomic write
    ROOT/versions/v000003/           a complete index dir (see pipeline.index) plus
        state.parquet                the manifest rows this version indexes: id, url, image (sha256), etag, size;
                                     sorted by id in row groups of STATE_GROUP_ROWS (StateUrls reads a few)
        stores.json                  ordered descriptor stores (newest last, relative to ROOT): read_stores()
                                     gives the URLs for LocalReader(stores)
        report.json                  the run report that published this version
        dba.parquet                  DBA vectors of its images (with ``ReindexConfig.dba``; pipeline.index.dba)
    ROOT/descriptors/<run-name>/     descriptor store of one run's new + changed rows
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import InputError, MissingInputError
from pipeline.storage import Options

LATEST = "LATEST"
VERSIONS = "versions"
DESCRIPTORS = "descriptors"
STATE = "state.parquet"
STORES = "stores.json"
REPORT = "report.json"
VERSION_FILES = (STATE, STORES, REPORT)  # ours; the rest of a version dir is the index
STATE_GROUP_ROWS = 4096  # rows per row group of state.parquet: what a lookup of one id reads (~0.3 MB)


def version_name(number: int) -> str:
    return f"v{number:06d}"


def version_number(name: str) -> int:
    if len(name) != 7 or not name.startswith("v") or not name[1:].isdigit():
        raise InputError(f"version name {name!r}; expected 'v' and 6 digits, e.g. 'v000001'")
    return int(name[1:])


def version_url(root_url: str, name: str) -> str:
    return storage.join(root_url, VERSIONS, name)


def live_version(root_url: str, options: Options = None) -> str | None:
    """The name LATEST holds, or None before the first publish."""
    url = storage.join(root_url, LATEST)
    if not storage.exists(url, options):
        return None
    name = storage.read_text(url, options).strip()
    version_number(name)
    return name


def resolve_latest(root_url: str, options: Options = None) -> str:
    """The URL of the live, complete version (an index dir with state.parquet and stores.json)."""
    name = live_version(root_url, options)
    if name is None:
        raise MissingInputError(f"no published version under {storage.redact(root_url)} (no {LATEST})")
    return version_url(root_url, name)


def read_stores(version: str, options: Options = None) -> list[str]:
    """The ordered descriptor store URLs (newest last) whose local features a version's ids use."""
    root = version.rstrip("/").rsplit("/", 2)[0]  # ROOT/versions/vN → ROOT
    return [
        storage.join(root, name)
        for name in json.loads(storage.read_text(storage.join(version, STORES), options))
    ]


def store_names(stores: Sequence[str]) -> list[str]:
    """Store URLs as paths relative to ROOT (all live under ROOT/descriptors), so a root can be moved."""
    return [f"{DESCRIPTORS}/{url.rstrip('/').rsplit('/', 1)[-1]}" for url in stores]


def published_versions(root_url: str, options: Options) -> list[str]:
    names = [
        u.rstrip("/").rsplit("/", 1)[-1]
        for u in storage.glob(storage.join(root_url, VERSIONS, "v*"), options)
    ]
    return sorted(n for n in names if len(n) == 7 and n[1:].isdigit())


def state_table(table: pa.Table) -> pa.Table:
    """The columns of manifest rows that decide whether an image changed; inline images as sha256 digests."""
    images = table.column("image").combine_chunks()
    digests = pa.array(
        [None if b is None else hashlib.sha256(b).digest() for b in images.to_pylist()]
        if images.null_count < len(images)
        else pa.nulls(len(images), pa.binary()),
        pa.binary(),
    )
    columns = {"id": table.column("id"), "url": table.column("url"), "image": digests}
    columns |= {c: table.column(c) for c in ("etag", "size") if c in table.column_names}
    return pa.table(columns)


def empty_state() -> pa.Table:
    return pa.table(
        {
            "id": pa.array([], pa.string()),
            "url": pa.array([], pa.string()),
            "image": pa.array([], pa.binary()),
        }
    )


def prune(root_url: str, live_number: int, keep: int, options: Options) -> None:
    """Keep the newest ``keep`` published versions; remove older ones and stores no kept version uses.

    Versions numbered above the live one are a crashed run's partial output: the next run overwrites them.
    """
    published = [n for n in published_versions(root_url, options) if version_number(n) <= live_number]
    kept = published[-keep:]
    for name in published[:-keep]:
        storage.remove(version_url(root_url, name), options, recursive=True)
    referenced = {
        url.rstrip("/").rsplit("/", 1)[-1]
        for name in kept
        for url in read_stores(version_url(root_url, name), options)
    }
    for url in storage.glob(storage.join(root_url, DESCRIPTORS, "*"), options):
        if url.rstrip("/").rsplit("/", 1)[-1] not in referenced:
            storage.remove(url, options, recursive=True)


def write_version_files(
    target: str, table: pa.Table, stores: Sequence[str], report: dict[str, Any], options: Options = None
) -> None:
    """A version's own files beside its index: the manifest rows' state (sorted by id: a row group's id
    statistics then bound a lookup, StateUrls), its stores, the run report."""
    state = state_table(table).sort_by("id")
    storage.write_parquet(storage.join(target, STATE), state, options, row_group_size=STATE_GROUP_ROWS)
    storage.write_text(storage.join(target, STORES), json.dumps(store_names(stores), indent=2), options)
    text = storage.redact_text(json.dumps(report, indent=2))  # error records quote library messages
    storage.write_text(storage.join(target, REPORT), text, options)


def read_state(version: str, options: Options = None) -> pa.Table:
    return storage.read_parquet(storage.join(version, STATE), options)


class StateUrls:
    """A version's image urls by id, from its state.parquet without loading it (GLDv2: 762k rows): the footer
    is read once, then a lookup reads only the row groups whose id statistics (min, max) can hold a wanted
    id. A state sorted by id (write_version_files) gives each id one group; an older, unsorted one is read
    right, only less selectively."""

    def __init__(self, version: str, options: Options = None) -> None:
        self.url, self.options = storage.join(version, STATE), options
        with storage.open_input(self.url, options, read_ahead=False) as f:
            self.metadata = pq.ParquetFile(f).metadata
        column = self.metadata.schema.names.index("id")
        self.bounds = [
            _min_max(self.metadata.row_group(g).column(column).statistics)
            for g in range(self.metadata.num_row_groups)
        ]
        self.rows_read = 0  # rows of the row groups read by lookups so far: their cost

    def urls(self, ids: Sequence[str]) -> dict[str, str | None]:
        """The url of each of ``ids`` that the state holds (None: an inline image)."""
        wanted = set(ids)
        groups = [
            g
            for g, bounds in enumerate(self.bounds)
            if bounds is None or any(bounds[0] <= i <= bounds[1] for i in wanted)
        ]
        if not groups:
            return {}
        with storage.open_input(self.url, self.options, read_ahead=False) as f:
            rows = pq.ParquetFile(f, metadata=self.metadata).read_row_groups(groups, columns=["id", "url"])
        self.rows_read += rows.num_rows
        found = zip(rows.column("id").to_pylist(), rows.column("url").to_pylist(), strict=True)
        return {image_id: url for image_id, url in found if image_id in wanted}


def _min_max(statistics: pq.Statistics | None) -> tuple[str, str] | None:
    """A row group's (min, max) id; None when it was written without statistics (then it is always read)."""
    if statistics is None or not statistics.has_min_max:
        return None
    return statistics.min, statistics.max


def read_report(version: str, options: Options = None) -> dict[str, Any]:
    return json.loads(storage.read_text(storage.join(version, REPORT), options))


def publish(root_url: str, name: str, options: Options = None) -> None:
    """Make ``name`` the live version: one small atomic write of LATEST."""
    storage.write_text(storage.join(root_url, LATEST), name + "\n", options)
