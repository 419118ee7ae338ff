"""What a report shows: one query's rankings (:class:`QueryView` of :class:`Hit`), failed rows by reason, and
the report's settings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import ConfigError, InputError

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
            raise InputError(f"hit {self.id!r} has label {self.label!r}; allowed: {list(LABELS)} or None")


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

    def match_pairs(self, most: int) -> list[Hit]:
        """The top re-ranked hits that have inlier matches, at most ``most`` (drawn with their inliers)."""
        return [hit for hit in self.reranked if hit.id in self.matches][:most]


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
                raise ConfigError(f"ReportSettings.{name} = {getattr(self, name)}; must be ≥ {minimum}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ConfigError(f"ReportSettings.jpeg_quality = {self.jpeg_quality}; allowed 1..95")


@dataclass(frozen=True)
class ErrorGroup:
    """The failed rows of one reason in one descriptor store."""

    store: str  # "index" | "queries"
    reason: str
    count: int
    examples: Sequence[tuple[str, str]]  # (row id, message), a few
