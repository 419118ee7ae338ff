"""The `landmark-index` command line: thin shells that parse arguments and call the library stages.

Each command's setting options are generated from the library dataclasses it feeds (pipeline.cli.options);
a module per group of commands registers them on the one app (pipeline.cli.app). Storage credentials never
go on the command line: they come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL, ...) or from LANDMARK_INDEX_STORAGE_OPTIONS (JSON fsspec options).
"""

from __future__ import annotations

# isort: off  (each module registers its commands, in the order `landmark-index --help` lists them)
from pipeline.cli import index, rerank, runs, serving, stores  # noqa: F401
from pipeline.cli.app import app, main

# isort: on

__all__ = ["app", "main"]
