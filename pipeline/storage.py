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

Writes are atomic: a reader sees a whole object or nothing. Object stores give this per PUT; on
local disks we write a temporary sibling and rename it.

HTTP(S) reads identify themselves (:func:`user_agent`), honour a 429/503 answer's Retry-After (up to
:data:`MAX_RETRY_AFTER_S`; a longer wait fails the read at once) and hold one of
``LANDMARK_INDEX_HTTP_PER_HOST`` (default 8) slots per host and process while a request is in flight.

A member of an uncompressed tar is addressed as ``TAR_URL#offset=N&size=M`` (:func:`tar_member_url`), read
in place with one byte-range request; :func:`list_tar_members` lists a tar from its headers.
"""

from __future__ import annotations

import base64
import email.utils
import errno
import functools
import hashlib
import json
import logging
import os
import posixpath
import random
import re
import shutil
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

if TYPE_CHECKING:
    import fsspec

from pipeline import __version__
from pipeline.errors import UserError

log = logging.getLogger(__name__)

Options = Mapping[str, Any] | None
T = TypeVar("T")

# Errors that say the object is not there or not ours to read: retrying cannot help.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    ValueError,
)


class StorageError(UserError, RuntimeError):
    """An I/O failure that persisted after the allowed retries."""


class StorageFault(StorageError):
    """Storage refused an operation for a reason only the user can fix (no space, read-only, no permission,
    missing bucket, refused credentials). Never retried; its message is one line naming the path and the fault."""


class BucketMissing(StorageFault, FileNotFoundError):
    """The bucket does not exist: still a FileNotFoundError for callers that treat absence as "nothing there"."""


class AccessRefused(StorageFault, PermissionError):
    """No permission, or credentials refused: still a PermissionError for callers that catch that."""


# OSError errnos that are the user's environment, not a transient failure (README, "Failure modes").
_ERRNO_FAULTS: dict[int, tuple[type[StorageFault], str]] = {
    errno.ENOSPC: (StorageFault, "no space left on device"),
    errno.EDQUOT: (StorageFault, "disk quota exceeded"),
    errno.EROFS: (StorageFault, "read-only file system"),
    errno.EACCES: (AccessRefused, "permission denied"),
    errno.EPERM: (AccessRefused, "operation not permitted"),
}
# S3 error codes (botocore ``response["Error"]["Code"]``; a HEAD answer has no body, so only its status).
_S3_FAULTS: dict[str, tuple[type[StorageFault], str]] = {
    "NoSuchBucket": (BucketMissing, "bucket does not exist"),
    "InvalidAccessKeyId": (AccessRefused, "credentials refused: unknown access key"),
    "SignatureDoesNotMatch": (
        AccessRefused,
        "credentials refused: the secret key does not match the access key",
    ),
    "ExpiredToken": (AccessRefused, "credentials refused: the session token has expired"),
    "InvalidToken": (AccessRefused, "credentials refused: invalid session token"),
    "AccessDenied": (AccessRefused, "access denied"),
    "403": (AccessRefused, "access denied or credentials refused"),
}


MAX_RETRY_AFTER_S = 60.0  # longest Retry-After we sleep through; a server asking more fails the read
DEFAULT_HTTP_PER_HOST = 8  # concurrent requests per host and process (LANDMARK_INDEX_HTTP_PER_HOST)


def user_agent() -> str:
    """What http(s) requests send as User-Agent: project/version and the operator's contact URL, when set
    (``LANDMARK_INDEX_CONTACT_URL``), so a site owner can tell who fetches and how to reach them."""
    contact = os.environ.get("LANDMARK_INDEX_CONTACT_URL")
    return f"landmark-index/{__version__}" + (f" (+{contact})" if contact else "")


_host_slots: dict[str, threading.BoundedSemaphore] = {}
_host_slots_lock = threading.Lock()


def _host_slot(url: str) -> AbstractContextManager[Any]:
    """The per-process slot semaphore of ``url``'s host (http(s) only; other backends are not limited)."""
    if not _is_http(url):
        return nullcontext()
    host = urlsplit(url).netloc.rpartition("@")[2].lower()  # host[:port], without user info
    with _host_slots_lock:
        if host not in _host_slots:
            limit = int(os.environ.get("LANDMARK_INDEX_HTTP_PER_HOST", DEFAULT_HTTP_PER_HOST))
            if limit < 1:
                raise ValueError(f"LANDMARK_INDEX_HTTP_PER_HOST must be a positive count, got {limit}")
            _host_slots[host] = threading.BoundedSemaphore(limit)
        return _host_slots[host]


def _retry_after(exc: BaseException) -> float | None:
    """Seconds a 429/503 answer asks the client to wait (Retry-After: seconds or an HTTP date), else None."""
    if _http_status(exc) not in (429, 503):
        return None
    value = (getattr(exc, "headers", None) or {}).get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None  # unparseable: plain backoff
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


# The extra that brings a protocol's fsspec backend (s3, http and local ones are base dependencies).
EXTRAS = {"gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure"}

# Keys of a per-protocol options mapping, e.g. {"s3": {"endpoint_url": ...}, "https": {...}}.
PROTOCOLS = frozenset({"file", "local", "memory", "s3", "s3a", "gs", "gcs", "az", "abfs", "http", "https"})


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def options_for(url: str, options: Options) -> dict[str, Any]:
    """The storage options that apply to ``url``.

    ``options`` is either per protocol (``{"s3": {...}, "https": {...}}``) or flat; flat options are
    object-store credentials/endpoints and apply to object-store URLs only, never to local paths or http(s)
    (so one run can read images over https and write to s3).
    """
    if not options:
        return {}
    protocol = protocol_of(url)
    if any(k in PROTOCOLS and isinstance(v, Mapping) for k, v in options.items()):
        return dict(options.get(protocol) or {})
    return {} if protocol in ("file", "local", "memory", "http", "https") else dict(options)


def filesystem(url: str, options: Options = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the backend path for ``url``. Instances are cached by fsspec."""
    from fsspec.core import url_to_fs  # fsspec loads on first use: the CLI's --help does without it

    kwargs = options_for(url, options)
    remember_secrets(url, kwargs)
    if kwargs.pop("content_md5", False):
        protocol = protocol_of(url)
        if protocol not in ("s3", "s3a"):
            raise ValueError(
                f"option content_md5 applies to s3:// URLs only, not {protocol}:// ({redact(url)})"
            )
        if "session" in kwargs:
            raise ValueError(
                "option content_md5 cannot be combined with a 'session' option (it brings its own)"
            )
        kwargs["session"] = _content_md5_session()
    if _is_http(url):
        # One pooled client session per process (connection reuse), bounded timeouts.
        import aiohttp

        kwargs.setdefault("client_kwargs", {"timeout": aiohttp.ClientTimeout(total=60, sock_connect=10)})
        kwargs["client_kwargs"] = {"headers": {"User-Agent": user_agent()}, **kwargs["client_kwargs"]}
    try:
        return url_to_fs(url, **kwargs)
    except ImportError as exc:
        extra = EXTRAS.get(protocol_of(url))
        if extra is None:
            raise
        raise ValueError(
            f"{redact(url)}: {protocol_of(url)}:// needs the {extra!r} extra: pip install 'landmark-index[{extra}]'"
        ) from exc


@functools.cache
def _content_md5_session() -> Any:
    """One aiobotocore session per process (so fsspec keeps caching s3fs instances) with the MD5 hook."""
    from aiobotocore.session import AioSession

    class ContentMD5Session(AioSession):
        def __reduce__(self) -> tuple[Callable[[], Any], tuple[()]]:
            # Filesystems are pickled to Ray workers: rebuild the session there instead of copying it.
            return _content_md5_session, ()

    session = ContentMD5Session()
    session.register("before-call.s3", _add_content_md5)
    return session


def _add_content_md5(params: dict[str, Any], model: Any, **_: Any) -> None:
    """botocore hook: add Content-MD5 to requests whose operation requires a checksum (DeleteObjects...)."""
    body = params.get("body")
    required = model.http_checksum_required or model.http_checksum.get("requestChecksumRequired", False)
    if required and isinstance(body, bytes) and "Content-MD5" not in params["headers"]:
        digest = hashlib.md5(body, usedforsecurity=False).digest()
        params["headers"]["Content-MD5"] = base64.b64encode(digest).decode("ascii")


def join(base: str, *parts: str) -> str:
    """Join path components onto a URL or local path with '/'."""
    return posixpath.join(base.rstrip("/"), *parts) if parts else base


def is_local(url: str) -> bool:
    return protocol_of(url) in ("file", "local")


def options_from_env() -> dict[str, Any] | None:
    """Storage options from ``LANDMARK_INDEX_STORAGE_OPTIONS`` (JSON), so secrets never go on a command line."""
    raw = os.environ.get("LANDMARK_INDEX_STORAGE_OPTIONS")
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"LANDMARK_INDEX_STORAGE_OPTIONS is not valid JSON ({exc.msg}); expected an object"
        ) from None
    if not isinstance(value, dict):
        raise ValueError("LANDMARK_INDEX_STORAGE_OPTIONS must be a JSON object of fsspec storage options")
    return value


def redact(url: str) -> str:
    """The URL without user info or query string (which can carry credentials or signatures)."""
    if "://" not in url:
        return url
    remember_secrets(url)
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


# Option names (fsspec/s3fs/gcsfs/adlfs spellings) whose values are credentials.
_SECRET_OPTIONS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "session_token",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "account_key",
        "sas_token",
        "client_secret",
        "connection_string",
        "private_key",  # gcsfs: a service-account JSON as the token option
        "private_key_id",
        "refresh_token",  # gcsfs: authorized-user credentials
        "access_token",
    }
)
_SECRET_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_CLIENT_SECRET",
)
_MIN_SECRET_LENGTH = 4  # shorter values would blank ordinary words
_known_secrets: set[str] = set()


def _secret_values(options: Any) -> Iterator[str]:
    """Credential values anywhere in a (nested) options mapping."""
    if isinstance(options, Mapping):
        for name, value in options.items():
            if isinstance(value, str) and str(name).lower() in _SECRET_OPTIONS:
                yield value
            else:
                yield from _secret_values(value)


def remember_secrets(url: str | None = None, options: Options = None) -> None:
    """Record the credentials in ``url``'s user info and in ``options``, so that :func:`redact_text`
    removes their values from any text, whatever library quoted them and however (botocore quotes
    a bucket name ``KEY:SECRET@host`` without its scheme, which no URL pattern recognises)."""
    values = list(_secret_values(options))
    if url and "://" in url:
        parts = urlsplit(url)
        values += [unquote(v) for v in (parts.username, parts.password) if v]
    _known_secrets.update(v for v in values if len(v) >= _MIN_SECRET_LENGTH)


def _secrets() -> list[str]:
    """Known secret values, longest first (a secret containing another is removed whole)."""
    env = (os.environ.get(name, "") for name in _SECRET_ENV)
    found = _known_secrets | {v for v in env if len(v) >= _MIN_SECRET_LENGTH}
    return sorted(found, key=len, reverse=True)


# Credentials with a recognisable shape, whoever quotes them: Azure connection-string keys and SAS
# signatures (also outside a URL), PEM private keys (a GCS service-account JSON).
_KEY_IN_TEXT = re.compile(r"\b(AccountKey|SharedAccessSignature|sig)=[^;&\s'\"<>]+")
_PEM_IN_TEXT = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.DOTALL)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
# user:password@ without a scheme in front (a bucket or host name quoted by a library).
_USERINFO_IN_TEXT = re.compile(r"[^\s/'\"<>@:]+:[^\s/'\"<>@]+@(?=[\w.\[-])")


def redact_text(text: str) -> str:
    """``text`` with URLs redacted, schemeless user info removed and every known secret value blanked."""
    text = _URL_IN_TEXT.sub(lambda m: redact(m.group(0)), text)
    text = _USERINFO_IN_TEXT.sub("***@", text)
    text = _KEY_IN_TEXT.sub(r"\1=***", text)
    text = _PEM_IN_TEXT.sub("***", text)
    for secret in _secrets():
        text = text.replace(secret, "***")
    return text


def install_log_redaction() -> None:
    """Redact every log record this process creates, whatever logger, handler or library emits it: the
    message with its args applied and any traceback go through :func:`redact_text`. Idempotent."""
    make_record = logging.getLogRecordFactory()
    if getattr(make_record, "redacts", False):
        return

    def redacted_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        with suppress(Exception):  # a bad format string: logging reports it when the record is emitted
            record.msg, record.args = redact_text(record.getMessage()), None
        if record.exc_info:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        return record

    redacted_record.redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(redacted_record)


def _redact_exception(exc: BaseException) -> None:
    """Redact the URLs in an exception's message in place, so re-raising it leaks no credentials."""
    exc.args = tuple(redact_text(a) if isinstance(a, str) else a for a in exc.args)
    if isinstance(exc, OSError):
        for attr in ("strerror", "filename", "filename2"):
            if isinstance(getattr(exc, attr), str):
                setattr(exc, attr, redact_text(getattr(exc, attr)))


# HTTP statuses worth retrying among the 4xx: request timeout and too many requests.
_RETRYABLE_CLIENT_STATUSES = frozenset({408, 429})
# Client-side errors of botocore that no retry can fix (malformed bucket name, no/partial credentials).
_PERMANENT_BOTOCORE = frozenset({"ParamValidationError", "NoCredentialsError", "PartialCredentialsError"})


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status an exception carries (aiohttp's ``status``, botocore's response metadata)."""
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return status
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code if isinstance(code, int) else None
    return None


def _s3_error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, Mapping):
        return None
    code = response.get("Error", {}).get("Code")
    return str(code) if code is not None else None


def storage_fault(exc: BaseException, what: str) -> StorageFault | None:
    """The user-facing fault behind ``exc`` (anywhere in its chain of causes), as one line "``what``: fault
    (code)"; None when ``exc`` is no environment fault. ``what`` names the operation and the redacted path."""
    for cause in _causes(exc):
        if isinstance(cause, StorageFault):
            return cause
        if isinstance(cause, OSError) and cause.errno in _ERRNO_FAULTS:
            fault, text = _ERRNO_FAULTS[cause.errno]
            return fault(f"{what}: {text} ({errno.errorcode[cause.errno]})")
        code = _s3_error_code(cause)
        if code in _S3_FAULTS:
            fault, text = _S3_FAULTS[code]
            return fault(f"{what}: {text} ({'HTTP ' if code.isdigit() else ''}{code})")
    return None


def _raise_if_fault(exc: BaseException, what: str) -> None:
    """Raise the :class:`StorageFault` behind ``exc``, if it is one (without the cause's traceback)."""
    fault = storage_fault(exc, what)
    if fault is not None:
        raise fault from None


def is_permanent(exc: BaseException) -> bool:
    """Whether retrying ``exc`` is pointless: missing/forbidden objects, bad values, 4xx other than
    408/429, malformed requests and missing credentials, anywhere in its chain of causes."""
    for cause in _causes(exc):
        if isinstance(cause, PERMANENT_ERRORS) or type(cause).__name__ in _PERMANENT_BOTOCORE:
            return True
        status = _http_status(cause)
        if status is not None and 400 <= status < 500 and status not in _RETRYABLE_CLIENT_STATUSES:
            return True
    return False


def with_retries(
    operation: Callable[[], T],
    *,
    what: str,
    attempts: int = 4,
    base_delay: float = 0.2,
    max_delay: float = 5.0,
) -> T:
    """Run ``operation``; retry transient errors with exponential backoff and jitter.

    Environment faults (no space, read-only, permission, missing bucket, refused credentials) raise a
    :class:`StorageFault` naming ``what`` at once; other permanent errors (missing object, bad value) are
    raised at once as they are. An HTTP 429/503 with Retry-After waits that long instead of the backoff, or
    fails at once beyond :data:`MAX_RETRY_AFTER_S`. URLs in error messages are redacted; a cause whose
    message had to be redacted is not chained.
    """
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except Exception as exc:  # transient (connection reset, 5xx, timeouts...) unless permanent
            _raise_if_fault(exc, what)
            if isinstance(exc, PERMANENT_ERRORS):
                _redact_exception(exc)
                raise
            if is_permanent(exc):
                raise StorageError(f"{what} failed: {redact_text(f'{type(exc).__name__}: {exc}')}") from None
            asked = _retry_after(exc)
            too_long = asked is not None and asked > MAX_RETRY_AFTER_S
            if attempt == attempts or too_long:
                raw = f"{type(exc).__name__}: {exc}"
                message = redact_text(raw)
                cause = exc if message == raw else None  # a redacted cause would leak through the chain
                why = (
                    f"failed: the server asks to retry after {asked:.0f} s (more than {MAX_RETRY_AFTER_S:.0f})"
                    if too_long
                    else f"failed after {attempt} attempts"
                )
                raise StorageError(f"{what} {why}: {message}") from cause
            backoff = min(max_delay, base_delay * 2 ** (attempt - 1)) * (0.5 + random.random())
            delay = backoff if asked is None else asked
            log.warning(
                "%s failed (%s), retry %d/%d in %.2fs", what, type(exc).__name__, attempt, attempts, delay
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def read_bytes(url: str, options: Options = None) -> bytes:
    """The whole object at ``url`` (or one tar member, see :func:`tar_member_url`).

    Raises FileNotFoundError when absent, StorageError when I/O keeps failing.
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
            raise ValueError(f"{redact(target)}: got {len(data)} bytes for a {size}-byte member range")
        return data

    return with_retries(read, what=f"read {redact(url)}")


def read_range(url: str, start: int, size: int, options: Options = None) -> bytes:
    """``size`` bytes of the object at ``url`` from byte ``start`` (one range request on object stores)."""
    fs, path = filesystem(url, options)

    def read() -> bytes:
        with _host_slot(url):
            data = fs.cat_file(path, start=start, end=start + size)
        if len(data) != size:  # a server that ignores Range, or an object shorter than its index says
            raise ValueError(f"{redact(url)}: got {len(data)} bytes for the {size}-byte range at {start}")
        return data

    return with_retries(read, what=f"read {redact(url)} [{start}, {start + size})")


_TAR_MEMBER = re.compile(r"(?P<tar>.+\.tar)#offset=(?P<offset>\d+)&size=(?P<size>\d+)")


def local_path(url: str) -> str | None:
    """The local file ``url`` reads (a tar member's: its tar), absolute; None when ``url`` is not local."""
    member = _TAR_MEMBER.fullmatch(url)
    target = member["tar"] if member else url
    if not is_local(target):
        return None
    return os.path.abspath(filesystem(target)[1])


def tar_member_url(tar_url: str, offset: int, size: int) -> str:
    """The URL :func:`read_bytes` reads one tar member's ``size`` data bytes at ``offset`` from."""
    return f"{tar_url}#offset={offset}&size={size}"


def list_tar_members(url: str, options: Options = None) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file in the uncompressed tar at ``url``, in archive order.

    Reads the headers in place (seeking past each member's data); raises ValueError for a non-tar.
    """
    try:
        with open_input(url, options) as f, tarfile.open(fileobj=f, mode="r:") as archive:
            return [(m.name, m.offset_data, m.size) for m in archive if m.isreg()]
    except tarfile.TarError as exc:
        raise ValueError(f"{redact(url)} is not a readable uncompressed tar: {exc}") from None


def read_text(url: str, options: Options = None) -> str:
    """The object at ``url`` as UTF-8 text; ValueError naming it when it is not (a binary file given as text)."""
    data = read_bytes(url, options)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{redact(url)} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


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
def open_input(url: str, options: Options = None) -> Iterator[IO[bytes]]:
    """A seekable binary file for random-access readers (pyarrow reads Parquet footers and row groups)."""
    fs, path = filesystem(url, options)
    f = with_retries(lambda: fs.open(path, "rb"), what=f"open {redact(url)}")
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


def read_parquet(url: str, options: Options = None, columns: list[str] | None = None) -> Any:
    """One Parquet object as a pyarrow Table (only ``columns`` when given)."""
    import pyarrow.parquet as pq

    with open_input(url, options) as f:
        return pq.read_table(f, columns=columns)
