"""Re-ranking: batched local-feature matching, batched geometric verification (RANSAC) and scoring.

Names load their submodule on first use (pipeline.lazy): the CLI reads option choices from
pipeline.rerank.config without importing torch.
"""

from __future__ import annotations

from pipeline.lazy import lazy_exports

lazy_exports(
    __name__,
    {
        "config": ("RerankConfig",),
        "match": ("Matches", "gather_points", "match", "pad"),
        "score": ("rerank_order", "rerank_scores"),
        "shortlist": ("RerankedShortlist", "config_from_stores", "rerank_shortlist", "verify_candidates"),
        "stage": ("RerankRun", "RerankSummary", "rerank"),
        "verify": ("Verification", "verify"),
    },
)
