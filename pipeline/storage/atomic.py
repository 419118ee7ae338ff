"""Atomic writes: a reader sees a whole object or nothing (a temporary sibling renamed into place on local
disks, one PUT on object stores), and create-if-absent for commit markers and leases."""

from __future__ import annotations

import errno
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from pipeline.storage.objects import exists, read_bytes
from pipeline.storage.redaction import redact
from pipeline.storage.retries import _raise_if_fault, with_retries
from pipeline.storage.urls import Options, filesystem, is_local, protocol_of

if TYPE_CHECKING:
    import fsspec


@contextmanager
def _local_temp_copy(path: str, data: bytes) -> Iterator[str]:
    """A synced temporary sibling of local ``path`` holding ``data`` (parents created), removed afterwards:
    renaming or linking it into place publishes the whole file at once."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        yield tmp
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(url: str, data: bytes, options: Options = None) -> None:
    """Write ``data`` to ``url`` atomically (whole object or nothing), creating parent folders."""
    fs, path = filesystem(url, options)
    if not is_local(url):
        with_retries(lambda: fs.pipe_file(path, data), what=f"write {redact(url)}")
        return
    try:  # a local disk: nothing to retry, but a full or read-only disk is named as such
        with _local_temp_copy(path, data) as tmp:  # a failed write (disk full...) leaves nothing
            os.replace(tmp, path)
    except OSError as exc:
        _raise_if_fault(exc, f"write {redact(url)}")
        raise


CREATE_SETTLE_S = 1.0  # write_if_absent without conditional writes: wait this long, then read back


def write_if_absent(url: str, data: bytes, options: Options = None) -> bool:
    """Create ``url`` holding ``data`` unless it exists; True when this call created it.

    Of concurrent callers exactly one gets True on local disks (a hard link, which fails on an existing name)
    and on S3 servers with conditional writes (a PUT with ``If-None-Match: *``: AWS S3, MinIO). Where the
    store has none (other backends, and S3 servers that answer "not implemented", such as Swift's s3api),
    it checks, writes, waits :data:`CREATE_SETTLE_S` and reads back: exactly one True as long as no caller
    stalls that long between its check and its write. ``data`` must be unique to the caller (an owner id):
    the read-back tells callers apart by it.
    """
    fs, path = filesystem(url, options)
    if is_local(url):
        with _local_temp_copy(path, data) as tmp:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        return True
    if protocol_of(url) in ("s3", "s3a"):
        created = with_retries(lambda: _put_if_none_match(fs, path, data), what=f"create {redact(url)}")
        if created is not None:
            return created
    if exists(url, options):
        return False
    write_bytes(url, data, options)
    time.sleep(CREATE_SETTLE_S)  # a contender that also saw no object has written by now: last writer wins
    try:
        return read_bytes(url, options) == data
    except FileNotFoundError:
        return False


def _put_if_none_match(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool | None:
    """A conditional S3 PUT: True created, False the object exists, None the server has no conditional PUT."""
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:  # s3fs's translation of 412 PreconditionFailed (If-None-Match)
        return False
    except OSError as exc:
        if exc.errno == errno.ENOSYS:  # s3fs's translation of 501 NotImplemented
            return None
        raise
    return True


def write_text(url: str, text: str, options: Options = None) -> None:
    write_bytes(url, text.encode("utf-8"), options)


def upload(local_path: str, url: str, options: Options = None) -> None:
    """Copy a local file to ``url`` atomically."""
    with open(local_path, "rb") as f:
        write_bytes(url, f.read(), options)


def write_parquet(url: str, table: Any, options: Options = None, **write_options: Any) -> None:
    """Write a pyarrow Table as one Parquet object, atomically (``write_options`` go to pq.write_table)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **write_options)
    write_bytes(url, sink.getvalue().to_pybytes(), options)
