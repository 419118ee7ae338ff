"""The re-ranking stage: search results + two descriptor stores → re-ranked results (formats: pipeline.results).

Re-ranked results keep, besides each hit's inlier count, the inlier points of the top verified hits, so the
report draws them without re-running verification. The method that ran (verify, a global refinement, or a
refinement followed by verification of the refined shortlist) is recorded with the results.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from pipeline import store
from pipeline.rerank.config import RerankConfig, from_settings
from pipeline.rerank.global_rerank import GlobalRerankConfig, GlobalVectors, parse_method, refine_shortlists
from pipeline.rerank.match import Matches, gather_points, match, pad
from pipeline.rerank.score import gate, rerank_order, rerank_scores
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
    scores = rerank_scores(
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


Shortlist = tuple[str, np.ndarray, np.ndarray]  # query id, candidate ids (C,), scores (C,) in rank order


def _output_rows(query_id: str, ids: np.ndarray, input_scores: np.ndarray, r: RerankedShortlist) -> dict:
    """The results-file columns of one re-ranked query (see pipeline.results); ``input_scores`` are the
    search scores of ``ids``."""
    matches = [flatten_matches(*r.matches[p]) if p in r.matches else None for p in r.order.tolist()]
    return {
        "query_id": [query_id] * len(ids),
        "rank": np.arange(1, len(ids) + 1),
        "id": ids[r.order].tolist(),
        "score": r.scores[r.order],
        "inliers": r.inliers[r.order],
        "global_score": input_scores[r.order],
        "matches": matches,
    }


@dataclass
class _Counts:
    pairs: int = 0
    no_query: int = 0
    no_cand: int = 0


@dataclass(frozen=True)
class _Plan:
    """What runs on each batch: an optional global refinement, then optional verification."""

    config: RerankConfig
    refinement: str | None
    verifying: bool
    global_config: GlobalRerankConfig
    vectors: tuple[GlobalVectors, GlobalVectors] | None  # (queries, shortlisted images) for the refinement
    nulls: Mapping[str, Features]  # score "gate": null_sample's images, by id


def _refine(batch: list[Shortlist], plan: _Plan) -> list[Shortlist]:
    """The batch's shortlists in refined order, with refined scores (they replace the global ones)."""
    if not plan.refinement:
        return batch
    assert plan.vectors is not None
    refined = refine_shortlists(
        plan.refinement, *plan.vectors, batch, plan.global_config, resolve_device(plan.config)
    )
    return [(q, ids[o], s) for (q, ids, _), (o, s) in zip(batch, refined, strict=True)]


def _unverified(scores: np.ndarray) -> RerankedShortlist:
    return RerankedShortlist(np.arange(len(scores)), np.full(len(scores), -1, np.int64), scores, {})


def _rerank_batch(
    batch: list[Shortlist],
    readers: tuple[store.LocalReader, store.LocalReader],
    plan: _Plan,
    counts: _Counts,
) -> list[dict]:
    """Re-rank a batch of queries, reading their local features (and their top candidates') together."""
    config, (query_reader, index_reader) = plan.config, readers
    input_scores = {q: dict(zip(ids, scores, strict=True)) for q, ids, scores in batch}
    batch = _refine(batch, plan)
    verified = batch if plan.verifying else []
    queries = query_reader.read([q for q, _, _ in verified if q in query_reader])
    cands = index_reader.read(
        sorted({i for _, ids, _ in verified for i in ids[: config.top] if i in index_reader})
    )
    parts = []
    for query_id, ids, scores in batch:
        if plan.verifying:
            candidates = [cands.get(i) for i in ids]
            nulls = nulls_for(plan.nulls, query_id, ids)
            reranked = rerank_shortlist(queries.get(query_id), candidates, scores, config, nulls)
            counts.no_query += query_id not in queries
            counts.no_cand += sum(c is None for c in candidates[: min(len(ids), config.top)])
            counts.pairs += int((reranked.inliers >= 0).sum())
        else:
            reranked = _unverified(scores)
        searched = np.array([input_scores[query_id][i] for i in ids], dtype=np.float32)
        parts.append(_output_rows(query_id, ids, searched, reranked))
    return parts


def _global_vectors(
    refinement: str,
    shortlists: list[Shortlist],
    stores: tuple[str, str],
    index_url: str | None,
    options: Options,
) -> tuple[GlobalVectors, GlobalVectors]:
    """(queries, shortlisted images) global vectors from the (query, index) stores, in the space of the index
    at ``index_url`` when given (its whitening); DBA: the refined ones, from the index."""
    # here, not at the top: pipeline.index imports this package (update → dba)
    from pipeline.index import io, whitening
    from pipeline.index.dba import read_dba

    dba = refinement.startswith("dba")
    if dba and index_url is None:
        raise ValueError(f"method {refinement!r} needs the index URL whose dba.parquet holds the DBA vectors")
    table = read_dba(index_url, options) if dba else None
    space = whitening.space(index_url, io.read_params(index_url, options), options) if index_url else None
    queries = GlobalVectors.read(stores[0], {q for q, _, _ in shortlists}, options).mapped(space)
    if table is not None:
        return queries, GlobalVectors.of(table.ids, table.refined)
    wanted = {i for _, ids, _ in shortlists for i in ids}
    return queries, GlobalVectors.read(stores[1], wanted, options).mapped(space)


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
    """Re-rank every query's shortlist and write the results to ``out``.

    ``method``: "verify" (geometric verification), a global refinement ("qe", "dba", "dba+qe",
    "superglobal"; DBA vectors from ``index_url``'s dba.parquet), or a refinement followed by verification
    of the refined shortlist ("superglobal+verify", ...). Local features are read for exactly the queries and
    top-``config.top`` candidates being verified, ``config.queries_per_batch`` queries at a time. Images
    absent from a store are left unverified (and unrefined).
    """
    start = time.perf_counter()
    refinement, verifying = parse_method(method)
    shortlists = _read_shortlists(search_results, options)
    vectors = (
        _global_vectors(refinement, shortlists, (query_store, index_store), index_url, options)
        if refinement
        else None
    )
    readers = (store.LocalReader(query_store, options), store.LocalReader(index_store, options))
    nulls = read_null_sample(readers[1], config) if verifying else {}
    plan = _Plan(config, refinement, verifying, global_config, vectors, nulls)
    parts: list[dict] = []
    counts = _Counts()
    for first in range(0, len(shortlists), config.queries_per_batch):
        batch = shortlists[first : first + config.queries_per_batch]
        parts += _rerank_batch(batch, readers, plan, counts)
        log.info("re-ranked %d/%d queries", min(first + len(batch), len(shortlists)), len(shortlists))
    write_reranked(out, parts, asdict(config), options, method=method, global_config=asdict(global_config))
    return RerankSummary(
        queries=len(shortlists),
        pairs_verified=counts.pairs,
        queries_without_features=counts.no_query,
        candidates_without_features=counts.no_cand,
        seconds=time.perf_counter() - start,
        method=method,
    )
