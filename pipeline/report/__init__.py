"""A self-contained HTML report of a retrieval run, readable offline: one .html file, no external assets.

The page shows the summary metrics and stage timings, then per query its ranked thumbnails (global ranking and
re-ranked, side by side, each hit marked positive / negative / junk when ground truth exists) and, for the top
re-ranked pairs, the inlier matches drawn as SVG lines between the two images. Images are inlined as small
base64 JPEG thumbnails; every piece of text (ids are user data) is HTML-escaped.

Rooms: :mod:`~pipeline.report.views` (what a page shows, and the settings), :mod:`~pipeline.report.thumbnails`
(the images, loaded before rendering), :mod:`~pipeline.report.html` (rendering: a pure function of the
gathered data) and :mod:`~pipeline.report.gather` (a run's data from its files; the ``report`` stage).
Names load their submodule on first use (pipeline.lazy): the run config reads ReportSettings without faiss.
"""

from __future__ import annotations

from pipeline.lazy import lazy_exports

lazy_exports(
    __name__,
    {
        "views": ("BADGES", "LABELS", "ErrorGroup", "Hit", "ImageSource", "QueryView", "ReportSettings"),
        "thumbnails": ("Thumbnail", "Thumbnails", "load_thumbnails", "make_thumbnail"),
        "html": (
            "STYLE",
            "ReportData",
            "_anchor",
            "errors_html",
            "hit_html",
            "match_svg",
            "matches_html",
            "provenance_html",
            "quality_html",
            "query_ap_html",
            "query_html",
            "query_section",
            "ranking_html",
            "render_page",
            "render_report",
            "summary_html",
            "timings_html",
            "write_report",
        ),
        "gather": (
            "ERROR_EXAMPLES",
            "WORST_QUERIES",
            "ReportSummary",
            "RunReport",
            "error_groups",
            "gather_run",
            "provenance",
            "render_run",
            "report_run",
        ),
    },
)
