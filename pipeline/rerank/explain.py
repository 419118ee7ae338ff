"""Why one query's results moved (``landmark-index rerank --explain QUERY_ID``): its shortlist re-ranked by the
stage's own ``rerank_shortlist``, each candidate with its global score, inliers, the query's null level and
its position before and after."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline import store
from pipeline.errors import InputError
from pipeline.rerank.config import RerankConfig
from pipeline.rerank.shortlist import nulls_for, read_null_sample, rerank_shortlist
from pipeline.results import read_rankings
from pipeline.storage import Options, redact


@dataclass(frozen=True)
class Candidate:
    id: str
    global_rank: int  # 1 = first of the search results
    global_score: float
    inliers: int  # −1 = not verified (beyond ``top``, or no local features)
    rank: int  # position after re-ranking, 1 first


@dataclass(frozen=True)
class Explanation:
    query_id: str
    score: str  # the scoring mode (pipeline.rerank.score)
    level: float  # "gate": inliers a candidate must exceed to move; nan for the other modes
    null_inliers: np.ndarray  # (N,) "gate": the query's inlier counts on images surely not matching it
    query_has_features: bool
    candidates: list[Candidate]  # in global order


def explain_query(
    search_results: str,
    query_store: str,
    index_store: str,
    query_id: str,
    config: RerankConfig = RerankConfig(),
    options: Options = None,
) -> Explanation:
    """Re-rank ``query_id``'s shortlist from ``search_results`` as the stage's "verify" method does."""
    rankings = read_rankings(search_results, options)
    if query_id not in rankings:
        raise InputError(
            f"query {query_id!r} is not in {redact(search_results)} ({len(rankings)} queries); "
            "pass a query_id of the search results"
        )
    ranking = rankings[query_id]
    query_reader, index_reader = (
        store.LocalReader(query_store, options),
        store.LocalReader(index_store, options),
    )
    query = query_reader.read([query_id])[query_id] if query_id in query_reader else None
    features = index_reader.read([i for i in ranking.ids[: config.top] if i in index_reader])
    nulls = nulls_for(read_null_sample(index_reader, config), query_id, ranking.ids)
    scores = np.asarray(ranking.scores, dtype=np.float32)
    result = rerank_shortlist(query, [features.get(i) for i in ranking.ids], scores, config, nulls)
    rank = np.empty(len(result.order), np.int64)
    rank[result.order] = np.arange(1, len(result.order) + 1)
    candidates = [
        Candidate(
            image_id,
            position + 1,
            float(scores[position]),
            int(result.inliers[position]),
            int(rank[position]),
        )
        for position, image_id in enumerate(ranking.ids)
    ]
    return Explanation(
        query_id, config.score, result.level, result.null_inliers, query is not None, candidates
    )
