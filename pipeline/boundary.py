"""The error boundary of the CLI and the Ray jobs: a project user error gets one line and exit code 2.

Exit codes: 0 done, 1 an internal error (with its traceback: a bug to report), 2 a user error or an
environment fault (the line says what and where; see :mod:`pipeline.errors` for the types), 3 another run
holds the lock (reindex).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from typing import Any

from pipeline import storage
from pipeline.errors import USER_ERRORS
from pipeline.storage import redact_text

EXIT_USER_ERROR = 2


def _ray_task_error() -> type[BaseException] | None:
    """Ray's wrapper of an exception raised in a task, when Ray is loaded (never import Ray just for this)."""
    exceptions = sys.modules.get("ray.exceptions")
    return getattr(exceptions, "RayTaskError", None)


def user_error(exc: BaseException) -> BaseException | None:
    """The user-fixable error behind ``exc``: itself, the error a Ray task raised (``RayTaskError.cause``;
    the wrapper also subclasses the cause's type, so it is checked first), or a Ray task error ``exc`` was
    raised from. None for anything else: a bug keeps its traceback."""
    task_error = _ray_task_error()
    current: BaseException | None = exc
    while current is not None:
        if task_error is not None and isinstance(current, task_error):
            current = current.cause
        elif isinstance(current, USER_ERRORS):
            return current
        elif task_error is not None and isinstance(current.__cause__, task_error):
            current = current.__cause__
        else:
            return None
    return None


def error_line(exc: BaseException) -> str:
    """``exc``'s message as one redacted line."""
    return " ".join(redact_text(str(exc)).split())


def run_job(name: str, work: Callable[[], Mapping[str, Any]]) -> int:
    """A Ray job's shell: logs redacted, ``work()``'s summary printed as one redacted JSON line (exit 0), a
    user error as one line "``name`` failed: Type: message" on stderr (exit 2); a bug raises (exit 1)."""
    storage.install_log_redaction()
    try:
        summary = work()
    except Exception as exc:
        error = user_error(exc)
        if error is None:
            raise
        print(f"{name} failed: {type(error).__name__}: {error_line(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(redact_text(json.dumps(summary, sort_keys=True)))
    return 0
