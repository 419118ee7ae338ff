"""The re-ranking stage: search shortlist Parquet + two descriptor stores → re-ranked shortlist Parquet.

Input columns: query_id (string), rank (int32, 1 = best), id (string), score (float32, global similarity).
Output: the same columns re-ranked (rank and score are the new ones) plus inliers (int32, −1 = not verified:
beyond ``top`` or without local features) and global_score (float32, the input score). The config is kept in
the Parquet schema metadata under ``rerank_config``; the method that ran (verify, a global refinement, or a
refinement followed by verification of the refined shortlist) under ``rerank_method``, with the refinement's
settings under ``global_rerank_config``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch

from pipeline import storage, store
from pipeline.index.search import read_rankings
from pipeline.rerank.config import RerankConfig
from pipeline.rerank.global_rerank import GlobalRerankConfig, GlobalVectors, parse_method, refine_shortlists
from pipeline.rerank.match import Matches, gather_points, match, pad
from pipeline.rerank.score import rerank_order, rerank_scores
from pipeline.rerank.verify import Verification, verify
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
    method: str = "verify"  # what ran: see pipeline.rerank.global_rerank.parse_method


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


def rerank_shortlist(
    query: Features | None,
    candidates: Sequence[Features | None],
    global_scores: np.ndarray,
    config: RerankConfig = RerankConfig(),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-rank one query's shortlist, given in global order: (order (C,), inliers (C,), scores (C,)).

    The first ``config.top`` candidates that have local features are verified; the others get inliers −1.
    """
    inliers = np.full(len(candidates), -1, dtype=np.int64)
    verifiable = [i for i, c in enumerate(candidates[: config.top]) if c is not None]
    if query is not None and verifiable:
        _, verification = verify_candidates(query, [candidates[i] for i in verifiable], config)
        inliers[verifiable] = verification.inliers.cpu().numpy()
    scores = rerank_scores(
        global_scores,
        inliers,
        mode=config.score,
        min_inliers=config.min_inliers,
        saturate_at=config.saturate_at,
    )
    return rerank_order(scores), inliers, scores


def _read_shortlists(url: str, options: Options) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Per query (by id): (query_id, candidate ids (C,), global scores (C,)) in rank order."""
    return [
        (query_id, np.asarray(r.ids, dtype=object), r.scores.astype(np.float32))
        for query_id, r in read_rankings(url, options).items()
    ]


def _output_table(
    parts: list[dict[str, np.ndarray]], config: RerankConfig, method: str, global_config: GlobalRerankConfig
) -> pa.Table:
    def column(name: str) -> np.ndarray:
        return np.concatenate([p[name] for p in parts]) if parts else np.array([])

    table = pa.table(
        {
            "query_id": pa.array(column("query_id").tolist(), type=pa.string()),
            "rank": pa.array(column("rank"), type=pa.int32()),
            "id": pa.array(column("id").tolist(), type=pa.string()),
            "score": pa.array(column("score"), type=pa.float32()),
            "inliers": pa.array(column("inliers"), type=pa.int32()),
            "global_score": pa.array(column("global_score"), type=pa.float32()),
        }
    )
    return table.replace_schema_metadata(
        {
            "rerank_config": json.dumps(asdict(config)),
            "rerank_method": method,
            "global_rerank_config": json.dumps(asdict(global_config)),
        }
    )


def _global_vectors(
    refinement: str,
    shortlists: list[tuple[str, np.ndarray, np.ndarray]],
    stores: tuple[str, str],
    index_url: str | None,
    options: Options,
) -> tuple[GlobalVectors, GlobalVectors]:
    """(queries, shortlisted images) global vectors from the (query, index) stores; DBA: the refined ones."""
    queries = GlobalVectors.read(stores[0], {q for q, _, _ in shortlists}, options)
    if not refinement.startswith("dba"):
        return queries, GlobalVectors.read(stores[1], {i for _, ids, _ in shortlists for i in ids}, options)
    if index_url is None:
        raise ValueError(f"method {refinement!r} needs the index URL whose dba.parquet holds the DBA vectors")
    from pipeline.index.dba import read_dba  # here: pipeline.index imports this package (update → dba)

    table = read_dba(index_url, options)
    return queries, GlobalVectors.of(table.ids, table.refined)


def rerank(
    search_results: str,
    query_store: str,
    index_store: str,
    out: str,
    config: RerankConfig = RerankConfig(),
    *,
    options: Options = None,
    method: str = "verify",
    global_config: GlobalRerankConfig = GlobalRerankConfig(),
    index_url: str | None = None,
) -> RerankSummary:
    """Re-rank every query's shortlist and write the result Parquet to ``out``.

    ``method``: "verify" (geometric verification), a global refinement ("qe", "dba", "dba+qe",
    "superglobal"; DBA vectors from ``index_url``'s dba.parquet), or a refinement followed by verification
    of the refined shortlist ("superglobal+verify", ...). Local features are read for exactly the queries and
    top-``config.top`` candidates being verified, ``config.queries_per_batch`` queries at a time. Images
    absent from a store are left unverified (and unrefined).
    """
    start = time.perf_counter()
    refinement, verifying = parse_method(method)
    shortlists = _read_shortlists(search_results, options)
    if refinement:
        vectors = _global_vectors(refinement, shortlists, (query_store, index_store), index_url, options)
    query_reader = store.LocalReader(query_store, options)
    index_reader = store.LocalReader(index_store, options)
    parts: list[dict[str, np.ndarray]] = []
    pairs = no_query = no_cand = 0
    for first in range(0, len(shortlists), config.queries_per_batch):
        batch = shortlists[first : first + config.queries_per_batch]
        original = {q: (ids, g) for q, ids, g in batch}
        if refinement:  # the refined order and scores replace the global ones from here on
            refined = refine_shortlists(refinement, *vectors, batch, global_config, resolve_device(config))
            batch = [(q, ids[o], s) for (q, ids, _), (o, s) in zip(batch, refined, strict=True)]
        verified = batch if verifying else []
        queries = query_reader.read([q for q, _, _ in verified if q in query_reader])
        wanted = {i for _, ids, _ in verified for i in ids[: config.top] if i in index_reader}
        cands = index_reader.read(sorted(wanted))
        for query_id, ids, global_scores in batch:
            candidates = [cands.get(i) for i in ids]
            if verifying:
                order, inliers, scores = rerank_shortlist(
                    queries.get(query_id), candidates, global_scores, config
                )
            else:
                order, inliers, scores = np.arange(len(ids)), np.full(len(ids), -1), global_scores
            input_scores = dict(zip(*original[query_id], strict=True))
            shortlisted = min(len(ids), config.top) if verifying else 0
            no_query += verifying and query_id not in queries
            no_cand += sum(c is None for c in candidates[:shortlisted])
            pairs += int((inliers >= 0).sum())
            parts.append(
                {
                    "query_id": np.full(len(ids), query_id, dtype=object),
                    "rank": np.arange(1, len(ids) + 1),
                    "id": ids[order],
                    "score": scores[order],
                    "inliers": inliers[order],
                    "global_score": np.array([input_scores[i] for i in ids[order]], dtype=np.float32),
                }
            )
        log.info("re-ranked %d/%d queries", min(first + len(batch), len(shortlists)), len(shortlists))
    storage.write_parquet(out, _output_table(parts, config, method, global_config), options)
    return RerankSummary(
        queries=len(shortlists),
        pairs_verified=pairs,
        queries_without_features=no_query,
        candidates_without_features=no_cand,
        seconds=time.perf_counter() - start,
        method=method,
    )
