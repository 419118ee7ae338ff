"""The re-ranking stage: search results + two descriptor stores → re-ranked results (formats: pipeline.results).

Re-ranked results keep, besides each hit's inlier count, the inlier points of the top verified hits, so the
report draws them without re-running verification.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch

from pipeline import store
from pipeline.rerank.config import RerankConfig
from pipeline.rerank.match import Matches, gather_points, match, pad
from pipeline.rerank.score import rerank_order, rerank_scores
from pipeline.rerank.verify import Verification, verify
from pipeline.results import flatten_matches, read_rankings, write_reranked
from pipeline.storage import Options

log = logging.getLogger(__name__)


class Features(Protocol):
    """What re-ranking needs of an image's local features (pipeline.store.LocalFeatures has it)."""

    keypoints: np.ndarray  # (N, 2) float32, (x, y) pixels
    descriptors: np.ndarray  # (N, D) float32, L2-normalised


@dataclass(frozen=True)
class RerankSummary:
    queries: int
    pairs_verified: int
    queries_without_features: int
    candidates_without_features: int
    seconds: float


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
    verification = verify(
        gather_points(query_kp, matches.query_idx),
        gather_points(cand_kp, matches.cand_idx),
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
) -> RerankedShortlist:
    """Re-rank one query's shortlist, given in global order.

    The first ``config.top`` candidates that have local features are verified; the others get inliers −1.
    The inlier points of the first ``config.keep_matches`` verified hits (inliers > 0) of the new order are kept.
    """
    inliers = np.full(len(candidates), -1, dtype=np.int64)
    verifiable = [i for i, c in enumerate(candidates[: config.top]) if c is not None]
    found = verification = None
    if query is not None and verifiable:
        found, verification = verify_candidates(query, [candidates[i] for i in verifiable], config)
        inliers[verifiable] = verification.inliers.cpu().numpy()
    scores = rerank_scores(
        global_scores,
        inliers,
        mode=config.score,
        min_inliers=config.min_inliers,
        saturate_at=config.saturate_at,
    )
    order = rerank_order(scores)
    kept: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if found is not None and verification is not None:
        batch_of = {position: b for b, position in enumerate(verifiable)}
        for position in [int(p) for p in order if inliers[p] > 0][: config.keep_matches]:
            kept[position] = _inlier_points(
                query, candidates[position], found, verification, batch_of[position]
            )
    return RerankedShortlist(order, inliers, scores, kept)


def _read_shortlists(url: str, options: Options) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Per query (by id): (query_id, candidate ids (C,), global scores (C,)) in rank order."""
    return [
        (query_id, np.asarray(r.ids, dtype=object), r.scores.astype(np.float32))
        for query_id, r in read_rankings(url, options).items()
    ]


def _output_rows(query_id: str, ids: np.ndarray, global_scores: np.ndarray, r: RerankedShortlist) -> dict:
    """The results-file columns of one re-ranked query (see pipeline.results)."""
    matches = [flatten_matches(*r.matches[p]) if p in r.matches else None for p in r.order.tolist()]
    return {
        "query_id": [query_id] * len(ids),
        "rank": np.arange(1, len(ids) + 1),
        "id": ids[r.order].tolist(),
        "score": r.scores[r.order],
        "inliers": r.inliers[r.order],
        "global_score": global_scores[r.order],
        "matches": matches,
    }


@dataclass
class _Counts:
    pairs: int = 0
    no_query: int = 0
    no_cand: int = 0


def _rerank_batch(
    batch: list[tuple[str, np.ndarray, np.ndarray]],
    query_reader: store.LocalReader,
    index_reader: store.LocalReader,
    config: RerankConfig,
    counts: _Counts,
) -> list[dict]:
    """Re-rank a batch of queries, reading their local features (and their top candidates') together."""
    queries = query_reader.read([q for q, _, _ in batch if q in query_reader])
    wanted = {i for _, ids, _ in batch for i in ids[: config.top] if i in index_reader}
    cands = index_reader.read(sorted(wanted))
    parts = []
    for query_id, ids, global_scores in batch:
        candidates = [cands.get(i) for i in ids]
        reranked = rerank_shortlist(queries.get(query_id), candidates, global_scores, config)
        counts.no_query += query_id not in queries
        counts.no_cand += sum(c is None for c in candidates[: min(len(ids), config.top)])
        counts.pairs += int((reranked.inliers >= 0).sum())
        parts.append(_output_rows(query_id, ids, global_scores, reranked))
    return parts


def rerank(
    search_results: str,
    query_store: str,
    index_store: str,
    out: str,
    config: RerankConfig = RerankConfig(),
    *,
    options: Options = None,
) -> RerankSummary:
    """Re-rank every query's shortlist by geometric verification and write the result Parquet to ``out``.

    Local features are read for exactly the queries and top-``config.top`` candidates being verified,
    ``config.queries_per_batch`` queries at a time. Images absent from a store are left unverified.
    """
    start = time.perf_counter()
    shortlists = _read_shortlists(search_results, options)
    query_reader = store.LocalReader(query_store, options)
    index_reader = store.LocalReader(index_store, options)
    parts: list[dict] = []
    counts = _Counts()
    for first in range(0, len(shortlists), config.queries_per_batch):
        batch = shortlists[first : first + config.queries_per_batch]
        parts += _rerank_batch(batch, query_reader, index_reader, config, counts)
        log.info("re-ranked %d/%d queries", min(first + len(batch), len(shortlists)), len(shortlists))
    write_reranked(out, parts, asdict(config), options)
    return RerankSummary(
        queries=len(shortlists),
        pairs_verified=counts.pairs,
        queries_without_features=counts.no_query,
        candidates_without_features=counts.no_cand,
        seconds=time.perf_counter() - start,
    )
