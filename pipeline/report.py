"""A self-contained HTML report of a retrieval run, readable offline: one .html file, no external assets.

The page shows the summary metrics and stage timings, then per query its ranked thumbnails (global ranking and
re-ranked, side by side, each hit marked positive / negative / junk when ground truth exists) and, for the top
re-ranked pairs, the inlier matches drawn as SVG lines between the two images. Images are inlined as small
base64 JPEG thumbnails; every piece of text (ids are user data) is HTML-escaped.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

import pipeline
from pipeline import images, results, storage
from pipeline.embedding_map import EmbeddingMap, embedding_map, map_html
from pipeline.storage import Options, StorageError

if TYPE_CHECKING:
    from pipeline.runconfig import RunConfig

LABELS = ("positive", "negative", "junk")
BADGES = {
    "positive": ("✓", "correct"),
    "negative": ("✗", "wrong"),
    "junk": ("∅", "junk: ignored by the metric"),
}

ImageSource = (
    bytes | str | None
)  # encoded image bytes, a URL / path read through pipeline.storage, or nothing


@dataclass(frozen=True)
class Hit:
    """One retrieved image."""

    id: str
    score: float
    image: ImageSource = None
    inliers: int | None = None  # verified inliers, for re-ranked hits
    label: str | None = None  # "positive" | "negative" | "junk"; None without ground truth
    global_score: float | None = None  # the global similarity before re-ranking, for re-ranked hits

    def __post_init__(self) -> None:
        if self.label is not None and self.label not in LABELS:
            raise ValueError(f"hit {self.id!r} has label {self.label!r}; allowed: {list(LABELS)} or None")


@dataclass(frozen=True)
class QueryView:
    """What the report shows for one query.

    ``matches`` maps a re-ranked hit id to its inlier correspondences ``(query_xy (M, 2), hit_xy (M, 2))``,
    in pixels of the images as given (after EXIF rotation, the frame the extractor uses).
    """

    query_id: str
    query_image: ImageSource
    global_ranking: Sequence[Hit]
    reranked: Sequence[Hit] = ()
    matches: Mapping[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)  # per-query figures, e.g. {"AP global": 0.41}


@dataclass(frozen=True)
class ReportSettings:
    title: str = "landmark-index report"
    thumb_px: int = 160  # longest side of a ranking thumbnail
    match_px: int = 220  # height of each image in a match panel: large enough to follow the lines
    max_queries: int = 20  # keeps the page a few MB
    max_hits: int = 10  # per ranking
    max_match_pairs: int = 3  # top re-ranked pairs drawn with their inliers
    max_match_lines: int = 80  # more lines than this are unreadable
    jpeg_quality: int = 70
    map_points: int = 500  # descriptors sampled for the embedding map (exact t-SNE, O(n²)); 0: no map

    def __post_init__(self) -> None:
        names = (
            "thumb_px",
            "match_px",
            "max_queries",
            "max_hits",
            "max_match_pairs",
            "max_match_lines",
            "map_points",
        )
        for name in names:
            minimum = 0 if name.startswith("max_match") or name == "map_points" else 1
            if getattr(self, name) < minimum:
                raise ValueError(f"ReportSettings.{name} = {getattr(self, name)}; must be ≥ {minimum}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"ReportSettings.jpeg_quality = {self.jpeg_quality}; allowed 1..95")


# ---------------------------------------------------------------------------------------------------------
# Thumbnails
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Thumbnail:
    data_uri: str  # data:image/jpeg;base64,...
    width: int
    height: int
    original_size: tuple[int, int]  # (w, h) of the upright full image: the frame of match coordinates


def _load_bytes(source: ImageSource, options: Options) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    try:
        return storage.read_bytes(source, options)
    except (OSError, StorageError):
        return None  # the page says "image unavailable" rather than failing the whole report


def make_thumbnail(data: bytes, max_side: int, quality: int, height: int | None = None) -> Thumbnail | None:
    """A JPEG thumbnail with longest side ``max_side`` (or exactly ``height`` tall); None if undecodable.

    Decoded by pipeline.images, as the extractor decodes: only safe formats, pixel count checked first,
    upright, RGB; so match coordinates (extractor pixels) land on the same frame.
    """
    try:
        pixels = images.decode_image(data)  # (3, H, W) uint8
    except images.ImageError:
        return None
    image = Image.fromarray(np.ascontiguousarray(pixels.numpy().transpose(1, 2, 0)))
    original = image.size
    if height is not None:
        image = image.resize(
            (max(1, round(original[0] * height / original[1])), height), Image.Resampling.BILINEAR
        )
    else:
        image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    uri = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return Thumbnail(uri, image.width, image.height, original)


class _Thumbnails:
    """Thumbnails cached by content, so an image shown in both rankings is decoded once."""

    def __init__(self, settings: ReportSettings, options: Options) -> None:
        self.settings, self.options = settings, options
        self.cache: dict[tuple[str, int | None], Thumbnail | None] = {}

    def get(self, source: ImageSource, height: int | None = None) -> Thumbnail | None:
        data = _load_bytes(source, self.options)
        if data is None:
            return None
        key = (hashlib.sha1(data).hexdigest(), height)
        if key not in self.cache:
            self.cache[key] = make_thumbnail(data, self.settings.thumb_px, self.settings.jpeg_quality, height)
        return self.cache[key]


# ---------------------------------------------------------------------------------------------------------
# HTML pieces
# ---------------------------------------------------------------------------------------------------------


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


def hit_html(rank: int, hit: Hit, thumbs: _Thumbnails, global_rank: int | None = None) -> str:
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
    title: str, hits: Sequence[Hit], thumbs: _Thumbnails, max_hits: int, global_ranks: dict
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


def matches_html(view: QueryView, thumbs: _Thumbnails, settings: ReportSettings) -> str:
    """Inlier panels for the top re-ranked hits that have matches."""
    pairs = [h for h in view.reranked if h.id in view.matches][: settings.max_match_pairs]
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


def query_html(index: int, view: QueryView, thumbs: _Thumbnails, settings: ReportSettings) -> str:
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


@dataclass(frozen=True)
class ErrorGroup:
    """The failed rows of one reason in one descriptor store."""

    store: str  # "index" | "queries"
    reason: str
    count: int
    examples: Sequence[tuple[str, str]]  # (row id, message), a few


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
    return query_html(0, view, _Thumbnails(settings, options), settings)


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
    """The whole report as one HTML string (images inlined); ``sections`` are (title, HTML) panels shown
    after the summary (index quality, errors, per-query AP, provenance); ``embedding`` adds the map, whose
    photos come from ``sources`` (id → image)."""
    thumbs = _Thumbnails(settings, options)
    shown = queries[: settings.max_queries]
    caps = (
        f"Showing {len(shown)} of {len(queries)} queries (at most {settings.max_queries}), the top "
        f"{settings.max_hits} hits of each ranking, inlier lines for the top {settings.max_match_pairs} "
        f"re-ranked pairs (at most {settings.max_match_lines} lines each); thumbnails ≤ {settings.thumb_px} px."
    )
    body = "".join(query_html(i, view, thumbs, settings) for i, view in enumerate(shown))
    if embedding is not None:
        photos = sources or {}
        body = map_html(embedding, lambda i: (t := thumbs.get(photos.get(i))) and t.data_uri) + body
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><title>{_e(settings.title)}</title>'
        f"<style>{STYLE}</style></head><body><header><h1>{_e(settings.title)}</h1>"
        f'<p class="note">{_e(caps)}</p></header><main><div class="top">'
        f'<div class="panel"><h3>Summary</h3>{summary_html(summary)}</div>'
        f'<div class="panel"><h3>Stage timings</h3>{timings_html(timings)}</div></div>'
        + "".join(
            f'<section class="panel section" id="{_e(title.lower().replace(" ", "-"))}"><h3>{_e(title)}</h3>'
            f"{html}</section>"
            for title, html in sections
        )
        + f"{_legend_html()}{body}</main></body></html>\n"
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


# ---------------------------------------------------------------------------------------------------------
# The report stage: a run's outputs → report.html (nothing is recomputed)
# ---------------------------------------------------------------------------------------------------------


def _image_sources(
    manifest_url: str, options: Options, image_root: str | None
) -> tuple[dict[str, ImageSource], dict[str, str]]:
    """id → URL or inline bytes of a manifest's images, and id → landmark_id where the manifest has one."""
    from pipeline import manifest

    table = manifest.read_manifest(manifest_url, options, image_root)
    ids, urls, inline = (table.column(c).to_pylist() for c in ("id", "url", "image"))
    landmarks = table.column("landmark_id").to_pylist()
    sources = {i: (b if b is not None else u) for i, u, b in zip(ids, urls, inline, strict=True)}
    return sources, {i: str(m) for i, m in zip(ids, landmarks, strict=True) if m is not None}


def _labeler(config: RunConfig, options: Options) -> Callable[[str, str], str | None]:
    from pipeline.evaluate import relevance_labeler

    data = config.data
    if not data.ground_truth:
        return lambda query, hit: None
    return relevance_labeler(data.protocol, data.ground_truth, options, landmarks_url=data.landmarks)


def _metrics_summary(config: RunConfig, options: Options) -> dict[str, Any]:
    """The run's metrics.json flattened to "<results> · <setting>" keys (empty without ground truth)."""
    from pipeline.run import RunPaths

    metrics_url = RunPaths(config.out).metrics
    if not config.data.ground_truth or not storage.exists(metrics_url, options):
        return {}
    metrics = json.loads(storage.read_text(metrics_url, options))
    return {f"{name} · {setting}": value for name, m in metrics.items() for setting, value in m.items()}


WORST_QUERIES = 10  # queries with the lowest AP, shown first with their rankings
ERROR_EXAMPLES = 3  # failed rows quoted per reason


def _sections(
    config: RunConfig,
    paths: Any,
    ap_name: str,
    aps: Mapping[str, Mapping[str, float]],
    worst: list[str],
    options: Options,
) -> list[tuple[str, str]]:
    """The run report's panels after the summary: index quality, failed rows, per-query AP, provenance."""
    from pipeline.index.io import read_quality

    return [
        ("Index quality", quality_html(read_quality(paths.index, options))),
        ("Failed rows", errors_html(error_groups(paths, options))),
        ("Per-query AP", query_ap_html(ap_name, aps, worst)),
        ("Provenance", provenance_html(provenance(config, options))),
    ]


def _embedding(
    paths: Any, landmarks: Mapping[str, str], settings: ReportSettings, options: Options
) -> EmbeddingMap | None:
    """The embedding map of the run's stores (None when ``map_points`` is 0)."""
    if not settings.map_points:
        return None
    return embedding_map(
        paths.query_store, paths.index_store, landmarks, settings.map_points, options=options
    )


def report_run(config: RunConfig, options: Options = None, out_url: str | None = None) -> dict[str, Any]:
    """Render the report of ``config``'s run from its outputs alone and write it (default: the run's
    report.html): results files, metrics.json, stage markers, the stores' error records and run metadata,
    the index's quality.json, the manifests' images, the ground truth."""
    from pipeline.index.io import index_bytes
    from pipeline.run import RunPaths, stage_seconds

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
    out_url = out_url or paths.report
    embedding = _embedding(paths, index_landmarks | query_landmarks, settings, options)
    write_report(
        out_url,
        summary,
        timings,
        views,
        settings,
        options,
        embedding=embedding,
        sources=sources,
        sections=_sections(config, paths, ap_name, aps, worst, options),
    )
    return {"queries_shown": len(views), "report": storage.redact(out_url)}


def _query_aps(config: RunConfig, options: Options) -> tuple[str, dict[str, dict[str, float]]]:
    """Per-query AP of the global and (when run) re-ranked results: (what AP it is, {results: {query: AP}})."""
    from pipeline.evaluate import query_aps
    from pipeline.run import RunPaths

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
    from pipeline import store

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
    import dataclasses

    from pipeline.run import RunPaths
    from pipeline.store import read_run_info

    paths = RunPaths(config.out)
    info = read_run_info(paths.index_store, options) or {}
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
