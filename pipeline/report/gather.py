"""Gathering a run's data for its report from the run's files alone (nothing is recomputed): results
files, metrics.json, stage markers, the stores' error records and run metadata, the index's quality.json,
the manifests' images, the ground truth."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import pipeline
from pipeline import manifest, results, storage, store
from pipeline.embedding_map import EmbeddingMap, embedding_map
from pipeline.evaluate import query_aps, read_metrics, relevance_labeler
from pipeline.index.io import index_bytes, read_quality
from pipeline.report.html import (
    ReportData,
    errors_html,
    provenance_html,
    quality_html,
    query_ap_html,
    render_page,
)
from pipeline.report.thumbnails import load_thumbnails
from pipeline.report.views import ErrorGroup, Hit, ImageSource, QueryView, ReportSettings
from pipeline.runpaths import RunPaths, stage_seconds
from pipeline.storage import Options

if TYPE_CHECKING:
    from pipeline.runconfig import RunConfig


def _image_sources(
    manifest_url: str, options: Options, image_root: str | None
) -> tuple[dict[str, ImageSource], dict[str, str]]:
    """id → URL or inline bytes of a manifest's images, and id → landmark_id where the manifest has one."""
    table = manifest.read_manifest(manifest_url, options, image_root)
    ids, urls, inline = (table.column(c).to_pylist() for c in ("id", "url", "image"))
    landmarks = table.column("landmark_id").to_pylist()
    sources = {i: (b if b is not None else u) for i, u, b in zip(ids, urls, inline, strict=True)}
    return sources, {i: str(m) for i, m in zip(ids, landmarks, strict=True) if m is not None}


def _labeler(config: RunConfig, options: Options) -> Callable[[str, str], str | None]:
    data = config.data
    if not data.ground_truth:
        return lambda query, hit: None
    return relevance_labeler(data.protocol, data.ground_truth, options, landmarks_url=data.landmarks)


def _metrics_summary(config: RunConfig, options: Options) -> dict[str, Any]:
    """The run's metrics.json flattened to "<results> · <setting>" keys (empty without ground truth)."""
    metrics_url = RunPaths(config.out).metrics
    if not config.data.ground_truth or not storage.exists(metrics_url, options):
        return {}
    metrics = read_metrics(metrics_url, options)
    return {f"{name} · {setting}": value for name, m in metrics.items() for setting, value in m.items()}


WORST_QUERIES = 10  # queries with the lowest AP, shown first with their rankings
ERROR_EXAMPLES = 3  # failed rows quoted per reason


def _embedding(
    paths: Any, landmarks: Mapping[str, str], settings: ReportSettings, options: Options
) -> EmbeddingMap | None:
    """The embedding map of the run's stores (None when ``map_points`` is 0)."""
    if not settings.map_points:
        return None
    return embedding_map(
        paths.query_store, paths.index_store, landmarks, settings.map_points, options=options
    )


@dataclass(frozen=True)
class RunReport:
    """A run's data for its report, gathered from the run's files."""

    page: ReportData  # summary, timings, the queries shown with their thumbnails, the embedding map
    quality: dict[str, Any] | None  # the index's quality.json
    errors: list[ErrorGroup]  # failed rows of both stores by reason
    ap_name: str  # what the per-query AP is ("" without ground truth)
    aps: dict[str, dict[str, float]]  # results → query → AP
    worst: list[str]  # the WORST_QUERIES queries with the lowest AP, shown first
    provenance: dict[str, Any]


def gather_run(config: RunConfig, options: Options = None) -> RunReport:
    """Everything the report of ``config``'s run shows, read from its outputs alone."""
    paths = RunPaths(config.out)
    settings = config.report.report_settings()
    label = _labeler(config, options)
    data = config.data
    index_sources, index_landmarks = _image_sources(data.index, options, data.index_image_root)
    query_sources, query_landmarks = _image_sources(data.queries, options, data.queries_image_root)
    sources = {**index_sources, **query_sources}
    global_hits = results.read_hits(paths.search, settings.max_hits, options)
    reranked_hits = (
        results.read_hits(paths.reranked, settings.max_hits, options) if config.rerank.enabled else {}
    )
    ap_name, aps = _query_aps(config, options)
    worst = _worst(aps)

    def hits(query: str, rows: list[results.Hit]) -> list[Hit]:
        return [
            Hit(r.id, r.score, sources.get(r.id), r.inliers, label(query, r.id), r.global_score) for r in rows
        ]

    order = [*worst, *(q for q in sorted(global_hits) if q not in worst)]
    views = [
        QueryView(
            query_id=query,
            query_image=sources.get(query),
            global_ranking=hits(query, global_hits[query]),
            reranked=hits(query, reranked_hits.get(query, [])),
            matches={r.id: r.matches for r in reranked_hits.get(query, []) if r.matches is not None},
            metrics={f"{ap_name} {name}": ap[query] for name, ap in aps.items() if query in ap},
        )
        for query in order[: settings.max_queries]
    ]
    summary = {**_metrics_summary(config, options), "queries": len(global_hits)}
    summary["index bytes"] = index_bytes(paths.index, options)
    timings = {stage: s for stage, s in stage_seconds(config, options).items() if stage != "report"}
    embedding = _embedding(paths, index_landmarks | query_landmarks, settings, options)
    thumbnails = load_thumbnails(views, settings, options, embedding, sources)
    page = ReportData(summary, timings, views, thumbnails, settings, embedding, sources)
    return RunReport(
        page,
        read_quality(paths.index, options),
        error_groups(paths, options),
        ap_name,
        aps,
        worst,
        provenance(config, options),
    )


def render_run(report: RunReport) -> str:
    """The run's report page: a pure function of the gathered data."""
    sections = [
        ("Index quality", quality_html(report.quality)),
        ("Failed rows", errors_html(report.errors)),
        ("Per-query AP", query_ap_html(report.ap_name, report.aps, report.worst)),
        ("Provenance", provenance_html(report.provenance)),
    ]
    return render_page(replace(report.page, sections=sections))


@dataclass(frozen=True)
class ReportSummary:
    """What :func:`report_run` wrote."""

    queries_shown: int
    report: str  # the page's URL, redacted


def report_run(config: RunConfig, options: Options = None, out_url: str | None = None) -> ReportSummary:
    """Render the report of ``config``'s run from its outputs alone and write it (default: the run's
    report.html)."""
    report = gather_run(config, options)
    out_url = out_url or RunPaths(config.out).report
    storage.write_text(out_url, render_run(report), options)
    return ReportSummary(len(report.page.queries), storage.redact(out_url))


def _query_aps(config: RunConfig, options: Options) -> tuple[str, dict[str, dict[str, float]]]:
    """Per-query AP of the global and (when run) re-ranked results: (what AP it is, {results: {query: AP}})."""
    data, paths = config.data, RunPaths(config.out)
    if not data.ground_truth:
        return "", {}
    files = {"global": paths.search, **({"reranked": paths.reranked} if config.rerank.enabled else {})}
    scored = {name: query_aps(url, data.ground_truth, data.protocol, options) for name, url in files.items()}
    name = next(iter(scored.values()))[0]
    return name, {results: aps for results, (_, aps) in scored.items() if aps}


def _worst(aps: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The WORST_QUERIES queries with the lowest AP in the final results (ties by id)."""
    if not aps:
        return []
    final = list(aps.values())[-1]
    return sorted(final, key=lambda q: (final[q], q))[:WORST_QUERIES]


def error_groups(paths: Any, options: Options) -> list[ErrorGroup]:
    """The failed rows of the run's index and query stores by reason, most frequent first, with examples."""
    groups = []
    for name, url in (("index", paths.index_store), ("queries", paths.query_store)):
        by_reason: dict[str, list[dict[str, Any]]] = {}
        for row in store.read_errors(url, options).to_pylist():
            by_reason.setdefault(row["reason"], []).append(row)
        groups += [
            ErrorGroup(name, reason, len(rows), [(r["id"], r["message"]) for r in rows[:ERROR_EXAMPLES]])
            for reason, rows in sorted(by_reason.items(), key=lambda item: (-len(item[1]), item[0]))
        ]
    return groups


def provenance(config: RunConfig, options: Options) -> dict[str, Any]:
    """What produced the run, as recorded by its index store (redacted when shown): the package version, the
    preset and weights (with their hash), the stores' and inputs' URLs, and every setting of the run."""
    paths = RunPaths(config.out)
    info = store.read_run_info(paths.index_store, options) or {}
    return {
        "landmark-index version (this report)": pipeline.__version__,
        "version that extracted": info.get("package_version"),
        "preset": info.get("preset"),
        "weights": info.get("weights"),
        "weights sha256": info.get("weights_sha256"),
        "index manifest": config.data.index,
        "query manifest": config.data.queries,
        "index store": paths.index_store,
        "query store": paths.query_store,
        "index": paths.index,
        # where it ran is no part of what it is (and a report rendered later, elsewhere, must not differ)
        "run settings": {k: v for k, v in dataclasses.asdict(config).items() if k != "ray_address"},
    }
