"""Global-feature re-ranking: α-weighted query expansion, database-side augmentation, SuperGlobal refinement.

Every function works on a whole query batch with matrix operations (any torch device). A batch of shortlists
is padded to one length C: ``cands`` (B, C, D) holds the candidates' global descriptors in shortlist order and
``valid`` (B, C) marks the real ones. Descriptors are L2-normalised (similarity = inner product).

- α-QE (Radenović, Tolias, Chum, TPAMI 2018): q' = normalise(q + Σ_{top-k} max(q·x, 0)^α x); the shortlist is
  scored again with q'. Here it re-scores the shortlist rather than re-searching the whole index.
- DBA (database-side augmentation, same paper's weighting): every database vector becomes
  normalise(x + Σ_{its top-k database neighbours} max(x·y, 0)^α y), computed offline (pipeline.index.dba).
- SuperGlobal (Shao et al., ICCV 2023), on the top M of the shortlist: each of the M descriptors is replaced
  by the weighted mean of itself (weight 1) and its K nearest among the M (weights β·similarity); the refined
  query is the element-wise max of the K+1 best refined descriptors by q·d'; the score is (q·d' + q'·d')/2.

Sources of the defaults: α = 3 is the paper's; the public cnnimageretrieval-pytorch code holds no α-QE or DBA,
so the neighbour counts (10) are the common choice of later evaluations, not a published code default — tune
them down when a landmark has fewer images (benchmarks/RESULTS.md). M = 400, K = 9, β = 0.15 are the defaults
of SuperGlobal's public re-ranking code. Negative similarities get weight 0 in all three (ours: SuperGlobal's
code does not clamp; a negative weight could make its weighted mean's denominator vanish).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import store
from pipeline.errors import ConfigError
from pipeline.rerank.config import GLOBAL_METHODS, METHODS
from pipeline.storage import Options


@dataclass(frozen=True)
class GlobalRerankConfig:
    # α-QE (Radenović et al. TPAMI 2018: α = 3).
    qe_k: int = (
        10  # nQE: top shortlist entries averaged into the query (which counts too); see the module doc
    )
    qe_alpha: float = 3.0  # weight = similarity^α (α = 3 published; 0 = plain average QE)
    # DBA (same weighting, applied to database vectors offline).
    dba_k: int = 10  # database neighbours averaged into each database vector (itself always counts)
    dba_alpha: float = 3.0  # weight = similarity^α (α = 3 as for α-QE)
    # SuperGlobal re-ranking (published code defaults: M = 400, K = 9, β = 0.15).
    sg_m: int = 400  # shortlist entries refined and re-ranked (capped by the shortlist length)
    sg_k: int = 9  # neighbours among the M averaged into each descriptor; the query takes the max of K + 1
    sg_beta: float = 0.15  # neighbour weight = β · similarity (the descriptor itself weighs 1)

    def __post_init__(self) -> None:
        for name in ("qe_k", "dba_k", "sg_m", "sg_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")
        for name in ("qe_alpha", "dba_alpha"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 0")
        if not self.sg_beta > 0:
            raise ConfigError(f"sg_beta={self.sg_beta}: must be > 0")


def parse_method(method: str) -> tuple[str | None, bool]:
    """ "superglobal+verify" → ("superglobal", True); "verify" → (None, True). Raises ValueError otherwise."""
    if method not in METHODS:
        raise ConfigError(f"method={method!r}: allowed {', '.join(METHODS)}")
    if method == "verify":
        return None, True
    refinement = method.removesuffix("+verify")
    return refinement, refinement != method


def _check(queries: torch.Tensor, cands: torch.Tensor, valid: torch.Tensor) -> None:
    if queries.ndim != 2 or cands.ndim != 3 or cands.shape[::2] != queries.shape:
        raise ValueError(
            f"queries {tuple(queries.shape)} must be (B, D) and cands {tuple(cands.shape)} (B, C, D)"
        )
    if valid.shape != cands.shape[:2] or valid.dtype != torch.bool:
        raise ValueError(
            f"valid {tuple(valid.shape)} {valid.dtype} must be bool (B, C) = {tuple(cands.shape[:2])}"
        )


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def _top_k(
    scores: torch.Tensor, valid: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k best valid entries along the last axis: (values, indices, taken mask), k capped at the length."""
    masked = scores.masked_fill(~valid, float("-inf"))
    values, indices = masked.topk(min(k, scores.shape[-1]), dim=-1)
    return values, indices, torch.isfinite(values)


def alpha_weighted_sum(
    anchors: torch.Tensor, neighbours: torch.Tensor, sims: torch.Tensor, taken: torch.Tensor, alpha: float
) -> torch.Tensor:
    """normalise(anchor + Σ max(sim, 0)^α · neighbour): (..., D) from (..., D), (..., k, D), (..., k), (..., k)."""
    weights = torch.where(taken, sims.clamp(min=0).pow(alpha), torch.zeros_like(sims))  # (..., k)
    return _normalise(anchors + torch.einsum("...k,...kd->...d", weights, neighbours))


def alpha_qe_scores(
    queries: torch.Tensor, cands: torch.Tensor, valid: torch.Tensor, k: int = 10, alpha: float = 3.0
) -> torch.Tensor:
    """(B, C) similarities of the shortlist to the α-expanded queries (−inf where not valid).

    The expansion takes the k most similar valid candidates (by q·x) with weights max(q·x, 0)^α, plus q itself.
    """
    _check(queries, cands, valid)
    sims = torch.einsum("bd,bcd->bc", queries, cands)  # (B, C)
    top, idx, taken = _top_k(sims, valid, k)  # (B, k')
    neighbours = torch.take_along_dim(cands, idx[..., None], dim=1)  # (B, k', D)
    expanded = alpha_weighted_sum(queries, neighbours, top, taken, alpha)  # (B, D)
    return torch.einsum("bd,bcd->bc", expanded, cands).masked_fill(~valid, float("-inf"))


def nearest_others(
    vectors: torch.Tensor, rows: torch.Tensor, k: int, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k most similar other rows of ``vectors`` (N, D) for each row position in ``rows`` (n,), exact.

    Returns similarities (n, k'), positions (n, k') and a taken mask (n, k'), k' = min(k, N − 1); best first.
    """
    width = min(k, vectors.shape[0] - 1)
    sims, idx, taken = [], [], []
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]  # (c,)
        scores = vectors[part] @ vectors.T  # (c, N)
        not_self = torch.ones_like(scores, dtype=torch.bool)
        not_self[torch.arange(len(part)), part] = False
        found = _top_k(scores, not_self, width)
        sims.append(found[0])
        idx.append(found[1])
        taken.append(found[2])
    empty = torch.zeros(0, max(width, 0), dtype=torch.long, device=vectors.device)
    if not sims:
        return empty.to(vectors.dtype), empty, empty.bool()
    return torch.cat(sims), torch.cat(idx), torch.cat(taken)


def database_augmentation(
    vectors: torch.Tensor, k: int = 10, alpha: float = 3.0, chunk: int = 1024
) -> torch.Tensor:
    """(N, D) DBA vectors: each row combined with its k most similar other rows (exact, chunked GEMM)."""
    if vectors.ndim != 2:
        raise ValueError(f"vectors {tuple(vectors.shape)} must be (N, D)")
    rows = torch.arange(vectors.shape[0], device=vectors.device)
    sims, idx, taken = nearest_others(vectors, rows, k, chunk)
    return alpha_weighted_sum(vectors, vectors[idx], sims, taken, alpha)


def superglobal_scores(
    queries: torch.Tensor, cands: torch.Tensor, valid: torch.Tensor, k: int = 9, beta: float = 0.15
) -> torch.Tensor:
    """(B, C) SuperGlobal scores (q·d' + q'·d')/2 of every valid candidate (−inf where not valid).

    Pass the top M of the shortlist as ``cands``: the neighbours of each descriptor are sought among them.
    """
    _check(queries, cands, valid)
    pair = torch.einsum("bcd,bed->bce", cands, cands)  # (B, C, C)
    sims, idx, taken = _top_k(pair, valid[:, None, :].expand_as(pair), k + 1)  # (B, C, k+1); itself first
    weights = torch.where(taken, beta * sims.clamp(min=0), torch.zeros_like(sims))
    weights[..., 0] = 1.0  # the descriptor itself (its own similarity is the top one)
    mixing = torch.zeros_like(pair).scatter_(2, idx, weights)  # (B, C, C): row c mixes its k + 1 neighbours
    refined = (mixing @ cands) / weights.sum(-1, keepdim=True)  # (B, C, D)
    first = torch.einsum("bd,bcd->bc", queries, refined)  # (B, C)
    _, best, best_taken = _top_k(first, valid, k + 1)  # (B, k+1)
    tops = torch.take_along_dim(refined, best[..., None], dim=1)  # (B, k+1, D)
    expanded = tops.masked_fill(~best_taken[..., None], float("-inf")).amax(dim=1)  # (B, D)
    second = torch.einsum("bd,bcd->bc", expanded, refined)
    return ((first + second) / 2).masked_fill(~valid, float("-inf"))


def refined_scores(
    refinement: str,
    queries: torch.Tensor,
    cands: torch.Tensor,
    valid: torch.Tensor,
    config: GlobalRerankConfig = GlobalRerankConfig(),
) -> torch.Tensor:
    """(B, C) scores of one refinement; for "dba"/"dba+qe" pass the candidates' DBA vectors as ``cands``.

    SuperGlobal scores only the first ``sg_m`` positions (the rest get −inf: they keep their order below).
    """
    _check(queries, cands, valid)
    if refinement == "qe" or refinement == "dba+qe":
        return alpha_qe_scores(queries, cands, valid, config.qe_k, config.qe_alpha)
    if refinement == "dba":
        return torch.einsum("bd,bcd->bc", queries, cands).masked_fill(~valid, float("-inf"))
    if refinement == "superglobal":
        m = min(config.sg_m, cands.shape[1])
        head = superglobal_scores(queries, cands[:, :m], valid[:, :m], config.sg_k, config.sg_beta)
        tail = torch.full_like(valid[:, m:], float("-inf"), dtype=head.dtype)
        return torch.cat([head, tail], dim=1)
    raise ConfigError(f"refinement={refinement!r}: allowed {', '.join(GLOBAL_METHODS)}")


def refined_order(refined: np.ndarray, global_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One query's (C,) refined scores (−inf = not refined) → (order (C,), scores in that order (C,)).

    Refined entries come first by refined score (ties: shortlist order), then the others in shortlist order.
    The scores returned are the refined ones scaled into [−1, 1] (SuperGlobal's may exceed 1), the others
    capped at the lowest of them: non-increasing, so a later verification sees the refined order as global.
    """
    refined = np.asarray(refined, dtype=np.float64)
    global_scores = np.asarray(global_scores, dtype=np.float64)
    done = np.isfinite(refined)
    order = np.concatenate(
        [np.flatnonzero(done)[np.argsort(-refined[done], kind="stable")], np.flatnonzero(~done)]
    )
    head = refined[done] / max(1.0, float(np.abs(refined[done]).max(initial=0.0)))
    floor = head.min(initial=1.0)
    tail = np.minimum(global_scores[~done], floor)
    return order, np.concatenate([np.sort(head)[::-1], tail])


@dataclass(frozen=True)
class GlobalVectors:
    """Global descriptors by image id: what the refinements read for queries and shortlisted images."""

    rows: dict[str, int]
    vectors: np.ndarray  # (N, D) float32

    @classmethod
    def of(cls, ids: Sequence[str], vectors: np.ndarray) -> GlobalVectors:
        return cls({image_id: i for i, image_id in enumerate(ids)}, np.asarray(vectors, dtype=np.float32))

    @classmethod
    def read(cls, store_url: str, wanted: set[str], options: Options = None) -> GlobalVectors:
        """The ``wanted`` images' vectors from a descriptor store (one shard in memory at a time)."""
        ids, vectors = [], []
        for shard_ids, shard_vectors in store.iter_global(store_url, options):  # (n,), (n, D)
            keep = np.fromiter((i in wanted for i in shard_ids), dtype=bool, count=len(shard_ids))
            ids.extend(shard_ids[keep].tolist())
            vectors.append(shard_vectors[keep])
        return cls.of(ids, np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32))

    def mapped(self, space: Callable[[np.ndarray], np.ndarray] | None) -> GlobalVectors:
        """The same images' vectors mapped by ``space`` (an index's whitening; None: unchanged)."""
        if space is None or not len(self.vectors):
            return self
        return GlobalVectors(self.rows, space(self.vectors))

    def get(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(n, D) vectors (zeros where absent) and (n,) found mask."""
        rows = np.array([self.rows.get(i, -1) for i in ids], dtype=np.int64)
        found = rows >= 0
        out = np.zeros((len(rows), self.vectors.shape[1] if self.vectors.ndim == 2 else 0), np.float32)
        out[found] = self.vectors[rows[found]]
        return out, found


def refine_shortlists(
    refinement: str,
    queries: GlobalVectors,
    index: GlobalVectors,
    shortlists: Sequence[tuple[str, np.ndarray, np.ndarray]],
    config: GlobalRerankConfig = GlobalRerankConfig(),
    device: torch.device | str = "cpu",
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per (query_id, ids (C,), global scores (C,)) shortlist: refined (order (C,), scores (C,)), one batch.

    ``index`` holds the DBA vectors for "dba" and "dba+qe". A query or candidate without a global vector is
    not refined (a query keeps its order; a candidate goes below the refined ones).
    """
    width = max((len(ids) for _, ids, _ in shortlists), default=0)
    query_vectors, query_found = queries.get([q for q, _, _ in shortlists])  # (B, D), (B,)
    cands = np.zeros((len(shortlists), width, query_vectors.shape[1]), np.float32)  # (B, C, D)
    valid = np.zeros((len(shortlists), width), dtype=bool)  # (B, C)
    for b, (_, ids, _) in enumerate(shortlists):
        cands[b, : len(ids)], found = index.get(ids)
        valid[b, : len(ids)] = found & query_found[b]
    scores = (
        refined_scores(
            refinement,
            torch.as_tensor(query_vectors, device=device),
            torch.as_tensor(cands, device=device),
            torch.as_tensor(valid, device=device),
            config,
        )
        .cpu()
        .numpy()
    )
    return [refined_order(scores[b, : len(ids)], g) for b, (_, ids, g) in enumerate(shortlists)]
