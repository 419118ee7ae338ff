"""How good an approximate index is: k-recall@k against exact inner-product search, and queries/s, per nprobe.

Definition: the queries behave like a user's, who queries with a photo the index does not hold. Either a seeded
random sample of a query store (``QualityConfig.query_store``), or leave-one-out: a seeded random sample of the
stored vectors, each query's own id excluded from both its exact ground truth and the approximate results (a
stored query would otherwise find itself: 1-recall@1 reads 1.0 whatever the index). Other stored vectors equal
to the query stay, as near-duplicates of a user's photo would. The ground truth of a query is its exact top-k by
inner product over every indexed vector. k-recall@k = |approximate top-k ∩ exact top-k| / k, averaged.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from pipeline import store
from pipeline.errors import ConfigError
from pipeline.index.io import packed_in_blocks
from pipeline.index.refine import code_size, configure
from pipeline.index.whitening import Space, identity
from pipeline.storage import Options

RECALL_KS = (1, 10, 100)
PLATEAU = 0.001  # recall gains below this are not worth more probes
# A byte of 4-bit fast-scan codes costs this much of a byte of 8-bit PQ codes or refinement codes: lists are
# scanned 32 codes at a time in SIMD registers. Measured single-threaded on 50k × 2048 (issue 31,
# benchmarks/bench_index_settings.py): 8-bit PQ ≈ 1.9 ns per scanned byte, fast-scan ≈ 0.28, SQ8 refinement ≈ 1.3.
FAST_SCAN_BYTE_COST = 0.15


@dataclass(frozen=True)
class QualityConfig:
    queries: int = 1000  # query sample size (capped at the vectors it is drawn from)
    query_store: str | None = (
        None  # descriptor store of held-out queries (None: leave-one-out stored vectors)
    )
    target: float = 0.98  # the stored setting must reach this target_k-recall@target_k ...
    target_k: int = 100
    target_r1: float = 0.99  # ... and this 1-recall@1
    max_nprobe: int = 1024  # nprobe values tried: 1, 2, 4, ... up to min(nlist, this)
    k_factors: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # refined shortlist sizes tried, in multiples of k

    def __post_init__(self) -> None:
        if not (0 < self.target <= 1 and 0 < self.target_r1 <= 1):
            raise ConfigError(f"recall targets {self.target}, {self.target_r1}; must be in (0, 1]")
        if self.queries < 1 or self.target_k < 1:
            raise ConfigError(f"queries={self.queries}, target_k={self.target_k}; both must be ≥ 1")
        if not self.k_factors or min(self.k_factors) < 1:
            raise ConfigError(f"k_factors={self.k_factors}; need at least one, each ≥ 1")


def drop_self(
    scores: np.ndarray, ids: np.ndarray, exclude: np.ndarray | None, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` columns of ranked ``scores``/``ids`` (q, ≥ k) once each row's own id ``exclude`` (q,)
    is dropped (None: nothing dropped). Searched k + 1 deep, this is the exact top-k without self, ties and
    duplicates included: only the one entry holding that id goes, wherever it ranks."""
    if exclude is None:
        return scores[:, :k], ids[:, :k]
    order = np.argsort(ids == exclude[:, None], axis=1, kind="stable")[:, :k]  # self (if found) last
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def exact_knn(
    queries: np.ndarray,
    shard_urls: Sequence[str],
    bases: Sequence[int],
    k: int,
    options: Options = None,
    space: Space = identity,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner product of ``queries`` (q, d) over the shards' vectors mapped by ``space`` (the
    index's whitening), one shard in memory at a time, without each query's own id ``exclude`` (q,).

    Ids are ``base + row``, as the index stores them. Returns scores (q, k) float32 and ids (q, k) int64.
    """
    depth = k + (exclude is not None)
    heap = faiss.ResultHeap(len(queries), depth, keep_max=True)
    for url, base in zip(shard_urls, bases, strict=True):
        _, stored = store.read_global_shard(url, options)  # (n, D)
        vectors = space(stored)  # (n, d)
        scores, rows = faiss.knn(
            queries, vectors, min(depth, len(vectors)), metric=faiss.METRIC_INNER_PRODUCT
        )
        heap.add_result(scores, np.where(rows >= 0, rows + base, -1))
    heap.finalize()
    return drop_self(heap.D, heap.I, exclude, k)


def recall_at(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean |approx[:, :k] ∩ exact[:, :k]| / k over queries (ids; -1 entries never match)."""
    hits = [len(set(a[:k][a[:k] >= 0]) & set(e[:k])) for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits)) / k


def nprobe_values(nlist: int, max_nprobe: int) -> list[int | None]:
    """1, 2, 4, ... up to min(nlist, max_nprobe) and nlist itself if smaller; [None] for an exact index."""
    if nlist == 0:
        return [None]
    top = min(nlist, max_nprobe)
    return [2**e for e in range(int(np.log2(top)) + 1)] + ([top] if top & (top - 1) else [])


def measure(
    index: Any,
    queries: np.ndarray,
    exact_ids: np.ndarray,
    nprobe: int | None,
    k_factor: int | None = None,
    exclude: np.ndarray | None = None,
) -> dict[str, Any]:
    """Recall at 1/10/100 (those ≤ the ground-truth depth) and queries/s at one nprobe and refinement factor
    (``k_factor`` None: the unrefined index); leave-one-out queries search one deeper and drop their own id."""
    configure(index, nprobe, k_factor)
    k = exact_ids.shape[1]
    start = time.perf_counter()
    scores, ids = index.search(queries, k + (exclude is not None))
    _, ids = drop_self(scores, ids, exclude, k)
    seconds = time.perf_counter() - start
    row: dict[str, Any] = {"nprobe": nprobe, "k_factor": k_factor, "qps": len(queries) / max(seconds, 1e-9)}
    for r in (*RECALL_KS, k):
        if r <= k:
            row[f"{r}-recall@{r}"] = recall_at(ids, exact_ids, r)
    return row


@dataclass(frozen=True)
class Target:
    """What the stored setting must reach, and the per-query cost model that ranks the settings that do."""

    key: str  # e.g. "100-recall@100"
    recall: float
    recall_at_1: float
    probe_bytes: float  # PQ bytes scanned per probed list: ntotal / nlist · code size (fast-scan: weighted)
    candidate_bytes: float  # refinement bytes per re-scored candidate: k · code size

    def met(self, row: dict[str, Any]) -> bool:
        return row[self.key] >= self.recall and row["1-recall@1"] >= self.recall_at_1

    def cost(self, row: dict[str, Any]) -> float:
        """Bytes read per query: probed inverted lists + the refined candidates' codes."""
        return (row["nprobe"] or 0) * self.probe_bytes + (row["k_factor"] or 0) * self.candidate_bytes


def sweep(
    index: Any,
    queries: np.ndarray,
    exact_ids: np.ndarray,
    nprobes: Sequence[int | None],
    k_factor: int | None,
    target: Target,
    exclude: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Rows over increasing nprobe; a refined sweep stops once the target is met or recall stops rising."""
    rows: list[dict[str, Any]] = []
    for nprobe in nprobes:
        rows.append(measure(index, queries, exact_ids, nprobe, k_factor, exclude))
        plateau = len(rows) > 1 and rows[-1][target.key] - rows[-2][target.key] < PLATEAU
        if k_factor is not None and (target.met(rows[-1]) or plateau):
            break
    return rows


def pick(rows: Sequence[dict[str, Any]], target: Target) -> tuple[dict[str, Any], str]:
    """The cheapest row meeting the target; when none does (the codes, not nprobe, limit recall), the
    cheapest within PLATEAU of the best recall seen, rather than the costliest one tried."""
    reached = [r for r in rows if target.met(r)]
    if reached:
        row = min(reached, key=target.cost)
        why = f"cheapest setting with {target.key} ≥ {target.recall} and 1-recall@1 ≥ {target.recall_at_1}"
        return row, f"{why} ({row[target.key]:.4f}, {row['1-recall@1']:.4f})"
    best = max(r[target.key] for r in rows)
    row = min((r for r in rows if r[target.key] >= best - PLATEAU), key=target.cost)
    return row, (
        f"no setting reached {target.key} ≥ {target.recall} with 1-recall@1 ≥ {target.recall_at_1}; best "
        f"{target.key} {best:.4f}: cheapest within {PLATEAU} of it ({row[target.key]:.4f})"
    )


def probe_bytes(index: faiss.Index, nlist: int) -> float:
    """The cost of probing one list: its codes' bytes, fast-scan ones at FAST_SCAN_BYTE_COST (0 for exact)."""
    if not nlist:
        return 0.0
    weight = FAST_SCAN_BYTE_COST if packed_in_blocks(index) else 1.0
    return index.ntotal / nlist * faiss.extract_index_ivf(index).code_size * weight


def quality_report(
    index: faiss.Index,
    queries: np.ndarray,
    exact_ids: np.ndarray,
    nlist: int,
    config: QualityConfig = QualityConfig(),
    refined: Any = None,
    exclude: np.ndarray | None = None,
    query_set: str = "",
) -> dict[str, Any]:
    """Recall/QPS rows over nprobe for ``index`` alone (k_factor None) and, given the ``refined`` index
    (pipeline.index.refine.attach), over nprobe × k_factor; the cheapest setting reaching the target is stored.
    ``exact_ids`` (q, k) from :func:`exact_knn`; ``exclude`` (q,): leave-one-out queries' own ids, which the
    ground truth must exclude too; ``query_set`` says where the queries come from (quality.json's record)."""
    target_k = min(config.target_k, exact_ids.shape[1])
    target = Target(
        f"{target_k}-recall@{target_k}",
        config.target,
        config.target_r1,
        probe_bytes(index, nlist),
        target_k * code_size(refined) if refined is not None else 0.0,
    )
    nprobes = nprobe_values(nlist, config.max_nprobe)
    rows = [measure(index, queries, exact_ids, p, None, exclude) for p in nprobes]
    for k_factor in sorted(config.k_factors) if refined is not None else ():
        rows += sweep(refined, queries, exact_ids, nprobes, k_factor, target, exclude)
    row, reason = pick(rows, target)
    configure(refined if refined is not None else index, row["nprobe"], row["k_factor"])
    return {
        "definition": "queries: see query_set (leave-one-out: each query's own id excluded from its truth and "
        "its results); truth: exact inner-product top-k over all indexed vectors; k-recall@k = |approx top-k ∩ "
        "exact top-k| / k; k_factor: refined shortlist of k · k_factor PQ candidates (null: PQ order, no "
        "refinement); cost: PQ + refinement bytes read per query (fast-scan PQ bytes weighted by "
        f"{FAST_SCAN_BYTE_COST}: scanned in SIMD)",
        "query_set": query_set,
        "leave_one_out": exclude is not None,
        "queries": len(queries),
        "k": int(exact_ids.shape[1]),
        "target": config.target,
        "target_r1": config.target_r1,
        "rows": [{**r, "cost_bytes": target.cost(r)} for r in rows],
        "nprobe": row["nprobe"],
        "k_factor": row["k_factor"],
        "nprobe_reason": reason,
    }
