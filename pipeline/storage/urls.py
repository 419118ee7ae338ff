"""URLs and paths: which fsspec filesystem and options serve a URL, joining, tar-member addresses, and the
per-host slots and User-Agent of http(s) reads."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import posixpath
import re
import threading
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pipeline import __version__
from pipeline.errors import ConfigError
from pipeline.storage.redaction import redact, remember_secrets

if TYPE_CHECKING:
    import fsspec


Options = Mapping[str, Any] | None
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
                raise ConfigError(f"LANDMARK_INDEX_HTTP_PER_HOST must be a positive count, got {limit}")
            _host_slots[host] = threading.BoundedSemaphore(limit)
        return _host_slots[host]


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
            raise ConfigError(
                f"option content_md5 applies to s3:// URLs only, not {protocol}:// ({redact(url)})"
            )
        if "session" in kwargs:
            raise ConfigError(
                "option content_md5 cannot be combined with a 'session' option (it brings its own)"
            )
        kwargs["session"] = _content_md5_session()
    if _is_http(url):
        # One pooled client session per process (connection reuse), bounded timeouts.
        import aiohttp

        kwargs.setdefault("client_kwargs", {"timeout": aiohttp.ClientTimeout(total=60, sock_connect=10)})
        kwargs["client_kwargs"] = {"headers": {"User-Agent": user_agent()}, **kwargs["client_kwargs"]}
    if protocol_of(url) in ("s3", "s3a"):
        # pipeline.storage.retries is the one retry layer: botocore makes one attempt per call (s3fs's own
        # retry loop is turned off below), so a failing request costs 4 attempts, not 4 × 5 × 5.
        kwargs["config_kwargs"] = {"retries": {"total_max_attempts": 1}, **kwargs.get("config_kwargs", {})}
    try:
        fs, path = url_to_fs(url, **kwargs)
    except ImportError as exc:
        extra = EXTRAS.get(protocol_of(url))
        if extra is None:
            raise
        raise ConfigError(
            f"{redact(url)}: {protocol_of(url)}:// needs the {extra!r} extra: pip install 'landmark-index[{extra}]'"
        ) from exc
    if protocol_of(url) in ("s3", "s3a"):
        fs.retries = 1  # s3fs's loop around each call: one attempt (a class attribute, not an option)
    return fs, path


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
        raise ConfigError(
            f"LANDMARK_INDEX_STORAGE_OPTIONS is not valid JSON ({exc.msg}); expected an object"
        ) from None
    if not isinstance(value, dict):
        raise ConfigError("LANDMARK_INDEX_STORAGE_OPTIONS must be a JSON object of fsspec storage options")
    return value


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
