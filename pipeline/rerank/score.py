"""Re-ranking scores: one number per candidate whose descending order is the re-ranked order.

"inliers" (reference): verified candidates (inliers ≥ min_inliers) by (inliers, global similarity), then the
rest by global similarity. "saturate": verified ones by min(inliers, k)/k + global, then the rest by global.
"""

from __future__ import annotations

import numpy as np

from pipeline.rerank.config import SCORE_MODES


def _unit(global_scores: np.ndarray) -> np.ndarray:
    """Global similarities (inner products of unit vectors, in [-1, 1]) mapped into [0, 1)."""
    return np.clip((global_scores + 1) / 2, 0, 1) * (1 - 1e-6)


def rerank_scores(
    global_scores: np.ndarray,
    inliers: np.ndarray,
    *,
    mode: str = "inliers",
    min_inliers: int = 0,
    saturate_at: int = 20,
) -> np.ndarray:
    """(C,) float64 scores from (C,) global similarities and (C,) inlier counts (−1 = not verified).

    Every verified candidate scores ≥ 0 and every unverified one < 0, so the latter keep their global order
    below the former. In "inliers" mode the score is inliers + g' with g' in [0, 1) increasing with the global
    similarity, which orders exactly by (inliers, global).
    """
    if mode not in SCORE_MODES:
        raise ValueError(f"mode={mode!r}: allowed {SCORE_MODES}")
    global_scores = np.asarray(global_scores, dtype=np.float64)
    inliers = np.asarray(inliers, dtype=np.int64)
    if global_scores.shape != inliers.shape or global_scores.ndim != 1:
        raise ValueError(
            f"global_scores {global_scores.shape} and inliers {inliers.shape} must be equal 1-D shapes"
        )
    g = _unit(global_scores)
    verified = (inliers >= min_inliers) & (inliers >= 0)
    if mode == "inliers":
        kept = inliers + g
    else:
        # min(inliers, k)/k + global, moved from [-1, 2] into [0, 1]
        kept = (np.minimum(inliers, saturate_at) / saturate_at + np.clip(global_scores, -1, 1) + 1) / 3
    return np.where(verified, kept, g - 1)


def rerank_order(scores: np.ndarray) -> np.ndarray:
    """Permutation sorting (C,) scores descending; ties keep the input (global) order."""
    return np.argsort(-np.asarray(scores), kind="stable")
