"""The straightforward per-pair verifier the batched one is measured against (tests and benchmark).

It does what the DELG reference does for one (query, candidate) pair: nearest-neighbour matching with a
KD-tree and a descriptor-distance bound, then scikit-image's ``ransac`` with an affine model.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.spatial import cKDTree
from skimage.measure import ransac
from skimage.transform import AffineTransform


def reference_matches(
    query_desc: np.ndarray, cand_desc: np.ndarray, max_distance: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """(query indices, candidate indices) of query features whose nearest candidate feature is < max_distance."""
    if len(query_desc) == 0 or len(cand_desc) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    distances, nearest = cKDTree(cand_desc).query(query_desc, k=1, distance_upper_bound=max_distance)
    kept = np.nonzero(distances < max_distance)[0]
    return kept, nearest[kept]


def reference_inliers(
    src: np.ndarray, dst: np.ndarray, *, threshold: float = 20.0, trials: int = 1000, seed: int = 0
) -> tuple[int, np.ndarray]:
    """Inlier count and (M,) mask of skimage ransac with AffineTransform (min_samples 3) on matches (M, 2)."""
    if len(src) < 3:
        return 0, np.zeros(len(src), dtype=bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No inliers found" on unverifiable pairs
        _, inliers = ransac(
            (src.astype(np.float64), dst.astype(np.float64)),
            AffineTransform,
            min_samples=3,
            residual_threshold=threshold,
            max_trials=trials,
            rng=seed,
        )
    if inliers is None:
        return 0, np.zeros(len(src), dtype=bool)
    return int(inliers.sum()), inliers


def reference_pair(
    query_kp: np.ndarray, query_desc: np.ndarray, cand_kp: np.ndarray, cand_desc: np.ndarray, seed: int = 0
) -> int:
    """Inliers of one pair end to end (match, then verify), as the reference re-ranking computes them.

    The reference fits the model index image → query, so its threshold is in query pixels.
    """
    q, c = reference_matches(query_desc, cand_desc)
    return reference_inliers(cand_kp[c], query_kp[q], seed=seed)[0]
