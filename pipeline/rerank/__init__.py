"""Re-ranking: batched local-feature matching, batched geometric verification (RANSAC) and scoring."""

from __future__ import annotations

from pipeline.rerank.config import RerankConfig
from pipeline.rerank.match import Matches, gather_points, match, pad
from pipeline.rerank.score import rerank_order, rerank_scores
from pipeline.rerank.stage import (
    RerankedShortlist,
    RerankRun,
    RerankSummary,
    config_from_stores,
    rerank,
    rerank_shortlist,
    verify_candidates,
)
from pipeline.rerank.verify import Verification, verify

__all__ = [
    "Matches",
    "RerankConfig",
    "RerankRun",
    "RerankSummary",
    "RerankedShortlist",
    "Verification",
    "config_from_stores",
    "gather_points",
    "match",
    "pad",
    "rerank",
    "rerank_order",
    "rerank_scores",
    "rerank_shortlist",
    "verify",
    "verify_candidates",
]
