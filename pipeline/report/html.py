"""Rendering: the report's data → one self-contained HTML page. Pure: it reads nothing; every image comes as
a thumbnail gathered beforehand (:mod:`pipeline.report.thumbnails`). Every text goes through :func:`_e`
(redacted, then escaped)."""

from __future__ import annotations

import hashlib
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.embedding_map import EmbeddingMap, map_html
from pipeline.report.thumbnails import Thumbnail, Thumbnails, load_thumbnails
from pipeline.report.views import BADGES, ErrorGroup, Hit, ImageSource, QueryView, ReportSettings
from pipeline.storage import Options


def _e(value: Any) -> str:
    """Every text of the page goes through here: redacted (no credential in a report), then escaped."""
    return html.escape(storage.redact_text(str(value)), quote=True)


def _format_figure(name: str, value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, (int, np.integer)) or name == "queries":
        return str(value)
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        return f"{100 * value:.1f}%"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summary_html(summary: Mapping[str, Any]) -> str:
    """Nested mappings ({setting: {figure: value}}) as one table; flat values as name/value rows."""
    nested = {k: v for k, v in summary.items() if isinstance(v, Mapping)}
    flat = {k: v for k, v in summary.items() if not isinstance(v, Mapping)}
    parts = []
    if nested:
        columns = list(dict.fromkeys(c for row in nested.values() for c in row))
        head = "".join(f"<th>{_e(c)}</th>" for c in columns)
        rows = "".join(
            f"<tr><th>{_e(name)}</th>"
            + "".join(f"<td>{_e(_format_figure(c, row.get(c)))}</td>" for c in columns)
            + "</tr>"
            for name, row in nested.items()
        )
        parts.append(
            f'<table class="metrics"><thead><tr><th></th>{head}</tr></thead><tbody>{rows}</tbody></table>'
        )
    if flat:
        rows = "".join(
            f"<tr><th>{_e(k)}</th><td>{_e(_format_figure(k, v))}</td></tr>" for k, v in flat.items()
        )
        parts.append(f'<table class="metrics"><tbody>{rows}</tbody></table>')
    return "".join(parts) or '<p class="note">No summary figures.</p>'


def _format_seconds(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.2f} s"


def timings_html(timings: Mapping[str, float]) -> str:
    """Stage timings with a bar proportional to each stage's share of the total."""
    if not timings:
        return '<p class="note">No stage timings recorded.</p>'
    total = sum(timings.values())
    rows = "".join(
        f"<tr><th>{_e(stage)}</th><td>{_e(_format_seconds(seconds))}</td>"
        f'<td class="bar-cell"><div class="bar" style="width:{100 * seconds / total if total else 0:.1f}%"></div></td></tr>'
        for stage, seconds in timings.items()
    )
    return (
        f'<table class="timings"><tbody>{rows}<tr class="total"><th>total</th>'
        f"<td>{_e(_format_seconds(total))}</td><td></td></tr></tbody></table>"
    )


def _image_html(thumb: Thumbnail | None, alt: str) -> str:
    if thumb is None:
        return f'<div class="missing" role="img" aria-label="{_e(alt)}">image unavailable</div>'
    return f'<img src="{thumb.data_uri}" width="{thumb.width}" height="{thumb.height}" alt="{_e(alt)}">'


def hit_html(rank: int, hit: Hit, thumbs: Thumbnails, global_rank: int | None = None) -> str:
    """One ranked tile: thumbnail, label badge, id, score, inliers and (re-ranked) the former rank."""
    label = hit.label or "unlabelled"
    glyph, meaning = BADGES[hit.label] if hit.label else ("", "")
    badge = (
        f'<span class="badge" title="{_e(meaning)}" aria-label="{_e(meaning)}">{glyph}</span>'
        if glyph
        else ""
    )
    details = [f"score {hit.score:.3f}"]
    details += [f"global {hit.global_score:.3f}"] if hit.global_score is not None else []
    details += [f"{hit.inliers} inliers"] if hit.inliers is not None else []
    details += [f"was #{global_rank}"] if global_rank is not None else []
    return (
        f'<li class="hit {label}" data-label="{label}">{badge}'
        f"{_image_html(thumbs.get(hit.image), hit.id)}"
        f'<div class="cap"><div class="id" title="{_e(hit.id)}"><span class="rank">#{rank}</span>{_e(hit.id)}</div>'
        + "".join(f'<div class="details">{_e(d)}</div>' for d in details)
        + "</div></li>"
    )


def ranking_html(
    title: str, hits: Sequence[Hit], thumbs: Thumbnails, max_hits: int, global_ranks: dict
) -> str:
    if not hits:
        return f'<div class="ranking"><h3>{_e(title)}</h3><p class="note">none</p></div>'
    tiles = "".join(
        hit_html(r, h, thumbs, global_ranks.get(h.id)) for r, h in enumerate(hits[:max_hits], start=1)
    )
    more = f'<p class="note">{len(hits) - max_hits} more not shown</p>' if len(hits) > max_hits else ""
    return f'<div class="ranking"><h3>{_e(title)}</h3><ol class="hits">{tiles}</ol>{more}</div>'


def _validated_matches(hit_id: str, matches: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    query_xy, hit_xy = (np.asarray(m, dtype=np.float64) for m in matches)
    if query_xy.ndim != 2 or query_xy.shape[1] != 2 or query_xy.shape != hit_xy.shape:
        raise ValueError(
            f"matches for {hit_id!r} have shapes {query_xy.shape} and {hit_xy.shape}; need two (M, 2) arrays"
        )
    return query_xy, hit_xy


def match_svg(
    query: Thumbnail, hit: Thumbnail, query_xy: np.ndarray, hit_xy: np.ndarray, max_lines: int, label: str
) -> str:
    """The two images side by side in one SVG with a line per inlier (M, 2) -> (M, 2), at most ``max_lines``."""
    gap = 12
    width, height = query.width + gap + hit.width, max(query.height, hit.height)
    scale_q = np.array([query.width / query.original_size[0], query.height / query.original_size[1]])
    scale_h = np.array([hit.width / hit.original_size[0], hit.height / hit.original_size[1]])
    shown = np.linspace(0, len(query_xy) - 1, min(len(query_xy), max_lines)).round().astype(int)
    start = query_xy[shown] * scale_q  # (L, 2) display pixels
    end = hit_xy[shown] * scale_h + np.array([query.width + gap, 0.0])
    lines = "".join(
        f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="hsl({(37 * i) % 360},90%,55%)"/>'
        f'<circle cx="{x1:.1f}" cy="{y1:.1f}" r="2.2"/><circle cx="{x2:.1f}" cy="{y2:.1f}" r="2.2"/>'
        for i, ((x1, y1), (x2, y2)) in enumerate(zip(start, end, strict=True))
    )
    return (
        f'<svg class="match" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{_e(label)}"><image href="{query.data_uri}" x="0" y="0" width="{query.width}" '
        f'height="{query.height}"/><image href="{hit.data_uri}" x="{query.width + gap}" y="0" '
        f'width="{hit.width}" height="{hit.height}"/><g class="inliers">{lines}</g></svg>'
    )


def matches_html(view: QueryView, thumbs: Thumbnails, settings: ReportSettings) -> str:
    """Inlier panels for the top re-ranked hits that have matches."""
    pairs = view.match_pairs(settings.max_match_pairs)
    if not pairs:
        return ""
    query_thumb = thumbs.get(view.query_image, settings.match_px)
    panels = []
    for hit in pairs:
        query_xy, hit_xy = _validated_matches(hit.id, view.matches[hit.id])
        hit_thumb = thumbs.get(hit.image, settings.match_px)
        shown = min(len(query_xy), settings.max_match_lines)
        caption = f"{hit.id}: {len(query_xy)} inliers" + (
            f" ({shown} drawn)" if shown < len(query_xy) else ""
        )
        body = (
            match_svg(query_thumb, hit_thumb, query_xy, hit_xy, settings.max_match_lines, caption)
            if query_thumb and hit_thumb
            else '<div class="missing">image unavailable</div>'
        )
        label = hit.label or "unlabelled"
        panels.append(f'<figure class="pair {label}">{body}<figcaption>{_e(caption)}</figcaption></figure>')
    return f'<div class="matches"><h3>Inlier matches, top re-ranked pairs</h3>{"".join(panels)}</div>'


def query_html(index: int, view: QueryView, thumbs: Thumbnails, settings: ReportSettings) -> str:
    chips = "".join(
        f'<span class="chip">{_e(name)} {_e(_format_figure(name, value))}</span>'
        for name, value in view.metrics.items()
    )
    global_ranks = {h.id: r for r, h in enumerate(view.global_ranking, start=1)}
    reranked = (
        ranking_html(
            "Re-ranked (geometric verification)", view.reranked, thumbs, settings.max_hits, global_ranks
        )
        if view.reranked
        else '<div class="ranking"><h3>Re-ranked</h3><p class="note">no re-ranking for this run</p></div>'
    )
    return (
        f'<section class="query" id="{_e(_anchor(view.query_id))}"><h2><span class="qn">{index + 1}</span>'
        f'<span class="qid">{_e(view.query_id)}</span>{chips}</h2><div class="query-row">'
        f'<figure class="query-image">{_image_html(thumbs.get(view.query_image), view.query_id)}'
        f"<figcaption>query</figcaption></figure>"
        f'<div class="rankings">{ranking_html("Global descriptor", view.global_ranking, thumbs, settings.max_hits, {})}'
        f"{reranked}</div></div>{matches_html(view, thumbs, settings)}</section>"
    )


def quality_html(quality: Mapping[str, Any] | None) -> str:
    """The index's recall against exact search at the stored search setting (the build's quality.json)."""
    if not quality:
        return '<p class="note">No recall report (quality.json) beside the index.</p>'
    setting = {"nprobe": quality.get("nprobe"), "k_factor": quality.get("k_factor")}
    chosen = next((r for r in quality.get("rows", []) if all(r.get(k) == v for k, v in setting.items())), {})
    figures = {k: v for k, v in chosen.items() if "recall" in k}
    shown = {**{k: "–" if v is None else str(v) for k, v in setting.items()}, **figures}
    shown["queries"] = quality.get("queries")
    reason = quality.get("nprobe_reason", "")
    return summary_html(shown) + (f'<p class="note">{_e(reason)}</p>' if reason else "")


def errors_html(groups: Sequence[ErrorGroup]) -> str:
    if not groups:
        return '<p class="note">No failed rows: every image gave descriptors.</p>'
    rows = "".join(
        f'<tr><th>{_e(g.store)}</th><td>{_e(g.reason)}</td><td>{g.count}</td><td class="examples">'
        + "".join(f"<div><b>{_e(i)}</b>: {_e(m)}</div>" for i, m in g.examples)
        + "</td></tr>"
        for g in groups
    )
    head = "<tr><th>store</th><th>reason</th><th>rows</th><th>examples</th></tr>"
    return f'<table class="errors"><thead>{head}</thead><tbody>{rows}</tbody></table>'


def provenance_html(provenance: Mapping[str, Any]) -> str:
    """What produced the run: versions, preset, weights hash, URLs (redacted), and the settings as JSON."""
    rows = "".join(
        f'<tr><th>{_e(k)}</th><td class="text">'
        + (
            f"<details><summary>show</summary><pre>{_e(json.dumps(v, indent=1, default=str))}</pre></details>"
            if isinstance(v, Mapping)
            else _e("–" if v is None else v)
        )
        + "</td></tr>"
        for k, v in provenance.items()
    )
    return f'<table class="provenance"><tbody>{rows}</tbody></table>'


def query_ap_html(name: str, aps: Mapping[str, Mapping[str, float]], worst: Sequence[str]) -> str:
    """Per-query AP of each results file (columns), worst first by the last one; the worst are marked."""
    if not aps:
        return '<p class="note">No per-query AP (no ground truth, or a protocol without one).</p>'
    columns = list(aps)
    order = sorted(aps[columns[-1]], key=lambda q: (aps[columns[-1]][q], q))
    head = "".join(f"<th>{_e(f'{name} {c}')}</th>" for c in columns)
    rows = "".join(
        (
            f'<tr class="worst"><th><a href="#{_e(_anchor(q))}">{_e(q)}</a></th>'
            if q in worst
            else f"<tr><th>{_e(q)}</th>"
        )
        + "".join(f"<td>{_e(_format_figure('AP', aps[c].get(q)))}</td>" for c in columns)
        + "</tr>"
        for q in order
    )
    return (
        f'<p class="note">Lowest first; the {len(worst)} lowest are shown first below with their rankings.</p>'
        f'<div class="scroll"><table class="metrics"><thead><tr><th>query</th>{head}</tr></thead>'
        f"<tbody>{rows}</tbody></table></div>"
    )


def _anchor(query_id: str) -> str:
    return "query-" + hashlib.sha1(query_id.encode()).hexdigest()[:12]


def query_section(
    view: QueryView, settings: ReportSettings = ReportSettings(), options: Options = None
) -> str:
    """One query's section as the report draws it (rankings, thumbnails, inlier lines), for pages that style
    it with :data:`STYLE` (the query service's page)."""
    return query_html(0, view, load_thumbnails([view], settings, options), settings)


STYLE = """
.emap-row{display:flex;gap:16px;align-items:flex-start;flex-wrap:wrap}#emap{background:#fff;border:1px solid var(--line)}
#emap circle{cursor:pointer}#emap-photo img{max-width:240px}#emap-photo figcaption{color:var(--muted)}
:root{--pos:#1a8f3c;--neg:#c62828;--junk:#8d8d8d;--ink:#1d2330;--muted:#5f6b7a;--line:#e3e7ee}
*{box-sizing:border-box}
body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink);background:#f5f7fa}
header,main{max-width:1400px;margin:0 auto;padding:16px 24px}
header{background:#fff;border-bottom:1px solid var(--line);max-width:none}
h1{margin:0 0 4px;font-size:22px}h2{font-size:17px;margin:0 0 10px}h3{font-size:13px;margin:0 0 6px;
color:var(--muted);text-transform:uppercase;letter-spacing:.04em}
.note{color:var(--muted);margin:4px 0}
.top{display:flex;gap:32px;flex-wrap:wrap;align-items:flex-start}
.panel{background:#fff;border:1px solid var(--line);border-radius:8px;padding:12px 16px}
table{border-collapse:collapse}th,td{padding:4px 10px;text-align:right;border-bottom:1px solid var(--line)}
th:first-child{text-align:left}thead th{color:var(--muted);font-weight:600}
td{font-variant-numeric:tabular-nums}
.timings .bar-cell{width:180px}.bar{height:10px;background:#4f7cc4;border-radius:3px}
.timings .total th,.timings .total td{font-weight:700;border-bottom:none}
.legend>span{display:inline-block;margin-right:18px}.sw{display:inline-block;width:18px;height:18px;
border-radius:50%;background:var(--line);color:#fff;font:700 12px/18px system-ui,sans-serif;text-align:center;
vertical-align:-4px;margin-right:6px}
.query{background:#fff;border:1px solid var(--line);border-radius:8px;padding:14px 16px;margin:16px 0}
.qn{display:inline-block;min-width:26px;padding:1px 6px;margin-right:8px;border-radius:12px;background:var(--ink);
color:#fff;text-align:center;font-size:13px}
.qid{font-family:ui-monospace,Menlo,Consolas,monospace;word-break:break-all}
.chip{font-size:12px;font-weight:500;background:#eef2f8;border-radius:10px;padding:2px 8px;margin-left:8px}
.query-row{display:flex;gap:16px;align-items:flex-start}
.query-image{margin:0;flex:0 0 140px;text-align:center;color:var(--muted);font-size:12px}
.query-image img,.query-image .missing{border:3px solid var(--ink);border-radius:4px;display:block;width:100%;
height:auto}
.rankings{display:flex;gap:16px;flex:1;min-width:0}.ranking{flex:1;min-width:0}
.ranking+.ranking{border-left:1px dashed var(--line);padding-left:16px}
ol.hits{list-style:none;margin:0;padding:0;display:grid;grid-template-columns:repeat(auto-fill,minmax(92px,1fr));gap:8px}
.hit{position:relative;border:3px solid var(--line);border-radius:6px;overflow:hidden;background:#fafbfc}
.hit img,.hit .missing{display:block;width:100%;height:74px;object-fit:cover}
.hit.positive{border-color:var(--pos)}.hit.negative{border-color:var(--neg)}
.hit.junk{border-color:var(--junk);border-style:dashed}.hit.junk img{opacity:.55}
.cap{padding:3px 6px 5px;font-size:11px}.rank{font-weight:700;margin-right:5px;font-family:system-ui,sans-serif}
.badge{position:absolute;top:4px;right:4px;width:20px;height:20px;border-radius:50%;color:#fff;
font:700 13px/20px system-ui,sans-serif;text-align:center;box-shadow:0 0 0 2px #fff}
.positive .badge,.sw.positive{background:var(--pos)}.negative .badge,.sw.negative{background:var(--neg)}
.junk .badge,.sw.junk{background:var(--junk)}
.id{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.details{color:var(--muted)}
.missing{display:flex;align-items:center;justify-content:center;background:#e9ecf1;color:var(--muted);
font-size:11px;width:120px;height:74px}
.matches{margin-top:14px}.pair{display:inline-block;margin:0 14px 8px 0;vertical-align:top}
.pair svg{display:block;max-width:100%;height:auto;border-radius:4px;background:#000}
.pair.positive svg{outline:3px solid var(--pos)}.pair.negative svg{outline:3px solid var(--neg)}
.pair figcaption{font-size:12px;color:var(--muted);margin-top:4px;max-width:460px;word-break:break-all}
.inliers line{stroke-width:1.3;stroke-opacity:.9}.inliers circle{fill:#fff;fill-opacity:.9}
.section{margin:16px 0}.section td.text,.errors td{text-align:left}.examples div{font-size:12px;color:var(--muted)}
.scroll{max-height:320px;overflow:auto}tr.worst th a{color:var(--neg)}pre{white-space:pre-wrap;font-size:11px}
"""


def _legend_html() -> str:
    items = "".join(
        f'<span><span class="sw {label}">{glyph}</span>{_e(meaning)}</span>'
        for label, (glyph, meaning) in BADGES.items()
    )
    return f'<p class="legend">{items}<span><span class="sw"></span>no ground truth</span></p>'


@dataclass(frozen=True)
class ReportData:
    """Everything a report page shows, gathered beforehand: rendering it reads nothing."""

    summary: Mapping[str, Any]
    timings: Mapping[str, float]
    queries: Sequence[QueryView]
    thumbnails: Thumbnails  # every image shown (load_thumbnails)
    settings: ReportSettings
    embedding: EmbeddingMap | None = None
    sources: Mapping[str, ImageSource] = field(default_factory=dict)  # id → image of the map's photos
    sections: Sequence[tuple[str, str]] = ()  # (title, HTML) panels after the summary


def render_page(data: ReportData) -> str:
    """The whole report as one HTML string (images inlined): a pure function of ``data``."""
    settings, thumbs = data.settings, data.thumbnails
    shown = data.queries[: settings.max_queries]
    caps = (
        f"Showing {len(shown)} of {len(data.queries)} queries (at most {settings.max_queries}), the top "
        f"{settings.max_hits} hits of each ranking, inlier lines for the top {settings.max_match_pairs} "
        f"re-ranked pairs (at most {settings.max_match_lines} lines each); thumbnails ≤ {settings.thumb_px} px."
    )
    body = "".join(query_html(i, view, thumbs, settings) for i, view in enumerate(shown))
    if data.embedding is not None:
        photos = data.sources
        body = map_html(data.embedding, lambda i: (t := thumbs.get(photos.get(i))) and t.data_uri) + body
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><title>{_e(settings.title)}</title>'
        f"<style>{STYLE}</style></head><body><header><h1>{_e(settings.title)}</h1>"
        f'<p class="note">{_e(caps)}</p></header><main><div class="top">'
        f'<div class="panel"><h3>Summary</h3>{summary_html(data.summary)}</div>'
        f'<div class="panel"><h3>Stage timings</h3>{timings_html(data.timings)}</div></div>'
        + "".join(
            f'<section class="panel section" id="{_e(title.lower().replace(" ", "-"))}"><h3>{_e(title)}</h3>'
            f"{html}</section>"
            for title, html in data.sections
        )
        + f"{_legend_html()}{body}</main></body></html>\n"
    )


def render_report(
    summary: Mapping[str, Any],
    timings: Mapping[str, float],
    queries: Sequence[QueryView],
    settings: ReportSettings = ReportSettings(),
    options: Options = None,
    embedding: EmbeddingMap | None = None,
    sources: Mapping[str, ImageSource] | None = None,
    sections: Sequence[tuple[str, str]] = (),
) -> str:
    """The whole report as one HTML string: its thumbnails loaded (through ``options``), then rendered;
    ``sections`` are (title, HTML) panels shown after the summary; ``embedding`` adds the map, whose photos
    come from ``sources`` (id → image)."""
    thumbs = load_thumbnails(queries, settings, options, embedding, sources)
    return render_page(
        ReportData(summary, timings, queries, thumbs, settings, embedding, sources or {}, sections)
    )


def write_report(
    out_url: str,
    summary: Mapping[str, Any],
    timings: Mapping[str, float],
    queries: Sequence[QueryView],
    settings: ReportSettings = ReportSettings(),
    options: Options = None,
    embedding: EmbeddingMap | None = None,
    sources: Mapping[str, ImageSource] | None = None,
    sections: Sequence[tuple[str, str]] = (),
) -> None:
    """Render the report and write it atomically to ``out_url`` (local path or object-store URL)."""
    page = render_report(
        summary, timings, queries, settings, options, embedding=embedding, sources=sources, sections=sections
    )
    storage.write_text(out_url, page, options)
