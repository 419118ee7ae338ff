"""Distributed index build vs a plain single-process faiss build of the same factory, on clustered synthetic
2048-d descriptors written as a descriptor store shard by shard (never all in RAM at float32 while writing).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_index.py --n 200000   # default 1M; auto parameters

Prints build time (train / add / merge), the ratio distributed ÷ single, peak RSS of the process tree (driver +
Ray workers, sampled), recall and queries/s per nprobe without refinement and per nprobe × k_factor with it,
bytes per vector of both, the stored setting, and a projection from the measured per-vector costs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import faiss
import numpy as np

from pipeline import store
from pipeline.index import BuildConfig, QualityConfig, build_index, io, refine
from pipeline.index.build import (
    draw_samples,
    id_bases,
    resolve_choice,
    sample_rows,
    sample_sizes,
    shard_rows,
    train_size,
)
from pipeline.index.params import IndexChoice, choose_index
from pipeline.index.quality import exact_knn, measure
from pipeline.ray_runtime import ensure_ray

PAGE = os.sysconf("SC_PAGE_SIZE")


def tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        with contextlib.suppress(OSError):  # the process may have exited meanwhile
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        stack.extend(children.get(pid, []))
    return total


class PeakRss:
    """Peak of tree_rss(this process) sampled every 0.25 s while inside the block."""

    def __enter__(self) -> PeakRss:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(os.getpid()))
            time.sleep(0.25)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def write_synthetic_store(
    url: str, n: int, dim: int, shards: int, seed: int, draws: int | None = None, prefix: str = "img"
) -> None:
    """L2-normalised vectors with a low intrinsic dimension, as real descriptors have: 1000 clusters in a 64-d
    latent space mapped into ``dim`` dims by a random orthonormal basis, plus small isotropic noise.
    Generated and written shard by shard; rows are in random cluster order. ``seed`` fixes the clusters and
    the basis, ``draws`` (default: ``seed``) the rows: another ``draws`` gives independent queries from the
    same distribution."""
    rng = np.random.default_rng(seed)
    latent = 64
    basis = np.linalg.qr(rng.standard_normal((dim, latent)))[0].T.astype(np.float32)  # (64, dim)
    centres = rng.standard_normal((1000, latent)).astype(np.float32)
    if draws is not None:
        rng = np.random.default_rng(draws)
    empty = store.LocalFeatures(
        np.zeros((0, 2), np.float32),
        np.zeros(0, np.float32),
        np.zeros(0, np.float32),
        np.zeros((0, 128), np.float32),
    )
    for shard, rows in enumerate(np.array_split(np.arange(n), shards)):
        z = centres[rng.integers(0, 1000, len(rows))] + 0.5 * rng.standard_normal(
            (len(rows), latent), np.float32
        )
        x = z @ basis + 0.05 * rng.standard_normal((len(rows), dim), np.float32)  # (rows, dim)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        store.write_shard(url, shard, [f"{prefix}{r:09d}" for r in rows], x, [empty] * len(rows))


def matmul_flops() -> float:
    """float32 GEMM throughput of this process (FLOP/s), the unit of the training projection."""
    a = np.random.default_rng(0).standard_normal((2048, 2048), np.float32)
    start = time.perf_counter()
    for _ in range(5):
        a @ a
    return 5 * 2 * 2048**3 / (time.perf_counter() - start)


def training_flops(n_train: int, dim: int, pca_dim: int, nlist: int, pq_bytes: int) -> float:
    """PCA covariance + IVF k-means (25 iterations) + PQ k-means (25 iterations on ≤ 65536 points)."""
    pq_points = min(n_train, 256 * 256)
    return 2.0 * (n_train * dim**2 + 25 * n_train * nlist * pca_dim + 25 * pq_points * 256 * pca_dim)


def single_process_build(
    store_url: str, choice: IndexChoice, config: BuildConfig
) -> tuple[faiss.Index, faiss.Index, dict[str, float]]:
    """Plain faiss building the same index in one process: the same training sample (size and seed), the same
    refinement codes (``IndexRefine`` with the scalar quantizer the build chose, held in RAM), then every
    shard added. Returns (refined or plain index, its base, timings)."""
    urls = store.global_shard_urls(store_url)
    counts = shard_rows(urls)
    dim = store.read_global_shard(urls[0])[1].shape[1]
    total = sum(counts)
    start = time.perf_counter()
    _, n_sample = sample_sizes(choice, total, dim, config)
    train_rows, _ = draw_samples(total, n_sample, min(config.quality.queries, total), config.seed)
    sample = sample_rows(urls, counts, train_rows)
    base = faiss.index_factory(dim, choice.factory, faiss.METRIC_INNER_PRODUCT)
    base.train(sample)
    index = base
    if choice.refine != "none":  # the store tier's codes are the same fp16 ones, memory-mapped from disk
        index = faiss.IndexRefine(base, refine.train_quantizer(choice.refine, sample, dim))
    del sample
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    for url in urls:  # ids in shard order are 0..N-1, the ids the distributed build gives
        index.add(store.read_global_shard(url)[1])
    return index, base, {"train_s": train_s, "add_s": time.perf_counter() - start}


def print_quality(index_dir: Path, summary: dict, n: int) -> None:
    """Recall/QPS rows without and with refinement, bytes per vector of each, and the stored setting."""
    quality = json.loads((index_dir / io.QUALITY).read_text())
    pq_bytes = (index_dir / io.INDEX).stat().st_size / n
    codes = sum(p.stat().st_size for p in index_dir.glob("refine-*.codes")) / n
    where = "disk, memory-mapped" if summary["refine"] == "store" else "RAM"
    print(
        f"quality ({quality['queries']} held-out queries, k={quality['k']}); refinement: {summary['refine']}"
    )
    print(f"  bytes per vector: without refinement {pq_bytes:.0f} B (RAM); with it + {codes:.0f} B ({where})")
    for row in quality["rows"]:
        print(
            "  nprobe {nprobe!s:>5}  k_factor {k_factor!s:>4}  1-R@1 {1-recall@1:.3f}  10-R@10 {10-recall@10:.3f}  "
            "100-R@100 {100-recall@100:.3f}  QPS {qps:8.0f}  cost {cost_bytes:9.0f} B/query".format(**row)
        )
    print(
        f"stored setting: nprobe {quality['nprobe']}, k_factor {quality['k_factor']} — {quality['nprobe_reason']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--factory", default=None, help="default: automatic parameters for N")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--refine", default="auto", help="auto, none, sq8, fp16 or store")
    parser.add_argument("--memory-budget", default=None, help="e.g. 600MB: steers factory and refinement")
    args = parser.parse_args()

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-index-"))
    store_url = str(root / "store")
    start = time.perf_counter()
    if not (root / "store").exists() or not store.global_shard_urls(store_url):  # a re-run reuses it
        write_synthetic_store(store_url, args.n, args.dim, args.shards, seed=0)
    print(
        f"store: {args.n} × {args.dim} float16 in {args.shards} shards at {root} ({time.perf_counter() - start:.0f} s)"
    )
    budget = None if args.factory else args.memory_budget
    choice = resolve_choice(args.factory, budget, args.n, args.dim, args.refine)
    print(f"factory: {choice.factory}, refine {choice.refine}  ({choice.reason})")
    config = BuildConfig(
        tasks=args.tasks, merge="ram", refine=args.refine, quality=QualityConfig(queries=args.queries)
    )

    ensure_ray(None)
    with PeakRss() as dist_rss:
        start = time.perf_counter()
        summary = build_index(
            store_url,
            str(root / "index"),
            factory=args.factory,
            memory_budget=budget,
            config=config,
        )
        dist_total = time.perf_counter() - start
    t = summary["timings"]
    with PeakRss() as single_rss:
        start = time.perf_counter()
        single, single_base, st = single_process_build(store_url, choice, config)
        single_total = time.perf_counter() - start

    dist_build = t["train_s"] + t["add_s"] + t["merge_s"]
    print(
        f"train points: {summary['train_points']}   cores: {os.cpu_count()}   OMP threads: {faiss.omp_get_max_threads()}"
    )
    print(f"{'':14}{'train s':>9}{'add s':>9}{'merge s':>9}{'build s':>9}{'peak RSS GB':>13}")
    print(
        f"{'distributed':14}{t['train_s']:9.1f}{t['add_s']:9.1f}{t['merge_s']:9.1f}{dist_build:9.1f}"
        f"{dist_rss.peak / 1e9:13.2f}   (+ quality report {t['quality_s']:.1f} s; total {dist_total:.1f} s)"
    )
    print(
        f"{'single':14}{st['train_s']:9.1f}{st['add_s']:9.1f}{0:9.1f}{single_total:9.1f}{single_rss.peak / 1e9:13.2f}"
    )
    print(
        f"ratio distributed/single: build {dist_build / single_total:.2f}, add {t['add_s'] / st['add_s']:.2f}"
    )

    print_quality(root / "index", summary, args.n)
    urls = store.global_shard_urls(store_url)
    base_rows = [
        r for r in json.loads((root / "index" / io.QUALITY).read_text())["rows"] if not r["k_factor"]
    ]
    nprobe = max(base_rows, key=lambda r: (r["100-recall@100"], -r["cost_bytes"]))["nprobe"]
    _, q_rows = draw_samples(args.n, summary["train_points"], args.queries, config.seed)
    queries = sample_rows(urls, shard_rows(urls), q_rows)
    _, exact_ids = exact_knn(queries, urls, id_bases(shard_rows(urls)), 100)
    row = measure(single_base, queries, exact_ids, nprobe)
    print(f"single-process index (unrefined) at nprobe {nprobe}: 100-R@100 {row['100-recall@100']:.3f}")
    if single is not single_base and summary["k_factor"]:
        row = measure(single, queries, exact_ids, summary["nprobe"], summary["k_factor"])
        print(
            f"single-process index refined at the stored setting (nprobe {summary['nprobe']}, k_factor "
            f"{summary['k_factor']}): 100-R@100 {row['100-recall@100']:.3f}, 1-R@1 {row['1-recall@1']:.3f}"
        )

    index_bytes = (root / "index" / io.INDEX).stat().st_size
    add_core_s = t["add_s"] * min(args.tasks, os.cpu_count() or 1) / args.n
    flops = matmul_flops()
    print(
        f"per vector: index {index_bytes / args.n:.0f} B, add {add_core_s * 1e3:.3f} core-ms (incl. shard reads); "
        f"GEMM here {flops / 1e9:.0f} GFLOP/s"
    )
    for label, n in (
        ("GLDv2 index (760k)", 760_000),
        ("GLDv2 train (4.1M)", 4_100_000),
        ("100M", 100_000_000),
    ):
        target = choose_index(n, args.dim)
        index = faiss.index_factory(args.dim, target.factory, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        n_train = train_size(target.factory, n, args.dim, config)
        work = training_flops(n_train, args.dim, ivf.d, ivf.nlist, target.code_bytes)
        print(
            f"projection {label}: {target.factory}; train {n_train} points ≈ {work / 1e12:.0f} TFLOP "
            f"= {work / flops / 3600:.1f} h at this machine's GEMM rate (≈ {work / 20e12 / 60:.1f} min on a GPU at "
            f"20 TFLOP/s); add ≈ {n * add_core_s / 3600:.1f} core-h (÷ cluster cores); "
            f"index ≈ {target.estimated_bytes / 1e9:.1f} GB"
        )


if __name__ == "__main__":
    main()
