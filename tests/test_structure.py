"""The package's structure: light imports, and every front end (CLI, run config, jobs) offering the settings of
the library dataclass it feeds, under the same name and default."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import typer.main

from jobs import index_manifest, nightly_reindex
from pipeline.cli import app
from pipeline.config import RuntimeOptions
from pipeline.extraction import ClusterOptions, ExtractionJob, Extractors
from pipeline.reindex import ReindexConfig
from pipeline.rerank import RerankConfig
from pipeline.rerank.global_rerank import GlobalRerankConfig
from pipeline.runconfig import ExtractSection, RerankSection
from pipeline.store import StoreSettings

# CLI name → library field name, where the CLI spells it differently (a Python keyword, or a URL field).
RENAMED = {"compile_model": "compile", "weights": "weights_url"}


def cli_options(command: str) -> dict[str, object]:
    """Option name (python spelling) → default of a `landmark-index` command."""
    params = typer.main.get_command(app).commands[command].params
    return {RENAMED.get(p.name, p.name): p.default for p in params if p.param_type_name == "option"}


def defaults(*classes: type) -> dict[str, object]:
    out: dict[str, object] = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
            else:
                out.setdefault(f.name, None)
    return out


def test_importing_the_index_package_loads_neither_ray_nor_torch() -> None:
    code = "import sys, pipeline.index, pipeline.results; print(sorted({'ray', 'torch', 'PIL'} & set(sys.modules)))"
    shown = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert shown.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("command", "classes", "positional"),
    [
        # method and index are rerank()'s own arguments (which stage variant runs, where DBA vectors are)
        ("rerank", (RerankConfig, GlobalRerankConfig), {"method", "index"}),
        ("extract", (ExtractionJob, StoreSettings, RuntimeOptions, ClusterOptions, Extractors), {"preset"}),
        ("reindex", (ReindexConfig, Extractors), set()),
    ],
)
def test_cli_options_are_library_fields_with_their_defaults(
    command: str, classes: tuple, positional: set
) -> None:
    library = defaults(*classes)
    options = cli_options(command)
    unknown = set(options) - set(library) - positional - {"address"}
    assert not unknown, f"`{command}` options without a library field: {sorted(unknown)}"
    differ = {
        name: (value, library[name])
        for name, value in options.items()
        # None: "take the setting recorded in the descriptor stores" (re-ranking), not a default of its own
        if name in library and name != "preset" and value is not None and value != library[name]
    }
    assert not differ, f"`{command}` defaults differ from the library's: {differ}"


def test_run_config_sections_are_library_fields() -> None:
    rerank_fields = set(defaults(RerankConfig, GlobalRerankConfig))
    assert {f.name for f in dataclasses.fields(RerankSection)} - {"enabled", "method"} <= rerank_fields
    extract_fields = set(defaults(ExtractionJob, StoreSettings, RuntimeOptions, Extractors)) | {
        "preset",
        "weights",
    }
    assert {f.name for f in dataclasses.fields(ExtractSection)} <= extract_fields


def test_jobs_offer_what_the_cli_offers() -> None:
    """A job and the CLI command it wraps take the same settings (a new one cannot miss a front end); only
    jobs print periodic progress lines (the CLI has its progress bar)."""
    job_only = {"progress_interval"}
    reindex_job = set(vars(nightly_reindex.parse_args(["--manifest", "m", "--root", "r", "--preset", "p"])))
    reindex_job -= job_only
    reindex_cli = set(cli_options("reindex")) | {"manifest", "root"}
    assert reindex_job ^ {"weights"} == reindex_cli ^ {"weights_url"}
    index_job = set(vars(index_manifest.parse_args(["--manifest", "m", "--out", "o", "--preset", "p"])))
    index_job -= job_only
    offered = set(cli_options("extract")) | set(cli_options("build-index")) | {"manifest", "out", "weights"}
    assert index_job <= offered
