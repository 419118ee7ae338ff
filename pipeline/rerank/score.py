"""Re-ranking scores: one number per candidate whose descending order is the re-ranked order.

"inliers" (reference): verified candidates (inliers ≥ min_inliers) by (inliers, global similarity), then the
rest by global similarity. "saturate": verified ones by min(inliers, k)/k + global, then the rest by global.
"shortlist": inlier counts judged against the shortlist's own, mostly false, candidates: a verified candidate
gains ``boost`` × clip((z − z_from) / z_span, 0, 1) on its global similarity, z = (inliers − median) / spread
over the shortlist's verified candidates (spread = 1.4826 · median absolute deviation, at least 1). Untrained
local features give false pairs tens of inliers (their level varies with the images), so only counts that
stand out of the shortlist's own distribution move a candidate, and by a bounded amount.
"""

from __future__ import annotations

import numpy as np

from pipeline.rerank.config import SCORE_MODES

MAD_TO_SIGMA = 1.4826  # median absolute deviation → standard deviation of a normal distribution


def _unit(global_scores: np.ndarray) -> np.ndarray:
    """Global similarities (inner products of unit vectors, in [-1, 1]) mapped into [0, 1)."""
    return np.clip((global_scores + 1) / 2, 0, 1) * (1 - 1e-6)


def shortlist_z(inliers: np.ndarray, verified: np.ndarray) -> np.ndarray:
    """(C,) robust z-scores of inlier counts against the verified candidates' median and spread."""
    if not verified.any():
        return np.zeros(len(inliers))
    counts = inliers[verified].astype(np.float64)
    median = np.median(counts)
    spread = max(MAD_TO_SIGMA * np.median(np.abs(counts - median)), 1.0)
    return (inliers - median) / spread


def rerank_scores(
    global_scores: np.ndarray,
    inliers: np.ndarray,
    *,
    mode: str = "inliers",
    min_inliers: int = 0,
    saturate_at: int = 20,
    z_from: float = 2.0,
    z_span: float = 16.0,
    boost: float = 0.5,
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
    similarity = np.clip(global_scores, -1, 1) + 1  # [0, 2]
    if mode == "inliers":
        kept = inliers + g
    elif mode == "saturate":
        # min(inliers, k)/k + global, moved from [-1, 2] into [0, 1]
        kept = (np.minimum(inliers, saturate_at) / saturate_at + similarity) / 3
    else:
        gain = np.clip((shortlist_z(inliers, verified) - z_from) / z_span, 0, 1)
        kept = (similarity + boost * gain) / (2 + boost)  # into [0, 1]
    return np.where(verified, kept, g - 1)


def rerank_order(scores: np.ndarray) -> np.ndarray:
    """Permutation sorting (C,) scores descending; ties keep the input (global) order."""
    return np.argsort(-np.asarray(scores), kind="stable")
