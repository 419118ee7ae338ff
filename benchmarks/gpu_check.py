"""GPU check (`make gpu-check`): the figures a GPU machine should be judged by, in one JSON file, in ≤ 8 min.

    .venv-gpu/bin/python benchmarks/gpu_check.py --out out/gpu-check.json [--address RAY] [--tiny]

- extraction, R50 preset (delg-r50-gldv2: 7 scales of a 1024-px image, random weights: timing does not
  depend on their values), images/s model-only (``Extractor.extract`` on decoded images; fp32 and bf16 +
  channels_last) and end to end (``run_extraction`` on a local Ray: decode tasks → one 1-GPU extractor →
  shard writes; the run's wall time, and the steady part after the first chunk), as in bench_pipeline.py;
- re-ranking: ms per query of ``verify_candidates`` (1 query × 100 candidates × 1000 features, the
  reference's affine RANSAC), on the shortlists of bench_rerank.py;
- faiss on the GPU: k-means (IVF coarse quantizer), add and search of 1M synthetic vectors (IVF-PQ).

Without a CUDA GPU it prints one line saying why and exits 0. ``--tiny`` runs the same code on the CPU at
toy sizes (the test of this script: tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_pipeline import benchmark_manifest, decode_all, end_to_end, model_only
from bench_rerank import shortlist, timed
from PIL import Image
from skimage import data

from pipeline.config import RuntimeOptions, get_preset
from pipeline.extraction import ClusterOptions, ExtractionJob, Extractors
from pipeline.features import build_extractor
from pipeline.rerank import RerankConfig, verify_candidates

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def sizes(tiny: bool) -> dict[str, Any]:
    """Workload sizes: the real check, or toy ones that run the same code on a CPU in seconds."""
    if tiny:
        return dict(
            preset="cpu-small",
            side=160,
            model_images=4,
            e2e_images=6,
            queries=1,
            candidates=3,
            features=300,
            vectors=4000,
            dim=32,
            nlist=16,
            pq=8,
            search_queries=100,
            nprobe=4,
        )
    return dict(
        preset="delg-r50-gldv2",
        side=1024,
        model_images=64,
        e2e_images=256,
        queries=20,
        candidates=100,
        features=1000,
        vectors=1_000_000,
        dim=256,
        nlist=4096,
        pq=32,
        search_queries=10_000,
        nprobe=32,
    )


def photo_folder(folder: Path, side: int) -> Path:
    """Real photos (scikit-image's), resized to ``side`` px on the long side: the preset's capped size."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        scale = side / max(image.size)
        image.resize((round(image.width * scale), round(image.height * scale))).save(folder / f"{name}.jpg")
    return folder


def extraction(work: Path, size: dict[str, Any], device: str, address: str | None) -> dict[str, Any]:
    config = get_preset(size["preset"])
    source = str(photo_folder(work / "photos", size["side"]))
    decoded, _ = decode_all(benchmark_manifest(work / "model", source, size["model_images"]))
    modes = {"fp32": RuntimeOptions(batch_size=8)}
    if device == "cuda":
        modes["bf16_channels_last"] = RuntimeOptions(batch_size=8, autocast="bf16", channels_last=True)
    model_only_rates = {}
    for mode, runtime in modes.items():
        extractor = build_extractor(config, None, device=device, runtime=runtime)
        extractor.extract(decoded[:2])  # warm-up: cuDNN autotuning, allocator
        if device == "cuda":
            torch.cuda.synchronize()
        model_only_rates[mode] = round(model_only(extractor, decoded, None), 2)
        del extractor
    manifest_url = benchmark_manifest(work / "e2e", source, size["e2e_images"])
    # the photos sit beside the manifest's folder, in the check's own work folder: allowed explicitly
    job = ExtractionJob(
        manifest_url, str(work / "store"), config, None, shard_size=64, allow_local_outside_root=True
    )
    gpus = 1 if device == "cuda" else 0
    cluster = ClusterOptions(address=address, extractors=Extractors(gpus), runtime=modes["fp32"])
    run = end_to_end(job, cluster)
    return {
        "preset": size["preset"],
        "image_long_side": size["side"],
        "scales": list(config.scales),
        "model_only_images_per_s": model_only_rates,
        "model_only_images": len(decoded),
        "end_to_end_images": run.rows,
        "end_to_end_images_per_s": round(run.rows / run.run_s, 2),
        "end_to_end_steady_images_per_s": round(run.steady_rows / run.steady_s, 2),
        "end_to_end_runtime": "fp32",
    }


def reranking(size: dict[str, Any], device: str) -> dict[str, Any]:
    config = RerankConfig(device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    query, candidates = shortlist(
        rng, size["features"], size["candidates"], true=max(1, size["candidates"] // 5)
    )
    seconds, cpu_seconds, _ = timed(
        lambda: verify_candidates(query, candidates, config), size["queries"], sync
    )
    return {
        "candidates": size["candidates"],
        "features": size["features"],
        "queries_timed": size["queries"],
        "ms_per_query": round(1000 * seconds, 2),
        "cpu_ms_per_query": round(1000 * cpu_seconds, 2),
        "config": "affine, 20 px, 1000 trials, refit (RerankConfig defaults)",
    }


def faiss_figures(size: dict[str, Any], device: str) -> dict[str, Any]:
    import faiss

    gpu = device == "cuda"
    if gpu and not hasattr(faiss, "StandardGpuResources"):
        return {"skipped": "this faiss build has no GPU support (faiss-cpu): install requirements/gpu.lock"}
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((size["vectors"], size["dim"]), dtype=np.float32)
    queries = rng.standard_normal((size["search_queries"], size["dim"]), dtype=np.float32)
    train = vectors[rng.choice(len(vectors), min(len(vectors), 256 * size["nlist"]), replace=False)]
    started = time.perf_counter()
    kmeans = faiss.Kmeans(size["dim"], size["nlist"], niter=20, seed=0, gpu=gpu, max_points_per_centroid=256)
    kmeans.train(train)
    kmeans_s = time.perf_counter() - started
    quantizer = faiss.IndexFlatL2(size["dim"])
    quantizer.add(kmeans.centroids)
    index = faiss.IndexIVFPQ(quantizer, size["dim"], size["nlist"], size["pq"], 8)
    index.train(train)  # the coarse quantizer is trained already: this trains the PQ codebooks
    if gpu:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
    started = time.perf_counter()
    index.add(vectors)
    add_s = time.perf_counter() - started
    index.nprobe = size["nprobe"]
    index.search(queries[:10], 100)  # warm-up
    started = time.perf_counter()
    index.search(queries, 100)
    search_s = time.perf_counter() - started
    return {
        "gpu": gpu,
        "vectors": size["vectors"],
        "dim": size["dim"],
        "index": f"IVF{size['nlist']},PQ{size['pq']}",
        "kmeans_s": round(kmeans_s, 3),
        "kmeans_training_points": len(train),
        "add_s": round(add_s, 3),
        "add_vectors_per_s": round(size["vectors"] / add_s),
        "search_queries": size["search_queries"],
        "search_k": 100,
        "nprobe": size["nprobe"],
        "search_queries_per_s": round(size["search_queries"] / search_s),
    }


def machine(device: str) -> dict[str, Any]:
    import faiss

    info = {"python": platform.python_version(), "torch": torch.__version__, "faiss": faiss.__version__}
    if device == "cuda":
        info |= {"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}
    return info | {"device": device, "torch_threads": torch.get_num_threads()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file of the figures")
    parser.add_argument("--address", default=None, help="Ray cluster for the end-to-end run (default: local)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (tests this script)")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        print(f"gpu-check skipped: no CUDA GPU visible to torch {torch.__version__} (nothing measured)")
        return 0
    logging.basicConfig(level=logging.ERROR)
    device = "cpu" if args.tiny else "cuda"
    size = sizes(args.tiny)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        figures = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "tiny": args.tiny,
            "machine": machine(device),
            "extraction": extraction(Path(work), size, device, args.address),
            "rerank": reranking(size, device),
            "faiss": faiss_figures(size, device),
        }
    figures["total_s"] = round(time.perf_counter() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
