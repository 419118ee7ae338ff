"""All storage access goes through this module (fsspec): local paths, s3://, gs:// (extra gcs), az:// and abfs://
(extra azure), http(s)://, memory://.

Every other module passes URLs and an optional ``options`` mapping (fsspec storage options, e.g.
``{"endpoint_url": ..., "key": ..., "secret": ...}`` for s3). Credentials may also come from the
environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``FSSPEC_S3_ENDPOINT_URL``...). Options are
never logged and never written to outputs: use :func:`redact` before showing a URL; error messages
raised from here are redacted too.

One option is ours, not fsspec's: ``"content_md5": True`` (s3 only) makes the S3 client send a
Content-MD5 header on requests whose API requires an integrity checksum (multi-object delete...).
botocore >= 1.36 sends a CRC32 checksum instead, which OpenStack Swift's s3api (and other
S3-compatible stores that predate flexible checksums) reject with "Missing required header ... Content-MD5".

Faults only the user can fix (no space, read-only, no permission, missing bucket, refused credentials) are
never retried: they raise a :class:`StorageFault` whose one-line message names the path and the fault.
Known secrets are blanked from any text by :func:`redact_text`, and from every log record once
:func:`install_log_redaction` ran (the CLI and the jobs do).

A missing object raises :class:`MissingObject` (a MissingInputError: one line naming the operation and the
redacted path). Retries happen in one layer, :func:`with_retries`: the S3 client (botocore) and s3fs make one
attempt per call; each retry counts into the ``storage_retries`` metric.

Writes are atomic: a reader sees a whole object or nothing. Object stores give this per PUT; on
local disks we write a temporary sibling and rename it.

HTTP(S) reads identify themselves (:func:`user_agent`), honour a 429/503 answer's Retry-After (up to
:data:`MAX_RETRY_AFTER_S`; a longer wait fails the read at once) and hold one of
``LANDMARK_INDEX_HTTP_PER_HOST`` (default 8) slots per host and process while a request is in flight.

A member of an uncompressed tar is addressed as ``TAR_URL#offset=N&size=M`` (:func:`tar_member_url`), read
in place with one byte-range request; :func:`list_tar_members` lists a tar from its headers.

The package's rooms, lowest first: :mod:`~pipeline.storage.redaction` (secrets kept out of text),
:mod:`~pipeline.storage.urls` (URL → filesystem and options), :mod:`~pipeline.storage.retries` (the one retry
layer and the user-facing faults), :mod:`~pipeline.storage.objects` (reads, listings, copies) and
:mod:`~pipeline.storage.atomic` (atomic writes). Callers import from ``pipeline.storage``.
"""

from __future__ import annotations

from pipeline.storage.atomic import (
    CREATE_SETTLE_S,
    upload,
    write_bytes,
    write_if_absent,
    write_parquet,
    write_text,
)
from pipeline.storage.objects import (
    COPY_CHUNK,
    copy,
    download,
    exists,
    glob,
    info,
    isdir,
    list_files,
    list_tar_members,
    open_input,
    read_bytes,
    read_parquet,
    read_range,
    read_text,
    remove,
)
from pipeline.storage.redaction import install_log_redaction, redact, redact_text, remember_secrets
from pipeline.storage.retries import (
    MAX_RETRY_AFTER_S,
    PERMANENT_ERRORS,
    AccessRefused,
    BucketMissing,
    MissingObject,
    StorageError,
    StorageFault,
    is_permanent,
    storage_fault,
    with_retries,
)
from pipeline.storage.urls import (
    DEFAULT_HTTP_PER_HOST,
    EXTRAS,
    PROTOCOLS,
    Options,
    filesystem,
    is_local,
    join,
    local_path,
    options_for,
    options_from_env,
    protocol_of,
    tar_member_url,
    user_agent,
)

__all__ = [
    "COPY_CHUNK",
    "CREATE_SETTLE_S",
    "DEFAULT_HTTP_PER_HOST",
    "EXTRAS",
    "MAX_RETRY_AFTER_S",
    "PERMANENT_ERRORS",
    "PROTOCOLS",
    "AccessRefused",
    "BucketMissing",
    "MissingObject",
    "Options",
    "StorageError",
    "StorageFault",
    "copy",
    "download",
    "exists",
    "filesystem",
    "glob",
    "info",
    "install_log_redaction",
    "is_local",
    "is_permanent",
    "isdir",
    "join",
    "list_files",
    "list_tar_members",
    "local_path",
    "open_input",
    "options_for",
    "options_from_env",
    "protocol_of",
    "read_bytes",
    "read_parquet",
    "read_range",
    "read_text",
    "redact",
    "redact_text",
    "remember_secrets",
    "remove",
    "storage_fault",
    "tar_member_url",
    "upload",
    "user_agent",
    "with_retries",
    "write_bytes",
    "write_if_absent",
    "write_parquet",
    "write_text",
]
