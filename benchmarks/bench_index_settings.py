"""Candidate index settings side by side in plain faiss, one process, against HNSW32 flat (autofaiss's default)
on the synthetic descriptors of bench_index.py with independent queries and exact truth (issue 31).

For each coarse stage (PCA dims, PQ code: 8-bit or 4-bit fast-scan) × refinement codes (SQ8 or fp16 of the
full vector, IndexRefine) the nprobe × k_factor grid is swept and the fastest setting meeting 100-recall@100 ≥
0.98 and 1-recall@1 ≥ 0.99 is printed with its RAM per vector; HNSW32 flat's efSearch likewise. Queries/s
are single-batch, the faster of two runs (other sessions' load), on one thread (builds on OMP_NUM_THREADS); the
PCA and the coarse quantizer of one PCA size are trained once and shared by its codes (the build trains the
same ones: index_factory "PCAR{d},IVF{nlist},…", inner product). The exploration behind the automatic choice
of pipeline/index/params.py:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_index_settings.py --n 50000 --queries 300 --spread 1.0
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable
from typing import Any

import faiss
import numpy as np
from bench_index import synthetic_shards

from pipeline.index.params import choose_nlist
from pipeline.index.quality import recall_at

NPROBES = (4, 8, 16, 32, 64, 128, 256, 512, 1024)
K_FACTORS = (1, 2, 4, 8, 16)
HNSW_EF = (16, 32, 64, 128, 256, 512, 1024)
REFINES = {"sq8": faiss.ScalarQuantizer.QT_8bit, "fp16": faiss.ScalarQuantizer.QT_fp16}
K = 100


def vectors(n: int, dim: int, seed: int, draws: int | None, spread: float) -> np.ndarray:
    """(n, dim) float32 as the store holds them (float16 values)."""
    x = np.concatenate([x for _, x in synthetic_shards(n, dim, 1, seed, draws, spread)])
    return x.astype(np.float16).astype(np.float32)


SEARCH_THREADS = 1  # faiss threads of every timed search (builds use OMP_NUM_THREADS)


def timed_search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Ids (q, k) and queries/s on SEARCH_THREADS threads: the faster of two runs."""
    build_threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(SEARCH_THREADS)
    best = np.inf
    for _ in range(2):
        start = time.perf_counter()
        ids = index.search(queries, k)[1]
        best = min(best, time.perf_counter() - start)
    faiss.omp_set_num_threads(build_threads)
    return ids, len(queries) / best


def row(ids: np.ndarray, qps: float, truth: np.ndarray, **setting: Any) -> dict[str, Any]:
    return {**setting, "r1": recall_at(ids, truth, 1), "r100": recall_at(ids, truth, K), "qps": qps}


def met(r: dict[str, Any], target: float, target_r1: float) -> bool:
    return r["r100"] >= target and r["r1"] >= target_r1


def sweep(
    search: Callable[[int, int], dict[str, Any]], nlist: int, target: float, target_r1: float
) -> list[dict[str, Any]]:
    """Per k_factor, nprobe upwards until the target is met or 100-recall@100 stops rising."""
    rows: list[dict[str, Any]] = []
    for k_factor in K_FACTORS:
        previous = -1.0
        for nprobe in (p for p in NPROBES if p <= nlist):
            rows.append(search(nprobe, k_factor))
            if met(rows[-1], target, target_r1) or rows[-1]["r100"] - previous < 0.001:
                break
            previous = rows[-1]["r100"]
    return rows


def coarse_stages(
    dim: int, nlist: int, sample: np.ndarray, pca_dims: Iterable[int], codes: Iterable[str]
) -> Iterable[tuple[str, faiss.Index, list[Any]]]:
    """(factory string, trained empty index, objects to keep alive) per PCA size × code: "PQ64" (8 bits per
    sub-quantizer, residual), "PQ64x4fs" (4-bit fast-scan of the PCA vector), "PQ64x4fsr" (of its residual)."""
    for pca_dim in pca_dims:
        first = faiss.index_factory(dim, f"PCAR{pca_dim},IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        start = time.perf_counter()
        first.train(sample)
        pca = faiss.downcast_VectorTransform(faiss.downcast_index(first).chain.at(0))
        quantizer = faiss.extract_index_ivf(first).quantizer
        reduced = pca.apply(sample)
        print(f"  PCAR{pca_dim} + IVF{nlist} trained in {time.perf_counter() - start:.0f} s", flush=True)
        for code in codes:
            m = int(code[2:].split("x")[0])
            coarse = faiss.clone_index(quantizer)
            if "x4fs" in code:
                ivf = faiss.IndexIVFPQFastScan(coarse, pca_dim, nlist, m, 4, faiss.METRIC_INNER_PRODUCT)
                ivf.by_residual = code.endswith("r")
            else:
                ivf = faiss.IndexIVFPQ(coarse, pca_dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
                ivf.do_polysemous_training = False
            ivf.train(reduced)
            index = faiss.IndexPreTransform(pca, ivf)
            yield f"PCAR{pca_dim},IVF{nlist},{code}", index, [first, pca, coarse, ivf]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=300, help="independent queries (same distribution)")
    parser.add_argument(
        "--spread", type=float, default=1.0, help="latent within-cluster std (bench_index.py)"
    )
    parser.add_argument("--pca", default="256", help="PCA output sizes, comma-separated")
    parser.add_argument("--codes", default="PQ64,PQ64x4fsr,PQ128x4fsr", help="comma-separated")
    parser.add_argument("--refines", default="sq8,fp16", help="comma-separated: sq8, fp16")
    parser.add_argument("--target", type=float, default=0.98)
    parser.add_argument("--target-r1", type=float, default=0.99)
    args = parser.parse_args()
    start = time.perf_counter()
    x = vectors(args.n, args.dim, 0, None, args.spread)
    queries = vectors(args.queries, args.dim, 0, 1, args.spread)
    truth = faiss.knn(queries, x, K, metric=faiss.METRIC_INNER_PRODUCT)[1]
    nlist = choose_nlist(args.n)
    print(
        f"{args.n} × {args.dim} (spread {args.spread}), {args.queries} independent queries, nlist {nlist}, "
        f"build threads {faiss.omp_get_max_threads()}, search threads {SEARCH_THREADS} ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )

    hnsw = faiss.IndexHNSWFlat(args.dim, 32, faiss.METRIC_INNER_PRODUCT)
    start = time.perf_counter()
    hnsw.add(x)
    print(f"HNSW32 flat built in {time.perf_counter() - start:.0f} s", flush=True)
    hnsw_bytes = len(faiss.serialize_index(hnsw)) / args.n
    hnsw_rows = []
    for ef in HNSW_EF:
        hnsw.hnsw.efSearch = ef
        hnsw_rows.append(row(*timed_search(hnsw, queries, K), truth, efSearch=ef))
        print(
            "  efSearch {efSearch:>5}  1-R@1 {r1:.3f}  100-R@100 {r100:.3f}  QPS {qps:8.0f}".format(
                **hnsw_rows[-1]
            )
        )
    del hnsw
    reached = [r for r in hnsw_rows if met(r, args.target, args.target_r1)]
    base_qps = max(r["qps"] for r in reached) if reached else float("nan")
    print(
        f"HNSW32 flat: {hnsw_bytes:.0f} B/vector, fastest meeting the target {base_qps:.0f} QPS", flush=True
    )

    refines = {}
    for kind in args.refines.split(","):
        refines[kind] = faiss.IndexScalarQuantizer(args.dim, REFINES[kind], faiss.METRIC_INNER_PRODUCT)
        refines[kind].train(x)
        refines[kind].add(x)
    summary = []
    pca_dims = [int(p) for p in args.pca.split(",")]
    for factory, base, keep in coarse_stages(args.dim, nlist, x, pca_dims, args.codes.split(",")):
        base.add(x)
        base_bytes = len(faiss.serialize_index(base)) / args.n
        ivf = faiss.extract_index_ivf(base)
        for kind, codes in refines.items():
            refined = faiss.IndexRefine(base, codes)

            def search(nprobe: int, k_factor: int, refined: Any = refined, ivf: Any = ivf) -> dict[str, Any]:
                ivf.nprobe, refined.k_factor = nprobe, float(k_factor)
                return row(*timed_search(refined, queries, K), truth, nprobe=nprobe, k_factor=k_factor)

            rows = sweep(search, nlist, args.target, args.target_r1)
            ok = [r for r in rows if met(r, args.target, args.target_r1)]
            best = max(ok, key=lambda r: r["qps"]) if ok else max(rows, key=lambda r: (r["r100"], r["qps"]))
            ram = base_bytes + codes.code_size
            summary.append((factory, kind, best, bool(ok), ram))
            print(
                f"{factory} + {kind}: {base_bytes:.0f} + {codes.code_size} B/vector; "
                + ("fastest meeting" if ok else "NOT MET, best")
                + " nprobe {nprobe} k_factor {k_factor}: 1-R@1 {r1:.3f} 100-R@100 {r100:.3f} QPS {qps:.0f}".format(
                    **best
                ),
                flush=True,
            )
            for r in rows:
                print(
                    "    nprobe {nprobe:>5} k_factor {k_factor:>3}  1-R@1 {r1:.3f}  100-R@100 {r100:.3f}  QPS {qps:8.0f}".format(
                        **r
                    )
                )
        del keep
    print(
        f"\nside by side (target 100-R@100 ≥ {args.target}, 1-R@1 ≥ {args.target_r1}; HNSW32 flat {base_qps:.0f} QPS, {hnsw_bytes:.0f} B/vector):"
    )
    for factory, kind, best, ok, ram in summary:
        print(
            f"  {factory:32} + {kind:5} nprobe {best['nprobe']:>5} k_factor {best['k_factor']:>3}  "
            f"1-R@1 {best['r1']:.3f}  100-R@100 {best['r100']:.3f}  QPS {best['qps']:7.0f} "
            f"({best['qps'] / base_qps:4.1f}×)  RAM {ram:6.0f} B/vector ({ram / hnsw_bytes:.2f}×)"
            + ("" if ok else "  target NOT met")
        )


if __name__ == "__main__":
    main()
