"""The `landmark-index` console entry point (``pipeline.cli.main``) run in the test process.

For tests that are not about the process boundary: the same arguments, error boundary and exit code as the
installed command, without an interpreter start-up and its imports. On the session's Ray it also reuses the
session job's warm workers: a command of its own is a new Ray job, whose workers import torch anew.
"""

from __future__ import annotations

import io
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass

from pipeline import cli


@dataclass(frozen=True)
class Ran:
    """What a command left: named like subprocess.CompletedProcess's fields, so checks read the same."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> Ran:
    """``landmark-index ARGS`` in this process; its exit code and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["landmark-index", *args]
    try:
        with redirect_stdout(out), redirect_stderr(err):
            cli.main()
        code = 0  # click exits through SystemExit even on success; a return is a success too
    except SystemExit as exited:
        code = exited.code if isinstance(exited.code, int) else (0 if exited.code is None else 1)
        if isinstance(exited.code, str):  # what the interpreter would print before exiting with 1
            err.write(exited.code + "\n")
    finally:
        sys.argv = argv
    return Ran(code, out.getvalue(), err.getvalue())
