"""One query's re-ranking: match its local features against its shortlist's, verify every pair in one batch
(RANSAC), score and re-order; plus the settings the descriptor stores record and score "gate"'s null sample.

The batch stage (pipeline.rerank.stage) runs this over every query; the query service and ``--explain`` call it
on one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from pipeline import store
from pipeline.errors import ConfigError
from pipeline.rerank.config import RerankConfig, from_settings
from pipeline.rerank.match import Matches, gather_points, match, pad
from pipeline.rerank.score import config_scores, gate, rerank_order
from pipeline.rerank.verify import Verification, verify
from pipeline.storage import Options


class Features(Protocol):
    """What re-ranking needs of an image's local features (pipeline.store.LocalFeatures has it)."""

    keypoints: np.ndarray  # (N, 2) float32, (x, y) pixels
    descriptors: np.ndarray  # (N, D) float32, L2-normalised


def resolve_device(config: RerankConfig) -> torch.device:
    return torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def verify_candidates(
    query: Features, candidates: Sequence[Features], config: RerankConfig = RerankConfig()
) -> tuple[Matches, Verification]:
    """Match one query against C candidates and verify all C pairs in one batch (usable on two images)."""
    if not candidates:
        raise ValueError("verify_candidates: got no candidates; need at least one")
    device = resolve_device(config)
    cand_desc, cand_mask = pad([c.descriptors for c in candidates], device)  # (C, Nc, D), (C, Nc)
    cand_kp, _ = pad([c.keypoints for c in candidates], device)  # (C, Nc, 2)
    query_desc = torch.as_tensor(np.asarray(query.descriptors, dtype=np.float32), device=device)  # (Nq, D)
    query_kp = torch.as_tensor(np.asarray(query.keypoints, dtype=np.float32), device=device)[
        None
    ]  # (1, Nq, 2)
    matches = match(
        query_desc,
        cand_desc,
        cand_mask=cand_mask,
        max_distance=config.max_distance,
        ratio=config.ratio,
        mutual=config.mutual,
        max_elements=config.max_elements,
    )
    query_pts, cand_pts = gather_points(query_kp, matches.query_idx), gather_points(cand_kp, matches.cand_idx)
    # the model maps src → dst and the threshold is measured in dst pixels
    src, dst = (cand_pts, query_pts) if config.residual_in == "query" else (query_pts, cand_pts)
    verification = verify(
        src,
        dst,
        matches.valid,
        model=config.model,
        threshold=config.threshold,
        trials=config.trials,
        seed=config.seed,
        refit=config.refit,
        max_elements=config.max_elements,
    )
    return matches, verification


@dataclass(frozen=True)
class RerankedShortlist:
    """One query's shortlist after re-ranking; arrays are indexed by position in the GLOBAL order."""

    order: np.ndarray  # (C,) global positions, best first
    inliers: np.ndarray  # (C,) int64, −1 = not verified
    scores: np.ndarray  # (C,) re-ranking scores
    matches: dict[
        int, tuple[np.ndarray, np.ndarray]
    ]  # position → (M, 2) query, (M, 2) candidate inlier points
    null_inliers: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (N,) "gate" null counts
    level: float = float("nan")  # "gate": the inlier count a candidate must exceed to move; nan otherwise


def _inlier_points(
    query: Features, candidate: Features, matches: Matches, verification: Verification, b: int
) -> tuple[np.ndarray, np.ndarray]:
    keep = (verification.inlier_mask[b] & matches.valid[b]).cpu().numpy()
    query_idx = matches.query_idx[b].cpu().numpy()[keep]
    cand_idx = matches.cand_idx[b].cpu().numpy()[keep]
    return np.asarray(query.keypoints)[query_idx], np.asarray(candidate.keypoints)[cand_idx]


def rerank_shortlist(
    query: Features | None,
    candidates: Sequence[Features | None],
    global_scores: np.ndarray,
    config: RerankConfig = RerankConfig(),
    null_candidates: Sequence[Features] = (),
) -> RerankedShortlist:
    """Re-rank one query's shortlist, given in global order.

    The first ``config.top`` candidates that have local features are verified; the others get inliers −1.
    Score "gate" also verifies up to ``config.null_size`` of ``null_candidates`` (images surely not matching the
    query, e.g. ``null_sample``'s outside its shortlist) and tops their counts up from the far half of the
    verified shortlist: the query's null (pipeline.rerank.score). The inlier points of the first
    ``config.keep_matches`` verified hits (inliers > 0) of the new order are kept.
    """
    inliers = np.full(len(candidates), -1, dtype=np.int64)
    verifiable = [i for i, c in enumerate(candidates[: config.top]) if c is not None]
    gating = config.score == "gate"
    nulls = list(null_candidates)[: config.null_size] if gating else []
    found = verification = None
    null_inliers, level = np.zeros(0, np.int64), float("nan")
    if query is not None and verifiable:
        found, verification = verify_candidates(query, [candidates[i] for i in verifiable] + nulls, config)
        counts = verification.inliers.cpu().numpy()
        inliers[verifiable] = counts[: len(verifiable)]
        if gating:
            null_inliers, level = gate(counts[len(verifiable) :], inliers, config)
    scores = config_scores(global_scores, inliers, config, level)
    order = rerank_order(scores)
    kept: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if found is not None and verification is not None:
        batch_of = {position: b for b, position in enumerate(verifiable)}
        for position in [int(p) for p in order if inliers[p] > 0][: config.keep_matches]:
            kept[position] = _inlier_points(
                query, candidates[position], found, verification, batch_of[position]
            )
    return RerankedShortlist(order, inliers, scores, kept, null_inliers, level)


def null_sample(database_ids: Iterable[str], size: int, seed: int) -> list[str]:
    """The first ``size`` of a seeded shuffle of the database's ids: one fixed sample for every query (read
    once; a smaller size takes a prefix), from which each query's null leaves out its shortlist and itself."""
    ids = sorted(database_ids)
    return [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))[:size]]


def read_null_sample(reader: store.LocalReader, config: RerankConfig) -> dict[str, Features]:
    """Score "gate": the local features of ``null_sample``'s database images (read once per run); else {}."""
    if config.score != "gate":
        return {}
    return reader.read(null_sample(reader.ids(), config.null_size, config.seed))


def nulls_for(sample: Mapping[str, Features], query_id: str, shortlist: Iterable[str]) -> list[Features]:
    """The null sample's images that may serve as one query's null: those outside its shortlist, not itself."""
    outside = {*shortlist, query_id}
    return [features for image_id, features in sample.items() if image_id not in outside]


def stored_settings(store_url: str, options: Options = None) -> dict[str, Any]:
    """A store's re-ranking settings from its _run.json ({} when it has none: reference defaults).

    Stores written before settings were recorded get the defaults of their local head.
    """
    from pipeline.config import rerank_settings

    info = store.read_run_info(store_url, options) or {}
    if "rerank" in info:
        return dict(info["rerank"])
    head = info.get("config", {}).get("local_head")
    return rerank_settings(head) if head else {}


def config_from_stores(
    query_store: str,
    index_store: str,
    overrides: Mapping[str, Any] | None = None,
    options: Options = None,
) -> RerankConfig:
    """The stores' re-ranking settings with explicit ``overrides`` on top; the stores must agree."""
    overrides = dict(overrides or {})
    query, index = stored_settings(query_store, options), stored_settings(index_store, options)
    differ = sorted(
        k for k in query.keys() | index.keys() if query.get(k) != index.get(k) and k not in overrides
    )
    if query and index and differ:
        raise ConfigError(
            f"query and index stores record different re-ranking settings ({', '.join(differ)}): "
            "were they extracted with different presets? Set those explicitly to choose."
        )
    return from_settings(index or query, overrides)
