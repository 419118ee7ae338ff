"""Re-ranking settings: one frozen dataclass shared by match, verify, score and the stage."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from pipeline.errors import ConfigError

MODELS = ("affine", "homography")
SCORE_MODES = ("inliers", "saturate", "shortlist", "gate")
RESIDUAL_SPACES = ("query", "candidate")
GLOBAL_METHODS = (
    "qe",
    "dba",
    "dba+qe",
    "superglobal",
)  # global refinements; each may be followed by "+verify"
METHODS = ("verify", *GLOBAL_METHODS, *(f"{m}+verify" for m in GLOBAL_METHODS))  # the re-rank stage's choices


@dataclass(frozen=True)
class RerankConfig:
    # Matching (reference: nearest neighbour with L2 distance < 1.0 on L2-normalised descriptors).
    max_distance: float = 1.0  # accept a nearest neighbour closer than this (L2, unit descriptors: 0..2)
    ratio: float | None = None  # Lowe ratio test d1 < ratio · d2; None = off (reference)
    mutual: bool = False  # keep only matches that are nearest neighbours both ways

    # Verification (reference: affine, 3-point samples, 20 px in query pixels, 1000 trials, fixed seed).
    model: str = "affine"  # "affine" (3-point) or "homography" (4-point DLT)
    # "query" (reference): models map candidate → query pixels, so the threshold is in query pixels, the
    # same ruler for every candidate; "candidate": query → candidate, threshold in each candidate's pixels
    residual_in: str = "query"
    threshold: float = 20.0  # inlier if the reprojection error (pixels of ``residual_in``) is below this
    trials: int = 1000  # RANSAC hypotheses per pair (degenerate samples count as trials and are skipped)
    seed: int = 0  # torch.Generator seed; every pair sees the same uniform stream (batch-invariant)
    refit: bool = True  # least-squares refit on the best consensus set, kept when it does not lose inliers

    # Scoring (reference: sort by (inliers, global similarity)). "shortlist", "gate": see pipeline.rerank.score.
    # "inliers": (inliers, global); "saturate": min(inliers, k)/k + global; "gate": candidates whose inliers
    # are significant against the query's null (its counts on images surely not matching) move up, in global
    # order; the rest keep their global order
    score: str = "inliers"
    min_inliers: int = 0  # fewer inliers than this = unverified: kept in global order below verified ones
    saturate_at: int = 20  # k of the "saturate" score
    # "shortlist": z = (inliers − shortlist median) / robust spread; boost = clip((z − z_from) / z_span, 0, 1)
    z_from: float = 2.0  # candidates this many spreads above the shortlist's median start gaining
    z_span: float = 16.0  # ... and gain the full boost this many spreads further
    boost: float = 0.5  # added to the global similarity at full boost
    # "gate" (pipeline.rerank.score; benchmarks/RESULTS.md, issue 28): the null is this many images, a fixed
    # random sample (``seed``) of the database outside the query's shortlist, topped up from the far half of
    # the verified shortlist when the database is too small. A cost choice (they are verified with the
    # shortlist: 40 % more pairs at top 100), not a quality knob: the level is a 95 % upper confidence bound,
    # so a smaller null makes the gate stricter, never looser
    null_size: int = 40
    # "gate": expected false promotions per query (NFA bound); smaller = stricter. Chosen leave-one-dataset-out
    # among the conventional 0.01, 0.05, 0.1 and 1 on 7 real sets (ties: the smaller)
    false_alarms: float = 0.01
    top: int = 100  # re-rank this many candidates per query; the rest keep their global order below

    # Execution.
    device: str | None = None  # "cpu", "cuda", ...; None = CUDA when available
    max_elements: int = 1 << 22  # bound on pairs × trials × matches (and pairs × features²) per tensor chunk
    queries_per_batch: int = 16  # queries whose candidates' local features are read together

    # Output.
    keep_matches: int = 3  # store the inlier pairs of this many top verified hits per query (for the report)

    def __post_init__(self) -> None:
        if not self.max_distance > 0:
            raise ConfigError(f"max_distance={self.max_distance}: must be > 0")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ConfigError(f"ratio={self.ratio}: must be in (0, 1] or None")
        if self.model not in MODELS:
            raise ConfigError(f"model={self.model!r}: allowed {MODELS}")
        if self.residual_in not in RESIDUAL_SPACES:
            raise ConfigError(f"residual_in={self.residual_in!r}: allowed {RESIDUAL_SPACES}")
        if not self.threshold > 0:
            raise ConfigError(f"threshold={self.threshold}: must be > 0 pixels")
        if self.trials < 1:
            raise ConfigError(f"trials={self.trials}: must be >= 1")
        if self.score not in SCORE_MODES:
            raise ConfigError(f"score={self.score!r}: allowed {SCORE_MODES}")
        if self.min_inliers < 0:
            raise ConfigError(f"min_inliers={self.min_inliers}: must be >= 0")
        if self.saturate_at < 1:
            raise ConfigError(f"saturate_at={self.saturate_at}: must be >= 1")
        if not self.z_span > 0 or not self.boost >= 0:
            raise ConfigError(f"z_span={self.z_span}, boost={self.boost}: need z_span > 0 and boost >= 0")
        if self.null_size < 0 or not self.false_alarms > 0:
            raise ConfigError(
                f"null_size={self.null_size}, false_alarms={self.false_alarms}: need >= 0 and > 0"
            )
        if self.top < 1:
            raise ConfigError(f"top={self.top}: must be >= 1")
        if self.max_elements < 1:
            raise ConfigError(f"max_elements={self.max_elements}: must be >= 1")
        if self.queries_per_batch < 1:
            raise ConfigError(f"queries_per_batch={self.queries_per_batch}: must be >= 1")
        if self.keep_matches < 0:
            raise ConfigError(f"keep_matches={self.keep_matches}: must be >= 0")


# how re-ranking runs, not what it computes
EXECUTION = ("device", "keep_matches", "max_elements", "queries_per_batch", "top")


def settings_of(config: RerankConfig) -> dict[str, Any]:
    """The matching, verification and scoring settings: what travels with a store's local features."""
    return {k: v for k, v in asdict(config).items() if k not in EXECUTION}


def overrides_from(values: Mapping[str, Any]) -> dict[str, Any]:
    """The RerankConfig fields ``values`` sets (None: unset, the stores' setting applies); ratio 0 = off."""
    given = {f.name: values[f.name] for f in fields(RerankConfig) if values.get(f.name) is not None}
    if given.get("ratio") == 0:
        given["ratio"] = None
    return given


def from_settings(settings: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> RerankConfig:
    """A config from stored settings (keys this version does not know are ignored) and explicit overrides."""
    known = {f.name for f in fields(RerankConfig)}
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise ConfigError(f"unknown re-ranking setting(s) {unknown}; allowed: {sorted(known)}")
    return RerankConfig(**{**{k: v for k, v in settings.items() if k in known}, **(overrides or {})})
