"""Automatic index parameters: from N, the dimension and a memory budget, a factory string and the reason for it."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pipeline.errors import ConfigError, InputError

MERGE_MODES = ("auto", "ram", "disk")  # how build-index merges inverted lists

# Below this many vectors IVF-PQ cannot be trained well: each of the 256 centroids of a PQ sub-quantizer
# wants ≥ 39 training points, and an exact search over so few vectors is fast anyway.
MIN_POINTS_PER_LIST = 39  # faiss k-means warns below this many training points per centroid
MIN_IVF_PQ_VECTORS = MIN_POINTS_PER_LIST * 256
PQ_SIZES = (256, 128, 96, 64, 48, 32, 16, 8)  # bytes per code, largest (most accurate) first
DEFAULT_PQ_BYTES = 64  # without a budget: the usual size at 1M-100M (GUIDE §2)
# Codes are 4-bit fast-scan PQ (faiss "PQ{2·bytes}x4fsr": two sub-quantizers of 16 centroids per byte, residual
# to the list centroid): lists are scanned 32 codes at a time in SIMD registers. Measured against 8-bit PQ64 of
# the same bytes (50k × 2048, independent queries, fp16 refinement, one thread, issue 31): the same nprobe and
# k_factor meet the target, at 1.7× the queries/s on separate clusters and 4.0× on overlapping ones
# (benchmarks/bench_index_settings.py, benchmarks/RESULTS.md).
FAST_SCAN_BLOCK = 32  # codes per block of a fast-scan list (the last block of each list is padded)
HNSW_QUANTIZER_FROM = 2**16  # a flat coarse quantizer costs O(nlist) per query; HNSW is sublinear
HNSW_M = 32
ID_BYTES = 8  # int64 id stored beside each code in the inverted lists
OVERHEAD = 1.1  # inverted-list slack (vector growth), per-list headers
REFINE_KINDS = ("none", "sq8", "fp16", "store")  # see pipeline.index.refine
IN_RAM_REFINE = ("fp16", "sq8")  # most exact first: fp16 holds the store's own values
# Without a budget: exact scores. SQ8's error (1 byte per dimension) is below most neighbour gaps, not all:
# measured on independent queries, its 1-recall@1 stops at 0.96 (5k × 64-d tests) and 0.987 (50k × 2048-d with
# separate clusters, issue 31, benchmarks/RESULTS.md), below the 0.99 target.
DEFAULT_REFINE = "fp16"
REFINE_WHY = {
    "none": "the PQ order is final (recall capped by the PQ code)",
    "sq8": "shortlist re-scored with 8-bit scalar codes in RAM (D B/vector)",
    "fp16": "shortlist re-scored with the float16 vectors in RAM (2·D B/vector): exact scores",
    "store": "shortlist re-scored with the float16 vectors memory-mapped from disk (no RAM)",
}

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "m": 1e6,
    "mb": 1e6,
    "g": 1e9,
    "gb": 1e9,
    "t": 1e12,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


@dataclass(frozen=True)
class IndexChoice:
    """A factory string with the numbers behind it and a readable reason."""

    factory: str
    reason: str
    nlist: int  # 0 for an exact flat index
    code_bytes: int  # bytes per stored vector code
    estimated_bytes: int  # index size in RAM: codes + ids + coarse quantizer (+ in-RAM refinement codes)
    refine: str = "none"  # how the shortlist is re-scored (pipeline.index.refine.KINDS)


def parse_size(size: str | int) -> int:
    """Bytes of a size like 4GB, 512MiB, 1.5g or a plain integer."""
    if isinstance(size, int):
        if size <= 0:
            raise ConfigError(f"memory budget {size}; must be > 0 bytes")
        return size
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", size)
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(
            f"size {size!r}; expected a number with an optional unit ({', '.join(sorted(_UNITS))})"
        )
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise ConfigError(f"size {size!r}; must be > 0 bytes")
    return value


def choose_nlist(n: int) -> int:
    """The largest power of 2 in [4√N, 16√N] with ≥ 39 training points per list.

    Below N ≈ 24k no list count in that range gets 39 points each (39 · 4√N > N); the k-means floor then
    wins over the √N heuristic: the largest power of 2 with ≥ 39 points per list (N ≥ 9984 here, so ≥ 256).
    """
    low, high = 4 * math.sqrt(n), 16 * math.sqrt(n)
    candidates = [2**e for e in range(math.ceil(math.log2(low)), math.floor(math.log2(high)) + 1)]
    trainable = [c for c in candidates if n >= MIN_POINTS_PER_LIST * c]
    return max(trainable) if trainable else 2 ** int(math.log2(n // MIN_POINTS_PER_LIST))


def refine_ram_bytes(kind: str, dim: int) -> int:
    """RAM per indexed vector of the refinement codes (the store tier keeps them on disk)."""
    return {"sq8": dim, "fp16": 2 * dim}.get(kind, 0)


def quantizer_bytes(nlist: int, dim: int) -> int:
    graph = nlist * HNSW_M * 2 * 4 if nlist >= HNSW_QUANTIZER_FROM else 0
    return nlist * dim * 4 + graph


def ivf_pq_bytes(n: int, nlist: int, code_bytes: int, dim: int, in_dim: int) -> int:
    """Codes and ids of n vectors (+ a padded block per list), the coarse quantizer, and a PCA from ``in_dim``
    (its in_dim × dim projection: training drops the full eigenvector matrix)."""
    pca = dim * in_dim * 4 if dim < in_dim else 0
    padding = nlist * FAST_SCAN_BLOCK * code_bytes
    return int(n * (code_bytes + ID_BYTES) * OVERHEAD) + padding + quantizer_bytes(nlist, dim) + pca


def _pq_dim(dim: int, m: int) -> int:
    """The dimension PQ sees for ``m`` code bytes: ≤ 4 dims per byte (2 per 4-bit sub-quantizer: finer splits
    waste the bits), a multiple of the 2·m sub-quantizers."""
    return min(dim, 4 * m) // (2 * m) * (2 * m)


def _factory(nlist: int, m: int, dim: int) -> str:
    pq_dim = _pq_dim(dim, m)
    transform = f"PCAR{pq_dim}," if pq_dim < dim else ""
    quantizer = f"IVF{nlist}_HNSW{HNSW_M}" if nlist >= HNSW_QUANTIZER_FROM else f"IVF{nlist}"
    return f"{transform}{quantizer},PQ{2 * m}x4fsr"


def _nlist_reason(n: int, nlist: int) -> str:
    low, high = 4 * math.sqrt(n), 16 * math.sqrt(n)
    if low <= nlist <= high:
        return f"nlist={nlist}: largest power of 2 in [4√N, 16√N] = [{low:.0f}, {high:.0f}] with ≥ 39 training points per list"
    return (
        f"nlist={nlist}: no power of 2 in [4√N, 16√N] = [{low:.0f}, {high:.0f}] gets ≥ 39 training points per "
        "list; largest power of 2 that does"
    )


def _pq_and_refine(
    n: int, nlist: int, dim: int, memory_budget: int | None, refine: str
) -> tuple[int, str, str]:
    """(PQ bytes, refinement kind, why).

    Rule: the PQ code only has to build the shortlist, the refinement codes set the final order. Without a
    budget: 64-byte codes + fp16 codes in RAM (``refine`` overrides the kind). With one: 64-byte codes + fp16
    codes in RAM (exact scores) if they fit, else + SQ8, else the largest code that fits with the float16
    vectors left on disk (store tier, no RAM).
    """
    sizes = [m for m in PQ_SIZES if 2 * m <= dim] or [max(1, dim // 2)]
    default = min(DEFAULT_PQ_BYTES, max(sizes))
    if memory_budget is None:
        kind = DEFAULT_REFINE if refine == "auto" else refine
        return default, kind, "default code size without a budget"
    tiers = [(kind, [default]) for kind in IN_RAM_REFINE] + [("store", sizes)]
    if refine != "auto":
        tiers = [(refine, sizes if refine in ("store", "none") else [default])]
    for kind, candidates in tiers:
        for m in candidates:
            refine_bytes = int(n * refine_ram_bytes(kind, dim) * OVERHEAD)
            if ivf_pq_bytes(n, nlist, m, _pq_dim(dim, m), dim) + refine_bytes <= memory_budget:
                return m, kind, f"fits the budget of {memory_budget} B with {kind} refinement"
    need = ivf_pq_bytes(n, nlist, PQ_SIZES[-1], _pq_dim(dim, PQ_SIZES[-1]), dim)
    raise ConfigError(
        f"memory budget {memory_budget} B < {need} B needed by the smallest IVF-PQ index "
        f"({PQ_SIZES[-1]} B codes) of {n} vectors with refinement {refine!r}"
    )


def choose_index(n: int, dim: int, memory_budget: int | None = None, refine: str = "auto") -> IndexChoice:
    """Pick a factory and refinement for ``n`` vectors of ``dim`` dims (inner product) within ``memory_budget``
    bytes of RAM. ``refine`` is "auto" or one of REFINE_KINDS (an exact flat index is never refined)."""
    if n < 1 or dim < 1:
        raise InputError(f"n={n}, dim={dim}; both must be ≥ 1")
    if refine != "auto" and refine not in REFINE_KINDS:
        raise ConfigError(f"refine={refine!r}; allowed: auto, {', '.join(REFINE_KINDS)}")
    if n < MIN_IVF_PQ_VECTORS:
        size = n * (dim * 4 + ID_BYTES)
        if memory_budget is not None and size > memory_budget:
            raise ConfigError(
                f"memory budget {memory_budget} B < {size} B needed by an exact index of {n} vectors"
            )
        return IndexChoice(
            "IDMap2,Flat",
            f"N={n} < {MIN_IVF_PQ_VECTORS} is too few to train IVF-PQ "
            "(39 points × 256 PQ centroids): exact flat inner-product index",
            0,
            dim * 4,
            size,
        )
    nlist = choose_nlist(n)
    m, kind, pq_why = _pq_and_refine(n, nlist, dim, memory_budget, refine)
    pq_dim = _pq_dim(dim, m)
    estimated = ivf_pq_bytes(n, nlist, m, pq_dim, dim) + int(n * refine_ram_bytes(kind, dim) * OVERHEAD)
    reasons = [
        _nlist_reason(n, nlist),
        f"PQ{2 * m}x4fsr: {m} B fast-scan codes (4-bit sub-quantizers, SIMD list scans), {pq_why} "
        f"(estimated {estimated} B in RAM)",
    ]
    if pq_dim < dim:
        reasons.append(
            f"PCAR{pq_dim}: reduce {dim} → {pq_dim} dims (≤ 4 dims per code byte, divisible by {2 * m})"
        )
    reasons.append(
        f"{'HNSW' if nlist >= HNSW_QUANTIZER_FROM else 'flat'} coarse quantizer for nlist={nlist} "
        f"({'≥' if nlist >= HNSW_QUANTIZER_FROM else '<'} {HNSW_QUANTIZER_FROM})"
    )
    reasons.append(f"refine={kind}: {REFINE_WHY[kind]}")
    return IndexChoice(_factory(nlist, m, dim), "; ".join(reasons), nlist, m, estimated, kind)
