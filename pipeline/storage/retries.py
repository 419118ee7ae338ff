"""One retry layer for all storage calls: transient errors are retried with backoff (the S3 client's own
retries are off, see :mod:`pipeline.storage.urls`); faults only the user can fix fail at once as one line."""

from __future__ import annotations

import email.utils
import errno
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import TypeVar

from pipeline import metrics
from pipeline.errors import MissingInputError, UserError
from pipeline.storage.redaction import _redact_exception, redact_text

log = logging.getLogger(__name__)
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


class MissingObject(MissingInputError):
    """The object (or folder) an operation asked for does not exist; its one-line message names the operation
    and the redacted path. Still a FileNotFoundError for callers that treat absence as "nothing there"."""


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
            if isinstance(exc, FileNotFoundError) and not isinstance(exc, UserError):
                raise MissingObject(f"{what}: not found") from None
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
            metrics.count("storage_retries", 1)
            time.sleep(delay)
    raise AssertionError("unreachable")
