"""The end-to-end `run`: every stage on the embedded demo, reuse of finished stages, config changes, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.demo import DEMO_PHOTOS, write_demo
from pipeline.run import STAGES, RunPaths, run_pipeline
from pipeline.runconfig import load_run_config, parse_run_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, ray_cluster):
    """The demo run once (2 views per photo), joining the session's Ray."""
    out = tmp_path_factory.mktemp("demo")
    config = replace(write_demo(str(out), views=2, preset="cpu-small"), ray_address=ray_cluster)
    return config, run_pipeline(config)


def test_every_stage_runs_and_writes_its_output(finished_run):
    config, results = finished_run
    assert list(results) == list(STAGES)
    assert not any(r.reused for r in results.values())
    paths = RunPaths(config.out)
    search = pq.read_table(paths.search)
    assert set(search.column("query_id").to_pylist()) == {f"query-{p}" for p in DEMO_PHOTOS}
    reranked = pq.read_table(paths.reranked)
    assert {"inliers", "global_score"} <= set(reranked.column_names)
    metrics = json.loads(Path(paths.metrics).read_text())
    assert set(metrics) == {"global", "reranked"}
    assert 0 <= metrics["global"]["all"]["mAP@100"] <= 1 and metrics["global"]["all"]["queries"] == len(
        DEMO_PHOTOS
    )
    html = Path(paths.report).read_text()
    assert all(f"query-{p}" in html for p in DEMO_PHOTOS)


def test_rerun_reuses_everything_and_a_change_reruns_downstream(finished_run):
    config, first = finished_run
    again = run_pipeline(config)
    assert all(r.reused for r in again.values())
    assert {k: r.key for k, r in again.items()} == {k: r.key for k, r in first.items()}
    changed = run_pipeline(replace(config, search=replace(config.search, k=5)))
    reran = {name for name, r in changed.items() if not r.reused}
    assert reran == {"search", "rerank", "evaluate", "report"}
    assert max(pq.read_table(RunPaths(config.out).search).column("rank").to_pylist()) == 5


def test_a_stage_killed_before_its_marker_runs_again(finished_run):
    config, _ = finished_run
    paths = RunPaths(config.out)
    run_pipeline(config)  # every marker matches this config again
    Path(paths.marker("rerank")).unlink()
    results = run_pipeline(config)
    # Same parameters, same inputs: the re-run stage has the same key, so later outputs stay valid.
    assert [n for n, r in results.items() if not r.reused] == ["rerank"]


def test_shipped_example_config_is_valid():
    config = load_run_config(str(ROOT / "configs/example.toml"))
    assert config.extract.preset == "delg-r50-gldv2" and config.index.memory_budget == "16GB"


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) extract\.presett"):
        parse_run_config({"out": "o", "data": {"index": "a", "queries": "b"}, "extract": {"presett": "x"}})
    with pytest.raises(ValueError, match=r"rerank: score='best'"):
        parse_run_config({"out": "o", "data": {"index": "a", "queries": "b"}, "rerank": {"score": "best"}})
    mutual = parse_run_config(
        {"out": "o", "data": {"index": "a", "queries": "b"}, "rerank": {"mutual": True}}
    )
    assert mutual.rerank.rerank_config().mutual and mutual.rerank.rerank_config().ratio is None
    bad = tmp_path / "bad.toml"
    bad.write_text("out = 'o'\n[data\n")
    with pytest.raises(ValueError, match="invalid TOML"):
        load_run_config(str(bad))
    relative = tmp_path / "sub" / "run.yaml"
    relative.parent.mkdir()
    relative.write_text("out: results\ndata: {index: m.parquet, queries: q.parquet}\n")
    assert load_run_config(str(relative)).data.index == str(relative.parent / "m.parquet")


def test_cli_run_reports_a_bad_config_clearly(tmp_path):
    bad = tmp_path / "run.toml"
    bad.write_text("out = 'o'\n[data]\nindex = 'a'\nqueries = 'b'\nprotocol = 'oxford'\n")
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "data.protocol='oxford'" in result.stderr and "Traceback" not in result.stderr
