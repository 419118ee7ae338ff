"""Re-ranking scores: one number per candidate whose descending order is the re-ranked order.

"inliers" (reference): verified candidates (inliers ≥ min_inliers) by (inliers, global similarity), then the
rest by global similarity. "saturate": verified ones by min(inliers, k)/k + global, then the rest by global.
"shortlist": inlier counts judged against the shortlist's own, mostly false, candidates: a verified candidate
gains ``boost`` × clip((z − z_from) / z_span, 0, 1) on its global similarity, z = (inliers − median) / spread
over the shortlist's verified candidates (spread = 1.4826 · median absolute deviation, at least 1). Untrained
local features give false pairs tens of inliers (their level varies with the images), so only counts that
stand out of the shortlist's own distribution move a candidate, and by a bounded amount.

"gate" (a-contrario): a candidate moves only when its inlier count is significant against a null measured for
this query. The null is the inlier counts the query gets against images that are surely not its matches (a
fixed, seeded random sample of the database; in a database barely larger than the shortlist, the far half of the
global ranking): untrained local features give false pairs an inlier level that varies from query to query
(tens of inliers for one, a handful for another), so no fixed count or curve carries from one collection to
the next, while each query's own false pairs measure it directly. False-pair counts are right-skewed, roughly
log-normal, so the null is μ, σ = median and 1.4826 · MAD of log(1 + count) (robust to the few true matches a
random sample of a small database holds; σ at least ``MIN_LOG_SPREAD``). Testing C candidates, each at level
α = ε / C (ε = ``false_alarms``), bounds the expected number of false promotions per query (the number of
false alarms, NFA) by ε.

The level is an upper confidence bound on the null's (1 − α) quantile, not its point estimate: log(1 + level)
= μ̂ + z_α σ̂ + z_γ · σ̂ √((π/2 + 1.3605 z_α²) / n), the last term z_γ standard errors of the estimated
quantile (the asymptotic variances of the median and of the MAD from n counts, uncorrelated), γ =
``LEVEL_CONFIDENCE`` (a one-sided tolerance bound). A null of a few counts cannot pin down a quantile this far
out (at n = 10 its standard error is 1.4 σ): with the bound its error makes the gate stricter, never looser, so
the null's size is a cost and power choice (40 images: 40 % more pairs at top 100, a margin of 1.2 σ against
2.3 σ at 10 and 0.8 σ at 80), not a setting whose wrong value promotes false pairs. ε is an expected count of
false promotions: the conventional levels are 0.01–0.1 (as a per-query error rate) and 1 (the a-contrario
"meaningful" threshold); the default, 0.01, is the one chosen leave-one-dataset-out among them
(benchmarks/RESULTS.md, issue 28).

A candidate above the level is promoted, ahead of every candidate that is not; promoted candidates keep their
global order among themselves (the test says "a match", and the global similarity ranks matches as well as
inlier counts do, without letting a strong false pair overtake a true one), and so does the rest. With fewer
than ``MIN_NULL`` null counts nothing is promoted: the global order stands; the level is never below RANSAC's
minimal sample. What the bound does not cover: images surely not matching are less similar to the query than
the false pairs of its shortlist, which get more inliers (similar-looking buildings give more chance matches;
a 128-px distractor with 30 features gives fewer than a 1,024-px photo with 1,000): measured on real sets, the
false promotions per query exceed ε, and the small ε is the margin that keeps them from costing mAP.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

from pipeline.errors import ConfigError
from pipeline.rerank.config import SCORE_MODES, RerankConfig
from pipeline.rerank.verify import MIN_SAMPLES

MAD_TO_SIGMA = 1.4826  # median absolute deviation → standard deviation of a normal distribution
MIN_NULL = 5  # fewer null counts than this say nothing about the false pairs' level: promote nothing
# floor of the null's spread in log(1 + count): identical null counts (e.g. all 0 with trained features)
# still ask a candidate for a clear margin (× e^(z · 0.25) ≈ 2.2 at z = 3.1) over them
MIN_LOG_SPREAD = 0.25
# one-sided confidence that the level is at or above the null's true quantile (a tolerance bound): the null's
# centre and spread are estimates from a few tens of counts, and a level estimated too low promotes false pairs
LEVEL_CONFIDENCE = 0.95
# asymptotic variances, in units of σ² / n, of the median and of 1.4826 · MAD for normal data (their
# efficiencies 2/π and 0.3675 relative to the mean and the standard deviation); the two are uncorrelated
MEDIAN_VARIANCE = np.pi / 2
MAD_VARIANCE = 0.5 / 0.3675


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


def null_counts(sample_inliers: np.ndarray, shortlist_inliers: np.ndarray, size: int) -> np.ndarray:
    """(≤ size,) a query's null: its counts on the (S,) sample images (up to ``size``), topped up when the
    sample is short with the last verified counts of its (C,) shortlist in global order (−1 = not verified),
    from the far half only: the near half is where its matches are."""
    sample = np.asarray(sample_inliers, dtype=np.int64)[:size]
    shortlist = np.asarray(shortlist_inliers, dtype=np.int64)
    verified = shortlist[shortlist >= 0]
    far = verified[len(verified) // 2 :]
    return np.concatenate([sample, far[len(far) - min(size - len(sample), len(far)) :]])


def null_level(
    null_inliers: np.ndarray, candidates: int, false_alarms: float, confidence: float = LEVEL_CONFIDENCE
) -> float:
    """The inlier count that a false pair exceeds with probability at most ``false_alarms / candidates``, at
    ``confidence``, from the query's (N,) null counts (see the module docstring); inf when there are fewer
    than ``MIN_NULL``."""
    counts = np.asarray(null_inliers, dtype=np.float64)
    counts = counts[counts >= 0]
    if len(counts) < MIN_NULL or candidates < 1:
        return float("inf")
    logs = np.log1p(counts)
    centre = float(np.median(logs))
    spread = max(MAD_TO_SIGMA * float(np.median(np.abs(logs - centre))), MIN_LOG_SPREAD)
    z = NormalDist().inv_cdf(1 - min(false_alarms / candidates, 0.5))
    # standard error of the estimated quantile centre + z · spread, for the one-sided confidence bound
    error = spread * np.sqrt((MEDIAN_VARIANCE + MAD_VARIANCE * z**2) / len(counts))
    return float(np.expm1(centre + z * spread + NormalDist().inv_cdf(confidence) * error))


def gate(
    sample_inliers: np.ndarray, shortlist_inliers: np.ndarray, config: RerankConfig
) -> tuple[np.ndarray, float]:
    """A query's null counts and its level for score "gate", from its counts on the null sample's images and
    its (C,) shortlist's (−1 = not verified). The level is at least RANSAC's minimal sample: a count that
    any three (affine) or four (homography) putative matches reach is no evidence of a match."""
    shortlist = np.asarray(shortlist_inliers)[: config.top]
    null = null_counts(sample_inliers, shortlist, config.null_size)
    level = null_level(null, int((shortlist >= 0).sum()), config.false_alarms)
    return null, max(level, float(MIN_SAMPLES[config.model]))


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
    level: float = float("inf"),
) -> np.ndarray:
    """(C,) float64 scores from (C,) global similarities and (C,) inlier counts (−1 = not verified).

    Every verified candidate scores ≥ 0 and every unverified one < 0, so the latter keep their global order
    below the former. In "inliers" mode the score is inliers + g' with g' in [0, 1) increasing with the global
    similarity, which orders exactly by (inliers, global). In "gate" mode (``level``: the query's null level)
    candidates above the level score 1 + g', all others g' − 1: two blocks, each in global order.
    """
    if mode not in SCORE_MODES:
        raise ConfigError(f"mode={mode!r}: allowed {SCORE_MODES}")
    global_scores = np.asarray(global_scores, dtype=np.float64)
    inliers = np.asarray(inliers, dtype=np.int64)
    if global_scores.shape != inliers.shape or global_scores.ndim != 1:
        raise ValueError(
            f"global_scores {global_scores.shape} and inliers {inliers.shape} must be equal 1-D shapes"
        )
    g = _unit(global_scores)
    verified = (inliers >= min_inliers) & (inliers >= 0)
    similarity = np.clip(global_scores, -1, 1) + 1  # [0, 2]
    if mode == "gate":
        return np.where(verified & (inliers > level), 1 + g, g - 1)
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


def config_scores(
    global_scores: np.ndarray, inliers: np.ndarray, config: RerankConfig, level: float = float("inf")
) -> np.ndarray:
    """:func:`rerank_scores` with ``config``'s scoring settings (the stage's and the benchmarks' one call)."""
    return rerank_scores(
        global_scores,
        inliers,
        mode=config.score,
        min_inliers=config.min_inliers,
        saturate_at=config.saturate_at,
        z_from=config.z_from,
        z_span=config.z_span,
        boost=config.boost,
        level=level,
    )
