"""Distributed index build vs a plain single-process faiss build of the same factory, on clustered synthetic
2048-d descriptors written as a descriptor store shard by shard (never all in RAM at float32 while writing).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_index.py --n 200000   # default 1M; auto parameters

Prints build time (train / add / merge), the ratio distributed ÷ single, peak memory summed over the build's
processes (driver + Ray, sampled) beside plain faiss in one process, recall and queries/s on independent queries
(same distribution, another draw) per nprobe without refinement and per nprobe × k_factor with it, bytes per
vector of both, the stored setting, then side by side with autofaiss's default index (HNSW32 flat) on the same
queries: recall, queries/s, RAM and build time, and a projection from the measured per-vector costs.

With ``--autofaiss PYTHON`` (an interpreter with autofaiss installed, e.g. its own venv: its pins are not the
project's) autofaiss itself builds its default index from the same vectors, in a subprocess with default
arguments; the side by side then loads that index, prints autofaiss's own search setting beside the efSearch
sweep, and reports the subprocess's peak RSS. Without it, the benchmark builds what autofaiss picks at these
sizes (HNSW32 flat) with faiss directly.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import ray

from pipeline import store
from pipeline.index import BuildConfig, QualityConfig, build_index, io, refine
from pipeline.index.build import (
    draw_samples,
    id_bases,
    leave_one_out_queries,
    resolve_choice,
    sample_rows,
    sample_sizes,
    shard_rows,
    train_size,
)
from pipeline.index.params import IndexChoice, choose_index
from pipeline.index.quality import exact_knn, measure
from pipeline.ray_runtime import ensure_ray
from pipeline.resources import PeakMemory

HNSW_EF = (16, 32, 64, 128, 256, 512, 1024)  # efSearch values tried on the autofaiss-default index
# autofaiss's build_index with its defaults but the paths, and the memory it may plan with (its default, 32G,
# exceeds small machines): argv = embeddings folder, index path, infos path, memory available.
AUTOFAISS_BUILD = """
import sys
from autofaiss import build_index
build_index(embeddings=sys.argv[1], index_path=sys.argv[2], index_infos_path=sys.argv[3],
            current_memory_available=sys.argv[4])
"""


def synthetic_shards(
    n: int, dim: int, shards: int, seed: int, draws: int | None = None, spread: float = 0.5
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows, vectors (rows, dim) float32) per shard: L2-normalised vectors with a low intrinsic dimension, as
    real descriptors have: 1000 clusters (centres of std 1) in a 64-d latent space, each point its centre plus
    ``spread`` × standard normal there (0.5: separate clusters; 1.0: clusters overlap, neighbours spread over
    many IVF lists: harder), mapped into ``dim`` dims by a random orthonormal basis, plus small isotropic
    noise. Rows are in random cluster order. ``seed`` fixes the clusters and the basis, ``draws`` (default:
    ``seed``) the rows: another ``draws`` gives independent queries from the same distribution."""
    rng = np.random.default_rng(seed)
    latent = 64
    basis = np.linalg.qr(rng.standard_normal((dim, latent)))[0].T.astype(np.float32)  # (64, dim)
    centres = rng.standard_normal((1000, latent)).astype(np.float32)
    if draws is not None:
        rng = np.random.default_rng(draws)
    for rows in np.array_split(np.arange(n), shards):
        z = centres[rng.integers(0, 1000, len(rows))] + spread * rng.standard_normal(
            (len(rows), latent), np.float32
        )
        x = z @ basis + 0.05 * rng.standard_normal((len(rows), dim), np.float32)  # (rows, dim)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield rows, x


def write_synthetic_store(
    url: str,
    n: int,
    dim: int,
    shards: int,
    seed: int,
    draws: int | None = None,
    prefix: str = "img",
    spread: float = 0.5,
) -> None:
    """:func:`synthetic_shards` written as a descriptor store, shard by shard (never all in RAM)."""
    empty = store.LocalFeatures(
        np.zeros((0, 2), np.float32),
        np.zeros(0, np.float32),
        np.zeros(0, np.float32),
        np.zeros((0, 128), np.float32),
    )
    batches = synthetic_shards(n, dim, shards, seed, draws, spread)
    for shard, (rows, x) in enumerate(batches):
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
    train_rows, _ = draw_samples(total, n_sample, leave_one_out_queries(total, config), config.seed)
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
        f"quality ({quality['queries']} queries: {quality['query_set']}; k={quality['k']}); refinement: {summary['refine']}"
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


def hnsw_default(urls: list[str], dim: int) -> tuple[faiss.Index, float, int]:
    """What autofaiss builds with default arguments at this size: HNSW32 over the flat float32 vectors
    (IndexHNSWFlat, inner product, faiss's default efConstruction 40). Returns it, build seconds and the peak
    memory of this process meanwhile (the build's local Ray is shut down by then)."""
    with PeakMemory() as memory:
        start = time.perf_counter()
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        for url in urls:
            index.add(store.read_global_shard(url)[1])
        seconds = time.perf_counter() - start
    return index, seconds, memory.peak


def autofaiss_default(
    python: str, urls: list[str], workdir: Path, memory: str
) -> tuple[faiss.Index, dict, float, int]:
    """autofaiss's own default index over the stored vectors (float32, one .npy per shard), built by ``python``
    in a subprocess. Returns the index, autofaiss's infos (index_key, index_param, ...), build seconds (the
    subprocess's wall time) and the subprocess's peak RSS in bytes."""
    embeddings = workdir / "autofaiss-embeddings"
    embeddings.mkdir(parents=True, exist_ok=True)
    for shard, url in enumerate(urls):  # zero-padded: autofaiss adds the files in name order = our ids
        path = embeddings / f"{shard:06d}.npy"
        if not path.exists():
            np.save(path, store.read_global_shard(url)[1].astype(np.float32))
    index_path, infos_path = workdir / "autofaiss.index", workdir / "autofaiss-infos.json"
    start = time.perf_counter()
    command = [python, "-c", AUTOFAISS_BUILD, str(embeddings), str(index_path), str(infos_path), memory]
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start
    if not index_path.exists():  # autofaiss logs its refusals (e.g. too little memory) and exits 0
        raise SystemExit(f"autofaiss wrote no index at {index_path}: see its log above")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux; the largest child
    return faiss.read_index(str(index_path)), json.loads(infos_path.read_text()), seconds, peak


def cheapest(rows: list[dict], target: float, target_r1: float) -> dict | None:
    """The fastest row meeting both recall targets (None when none does)."""
    met = [r for r in rows if r["100-recall@100"] >= target and r["1-recall@1"] >= target_r1]
    return max(met, key=lambda r: r["qps"]) if met else None


def fastest(
    index: Any, queries: np.ndarray, exact_ids: np.ndarray, nprobe: int | None, k_factor: int | None = None
) -> dict:
    """:func:`measure`'s row with the highest queries/s of 3 identical searches (recall does not change):
    other processes' load slows single runs at random."""
    return max(
        (measure(index, queries, exact_ids, nprobe, k_factor) for _ in range(3)), key=lambda r: r["qps"]
    )


@dataclass(frozen=True)
class Baseline:
    """The index autofaiss builds by default, as measured beside ours."""

    index: faiss.Index
    bytes: int  # serialized, from its file: serializing into memory would hold it twice (17 GB at 1M)
    label: str
    own_setting: str | None  # autofaiss's tuned search setting (None when autofaiss did not run)
    build_s: float
    memory: str  # its build's peak memory, and whose


def baseline(urls: list[str], dim: int, workdir: Path, autofaiss: tuple[str, str] | None) -> Baseline:
    """Built by autofaiss itself when ``autofaiss`` = (python, memory) is given, else HNSW32 flat built here."""
    if autofaiss is None:
        index, seconds, peak = hnsw_default(urls, dim)
        faiss.write_index(index, str(workdir / "hnsw32.index"))
        size = (workdir / "hnsw32.index").stat().st_size
        memory = f"peak {peak / 1e9:.2f} GB (this process)"
        return Baseline(index, size, "HNSW32 flat (faiss, as autofaiss picks)", None, seconds, memory)
    python, available = autofaiss
    index, infos, seconds, peak = autofaiss_default(python, urls, workdir, available)
    size = Path(infos["index_path"]).stat().st_size
    memory = f"peak {peak / 1e9:.2f} GB (autofaiss's process)"
    return Baseline(index, size, f"autofaiss {infos['index_key']}", infos["index_param"], seconds, memory)


def side_by_side(
    index_dir: Path,
    summary: dict,
    urls: list[str],
    queries: np.ndarray,
    config: BuildConfig,
    autofaiss: tuple[str, str] | None,
) -> None:
    """The built index at its stored setting and autofaiss's default index over the same queries and exact
    truth, one after the other in this process: recall, queries/s, index RAM and build time/memory."""
    _, exact_ids = exact_knn(queries, urls, id_bases(shard_rows(urls)), 100)
    ours = refine.attach(io.load_index(str(index_dir)), str(index_dir), io.read_params(str(index_dir)))
    row = fastest(ours, queries, exact_ids, summary["nprobe"], summary["k_factor"])
    ram = (index_dir / io.INDEX).stat().st_size
    if summary["refine"] in ("sq8", "fp16"):
        ram += sum(p.stat().st_size for p in index_dir.glob("refine-*.codes"))
    del ours
    other = baseline(urls, queries.shape[1], index_dir.parent, autofaiss)
    label, own = other.label, other.own_setting
    space, other_rows = faiss.ParameterSpace(), []
    for setting in [f"efSearch={ef}" for ef in HNSW_EF] + ([own] if own else []):
        space.set_index_parameters(other.index, setting)
        other_rows.append({**fastest(other.index, queries, exact_ids, None), "setting": setting})
    target, target_r1 = config.quality.target, config.quality.target_r1
    best = cheapest(other_rows, target, target_r1)
    which = "fastest setting meeting the target"
    if best is None:
        best, which = (
            max(other_rows, key=lambda r: r["100-recall@100"]),
            "best recall (no setting meets the target)",
        )
    print(
        f"side by side, {len(queries)} independent queries, exact truth, threads {faiss.omp_get_max_threads()}, "
        f"queries/s the best of 3 runs, load average {os.getloadavg()[0]:.1f}:"
    )
    for r in other_rows:
        mark = "  (autofaiss's own setting)" if own and r is other_rows[-1] else ""
        print(
            f"  {label} {r['setting']:>15}  1-R@1 {r['1-recall@1']:.3f}  100-R@100 "
            f"{r['100-recall@100']:.3f}  QPS {r['qps']:8.0f}{mark}"
        )
    total_s = sum(summary["timings"].values())
    print(
        f"  this index (nprobe {summary['nprobe']}, k_factor {summary['k_factor']}): 1-R@1 {row['1-recall@1']:.3f}"
        f"  100-R@100 {row['100-recall@100']:.3f}  QPS {row['qps']:.0f}  RAM {ram / 1e9:.3f} GB  build "
        f"{total_s:.0f} s (incl. quality report), peak {summary['peak_memory_bytes'] / 1e9:.2f} GB (driver + Ray)"
    )
    print(
        f"  {label} at its {which} ({best['setting']}): 1-R@1 {best['1-recall@1']:.3f}"
        f"  100-R@100 {best['100-recall@100']:.3f}  QPS {best['qps']:.0f}  RAM {other.bytes / 1e9:.3f} GB  build "
        f"{other.build_s:.0f} s, {other.memory}"
    )
    print(f"  ratio this/{label}: QPS {row['qps'] / best['qps']:.1f}×, RAM {ram / other.bytes:.2f}×")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--factory", default=None, help="default: automatic parameters for N")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--queries", type=int, default=1000, help="independent queries (same distribution)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--refine", default="auto", help="auto, none, sq8, fp16 or store")
    parser.add_argument("--memory-budget", default=None, help="e.g. 600MB: steers factory and refinement")
    parser.add_argument("--skip-single", action="store_true", help="no single-process faiss build")
    parser.add_argument(
        "--spread", type=float, default=0.5, help="latent within-cluster std: 0.5 separate, 1.0 overlapping"
    )
    parser.add_argument("--autofaiss", default=None, help="a python with autofaiss: it builds the baseline")
    parser.add_argument(
        "--autofaiss-memory",
        default="20G",
        help="autofaiss's current_memory_available (its default 32G; it must exceed its 16G index limit by 10%%)",
    )
    args = parser.parse_args()

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-index-"))
    store_url, query_url = str(root / "store"), str(root / "queries")
    start = time.perf_counter()
    # a re-run reuses the store and queries: give each --n/--spread its own --workdir
    if not (root / "store").exists() or not store.global_shard_urls(store_url):
        write_synthetic_store(store_url, args.n, args.dim, args.shards, seed=0, spread=args.spread)
    if not (root / "queries").exists() or not store.global_shard_urls(query_url):
        write_synthetic_store(
            query_url, args.queries, args.dim, 1, seed=0, draws=1, prefix="q", spread=args.spread
        )
    print(
        f"store: {args.n} × {args.dim} float16 in {args.shards} shards at {root}, {args.queries} independent "
        f"queries ({time.perf_counter() - start:.0f} s)"
    )
    budget = None if args.factory else args.memory_budget
    choice = resolve_choice(args.factory, budget, args.n, args.dim, args.refine)
    print(f"factory: {choice.factory}, refine {choice.refine}  ({choice.reason})")
    quality = QualityConfig(queries=args.queries, query_store=query_url)
    config = BuildConfig(tasks=args.tasks, merge="ram", refine=args.refine, quality=quality)

    ensure_ray(None)
    start = time.perf_counter()
    summary = build_index(
        store_url, str(root / "index"), factory=args.factory, memory_budget=budget, config=config
    ).to_dict()
    dist_total = time.perf_counter() - start
    t = summary["timings"]
    dist_build = t["train_s"] + t["add_s"] + t["merge_s"]
    print(
        f"train points: {summary['train_points']}   cores: {os.cpu_count()}   OMP threads: {faiss.omp_get_max_threads()}"
    )
    print(f"{'':14}{'train s':>9}{'add s':>9}{'merge s':>9}{'build s':>9}{'peak memory GB':>16}")
    print(
        f"{'distributed':14}{t['train_s']:9.1f}{t['add_s']:9.1f}{t['merge_s']:9.1f}{dist_build:9.1f}"
        f"{summary['peak_memory_bytes'] / 1e9:16.2f}   (driver + Ray processes summed; + quality report "
        f"{t['quality_s']:.1f} s; total {dist_total:.1f} s); index folder {summary['index_bytes'] / 1e9:.3f} GB"
    )
    print_quality(root / "index", summary, args.n)
    ray.shutdown()  # the build's local Ray (idle workers holding its memory) is not the baseline's
    urls = store.global_shard_urls(store_url)
    queries = np.concatenate([store.read_global_shard(u)[1] for u in store.global_shard_urls(query_url)])
    autofaiss = (args.autofaiss, args.autofaiss_memory) if args.autofaiss else None
    side_by_side(root / "index", summary, urls, queries, config, autofaiss)
    if not args.skip_single:
        with PeakMemory() as single_memory:
            start = time.perf_counter()
            st = single_process_build(store_url, choice, config)[2]
            single_total = time.perf_counter() - start
        print(
            f"{'single':14}{st['train_s']:9.1f}{st['add_s']:9.1f}{0:9.1f}{single_total:9.1f}"
            f"{single_memory.peak / 1e9:16.2f}   (plain faiss, one process)"
        )
        print(
            f"ratio distributed/single: build {dist_build / single_total:.2f}, add {t['add_s'] / st['add_s']:.2f}, "
            f"peak memory {summary['peak_memory_bytes'] / single_memory.peak:.2f}"
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
