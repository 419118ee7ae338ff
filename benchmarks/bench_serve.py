"""The query service under load, against the same query path in one process.

An index of the demo images (real DELG features, delg-mobilenetv2-imagenet with ../shared weights) plus
``--synthetic`` random unit global vectors, served by `pipeline.serve.app` on a local Ray (GPU extraction when
the machine has one). Prints, side by side in one run:

- model-only latency in one process: extraction + search + verification of one photo (QueryEngine's parts);
- end-to-end latency p50/p95/p99 and QPS at 1, 4 and 16 concurrent clients, and each deployment's share
  (the Server-Timing header: decode, extract, search, verify);
- resident memory of each Serve replica;
- serving overhead = end-to-end p50 at 1 client ÷ model-only p50 (goal ≤ 1.3).

    python benchmarks/bench_serve.py --synthetic 100000 --requests 40 --work /tmp/bench-serve
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from pipeline import storage, store, versions
from pipeline.config import get_preset
from pipeline.demo import SHARED_WEIGHTS, make_demo_dataset
from pipeline.extraction import ClusterOptions, ExtractionJob, run_extraction
from pipeline.index import build_index
from pipeline.query import QueryEngine, prepare_photo, resolve_version, shortlist_size
from pipeline.serve.app import build_app
from pipeline.serve.settings import ServeSettings

PRESET = "delg-mobilenetv2-imagenet"


def build_root(work: Path, synthetic: int, address: str) -> tuple[str, list[Path]]:
    """A versioned root whose v000001 indexes the demo images + ``synthetic`` random vectors; the query photos."""
    root = str(work / "root")
    if versions.live_version(root) is not None:
        return root, sorted((work / "data" / "images").glob("query-*.jpg"))
    dataset = make_demo_dataset(str(work / "data"), views=4)
    real = storage.join(root, versions.DESCRIPTORS, "demo")
    job = ExtractionJob(dataset.index_manifest, real, get_preset(PRESET), str(SHARED_WEIGHTS), shard_size=16)
    run_extraction(job, ClusterOptions(address=address))
    ids, vectors = store.read_global(real)
    compact = str(work / "compact")
    store.write_global_only_shard(compact, 0, list(ids), vectors.astype(np.float32))
    rng = np.random.default_rng(0)
    for shard, start in enumerate(range(0, synthetic, 50_000), start=1):
        count = min(50_000, synthetic - start)
        noise = rng.standard_normal((count, vectors.shape[1])).astype(np.float32)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        store.write_global_only_shard(
            compact, shard, [f"synthetic-{start + i:07d}" for i in range(count)], noise
        )
    version = versions.version_url(root, versions.version_name(1))
    build_index(compact, version, ray_address=address)
    storage.write_text(storage.join(version, versions.STORES), json.dumps(versions.store_names([real])))
    versions.publish(root, versions.version_name(1))
    return root, sorted((work / "data" / "images").glob("query-*.jpg"))


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1000
    return {f"p{q}": round(float(np.percentile(ms, q)), 1) for q in (50, 95, 99)}


def model_only(root: str, photos: list[Path], repeats: int, k: int) -> dict[str, float]:
    """One query at a time in this process: extraction + search + verification (decode apart)."""
    version = resolve_version(root)
    engine = QueryEngine(version)
    totals, parts = [], {"extract": [], "search": [], "verify": []}
    for i in range(repeats + 1):
        prepared = prepare_photo(version, photos[i % len(photos)].read_bytes())
        start = time.perf_counter()
        features = engine.model.extract([prepared])[0]
        extracted = time.perf_counter()
        shortlist = engine.searcher.search(
            features.global_descriptor[None], shortlist_size(version, k, True)
        )[0]
        searched = time.perf_counter()
        engine.verifier.verify(features, shortlist, k)
        done = time.perf_counter()
        if i == 0:
            continue  # warm-up
        totals.append(done - start)
        for name, seconds in (
            ("extract", extracted - start),
            ("search", searched - extracted),
            ("verify", done - searched),
        ):
            parts[name].append(seconds)
    return {"p50_ms": round(1000 * statistics.median(totals), 1)} | {
        f"{name}_p50_ms": round(1000 * statistics.median(v), 1) for name, v in parts.items()
    }


def load(url: str, photos: list[Path], clients: int, total: int, k: int) -> dict:
    bodies = [p.read_bytes() for p in photos]

    def one(i: int) -> tuple[float, int, dict[str, float]]:
        start = time.perf_counter()
        response = requests.post(
            f"{url}/v1/search",
            data=bodies[i % len(bodies)],
            params={"k": k},
            headers={"Content-Type": "image/jpeg"},
            timeout=600,
        )
        seconds = time.perf_counter() - start
        timing = {}
        for part in response.headers.get("Server-Timing", "").split(", "):
            if ";dur=" in part:
                name, value = part.split(";dur=")
                timing[name] = float(value) / 1000
        return seconds, response.status_code, timing

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(total)))
    wall = time.perf_counter() - start
    ok = [r for r in results if r[1] == 200]
    row = {"clients": clients, "requests": total, "ok": len(ok), "qps": round(len(ok) / wall, 2)}
    row |= {f"e2e_{k_}": v for k_, v in percentiles([r[0] for r in ok]).items()}
    for name in ("decode", "extract", "search", "verify"):
        row[f"{name}_p50"] = percentiles([r[2][name] for r in ok if name in r[2]])["p50"]
    return row


def replica_memory(since: float) -> dict[str, float]:
    """RSS (MiB) of this run's Serve replica processes, found by their process titles (the state API needs the
    dashboard, which this benchmark does not start); ``since``: the run's start time (other sessions' Ray)."""
    import psutil

    out = {}
    for process in psutil.process_iter(["pid", "cmdline", "create_time", "memory_info"]):
        title = " ".join(process.info["cmdline"] or [])
        if title.startswith("ray::ServeReplica:landmark-index:") and process.info["create_time"] >= since:
            name = title.split(":")[-1].split()[0]
            out[f"{name}[{process.info['pid']}]"] = round(process.info["memory_info"].rss / 2**20, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--synthetic", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=40, help="requests per concurrency level")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument(
        "--work", default=None, help="folder for the data and index (kept: reruns reuse them)"
    )
    args = parser.parse_args()
    import ray
    from ray import serve

    started = time.time()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-serve-"))
    ray.init(include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    root, photos = build_root(work, args.synthetic, address)
    print(
        json.dumps({"root": root, "synthetic": args.synthetic, "gpus": ray.cluster_resources().get("GPU", 0)})
    )
    baseline = model_only(root, photos, repeats=len(photos), k=args.k)
    print(json.dumps({"model_only": baseline}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(ServeSettings(index=root, max_in_flight=64)), name="landmark-index", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    load(url, photos, 1, 2, args.k)  # warm-up
    rows = [load(url, photos, clients, args.requests, args.k) for clients in (1, 4, 16)]
    for row in rows:
        print(json.dumps(row))
    print(json.dumps({"replica_rss_mib": replica_memory(started)}))
    print(json.dumps({"serving_overhead": round(rows[0]["e2e_p50"] / baseline["p50_ms"], 2), "goal": 1.3}))
    serve.shutdown()


if __name__ == "__main__":
    main()
