"""How good an approximate index is: k-recall@k against exact inner-product search, and queries/s, per nprobe.

Definition: the queries are a seeded random sample of the stored vectors (drawn across all shards). The ground
truth of a query is its exact top-k by inner product over every indexed vector (the query itself included, as
it is for any near-duplicate in the collection). k-recall@k = |approximate top-k ∩ exact top-k| / k, averaged.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from pipeline import store
from pipeline.index.io import set_search_params
from pipeline.storage import Options

RECALL_KS = (1, 10, 100)
PLATEAU = 0.001  # recall gains below this are not worth more probes


@dataclass(frozen=True)
class QualityConfig:
    queries: int = 1000  # held-out query sample size (capped at N)
    target: float = 0.95  # smallest nprobe whose 100-recall@100 reaches this is stored with the index
    target_k: int = 100
    max_nprobe: int = 1024  # nprobe values tried: 1, 2, 4, ... up to min(nlist, this)

    def __post_init__(self) -> None:
        if not 0 < self.target <= 1:
            raise ValueError(f"recall target {self.target}; must be in (0, 1]")
        if self.queries < 1 or self.target_k < 1:
            raise ValueError(f"queries={self.queries}, target_k={self.target_k}; both must be ≥ 1")


def exact_knn(
    queries: np.ndarray, shard_urls: Sequence[str], bases: Sequence[int], k: int, options: Options = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner product of ``queries`` (q, D) over the shards, one shard in memory at a time.

    Ids are ``base + row``, as the index stores them. Returns scores (q, k) float32 and ids (q, k) int64.
    """
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for url, base in zip(shard_urls, bases, strict=True):
        _, vectors = store.read_global_shard(url, options)  # (n, D)
        scores, rows = faiss.knn(queries, vectors, min(k, len(vectors)), metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(rows >= 0, rows + base, -1))
    heap.finalize()
    return heap.D, heap.I


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
    index: faiss.Index, queries: np.ndarray, exact_ids: np.ndarray, nprobe: int | None
) -> dict[str, Any]:
    """Recall at 1/10/100 (those ≤ the ground-truth depth) and queries/s at one nprobe."""
    set_search_params(index, nprobe)
    k = exact_ids.shape[1]
    start = time.perf_counter()
    _, ids = index.search(queries, k)
    seconds = time.perf_counter() - start
    row: dict[str, Any] = {"nprobe": nprobe, "qps": len(queries) / max(seconds, 1e-9)}
    for r in (*RECALL_KS, k):
        if r <= k:
            row[f"{r}-recall@{r}"] = recall_at(ids, exact_ids, r)
    return row


def pick_nprobe(rows: Sequence[dict[str, Any]], target: float, target_k: int) -> tuple[int | None, str]:
    """The smallest nprobe reaching ``target`` k-recall@k; when none does (the codes, not nprobe, limit recall),
    the smallest nprobe within PLATEAU of the best recall seen, rather than the costliest one tried."""
    key = f"{target_k}-recall@{target_k}"
    for row in rows:
        if row[key] >= target:
            return row["nprobe"], f"smallest nprobe with {key} ≥ {target} ({row[key]:.4f})"
    best = max(row[key] for row in rows)
    row = next(r for r in rows if r[key] >= best - PLATEAU)
    return row["nprobe"], (
        f"no nprobe reached {key} ≥ {target}; best {best:.4f}: smallest nprobe within {PLATEAU} of it ({row[key]:.4f})"
    )


def quality_report(
    index: faiss.Index,
    queries: np.ndarray,
    exact_ids: np.ndarray,
    nlist: int,
    config: QualityConfig = QualityConfig(),
) -> dict[str, Any]:
    """Recall/QPS table over nprobe values and the chosen nprobe; ``exact_ids`` (q, k) from :func:`exact_knn`."""
    target_k = min(config.target_k, exact_ids.shape[1])
    rows = [measure(index, queries, exact_ids, p) for p in nprobe_values(nlist, config.max_nprobe)]
    nprobe, reason = pick_nprobe(rows, config.target, target_k)
    set_search_params(index, nprobe)
    return {
        "definition": "queries: seeded random sample of stored vectors; truth: exact inner-product top-k over all "
        "indexed vectors; k-recall@k = |approx top-k ∩ exact top-k| / k",
        "queries": len(queries),
        "k": int(exact_ids.shape[1]),
        "target": config.target,
        "rows": rows,
        "nprobe": nprobe,
        "nprobe_reason": reason,
    }
