"""The search page at ``/``: one HTML file, no external assets; results drawn by pipeline.report's code."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline import report, storage, versions
from pipeline.query import Hit, IndexVersion, Shortlist

TEMPLATE = Path(__file__).with_name("page.html")


def page_html() -> str:
    """The page, styled like the HTML report."""
    return TEMPLATE.read_text().replace("/*REPORT_STYLE*/", report.STYLE)


class ImageSources:
    """Where a version's index images are, by id: its state.parquet's urls (versioned roots; an index folder
    has none), looked up per response for the ids it shows (versions.StateUrls: a replica never holds the
    whole table). The index's own images only, never a path a request names; read through pipeline.storage
    with the server's credentials."""

    def __init__(self, version: IndexVersion, options: storage.Options = None) -> None:
        state_url = storage.join(version.index_url, versions.STATE)
        self.state = (
            versions.StateUrls(version.index_url, options) if storage.exists(state_url, options) else None
        )

    def urls(self, ids: Sequence[str]) -> dict[str, str | None]:
        """The urls of those ``ids`` whose image the version knows."""
        return self.state.urls(ids) if self.state is not None else {}


def results_html(
    photo: str,
    data: bytes,
    shortlist: Shortlist,
    hits: Sequence[Hit] | None,
    sources: ImageSources,
    k: int,
    options: storage.Options = None,
) -> str:
    """The report's section for one query: the global ranking, the re-ranked one (``hits``), inlier lines."""
    shown = [str(i) for i in shortlist.ids[:k]]
    urls = sources.urls([*shown, *(h.id for h in hits or ())])
    global_ranking = [
        report.Hit(i, float(s), urls.get(i)) for i, s in zip(shown, shortlist.scores[:k], strict=True)
    ]
    reranked = [report.Hit(h.id, h.score, urls.get(h.id), h.inliers) for h in hits or ()]
    matches = {
        h.id: (np.asarray(h.matches[0]), np.asarray(h.matches[1]))
        for h in hits or ()
        if h.matches is not None
    }
    view = report.QueryView(photo, data, global_ranking, reranked, matches)
    return report.query_section(view, options=options)
