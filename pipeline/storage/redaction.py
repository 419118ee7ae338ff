"""Credentials kept out of every message and log line: URLs without user info or query, known secret values blanked."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import suppress
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit


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


def remember_secrets(url: str | None = None, options: Mapping[str, Any] | None = None) -> None:
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
