"""Re-ranking at scale: what reading local features costs per image, and verified pairs/s on 1 and 2 workers.

A synthetic index store of ``--images`` images × ``--features`` local features (int8 or float16 descriptors, in
shards of 1,000 images, one row group per image with the local index) and ``--queries`` queries, each with a
shortlist of ``--candidates`` index images drawn at random (scattered over every shard: the worst case for
reading). Reported, side by side in one run:

1. bytes read ÷ bytes of the features used (ReadStats: stored bytes of the images asked for), cold and warm
   (node-local cache), and the same for a store in the old layout (64 images per row group, no local index);
2. pairs/s of the re-ranking stage in process, then on 1 and on 2 Ray workers (a local Ray with the machine's
   CPUs): the 1 → 2 speed-up compares the same code path;
3. ``--s3``: the same store layout on the local S3 server (scripts/swift_s3.py): requests and bytes per query;
4. the projection to GLDv2 (118k queries × top 100) in CPU-node-hours (from the measured pairs/s) and
   GPU-hours (from ``--gpu-ms-per-query``, the figure ``--gpu`` measures);
5. ``--gpu``: ms/query for 100 candidates × 1,000 features on one GPU (match + verify, no I/O).

Distinct feature sets are generated for 64 images and reused (shifted keypoints): verification cost and
stored bytes per image are those of real-size images; generation stays minutes, not hours.

    .venv/bin/python benchmarks/bench_answers.py --images 50000 --queries 100 [--s3] [--root /tmp/bench-answers]
    .venv/bin/python benchmarks/bench_answers.py --images 50000 --queries 5000 --root /data/bench-answers --keep
    .venv/bin/python benchmarks/bench_answers.py --gpu          # on a GPU machine

The issue's full case (50,000 images × 5,000 queries × 100 candidates: 500k pairs per run, four runs) is hours on
a 2-core machine: ``--root DIR --keep`` keeps the generated stores, and a rerun with the same sizes reuses them
(``DIR/_bench.json`` records what was generated).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import storage, store
from pipeline.execution import Workers
from pipeline.ray_runtime import ensure_ray
from pipeline.rerank import RerankConfig, RerankRun, rerank, verify_candidates
from pipeline.store import LocalFeatures, StoreSettings

GLDV2_PAIRS = 118_000 * 100
SHARD = 1000
DISTINCT = 64


def feature_pool(rng: np.random.Generator, features: int) -> list[LocalFeatures]:
    """``DISTINCT`` images' local features (unit 128-d descriptors, keypoints in a 1024-px image)."""
    pool = []
    for _ in range(DISTINCT):
        desc = rng.standard_normal((features, 128)).astype(np.float32)
        ones = np.ones(features, np.float32)
        keypoints = rng.uniform(0, 1024, (features, 2)).astype(np.float32)
        pool.append(LocalFeatures(keypoints, ones, ones, desc / np.linalg.norm(desc, axis=1)[:, None]))
    return pool


def write_store(
    url: str,
    images: int,
    pool: list[LocalFeatures],
    settings: StoreSettings,
    options=None,
    prefix: str = "img",
) -> None:
    for shard, start in enumerate(range(0, images, SHARD)):
        ids = [f"{prefix}{i:07d}" for i in range(start, min(start + SHARD, images))]
        local = [pool[i % DISTINCT] for i in range(start, start + len(ids))]
        vectors = np.zeros((len(ids), 8), np.float32)
        store.write_shard(url, shard, ids, vectors, local, settings=settings, options=options)


def shortlists(rng: np.random.Generator, url: str, queries: int, candidates: int, images: int) -> None:
    rows = {"query_id": [], "rank": [], "id": [], "score": []}
    for q in range(queries):
        picked = rng.choice(images, candidates, replace=False)
        rows["query_id"] += [f"q{q:07d}"] * candidates
        rows["rank"] += list(range(1, candidates + 1))
        rows["id"] += [f"img{i:07d}" for i in picked]
        rows["score"] += list(np.linspace(0.9, 0.5, candidates))
    table = pa.table(rows).cast(
        pa.schema(
            [("query_id", pa.string()), ("rank", pa.int32()), ("id", pa.string()), ("score", pa.float32())]
        )
    )
    pq.write_table(table, url)


def generated(root: Path, args: argparse.Namespace) -> bool:
    """Whether ``root`` holds the stores and shortlists of these sizes from an earlier ``--keep`` run."""
    marker = root / "_bench.json"
    return marker.exists() and json.loads(marker.read_text()) == sizes(args)


def sizes(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in ("images", "features", "dtype", "queries", "candidates")}


def run(root: Path, name: str, index: str, queries: str, config: RerankConfig, run: RerankRun, options=None):
    start = time.perf_counter()
    summary = rerank(
        str(root / "search.parquet"), queries, index, str(root / name), config, options=options, run=run
    )
    seconds = time.perf_counter() - start
    return summary, seconds


def describe(label: str, summary, seconds: float, queries: int, workers: int = 1) -> dict:
    """One run's figures; pairs/s is wall-clock (Ray and worker start-up included), busy pairs/s excludes
    start-up: pairs ÷ (the workers' summed step seconds ÷ workers)."""
    ratio = summary.bytes_read / max(summary.bytes_wanted, 1)
    busy = sum(summary.seconds_per_step.values()) / workers
    line = {
        "run": label,
        "pairs/s": round(summary.pairs_verified / seconds, 1),
        "busy pairs/s": round(summary.pairs_verified / max(busy, 1e-9), 1),
        "ms/query": round(1000 * seconds / queries, 1),
        "bytes read ÷ used": round(ratio, 3),
        "MB read/query": round(summary.bytes_read / queries / 1e6, 2),
        "requests/query": round(summary.requests / queries, 1),
        "cache MB/query": round(summary.cache_bytes / queries / 1e6, 2),
        "seconds/step": summary.seconds_per_step,
    }
    print(json.dumps(line), flush=True)
    return line


def ray_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def gpu_ms_per_query(features: int, candidates: int, repeats: int) -> float:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device here")
    rng = np.random.default_rng(0)
    pool = feature_pool(rng, features)
    query, shortlist = pool[0], [pool[1 + i % (DISTINCT - 1)] for i in range(candidates)]
    config = RerankConfig(device="cuda")
    verify_candidates(query, shortlist, config)  # warm-up: kernels, allocator
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        verify_candidates(query, shortlist, config)
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    print(
        f"GPU {torch.cuda.get_device_name()}: {np.median(times):.2f} ms/query (median of {repeats}), "
        f"{candidates} candidates × {features} features"
    )
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--features", type=int, default=1000)
    parser.add_argument("--dtype", default="int8", choices=["int8", "float16"])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--legacy-images", type=int, default=5000, help="images of the old-layout store")
    parser.add_argument("--root", default=None, help="scratch folder (default: a new one under /tmp)")
    parser.add_argument(
        "--keep", action="store_true", help="keep --root's stores for a rerun of the same sizes"
    )
    parser.add_argument("--s3", action="store_true", help="also against the local S3 server (Swift + s3api)")
    parser.add_argument("--s3-images", type=int, default=5000)
    parser.add_argument("--gpu", action="store_true", help="only: ms/query on one GPU")
    parser.add_argument("--gpu-ms-per-query", type=float, default=None, help="for the GPU-hours projection")
    args = parser.parse_args()
    if args.gpu:
        gpu_ms_per_query(args.features, args.candidates, repeats=20)
        return
    root = Path(args.root or tempfile.mkdtemp(prefix="bench-answers-"))
    try:
        measure(args, root)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def measure(args: argparse.Namespace, root: Path) -> None:
    rng = np.random.default_rng(24)
    pool = feature_pool(rng, args.features)
    settings = StoreSettings(local_dtype=args.dtype)
    index, queries = str(root / "index"), str(root / "queries")
    start = time.perf_counter()
    reused = generated(root, args)
    if not reused:
        for name in ("index", "queries", "search.parquet", "_bench.json"):
            storage.remove(str(root / name), recursive=True)
        write_store(index, args.images, pool, settings)
        write_store(queries, args.queries, pool, settings, prefix="q")
        shortlists(rng, str(root / "search.parquet"), args.queries, args.candidates, args.images)
        (root / "_bench.json").write_text(json.dumps(sizes(args)))
    for name in ("r1", "r1w", "rr1", "r2", "cache"):  # outputs of an earlier run: every run starts cold
        storage.remove(str(root / name), recursive=True)
    size = sum(f.stat().st_size for f in (root / "index").rglob("*.parquet"))
    print(
        f"store: {args.images} images × {args.features} {args.dtype} features, {size / 1e9:.2f} GB, "
        f"{'reused' if reused else 'written'} in {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    config = RerankConfig(top=args.candidates, trials=args.trials)
    cache = str(root / "cache")
    one = describe(
        "cold, 1 worker", *run(root, "r1", index, queries, config, RerankRun(cache_dir=cache)), args.queries
    )
    describe(
        "warm (node-local cache), 1 worker",
        *run(root, "r1w", index, queries, config, RerankRun(cache_dir=cache)),
        args.queries,
    )
    ensure_ray()  # Ray's own start is not the stage's: outside the timed run (actor start-up is inside)
    address = ray_address()
    on_ray = {}
    for count in (1, 2):
        workers = Workers(address=address, min_workers=count)
        part = max(1, args.queries // 8)
        on_ray[count] = describe(
            f"cold, {count} Ray worker(s)",
            *run(
                root,
                f"rr{count}" if count == 1 else "r2",
                index,
                queries,
                config,
                RerankRun(workers=workers, queries_per_part=part),
            ),
            args.queries,
            workers=count,
        )
    print(
        f"speed-up 1 → 2 Ray workers: {on_ray[2]['pairs/s'] / on_ray[1]['pairs/s']:.2f}× wall-clock, "
        f"{on_ray[2]['busy pairs/s'] / on_ray[1]['busy pairs/s']:.2f}× busy"
    )
    legacy = str(root / "legacy")
    write_store(legacy, args.legacy_images, pool, StoreSettings(local_dtype=args.dtype, row_group_size=64))
    storage.remove(str(root / "legacy" / "local_index"), recursive=True)
    shortlists(rng, str(root / "search.parquet"), args.queries, args.candidates, args.legacy_images)
    fast = RerankConfig(top=args.candidates, trials=1)  # reading is what this run measures
    describe(
        "old layout (64 per row group), cold",
        *run(root, "rl", legacy, queries, fast, RerankRun()),
        args.queries,
    )
    if args.s3:
        measure_s3(args, root, pool, settings, queries, fast, rng)
    per_pair_s = 1 / one["pairs/s"]
    print(
        f"GLDv2 projection (118k × 100 = {GLDV2_PAIRS / 1e6:.1f} M pairs): "
        f"{GLDV2_PAIRS * per_pair_s / 3600:.0f} CPU-node-hours at {one['pairs/s']} pairs/s per 2-core node"
    )
    if args.gpu_ms_per_query:
        print(
            f"  {118_000 * args.gpu_ms_per_query / 1000 / 3600:.2f} GPU-hours at {args.gpu_ms_per_query} ms/query"
        )


def measure_s3(
    args, root: Path, pool, settings: StoreSettings, queries: str, config: RerankConfig, rng
) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from swift_s3 import SwiftS3

    with SwiftS3.start() as server:
        options = server.options
        fs, _ = storage.filesystem("s3://bench", options)
        fs.mkdir("bench")
        write_store("s3://bench/index", args.s3_images, pool, settings, options)
        shortlists(rng, str(root / "search.parquet"), args.queries, args.candidates, args.s3_images)
        describe(
            "S3 (Swift s3api), cold",
            *run(root, "rs3", "s3://bench/index", queries, config, RerankRun(), options),
            args.queries,
        )


if __name__ == "__main__":
    main()
