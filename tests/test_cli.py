"""The `landmark-index` command line as a user runs it: every stage command on small stores, clear errors."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import cli as cli_module
from pipeline import store
from pipeline.config import rerank_settings
from pipeline.index import SearchSummary
from pipeline.index.dba import read_dba
from pipeline.index.io import read_id_map
from pipeline.results import read_metadata
from tests.inprocess import Ran, run_cli
from tests.stores import write_clustered_store
from tests.tables import table_rows

COMMANDS = (
    "presets",
    "convert-weights",
    "dba",
    "extract",
    "stats",
    "migrate-store",
    "build-index",
    "index-add",
    "index-remove",
    "search",
    "rerank",
    "aggregate",
    "evaluate",
    "run",
    "report",
    "demo",
    "reindex",
    "latest",
    "query",
    "serve",
    "train",
)


def command(*args: str, check: bool = True, columns: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a command of its own; ``columns`` widens rich's output so that no choice list is
    wrapped mid-word."""
    env = {**os.environ, "COLUMNS": str(columns)} if columns else None
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=300, env=env
    )
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def cli(*args: str, check: bool = True) -> Ran:
    """Run the CLI's entry point in this process (the stage commands: no interpreter start-up and imports
    per command, and the session's warm Ray workers)."""
    result = run_cli(*args)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_help_lists_every_command():
    panel = command("--help").stdout.split("Commands")[1].splitlines()[1:]
    listed = [line[2:].split()[0] for line in panel if line.startswith("│ ") and line[2] != " "]
    assert sorted(listed) == sorted(COMMANDS)  # continuation lines of long descriptions start with spaces
    assert "delg-r50-gldv2" in table_rows(command("presets").stdout)


def test_stage_commands_chain(tmp_path: Path, ray_cluster: str):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 32)).astype(np.float32)
    index_store, query_store = str(tmp_path / "idx"), str(tmp_path / "qry")
    write_clustered_store(index_store, "img", 40, rng, centres)
    write_clustered_store(query_store, "q", 4, rng, centres)
    index, results, reranked = (
        str(tmp_path / "index"),
        str(tmp_path / "r.parquet"),
        str(tmp_path / "rr.parquet"),
    )

    built = cli(
        "build-index",
        index_store,
        index,
        "--address",
        ray_cluster,
        "--tasks",
        "2",
        "--recall-queries",
        query_store,
    )
    assert table_rows(built.stdout)["factory"] == "IDMap2,Flat"  # 40 vectors: too few for IVF-PQ
    quality = json.loads((tmp_path / "index" / "quality.json").read_text())
    assert quality["query_set"] == f"query store {query_store}" and quality["queries"] == 4
    searched = table_rows(cli("search", index, query_store, results, "--k", "10").stdout)
    assert list(searched) == [f.name for f in fields(SearchSummary)]  # the summary, field by field
    assert (searched["queries"], searched["rows"], searched["k"], searched["out"]) == (
        "4",
        "40",
        "10",
        results,
    )
    table = pq.read_table(results)
    assert table.num_rows == 40 and sorted(set(table.column("rank").to_pylist())) == list(range(1, 11))
    # Query q000 is near centre 0: its top 10 are the 10 index images of centre 0.
    top = [r["id"] for r in table.to_pylist() if r["query_id"] == "q000"]
    assert {int(i[3:]) % 4 for i in top} == {0}

    cli("rerank", results, query_store, index_store, reranked, "--top", "5", "--trials", "50")
    assert {"inliers", "global_score"} <= set(pq.read_table(reranked).column_names)
    used = json.loads(read_metadata(reranked)["rerank_config"])
    assert (used["score"], used["residual_in"], used["trials"]) == (
        "inliers",
        "query",
        50,
    )  # no settings stored
    # stores that record their preset's settings: those are used, flags given override them
    for url in (index_store, query_store):
        store.write_run_info(url, {"rerank": rerank_settings("backbone")})
    cli("rerank", results, query_store, index_store, reranked, "--top", "5", "--threshold", "7")
    used = json.loads(read_metadata(reranked)["rerank_config"])
    assert (used["score"], used["threshold"], used["trials"], used["top"]) == ("gate", 7.0, 1000, 5)

    truth = tmp_path / "truth.csv"
    rows = [f"q{q:03d},{' '.join(f'img{i:03d}' for i in range(q, 40, 4))},Public" for q in range(4)]
    truth.write_text("id,images,Usage\n" + "\n".join(rows) + "\n")
    metrics = tmp_path / "m.json"
    shown = cli("evaluate", results, str(truth), "--protocol", "gldv2-retrieval", "--out", str(metrics))
    assert table_rows(shown.stdout)["all"].split()[0] == "100.00"  # mAP@100 in %
    assert json.loads(metrics.read_text())["all"]["mAP@100"] == pytest.approx(1.0)

    doomed = tmp_path / "doomed.txt"
    doomed.write_text("img000\nimg004\n")
    refined = table_rows(cli("dba", index, index_store, "--k", "3").stdout)  # index-add/-remove keep it
    assert refined == {
        "images": "40",
        "k": "3",
        "alpha": "3.0",
        "out": str(tmp_path / "index" / "dba.parquet"),
    }
    assert table_rows(cli("index-remove", index, str(doomed)).stdout) == {"removed": "2", "ntotal": "38"}
    extra = str(tmp_path / "extra")
    write_clustered_store(extra, "new", 3, rng, centres)
    added = cli("index-add", index, extra)
    assert table_rows(added.stdout) == {"added": "3", "ntotal": "41"}  # after adding 3 to 38
    assert sorted(read_dba(index).ids) == sorted(read_id_map(index)[1])


HEAVY_MODULES = ("torch", "torchvision", "faiss", "ray", "tensorflow", "numpy", "pyarrow", "fsspec")


@pytest.mark.parametrize(
    "arguments", [["--help"], ["--version"], ["extract", "--help"], ["rerank", "--help"]]
)
def test_help_and_version_import_no_model_or_index_library(arguments: list[str]):
    """`landmark-index --help/--version` and a command's --help (its options generated from the settings, read
    from pipeline/cli/catalog.json) must start fast: none of torch, faiss, Ray, TensorFlow (seconds each),
    numpy, pyarrow or fsspec is imported; only the commands that use them do. (Start-up time itself is a
    benchmark: benchmarks/bench_startup.py.)"""
    probe = (
        "import sys\n"
        f"sys.argv = ['landmark-index', *{arguments!r}]\n"
        "from pipeline.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert exit.code in (0, None), exit.code\n"
        f"print(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))\n"
    )
    shown = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert "landmark-index" in shown.stdout
    assert shown.stdout.splitlines()[-1] == "[]"


def test_lazy_packages_export_what_their_submodules_define():
    """pipeline.index / .rerank / .model name their API without importing it; an export spelled like its
    submodule (the function ``search`` of ``pipeline.index.search``) stays the function, as with eager imports."""
    probe = (
        "import sys, types\n"
        "import pipeline.index.search, pipeline.rerank.match, pipeline.rerank.verify\n"
        "from pipeline.index import search\n"
        "from pipeline.rerank import match, verify\n"
        "import pipeline.model as model\n"
        "assert not any(isinstance(f, types.ModuleType) for f in (search, match, verify))\n"
        "assert search is sys.modules['pipeline.index.search'].search\n"
        "assert model.BACKBONES is sys.modules['pipeline.model.backbones'].BACKBONES\n"
        "try:\n    model.NoSuchName\nexcept AttributeError as e:\n    print(e)\n"
    )
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "module 'pipeline.model' has no attribute 'NoSuchName'"


def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path: Path):
    missing = cli(
        "search",
        str(tmp_path / "no-index"),
        str(tmp_path / "no-store"),
        str(tmp_path / "o.parquet"),
        check=False,
    )
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    bad_preset = cli("extract", str(tmp_path), str(tmp_path / "out"), "--preset", "delg-r51", check=False)
    assert bad_preset.returncode == 2 and "delg-r50-gldv2" in bad_preset.stderr  # names the allowed presets
    bad_pool = cli(
        "extract", str(tmp_path), "o", "--min-extractors", "2", "--max-extractors", "1", check=False
    )
    assert bad_pool.returncode == 2 and "Traceback" not in bad_pool.stderr
    assert "max_extractors (--max-extractors) = 1; must be ≥ min_extractors (2)" in bad_pool.stderr


def test_version_and_choices_are_shown_and_checked(tmp_path: Path):
    version = command("--version").stdout.split()
    assert version == ["landmark-index", importlib.metadata.version("landmark-index")]
    shown = command("rerank", "--help", columns=300).stdout
    assert "superglobal+verify" in shown and "saturate" in shown and "homography" in shown
    bad = command("evaluate", "r.parquet", "gt.csv", "--protocol", "trec", check=False)
    assert bad.returncode == 2 and "gldv2-recognition" in bad.stderr and "Traceback" not in bad.stderr


def test_stats_counts_as_json_and_a_missing_store_is_a_user_error(tmp_path: Path):
    rng = np.random.default_rng(1)
    url = str(tmp_path / "store")
    write_clustered_store(url, "img", 10, rng, rng.standard_normal((2, 32)).astype(np.float32))
    counts = json.loads(cli("stats", url, "--json").stdout)
    assert counts == {"shards": 2, "rows": 10, "ok": 10, "errors": 0, "errors_by_reason": {}}  # 8 + 2 rows
    missing = cli("stats", str(tmp_path / "typo"), check=False)
    assert missing.returncode == 2 and "no descriptor store" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_internal_errors_keep_their_traceback(monkeypatch: pytest.MonkeyPatch):
    """A bug (a bare KeyError here) must not be dressed up as a user error with exit code 2."""
    monkeypatch.setattr(cli_module.app, "registered_commands", list(cli_module.app.registered_commands))

    @cli_module.app.command("crash")
    def crash() -> None:
        raise KeyError("an internal lookup")

    monkeypatch.setattr(sys, "argv", ["landmark-index", "crash"])
    with pytest.raises(KeyError, match="an internal lookup"):
        cli_module.main()


def test_vlad_stores_index_and_search_like_any_store(tmp_path, ray_cluster):
    """aggregate (codebook trained on the index store) → aggregate the queries with the index's codebook →
    build-index → search: a query that is an indexed image finds itself first."""
    rng = np.random.default_rng(5)
    images = str(tmp_path / "images")
    write_clustered_store(images, "img", 16, rng, rng.standard_normal((4, 8)).astype(np.float32))
    vlad, queries = str(tmp_path / "vlad"), str(tmp_path / "vlad-queries")
    cli("aggregate", images, vlad, "--clusters", "4", "--sample-images", "16")
    cli("aggregate", images, queries, "--codebook", vlad)
    index, results = str(tmp_path / "index"), str(tmp_path / "results.parquet")
    cli("build-index", vlad, index, "--address", ray_cluster)
    cli("search", index, queries, results, "--k", "3")
    table = pq.read_table(results).to_pylist()
    first = {r["query_id"]: r["id"] for r in table if r["rank"] == 1}
    assert len(first) == 16 and all(q == i for q, i in first.items())
    assert store.read_global(vlad)[1].shape == (16, 4 * 128)
    missing = cli(
        "aggregate", images, str(tmp_path / "q2"), "--codebook", str(tmp_path / "nowhere"), check=False
    )
    assert missing.returncode == 2 and "no VLAD codebook" in missing.stderr
