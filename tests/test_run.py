"""The end-to-end `run`: every stage on the embedded demo, reuse of finished stages, config changes, CLI."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from rich.console import Console

from pipeline.cli import display
from pipeline.demo import DEMO_PHOTOS, write_demo
from pipeline.extraction import Extractors
from pipeline.run import STAGES, RunPaths, StageProgress, run_pipeline
from pipeline.runconfig import load_run_config, parse_run_config
from tests.tables import stored_matches

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shown() -> list[StageProgress]:
    """What the finished run gave its live display, in order."""
    return []


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, ray_cluster, shown):
    """The demo run once (2 views per photo), joining the session's Ray."""
    out = tmp_path_factory.mktemp("demo")
    config = replace(write_demo(str(out), views=2, preset="cpu-small"), ray_address=ray_cluster)
    return config, run_pipeline(config, show=shown.append)


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
    for name, url in (("global", paths.search), ("reranked", paths.reranked)):
        assert metrics[name]["all"]["mAP@100"] == pytest.approx(
            hand_map_at_100(url, config.data.ground_truth)
        )
        assert metrics[name]["all"]["queries"] == len(DEMO_PHOTOS)
    html = Path(paths.report).read_text()
    assert all(f"query-{p}" in html for p in DEMO_PHOTOS)
    embedding_map = html[html.index('<svg id="emap"') : html.index("</svg>", html.index('<svg id="emap"'))]
    indexed = pq.read_table(paths.index_store + "/global").num_rows  # every descriptor: below the sample cap
    assert embedding_map.count("<circle") == len(DEMO_PHOTOS) + indexed
    quality = json.loads(Path(paths.index, "quality.json").read_text())
    assert (
        quality["query_set"] == f"query store {paths.query_store}"
    )  # recall measured with the run's queries


def test_every_stage_shows_live_progress(finished_run, shown):
    """Issue 27: `run` showed no progress. Each stage starts and finishes on the display; extraction counts
    its rows as `extract` does, the index build its steps."""
    _, results = finished_run
    assert list(dict.fromkeys(p.stage for p in shown)) == list(STAGES)
    for stage in STAGES:
        own = [p for p in shown if p.stage == stage]
        assert own[0] == StageProgress(stage) and own[-1] == StageProgress(stage, finished=True)
    for stage in ("extract-index", "extract-queries"):
        counted = [p for p in shown if p.stage == stage and p.total is not None]
        rows = results[stage].summary["rows"]
        assert counted[-1].done == counted[-1].total == rows and "img/s" in counted[-1].detail
    steps = [(p.detail, p.done) for p in shown if p.stage == "build-index" and p.total == 3]
    assert steps == [("train", 0), ("add", 1), ("merge and recall", 2), ("done", 3)]


def test_the_console_shows_a_bar_per_stage(shown, monkeypatch):
    """The CLI's display of those updates: one bar per stage, complete at the end, in the order they ran."""
    console = Console(file=io.StringIO(), width=160)
    monkeypatch.setattr(display, "console", console)
    with display.StageBars() as bars:
        for progress in shown:
            bars.show(progress)
    lines = [line for line in console.file.getvalue().splitlines() if line.strip()]
    assert [line.split()[0] for line in lines] == list(STAGES)
    assert " 1/1 " in next(line for line in lines if line.startswith("evaluate"))
    for stage in ("search", "rerank"):  # they count queries, committed part by part
        last = [p for p in shown if p.stage == stage and p.total is not None][-1]
        assert last.done == last.total and f" {last.total}/{last.total} " in next(
            line for line in lines if line.startswith(stage)
        )
    assert " 3/3 " in next(line for line in lines if line.startswith("build-index"))


def hand_map_at_100(results_url: str, solution_csv: str, only: str | None = None) -> float:
    """GLDv2 retrieval mAP@100 written out plainly: AP@100 = Σ_k P(k)·rel(k) / min(#relevant, 100)."""
    relevant = {
        row["id"]: set(row["images"].split())
        for row in csv.DictReader(Path(solution_csv).read_text().splitlines())
    }
    table = pq.read_table(results_url).sort_by([("query_id", "ascending"), ("rank", "ascending")])
    ranked: dict[str, list[str]] = {}
    for query, hit in zip(table["query_id"].to_pylist(), table["id"].to_pylist(), strict=True):
        ranked.setdefault(query, []).append(hit)
    aps = []
    for query, truth in relevant.items():
        if only not in (None, query):
            continue
        hits = [hit in truth for hit in ranked.get(query, [])[:100]]
        precision_sum = sum(sum(hits[: k + 1]) / (k + 1) for k, rel in enumerate(hits) if rel)
        aps.append(precision_sum / min(len(truth), 100))
    return sum(aps) / len(aps)


def test_report_renders_from_outputs_alone(finished_run, tmp_path):
    """The report stage reads results, metrics and stage markers: rendering it again later, from the CLI,
    gives the same page. Inlier points are stored exactly for verified hits (none verify with the random
    demo weights; tests/test_rerank.py checks the stored points)."""
    config, _ = finished_run
    paths = RunPaths(config.out)
    reranked = pq.read_table(paths.reranked).to_pydict()
    stored, expected = stored_matches(reranked, config.rerank.rerank_config().keep_matches)
    assert stored == expected
    again = tmp_path / "again.html"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "report",
            str(Path(config.out) / "demo.toml"),
            "--out",
            str(again),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert again.read_text() == Path(paths.report).read_text()
    assert f"({len(DEMO_PHOTOS)} queries shown)" in result.stdout


def test_the_run_report_has_quality_errors_per_query_ap_and_provenance(finished_run):
    """Issue 27: the report's new sections hold the run's own figures."""
    import pipeline
    from tests.test_report import section

    config, _ = finished_run
    paths = RunPaths(config.out)
    page = Path(paths.report).read_text()
    quality = json.loads((Path(paths.index) / "quality.json").read_text())
    chosen = next(r for r in quality["rows"] if r["nprobe"] == quality["nprobe"])
    assert f"{100 * chosen['1-recall@1']:.1f}%" in section(page, "index-quality")
    assert "No failed rows" in section(page, "failed-rows")  # the demo's images all decode
    info = json.loads((Path(paths.index_store) / "_run.json").read_text())
    provenance = section(page, "provenance")
    assert pipeline.__version__ in provenance and info["preset"] in provenance
    table = section(page, "per-query-ap")
    for query in (f"query-{p}" for p in DEMO_PHOTOS):
        ap = hand_map_at_100(paths.reranked, config.data.ground_truth, only=query)
        assert f"{query}" in table and f"{100 * ap:.1f}%" in table


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
    assert config.extract.cluster(None).extractors == Extractors(1, min_extractors=1, max_extractors=4)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) extract\.presett"):
        parse_run_config({"out": "o", "data": {"index": "a", "queries": "b"}, "extract": {"presett": "x"}})
    with pytest.raises(ValueError, match=r"extract: max_extractors \(--max-extractors\) = 1; must be ≥ min"):
        parse_run_config(
            {
                "out": "o",
                "data": {"index": "a", "queries": "b"},
                "extract": {"min_extractors": 2, "max_extractors": 1},
            }
        )
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
