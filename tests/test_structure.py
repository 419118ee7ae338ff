"""The package's structure: light imports, short functions, and every front end (CLI, run config, jobs) offering
the settings of the library dataclasses it feeds, under the same name and default."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from jobs import index_manifest, nightly_reindex, train
from pipeline import runconfig, settings, settings_doc
from pipeline.aggregate import AggregateConfig
from pipeline.cli import app, catalog, options
from pipeline.evaluate import evaluate
from pipeline.execution import Workers
from pipeline.extraction import ClusterOptions, ExtractionJob
from pipeline.index import BuildConfig, SearchConfig, build_index
from pipeline.reindex import ReindexConfig
from pipeline.report import ReportSettings
from pipeline.rerank import RerankConfig, RerankRun
from pipeline.rerank.global_rerank import GlobalRerankConfig
from pipeline.serve.settings import ServeSettings
from pipeline.settings_help import HELP, help_entry, help_text
from pipeline.train import TrainCluster, TrainJob

ROOT = Path(__file__).resolve().parents[1]
GUARDS = {
    "allowed_schemes",
    "max_pixels",
    "origin_manifest_url",
}  # untrusted-input guards: no front end offers them


def test_importing_the_index_package_loads_neither_ray_nor_torch() -> None:
    code = "import sys, pipeline.index, pipeline.results; print(sorted({'ray', 'torch', 'PIL'} & set(sys.modules)))"
    shown = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert shown.stdout.strip() == "[]"


# ---------------------------------------------------------------- short functions

MAX_LINES = 60


def function_lengths(source: str) -> dict[str, int]:
    """Lines of each function; a CLI command's parameter list (a flat declaration of its options) not counted."""
    lengths = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            command = any("command" in ast.unparse(d) for d in node.decorator_list)
            start = node.body[0].lineno if command else node.lineno
            lengths[node.name] = node.end_lineno - start + 1
    return lengths


def test_no_function_in_the_library_is_longer_than_sixty_lines() -> None:
    lengths = {
        f"{path.relative_to(ROOT)}:{name}": n
        for path in sorted((ROOT / "pipeline").rglob("*.py"))
        for name, n in function_lengths(path.read_text()).items()
    }
    assert len(lengths) > 300  # every module was read
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}


def test_the_length_check_counts_a_long_function_and_skips_a_command_signature() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    params = "\n".join(f"    p{i}: int = {i}," for i in range(70))
    source = f"def long():\n{body}\n\n\n@app.command()\ndef flags(\n{params}\n) -> None:\n    pass\n"
    assert function_lengths(source) == {"long": 62, "flags": 1}


# ---------------------------------------------------------------- CLI options

# command → (the library dataclasses / stage functions it feeds, fields it does not offer as options and why,
# option spellings that differ from the setting's key)
COMMANDS = {
    # MANIFEST and OUT are arguments; config = --preset's ExtractionConfig
    "extract": ([ExtractionJob, ClusterOptions], {"manifest_url", "out_url", "config", *GUARDS}, {}),
    # MANIFEST and OUT are arguments; arcface_scale is the reference's fixed √2048 (jobs/train.py offers it);
    # crash_after_step is the resume tests' fault injection
    "train": (
        [TrainJob, TrainCluster],
        {"manifest_url", "out_url", "arcface_scale", "crash_after_step", *GUARDS},
        {},
    ),
    # options: from the environment; ray_address = --address; config = the BuildConfig options; k_factors is
    # a list (run config [index] k_factors, jobs' --k-factors 1,2,4)
    # in_process: a build without Ray, for small builds and tests (the command builds on Ray)
    "build-index": (
        [build_index, BuildConfig],
        {"options", "ray_address", "config", "k_factors", "in_process"},
        {"ray_address": "address"},
    ),
    "search": ([SearchConfig, Workers], set(), {}),
    "aggregate": ([AggregateConfig], set(), {}),
    # dba_k / dba_alpha shape the DBA vectors, which `dba --k --alpha` builds (rerank only reads them)
    "rerank": ([RerankConfig, GlobalRerankConfig, RerankRun], {"dba_k", "dba_alpha"}, {}),
    "evaluate": ([evaluate], {"options"}, {"landmarks_url": "landmarks", "out_url": "out"}),
    # the report of a run takes its settings from the run config's [report] section
    "report": ([ReportSettings], {f.name for f in dataclasses.fields(ReportSettings)}, {}),
    # build: the index settings of a retrain keep BuildConfig's defaults on the nightly path (the run config,
    # build-index and jobs/nightly_reindex.py offer them)
    "reindex": ([ReindexConfig], {"build", "row_group_size"}, {}),
    "serve": ([ServeSettings], set(), {}),
}


def cli_options(command: str) -> dict[str, object]:
    """Option key → default of a `landmark-index` command. The key is the parameter's name, which
    `given = dict(locals())` hands the library, and must be its long flag's spelling too."""
    params = typer.main.get_command(app).commands[command].params
    options = [p for p in params if p.param_type_name == "option"]
    flags = {p.name: max(p.opts, key=len).lstrip("-").replace("-", "_") for p in options}
    assert {name: flag for name, flag in flags.items() if name != flag} == {}, (
        "flags spelled unlike their keys"
    )
    return {p.name: p.default for p in options}


def expected_options(command: str) -> dict[str, settings.Setting]:
    sources, excluded, spelled = COMMANDS[command]
    found = [s for source in sources for s in settings.settings_of(source, excluded)]
    return {spelled.get(s.key, s.key): s for s in found}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_setting_of_a_command_is_an_option_with_the_library_default(command: str) -> None:
    options, expected = cli_options(command), expected_options(command)
    missing = sorted(set(expected) - set(options))
    assert not missing, f"`{command}` lacks options for library settings: {missing}"
    differ = {
        key: (options[key], s.default)
        for key, s in expected.items()
        if not s.required
        and options[key] != s.default
        # None on a re-ranking option: the descriptor stores' setting applies (config_from_stores)
        and not (options[key] is None and s.owner is RerankConfig)
    }
    assert not differ, f"`{command}` defaults differ from the library's (option, library): {differ}"


def test_the_option_check_catches_a_missing_option() -> None:
    @dataclasses.dataclass(frozen=True)
    class Grown(SearchConfig):
        new_setting: int = 1

    COMMANDS["search-grown"] = ([Grown], set(), {})
    try:
        assert "new_setting" in set(expected_options("search-grown")) - set(cli_options("search"))
    finally:
        del COMMANDS["search-grown"]


# ---------------------------------------------------------------- run config


SECTION_SOURCES = {  # section → (library sources, fields the run sets itself, run-only keys)
    "extract": (
        [ExtractionJob, ClusterOptions],
        {"manifest_url", "out_url", "config", "image_root", "address", *GUARDS},
        {"preset"},
    ),
    "index": ([build_index, BuildConfig], {"options", "ray_address", "config", "in_process"}, set()),
    "search": ([SearchConfig], set(), set()),
    "rerank": ([RerankConfig, GlobalRerankConfig, RerankRun], {"Workers.address"}, {"enabled", "method"}),
    "report": ([ReportSettings], set(), {"enabled"}),
}


@pytest.mark.parametrize("section", sorted(SECTION_SOURCES))
def test_run_config_sections_are_the_library_settings(section: str) -> None:
    sources, set_by_run, own = SECTION_SOURCES[section]
    library = {s.key: s for source in sources for s in settings.settings_of(source, set_by_run)}
    fields = {f.name: f for f in dataclasses.fields(runconfig.SECTIONS[section])}
    assert set(fields) == set(library) | own
    for key, s in library.items():
        # re-ranking keys left out take the stores' settings: unset (None) by default
        expected = None if s.owner is RerankConfig else s.default
        assert fields[key].default == expected, key


def test_every_run_config_key_is_documented_once() -> None:
    """docs/configuration.md lists each section's keys from runconfig.section_settings: exactly its fields."""
    keys = {"": {"out", "ray_address"}}
    keys |= {name: {f.name for f in dataclasses.fields(cls)} for name, cls in runconfig.SECTIONS.items()}
    documented = {name: [s.key for s, _ in runconfig.section_settings(name)] for name in keys}
    assert {name: set(found) for name, found in documented.items()} == keys
    assert all(len(found) == len(set(found)) for found in documented.values())


def test_the_generated_catalog_and_configuration_doc_are_current() -> None:
    """pipeline/cli/catalog.json (what --help shows) and docs/configuration.md are rendered from the
    dataclasses; regenerate: python -m pipeline.cli.catalog; python -m pipeline.settings_doc > docs/configuration.md"""
    assert options.CATALOG.read_text() == catalog.render(), f"stale catalog: run {options.REGENERATE}"
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert doc == settings_doc.render(), f"stale docs/configuration.md: run {settings_doc.COMMAND}"
    assert "| `--score` | inliers \\| saturate \\| shortlist \\| gate (or unset) | unset |" in doc


def every_offered_setting() -> list[settings.Setting]:
    """The settings some front end offers: the CLI's, the run config's and the jobs'."""
    found = [s for name in ["", *runconfig.SECTIONS] for s, _ in runconfig.section_settings(name)]
    found += [
        s
        for sources, excluded, _ in COMMANDS.values()
        for src in sources
        for s in settings.settings_of(src, excluded)
    ]
    return found + [
        s
        for _, _, sources, set_here, _ in JOBS.values()
        for src in sources
        for s in settings.settings_of(src, set_here)
    ]


def test_every_setting_has_one_help_text_and_every_text_a_setting() -> None:
    found = every_offered_setting()
    missing = sorted(
        {
            f"{s.owner.__name__}.{s.key}"
            for s in found
            if not (s.metadata.get("help") or s.key in HELP or f"{s.owner.__name__}.{s.key}" in HELP)
        }
    )
    assert missing == [], "settings without help (pipeline/settings_help.py HELP)"
    used = {help_entry(s) for s in found if "help" not in s.metadata} | {"preset", "address"}
    assert sorted(set(HELP) - used) == [], "help texts of no setting"
    assert all(help_text(s).strip() for s in found)


def test_a_command_refuses_to_run_with_a_stale_catalog(monkeypatch: pytest.MonkeyPatch) -> None:
    """A setting added to a dataclass but not to the catalog would have no flag: the command says so (a bug,
    exit 1) instead of running without it."""
    stale = {name: entries[:-1] for name, entries in json.loads(options.CATALOG.read_text()).items()}
    monkeypatch.setattr(options, "_catalog", lambda: stale)
    result = CliRunner().invoke(app, ["search", "i", "q", "o"])
    assert isinstance(result.exception, RuntimeError)
    assert "pipeline/cli/catalog.json is stale for `search`" in str(result.exception)


def test_unset_is_none_and_an_empty_string_unsets() -> None:
    data = {"index": "i", "queries": "q"}
    config = runconfig.parse_run_config(
        {"out": "o", "ray_address": "", "data": {**data, "landmarks": ""}, "index": {"factory": ""}}
    )
    assert (config.ray_address, config.data.landmarks, config.index.factory) == (None, None, None)
    assert config.data.ground_truth is None and config.extract.weights is None
    assert config.search.search_config().nprobe is None
    with pytest.raises(ValueError, match=r"search: nprobe=0; must be ≥ 1; leave it unset"):
        runconfig.parse_run_config({"out": "o", "data": data, "search": {"nprobe": 0}})
    with pytest.raises(ValueError, match=r"index\.k_factors=\[1, 'x'\] must be a list of int"):
        runconfig.parse_run_config({"out": "o", "data": data, "index": {"k_factors": [1, "x"]}})


def test_every_library_setting_reaches_the_object_the_run_builds() -> None:
    """A key given in the file arrives in the library object built from its section (no key is dropped)."""
    data = {"index": "i", "queries": "q"}
    raw = {
        "extract": {"max_extractors": 3, "row_group_size": 7, "compile": True, "decode_cpus": 0.5},
        "index": {
            "target_recall": 0.9,
            "recall_sample": 50,
            "k_factors": [1, 2],
            "tasks": 2,
            "factory": "Flat",
        },
        "search": {"k": 7, "nprobe": 3},
        "rerank": {"trials": 10, "keep_matches": 1, "sg_k": 4},
        "report": {"max_hits": 4},
    }
    config = runconfig.parse_run_config({"out": "o", "data": data, **raw})
    job, cluster = config.extract.job("m", "o", None), config.extract.cluster(None)
    assert (cluster.extractors.max_extractors, job.store.row_group_size, cluster.runtime.compile) == (
        3,
        7,
        True,
    )
    assert cluster.decode_cpus == 0.5
    build = config.index.build_config()
    assert (build.quality.target, build.quality.queries, build.quality.k_factors, build.tasks) == (
        0.9,
        50,
        (1, 2),
        2,
    )
    assert config.index.build_arguments() == {"factory": "Flat"}
    assert config.search.search_config() == SearchConfig(k=7, nprobe=3)
    assert config.rerank.overrides() == {"trials": 10, "keep_matches": 1}
    assert config.rerank.global_rerank_config() == GlobalRerankConfig(sg_k=4)
    assert config.report.report_settings() == ReportSettings(max_hits=4)


# ---------------------------------------------------------------- jobs

# job → (module, minimal argv, library sources, fields it sets itself, its own arguments: the job's inputs
# and the period of its progress lines in `ray job logs`)
JOBS = {
    "index_manifest": (
        index_manifest,
        ["--manifest", "m", "--out", "o", "--preset", "p"],
        [ExtractionJob, ClusterOptions, build_index, BuildConfig],
        {"manifest_url", "out_url", "config", "address", "options", "ray_address", "in_process", *GUARDS},
        {"manifest", "out", "preset", "address", "progress_interval"},
    ),
    "nightly_reindex": (
        nightly_reindex,
        ["--manifest", "m", "--root", "r", "--preset", "p"],
        [ReindexConfig],
        {"Workers.address"},
        {"manifest", "root", "address", "progress_interval"},
    ),
    "train": (
        train,
        ["--manifest", "m", "--out", "o", "--preset", "p"],
        [TrainJob, TrainCluster],
        {"manifest_url", "out_url", "address", "crash_after_step", *GUARDS},
        {"manifest", "out", "address", "progress_interval"},
    ),
}


@pytest.mark.parametrize("job", sorted(JOBS))
def test_every_setting_of_a_job_is_an_argument_with_the_library_default(job: str) -> None:
    module, argv, sources, set_here, own = JOBS[job]
    args = vars(module.parse_args(argv))
    library = {s.key: s for source in sources for s in settings.settings_of(source, set_here)}
    assert set(args) - own == set(library)
    differ = {k: (args[k], s.default) for k, s in library.items() if not s.required and args[k] != s.default}
    assert not differ


def test_job_arguments_parse_into_the_library_types() -> None:
    args = index_manifest.parse_args(
        ["--manifest", "m", "--out", "o", "--preset", "p", "--k-factors", "1,4", "--compile", "--tasks", "2"]
    )
    assert (args.k_factors, args.compile, args.tasks) == ((1, 4), True, 2)
    built = settings.build(BuildConfig, vars(args))
    assert built.quality.k_factors == (1, 4) and built.tasks == 2
    reindex = nightly_reindex.parse_args(
        ["--manifest", "m", "--root", "r", "--preset", "p", "--dba", "--weights", "", "--memory-budget", ""]
    )
    assert reindex.dba and (reindex.weights, reindex.memory_budget) == (None, None)  # "" from an empty $VAR
