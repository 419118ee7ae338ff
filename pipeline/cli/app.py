"""The `landmark-index` app: its consoles, the global options and the error boundary of every command."""

from __future__ import annotations

import importlib.metadata
import logging
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from pipeline import storage
from pipeline.boundary import EXIT_USER_ERROR, error_line, user_error

app = typer.Typer(
    help="Distributed batch indexing for landmark image retrieval: DELG extraction on Ray, FAISS IVF-PQ "
    "indexing, geometric re-ranking, evaluation.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)
# Tables go to stdout; when it is a pipe or file, rich would wrap at 80 columns and split names.
stdout = Console() if sys.stdout.isatty() else Console(width=200)


def _print_version(requested: bool) -> None:
    if requested:
        stdout.print(f"landmark-index {importlib.metadata.version('landmark-index')}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more.")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    storage.install_log_redaction()
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def main() -> None:
    """Console-script entry point: the CLI with one error boundary for every command (pipeline.boundary):
    a user error or environment fault, also one raised in a Ray task, is one line and exit code 2."""
    try:
        app()
    except Exception as exc:
        error = user_error(exc)
        if error is None:
            raise
        console.print(f"[bold red]error:[/] {escape(error_line(error))}", soft_wrap=True)
        raise SystemExit(EXIT_USER_ERROR) from None
