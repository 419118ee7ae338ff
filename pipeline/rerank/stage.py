"""The re-ranking stage: search shortlist Parquet + two descriptor stores → re-ranked shortlist Parquet.

Input columns: query_id (string), rank (int32, 1 = best), id (string), score (float32, global similarity).
Output: the same columns re-ranked (rank and score are the new ones) plus inliers (int32, −1 = not verified:
beyond ``top`` or without local features) and global_score (float32, the input score). The config is kept in
the Parquet schema metadata under ``rerank_config``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import torch

from pipeline import storage, store
from pipeline.index.search import read_rankings
from pipeline.rerank.config import RerankConfig, from_settings
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
        z_from=config.z_from,
        z_span=config.z_span,
        boost=config.boost,
    )
    return rerank_order(scores), inliers, scores


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
        raise ValueError(
            f"query and index stores record different re-ranking settings ({', '.join(differ)}): "
            "were they extracted with different presets? Set those explicitly to choose."
        )
    return from_settings(index or query, overrides)


def _read_shortlists(url: str, options: Options) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Per query (by id): (query_id, candidate ids (C,), global scores (C,)) in rank order."""
    return [
        (query_id, np.asarray(r.ids, dtype=object), r.scores.astype(np.float32))
        for query_id, r in read_rankings(url, options).items()
    ]


def _output_table(parts: list[dict[str, np.ndarray]], config: RerankConfig) -> pa.Table:
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
    return table.replace_schema_metadata({"rerank_config": json.dumps(asdict(config))})


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
    parts: list[dict[str, np.ndarray]] = []
    pairs = no_query = no_cand = 0
    for first in range(0, len(shortlists), config.queries_per_batch):
        batch = shortlists[first : first + config.queries_per_batch]
        queries = query_reader.read([q for q, _, _ in batch if q in query_reader])
        wanted = {i for _, ids, _ in batch for i in ids[: config.top] if i in index_reader}
        cands = index_reader.read(sorted(wanted))
        for query_id, ids, global_scores in batch:
            candidates = [cands.get(i) for i in ids]
            order, inliers, scores = rerank_shortlist(
                queries.get(query_id), candidates, global_scores, config
            )
            shortlisted = min(len(ids), config.top)
            no_query += query_id not in queries
            no_cand += sum(c is None for c in candidates[:shortlisted])
            pairs += int((inliers >= 0).sum())
            parts.append(
                {
                    "query_id": np.full(len(ids), query_id, dtype=object),
                    "rank": np.arange(1, len(ids) + 1),
                    "id": ids[order],
                    "score": scores[order],
                    "inliers": inliers[order],
                    "global_score": global_scores[order],
                }
            )
        log.info("re-ranked %d/%d queries", min(first + len(batch), len(shortlists)), len(shortlists))
    storage.write_parquet(out, _output_table(parts, config), options)
    return RerankSummary(
        queries=len(shortlists),
        pairs_verified=pairs,
        queries_without_features=no_query,
        candidates_without_features=no_cand,
        seconds=time.perf_counter() - start,
    )
