"""Reading, listing, copying and removing objects, each call under :func:`~pipeline.storage.retries.with_retries`."""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import IO, TYPE_CHECKING, Any

from pipeline.errors import InputError
from pipeline.storage.redaction import redact
from pipeline.storage.retries import with_retries
from pipeline.storage.urls import _TAR_MEMBER, Options, _host_slot, filesystem, is_local, join

if TYPE_CHECKING:
    import fsspec


def read_bytes(url: str, options: Options = None) -> bytes:
    """The whole object at ``url`` (or one tar member, see :func:`tar_member_url`).

    Raises MissingObject (a FileNotFoundError) when absent, StorageError when I/O keeps failing.
    """
    member = _TAR_MEMBER.fullmatch(url)
    target = member["tar"] if member else url
    fs, path = filesystem(target, options)

    def read() -> bytes:
        with _host_slot(target):
            if member is None:
                return fs.cat_file(path)
            start, size = int(member["offset"]), int(member["size"])
            data = fs.cat_file(path, start=start, end=start + size)
        if len(data) != size:  # a server that ignores Range sends the whole tar
            raise InputError(f"{redact(target)}: got {len(data)} bytes for a {size}-byte member range")
        return data

    return with_retries(read, what=f"read {redact(url)}")


def read_range(url: str, start: int, size: int, options: Options = None) -> bytes:
    """``size`` bytes of the object at ``url`` from byte ``start`` (one range request on object stores)."""
    fs, path = filesystem(url, options)

    def read() -> bytes:
        with _host_slot(url):
            data = fs.cat_file(path, start=start, end=start + size)
        if len(data) != size:  # a server that ignores Range, or an object shorter than its index says
            raise InputError(f"{redact(url)}: got {len(data)} bytes for the {size}-byte range at {start}")
        return data

    return with_retries(read, what=f"read {redact(url)} [{start}, {start + size})")


def list_tar_members(url: str, options: Options = None) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file in the uncompressed tar at ``url``, in archive order.

    Reads the headers in place (seeking past each member's data); raises InputError for a non-tar.
    """
    try:
        with open_input(url, options) as f, tarfile.open(fileobj=f, mode="r:") as archive:
            return [(m.name, m.offset_data, m.size) for m in archive if m.isreg()]
    except tarfile.TarError as exc:
        raise InputError(f"{redact(url)} is not a readable uncompressed tar: {exc}") from None


def read_text(url: str, options: Options = None) -> str:
    """The object at ``url`` as UTF-8 text; InputError naming it when it is not (a binary file given as text)."""
    data = read_bytes(url, options)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{redact(url)} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def exists(url: str, options: Options = None) -> bool:
    fs, path = filesystem(url, options)
    return bool(with_retries(lambda: fs.exists(path), what=f"stat {redact(url)}"))


def info(url: str, options: Options = None) -> dict[str, Any]:
    """Backend metadata of one object (size, ETag/mtime where the backend has them)."""
    fs, path = filesystem(url, options)
    return with_retries(lambda: fs.info(path), what=f"stat {redact(url)}")


def list_files(prefix: str, options: Options = None, suffix: str = "") -> list[str]:
    """Sorted full URLs of the objects directly under ``prefix`` whose names end with ``suffix``.

    A missing prefix lists as empty.
    """
    fs, path = filesystem(prefix, options)
    try:
        entries = with_retries(lambda: fs.ls(path, detail=True, refresh=True), what=f"list {redact(prefix)}")
    except FileNotFoundError:
        return []
    names = sorted(
        posixpath.basename(e["name"].rstrip("/"))
        for e in entries
        if e.get("type") != "directory" and e["name"].endswith(suffix)
    )
    return [join(prefix, n) for n in names if not n.startswith(".tmp-")]


def glob(pattern: str, options: Options = None) -> list[str]:
    """Sorted full URLs matching a glob pattern, spelled like the pattern (as :func:`list_files` does)."""
    fs, path = filesystem(pattern, options)
    matches = with_retries(lambda: fs.glob(path), what=f"glob {redact(pattern)}")
    if is_local(pattern):
        return sorted(matches)
    return sorted(_spelled_like(pattern, fs, m) for m in matches)


def _spelled_like(pattern: str, fs: fsspec.AbstractFileSystem, match: str) -> str:
    """A backend path as a URL with the pattern's own prefix: memory:// paths come back as
    '/x/..', which ``unstrip_protocol`` turns into 'memory:///x/..', not the 'memory://x/..' we wrote."""
    folder = re.split(r"[*?\[]", pattern, maxsplit=1)[0].rpartition("/")[0]  # the literal part of the pattern
    stripped = fs._strip_protocol(folder)
    if "://" in folder and match.startswith(stripped + "/"):
        return folder + match[len(stripped) :]
    return fs.unstrip_protocol(match)


def isdir(url: str, options: Options = None) -> bool:
    fs, path = filesystem(url, options)
    return bool(with_retries(lambda: fs.isdir(path), what=f"stat {redact(url)}"))


def remove(url: str, options: Options = None, recursive: bool = False) -> None:
    """Remove an object (or a whole prefix with ``recursive``); a missing one is not an error."""
    fs, path = filesystem(url, options)
    with suppress(FileNotFoundError):
        with_retries(lambda: fs.rm(path, recursive=recursive), what=f"remove {redact(url)}")


@contextmanager
def open_input(url: str, options: Options = None, read_ahead: bool = True) -> Iterator[IO[bytes]]:
    """A seekable binary file for random-access readers (pyarrow reads Parquet footers and row groups).
    ``read_ahead=False``: each read fetches only its bytes (on object stores one range request; fsspec would
    otherwise fetch a whole block, MBs, around a small read)."""
    fs, path = filesystem(url, options)
    kwargs = {} if read_ahead else {"cache_type": "none"}
    f = with_retries(lambda: fs.open(path, "rb", **kwargs), what=f"open {redact(url)}")
    try:
        yield f
    finally:
        f.close()


def copy(source: str, target: str, options: Options = None) -> None:
    """Copy one object without holding it in memory: on one filesystem its own copy (server-side on S3:
    CopyObject), across filesystems a streamed copy."""
    source_fs, source_path = filesystem(source, options)
    target_fs, target_path = filesystem(target, options)
    what = f"copy {redact(source)} to {redact(target)}"
    if is_local(target):
        os.makedirs(os.path.dirname(target_path), exist_ok=True)
    if source_fs is target_fs:
        with_retries(lambda: source_fs.copy(source_path, target_path), what=what)
        return

    def stream() -> None:
        with source_fs.open(source_path, "rb") as reader, target_fs.open(target_path, "wb") as writer:
            shutil.copyfileobj(reader, writer, COPY_CHUNK)

    with_retries(stream, what=what)


COPY_CHUNK = 8 * 2**20  # bytes per read of a streamed copy


def download(url: str, local_path: str, options: Options = None) -> None:
    """Copy an object to a local file (for libraries that need a path, e.g. faiss.read_index)."""
    data = read_bytes(url, options)
    os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
    with open(local_path, "wb") as f:
        f.write(data)


def read_parquet(url: str, options: Options = None, columns: list[str] | None = None) -> Any:
    """One Parquet object as a pyarrow Table (only ``columns`` when given)."""
    import pyarrow.parquet as pq

    with open_input(url, options) as f:
        return pq.read_table(f, columns=columns)
