"""The offline HTML report: structure, escaping, inlined thumbnails, inlier geometry, a real browser render."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import storage
from pipeline.report import Hit, QueryView, ReportSettings, _anchor, render_report, write_report

EVIL_QUERY = '<script>alert("q")</script>&amp;'
EVIL_HIT = '"><img src=x onerror=alert(1)>'
SUMMARY = {
    "medium": {"mAP": 0.736, "mP@10": 0.5, "queries": 70},
    "hard": {"mAP": 0.51, "mP@10": 0.4, "queries": 70},
}
TIMINGS = {"extract": 812.4, "search": 12.3, "rerank": 401.0}


class Page(HTMLParser):
    """Start tags with their attributes, and all text, as the browser's parser sees them."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def find(self, tag: str, cls: str | None = None) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag and (cls is None or cls in a.get("class", "").split())]


def jpeg(width: int, height: int, seed: int) -> bytes:
    """A deterministic textured image (random colour blocks) as JPEG bytes."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 20 + 1, width // 20 + 1, 3), dtype=np.uint8)
    pixels = np.kron(blocks, np.ones((20, 20, 1), dtype=np.uint8))[:height, :width]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_view(query_id: str, seed: int, n_hits: int = 6) -> QueryView:
    labels = ["positive", "negative", "junk", None]
    global_ranking = [
        Hit(
            f"{query_id}-img{i}", 0.9 - 0.05 * i, jpeg(300 + 10 * i, 200, seed * 100 + i), None, labels[i % 4]
        )
        for i in range(n_hits)
    ]
    reranked = [
        Hit(h.id, h.score, h.image, 50 - 7 * i, h.label) for i, h in enumerate(reversed(global_ranking))
    ]
    rng = np.random.default_rng(seed)
    matches = {reranked[0].id: (rng.uniform(0, 200, (30, 2)), rng.uniform(0, 200, (30, 2)))}
    return QueryView(query_id, jpeg(400, 300, seed), global_ranking, reranked, matches, {"AP": 0.5})


@pytest.fixture(scope="module")
def views() -> list[QueryView]:
    evil = make_view(EVIL_QUERY, 1)
    evil_hit = Hit(EVIL_HIT, 0.95, jpeg(200, 200, 7), None, "negative")
    evil = QueryView(
        evil.query_id, evil.query_image, [evil_hit, *evil.global_ranking], evil.reranked, evil.matches
    )
    plain = make_view("q-without-rerank", 3)
    return [
        evil,
        make_view("all_souls_000013", 2),
        QueryView(plain.query_id, plain.query_image, plain.global_ranking),
    ]


def test_every_query_and_label_appears(views: list[QueryView]) -> None:
    page = Page(render_report(SUMMARY, TIMINGS, views))
    text = "".join(page.text)
    sections = page.find("section", "query")
    assert len(sections) == len(views)
    for view in views:
        assert view.query_id in text
    hits = page.find("li", "hit")
    assert len(hits) == sum(len(v.global_ranking) + len(v.reranked) for v in views)
    expected = [h.label or "unlabelled" for v in views for h in [*v.global_ranking, *v.reranked]]
    assert [h["data-label"] for h in hits] == expected
    badges = [b["title"] for b in page.find("span", "badge")]
    for label, meaning in (
        ("positive", "correct"),
        ("negative", "wrong"),
        ("junk", "junk: ignored by the metric"),
    ):
        assert badges.count(meaning) == expected.count(label)
    assert "73.6%" in text and "13.5 min" in text  # summary as %, timings in readable units


def test_user_text_is_escaped(views: list[QueryView]) -> None:
    html = render_report({"<b>bold</b>": 0.5}, {"<i>stage</i>": 1.0}, views)
    page = Page(html)
    assert not page.find("script") and not page.find("b") and not page.find("i")
    assert EVIL_QUERY in "".join(page.text) and "<b>bold</b>" in "".join(page.text)
    # The hostile hit id is an attribute value (title / alt) and text, never a tag: every img is a data: URI.
    assert any(a.get("title") == EVIL_HIT for _, a in page.tags)
    images = page.find("img")
    assert images and all(img["src"].startswith("data:image/jpeg;base64,") for img in images)
    assert "onerror" not in {k for _, attrs in page.tags for k in attrs}


def test_thumbnails_are_inlined_small_jpegs(views: list[QueryView]) -> None:
    settings = ReportSettings(thumb_px=120)
    page = Page(render_report(SUMMARY, TIMINGS, views, settings))
    sources = [img["src"] for img in page.find("img")] + [a["href"] for t, a in page.tags if t == "image"]
    assert sources and all(s.startswith("data:image/jpeg;base64,") for s in sources)
    for img in page.find("img"):
        with Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) == 120
            assert thumb.size == (int(img["width"]), int(img["height"]))
    assert all(attrs["href"].startswith("data:") for _, attrs in page.tags if "href" in attrs)


def test_caps_are_applied_and_stated() -> None:
    views = [make_view(f"q{i}", i, n_hits=4) for i in range(7)]
    settings = ReportSettings(max_queries=5, max_hits=3, max_match_lines=10)
    page = Page(render_report(SUMMARY, TIMINGS, views, settings))
    text = "".join(page.text)
    assert len(page.find("section", "query")) == 5
    assert "Showing 5 of 7 queries" in text and "q5" not in text
    assert len(page.find("li", "hit")) == 5 * 2 * 3
    assert text.count("1 more not shown") == 5 * 2
    assert len(page.find("line")) == 5 * 10 and "30 inliers (10 drawn)" in text


def test_inlier_lines_land_on_the_scaled_keypoints() -> None:
    query, hit = jpeg(400, 300, 1), jpeg(600, 200, 2)
    query_xy = np.array([[0.0, 0.0], [400.0, 300.0], [100.0, 150.0]])  # (M, 2) original query pixels
    hit_xy = np.array([[600.0, 200.0], [0.0, 0.0], [300.0, 50.0]])
    view = QueryView(
        "q", query, [Hit("h", 0.5, hit)], [Hit("h", 0.5, hit, 3, "positive")], {"h": (query_xy, hit_xy)}
    )
    settings = ReportSettings(match_px=150)
    page = Page(render_report({}, {}, [view], settings))
    lines = page.find("line")
    assert len(lines) == 3
    # Both images are drawn 150 px tall: query 200 x 150 (scale 0.5), hit 450 x 150 (scale 0.75), 12 px apart.
    svg = page.find("svg", "match")[0]
    assert svg["viewbox"] == f"0 0 {200 + 12 + 450} 150"
    for line, q, h in zip(lines, query_xy, hit_xy, strict=True):
        got = [float(line[k]) for k in ("x1", "y1", "x2", "y2")]
        assert got == pytest.approx([q[0] * 0.5, q[1] * 0.5, 212 + h[0] * 0.75, h[1] * 0.75], abs=0.05)


def test_bad_inputs_are_value_errors() -> None:
    with pytest.raises(ValueError, match=r"label 'correct'; allowed"):
        Hit("x", 1.0, label="correct")
    with pytest.raises(ValueError, match=r"max_hits = 0; must be ≥ 1"):
        ReportSettings(max_hits=0)
    hit = Hit("h", 0.5, jpeg(50, 50, 0))
    view = QueryView("q", jpeg(50, 50, 1), [hit], [hit], {"h": (np.zeros((3, 2)), np.zeros((4, 2)))})
    with pytest.raises(ValueError, match=r"matches for 'h' have shapes \(3, 2\) and \(4, 2\)"):
        render_report({}, {}, [view])


def test_missing_or_broken_images_become_placeholders(tmp_path: Path) -> None:
    on_disk = tmp_path / "img.jpg"
    on_disk.write_bytes(jpeg(80, 60, 3))
    hits = [
        Hit("from-path", 0.9, str(on_disk)),
        Hit("absent", 0.8, str(tmp_path / "nope.jpg")),
        Hit("garbage", 0.7, b"not an image"),
        Hit("none", 0.6, None),
    ]
    page = Page(render_report({}, {}, [QueryView("q", None, hits)]))
    assert len(page.find("img")) == 1  # only the file on disk decodes
    assert "".join(page.text).count("image unavailable") == 4  # three hits and the query


def test_write_report_through_storage(tmp_path: Path, views: list[QueryView]) -> None:
    write_report("memory://report-test/report.html", SUMMARY, TIMINGS, views)
    text = storage.read_text("memory://report-test/report.html")
    assert text == render_report(SUMMARY, TIMINGS, views)
    assert len(text) < 400_000  # ~60 thumbnails


def screenshot(html: str, tmp_path: Path) -> np.ndarray:
    """Render with headless chromium at 1280 x 2000; (2000, 1280, 3) int16 pixels."""
    chromium = shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
    )
    if chromium is None:
        pytest.skip("chromium is not installed: the headless-browser render check needs /usr/bin/chromium")
    report, shot = tmp_path / "report.html", tmp_path / "shot.png"
    report.write_text(html)
    flags = (
        "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking"
    )
    flags += " --disable-component-update --disable-sync"
    subprocess.run(
        [chromium, *flags.split(), f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
         "--window-size=1280,2000", report.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)


def test_chromium_renders_the_report(tmp_path: Path, views: list[QueryView]) -> None:
    # Without match panels, so the coloured pixels counted below come from the ranked tiles.
    tiles_only = [QueryView(v.query_id, v.query_image, v.global_ranking, v.reranked) for v in views]
    pixels = screenshot(render_report(SUMMARY, TIMINGS, tiles_only), tmp_path)
    assert pixels.shape == (2000, 1280, 3)
    assert pixels.std() > 20  # not a blank page
    # Labels are visible: each correct (#1a8f3c) / wrong (#c62828) tile has a 3 px border of ~1,200 pixels.
    for label, colour in (("positive", (0x1A, 0x8F, 0x3C)), ("negative", (0xC6, 0x28, 0x28))):
        n_tiles = sum(h.label == label for v in tiles_only for h in [*v.global_ranking, *v.reranked])
        assert (np.abs(pixels - colour).max(axis=2) <= 6).sum() > 800 * n_tiles


def test_reranked_hits_say_why_they_moved() -> None:
    """A re-ranked tile shows its new score, its global score before, its inliers and its former rank."""
    image = jpeg(60, 60, 3)
    before = [Hit("a", 0.80, image), Hit("b", 0.70, image)]
    after = [Hit("b", 0.912, image, 57, None, 0.70), Hit("a", 0.818, image, 4, None, 0.80)]
    html = render_report({}, {}, [QueryView("q", image, before, after, {})])
    tile = html[html.index("#1</span>b") :]
    tile = tile[: tile.index("</li>")]
    assert "score 0.912" in tile and "global 0.700" in tile and "57 inliers" in tile and "was #2" in tile


def test_the_embedding_map_draws_every_sampled_descriptor(tmp_path: Path) -> None:
    """A t-SNE map of two stores: one mark per descriptor (queries as rings), ids in hover titles, coloured by
    landmark, photos for clicks; the sample cap is applied and stated."""
    from pipeline.embedding_map import embedding_map
    from tests.stores import write_clustered_store

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 16)).astype(np.float32)
    write_clustered_store(str(tmp_path / "q"), "q", 5, rng, centres)
    write_clustered_store(str(tmp_path / "i"), "i", 20, rng, centres)
    landmarks = {f"i{n:03d}": f"L{n % 3}" for n in range(20)}
    view = embedding_map(str(tmp_path / "q"), str(tmp_path / "i"), landmarks, max_points=100)
    sources = {"i000": jpeg(50, 40, 1)}
    html = render_report({}, {}, [], embedding=view, sources=sources)
    svg = html[html.index('<svg id="emap"') : html.index("</svg>")]
    assert svg.count("<circle") == 25 and svg.count('fill="none"') == 5  # 5 query rings
    assert "<title>index i000 · L0</title>" in svg and "<title>query q004</title>" in svg
    assert svg.count("hsl(") == 20  # the index images have landmarks; the queries none (grey)
    assert "data:image/jpeg;base64," in html[html.index('id="emap-photos"') :]
    assert "5 of 5 query and 20 of 20 index descriptors" in html
    capped = embedding_map(str(tmp_path / "q"), str(tmp_path / "i"), None, max_points=8)
    assert (int(capped.is_query.sum()), int((~capped.is_query).sum())) == (4, 4)
    assert "4 of 5 query and 4 of 20 index descriptors" in render_report({}, {}, [], embedding=capped)

    clicked = click_in_chromium(html, "#emap circle[data-i='5']", "#emap-photo", tmp_path)
    assert clicked.startswith("data:image/jpeg;base64,")  # i000, the first index point, has a photo


def click_in_chromium(html: str, target: str, figure: str, tmp_path: Path) -> str:
    """Open the page in the system Chromium (Playwright), click ``target``; the ``figure``'s img src."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed: the click check needs a browser on PATH")
    from playwright.sync_api import sync_playwright

    page_file = tmp_path / "map.html"
    page_file.write_text(html)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(page_file.as_uri())
            page.locator(target).dispatch_event("click")  # on the mark itself: t-SNE marks may overlap
            return page.get_attribute(f"{figure} img", "src") or ""
        finally:
            browser.close()


# ---------------------------------------------------------------------------------------------------------
# The run report's sections (issue 27): index quality, failed rows, per-query AP, provenance
# ---------------------------------------------------------------------------------------------------------


def section(page_html: str, section_id: str) -> str:
    """The text of the report section with ``section_id``."""
    start = page_html.index(f'id="{section_id}"')
    return "".join(Page(page_html[start : page_html.index("</section>", start)]).text)


def test_index_quality_shows_the_recall_at_the_stored_setting() -> None:
    from pipeline.report import quality_html

    quality = {
        "nprobe": 8,
        "k_factor": None,
        "queries": 500,
        "nprobe_reason": "cheapest setting with 100-recall@100 ≥ 0.95",
        "rows": [
            {"nprobe": 4, "k_factor": None, "1-recall@1": 0.91, "100-recall@100": 0.90, "qps": 9000.0},
            {"nprobe": 8, "k_factor": None, "1-recall@1": 0.993, "100-recall@100": 0.962, "qps": 5000.0},
        ],
    }
    page = render_report({}, {}, [], sections=[("Index quality", quality_html(quality))])
    text = section(page, "index-quality")
    assert "99.3%" in text and "96.2%" in text and "500" in text and "cheapest setting" in text
    assert "91.0%" not in text  # another nprobe's row
    assert "No recall report" in quality_html(None)


def test_failed_rows_are_counted_by_reason_with_examples(tmp_path: Path) -> None:
    from pipeline import store
    from pipeline.report import error_groups, errors_html
    from pipeline.run import RunPaths

    paths = RunPaths(str(tmp_path))
    reasons = ["missing", "not_an_image", "missing", "missing", "missing"]
    records = [
        store.ErrorRecord(f"img{i}", f"s3://KEY:SECRET@host/b/img{i}.jpg", "fetch", r, f"{r} at img{i}")
        for i, r in enumerate(reasons)
    ]
    store.write_shard(paths.index_store, 0, [], np.zeros((0, 4), np.float32), [], records, rows=5)
    store.write_shard(paths.query_store, 0, [], np.zeros((0, 4), np.float32), [], [], rows=0)
    groups = error_groups(paths, None)
    assert [(g.store, g.reason, g.count) for g in groups] == [
        ("index", "missing", 4),
        ("index", "not_an_image", 1),
    ]
    assert groups[0].examples == [
        ("img0", "missing at img0"),
        ("img2", "missing at img2"),
        ("img3", "missing at img3"),
    ]
    page = render_report({}, {}, [], sections=[("Failed rows", errors_html(groups))])
    text = section(page, "failed-rows")
    assert "missing" in text and "not_an_image" in text and "img1: not_an_image at img1" in text
    assert "img4" not in text  # three examples per reason
    assert "No failed rows" in errors_html([])


def test_per_query_ap_lists_every_query_worst_first_and_links_the_worst() -> None:
    from pipeline.report import query_ap_html

    aps = {"global": {"a": 0.5, "b": 0.1, "c": 1.0}, "reranked": {"a": 0.25, "b": 0.75, "c": 1.0}}
    html = query_ap_html("AP@100", aps, worst=["a", "b"])
    page = Page(html)
    rows = ["".join(Page("<tr" + row).text) for row in html.split("<tr")[2:]]
    assert "the 2 lowest are shown first" in "".join(page.text)
    assert [r[:1] for r in rows] == ["a", "b", "c"]  # by the re-ranked AP
    assert rows[0] == "a50.0%25.0%" and rows[2] == "c100.0%100.0%"
    assert [a["href"] for a in page.find("a")] == [f"#{_anchor('a')}", f"#{_anchor('b')}"]


def test_provenance_is_shown_redacted() -> None:
    from pipeline.report import provenance_html

    html = provenance_html(
        {
            "preset": "delg-r50-gldv2",
            "weights sha256": "ab" * 32,
            "index store": "s3://AKIAXYZ:topsecret@host/bucket/idx",
            "run settings": {"out": "s3://AKIAXYZ:topsecret@host/bucket/run", "k": 100},
        }
    )
    text = "".join(Page(html).text)
    assert "delg-r50-gldv2" in text and "ab" * 32 in text and '"k": 100' in text
    assert "topsecret" not in html and "AKIAXYZ" not in html
