"""Pipeline efficiency: end-to-end extraction images/s ÷ model-only images/s (same preset, images, device, run).

    .venv/bin/python benchmarks/bench_pipeline.py --preset cpu-small --n 320 --repeat 3

Images: the embedded demo dataset (real photos, ≤480 px) by default, or ``--manifest`` (a manifest or an
image folder, e.g. ../shared/data/landmarks-mini/images with 0.3–8 MP photos); rows are cycled to ``--n``.
Weights: the shared ImageNet MobileNetV2 features for mobilenet presets when ../shared is there, else random
init (timing does not depend on the weights' values).

Each repeat measures, interleaved (the order alternates between repeats, so load drift hits both):

- model-only: the images are decoded first (not timed); then ``Extractor.extract`` over all of them, with the
  batch size, torch threads, OpenMP settings and process priority (Ray runs workers niced) an extractor
  actor gets. Also over ``--chunk-size`` slices, as the actor sees them (shape groups, hence batches,
  are formed per chunk).
- end-to-end: ``run_extraction`` on a local Ray into a fresh local store (decode tasks → actor → shard
  writes). "run" is the run's own wall time (manifest read, actor start, model load, drain, final commit);
  "+Ray start" adds the one-off ``ray.init``; "steady" starts the clock when the first chunk completes (the
  actor is up and its model loaded) and counts only the rows after it, to the end of the run (last shard
  committed). Bias of "steady": chunks decoded while the model loaded are inside the window for free;
  their decode time is printed as an upper bound.

The ratio (efficiency) is steady end-to-end ÷ model-only (all at once) of the same repeat. From Ray's task
timeline the actor's busy share of the steady window is printed: < 1 means it waited for input, a low
images/s while busy means it competed for cores.
"""

from __future__ import annotations

import os

# Extractor actors run with pipeline.extraction.ACTOR_ENV (checked in main); OpenMP reads it when torch
# loads, so model-only sets it before the import to run under the same conditions.
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import argparse
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch

from pipeline import extraction, images, manifest, ray_runtime, storage
from pipeline.config import RuntimeOptions, get_preset
from pipeline.demo import DEMO_PHOTOS, make_demo_dataset
from pipeline.extraction import ClusterOptions, ExtractionJob, Extractors, run_extraction
from pipeline.features import Extractor, build_extractor

SHARED_MOBILENET = (
    Path(__file__).resolve().parents[2] / "shared" / "weights" / "mobilenetv2_imagenet_features.pt"
)


@dataclass(frozen=True)
class EndToEnd:
    rows: int
    run_s: float  # run_extraction's wall time
    steady_rows: int  # rows completed after the first chunk
    steady_s: float  # first chunk's completion → run end
    actor_busy_s: float  # time inside ExtractorActor.extract during the steady window
    cpu_tasks_s: float  # decode and write task time during the steady window


def benchmark_manifest(folder: Path, source: str | None, n: int) -> str:
    """A manifest of ``n`` rows: ``source``'s rows (or the demo dataset's) cycled, with unique ids."""
    if source is None:
        views = -(-n // len(DEMO_PHOTOS))
        source = make_demo_dataset(str(folder / "demo"), views=views).index_manifest
    table = manifest.read_manifest(source)
    if table.num_rows == 0:
        raise ValueError(f"manifest {source} has no rows")
    rows = table.select(["id", "url"]).to_pylist()
    cycled = [
        {"id": f"{rows[i % len(rows)]['id']}-{i // len(rows)}", "url": rows[i % len(rows)]["url"]}
        for i in range(n)
    ]
    url = str(folder / "bench.parquet")
    storage.write_parquet(url, pa.Table.from_pylist(cycled))
    return url


def decode_all(manifest_url: str) -> tuple[list[torch.Tensor], float]:
    """Decoded images (uint8 (3, H, W)) and the decode seconds per image (one process, one thread)."""
    started = time.perf_counter()
    decoded = [images.load_image(row) for row in manifest.read_manifest(manifest_url).to_pylist()]
    return decoded, (time.perf_counter() - started) / len(decoded)


def model_only(extractor: Extractor, decoded: list[torch.Tensor], chunk_size: int | None) -> float:
    """Images/s of ``Extractor.extract`` over all images at once, or over ``chunk_size`` slices."""
    step = chunk_size or len(decoded)
    started = time.perf_counter()
    for start in range(0, len(decoded), step):
        extractor.extract(decoded[start : start + step])
    return len(decoded) / (time.perf_counter() - started)


def end_to_end(job: ExtractionJob, cluster: ClusterOptions) -> EndToEnd:
    """One fresh run; the steady window opens when the first chunk completes."""
    marks: list[tuple[float, int]] = []
    started = time.time()  # wall clock: Ray's timeline is in epoch microseconds
    summary = run_extraction(job, cluster, on_progress=lambda p: marks.append((time.time(), p.done_rows)))
    ended = time.time()
    first_time, first_rows = marks[0]
    return EndToEnd(
        rows=summary.rows_this_run,
        run_s=ended - started,
        steady_rows=summary.rows_this_run - first_rows,
        steady_s=ended - first_time,
        actor_busy_s=_busy_seconds({"task::ExtractorActor.extract"}, first_time, ended),
        cpu_tasks_s=_busy_seconds({"task::decode_rows", "task::write_chunks"}, first_time, ended),
    )


def _busy_seconds(categories: set[str], start: float, end: float) -> float:
    """Task seconds of ``categories`` between ``start`` and ``end`` (epoch s), from Ray's task timeline."""
    import ray

    busy = 0.0
    for event in ray.timeline():
        if event.get("ph") == "X" and event.get("cat") in categories:
            begin = event["ts"] / 1e6
            busy += max(0.0, min(begin + event["dur"] / 1e6, end) - max(begin, start))
    return busy


def _niceness() -> int:
    return os.nice(0)


def match_worker_niceness() -> int:
    """Take the Ray workers' scheduling priority (Ray starts them niced), so that model-only competes for
    the cores like the actor does when other processes load the machine; returns that niceness."""
    import ray

    worker = ray.get(ray.remote(num_cpus=0)(_niceness).remote())
    os.nice(worker - os.nice(0))
    return worker


def _load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--n", type=int, default=192, help="images (manifest rows)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=ClusterOptions().chunk_size)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--manifest", default=None, help="manifest or image folder; default: demo dataset")
    return parser.parse_args()


def start_ray() -> tuple[float, int, int, int]:
    """Seconds to start a local Ray, its CPUs and GPUs, and the niceness now shared with its workers."""
    import ray

    started = time.perf_counter()
    ray_runtime.ensure_ray()
    seconds = time.perf_counter() - started
    resources = ray.cluster_resources()
    return seconds, int(resources.get("CPU", 1)), int(resources.get("GPU", 0)), match_worker_niceness()


def measure_repeat(
    rep: int, job: ExtractionJob, cluster: ClusterOptions, extractor: Extractor, decoded: list[torch.Tensor]
) -> tuple[float, float, EndToEnd]:
    """Model-only (all at once, per chunk) and end-to-end images/s; the order alternates with ``rep``."""
    e2e = end_to_end(job, cluster) if rep % 2 else None
    chunked = model_only(extractor, decoded, cluster.chunk_size)
    model = model_only(extractor, decoded, None)
    return model, chunked, e2e or end_to_end(job, cluster)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.ERROR)
    if not extraction.ACTOR_ENV.items() <= os.environ.items():
        raise ValueError(f"model-only must run with the actors' {extraction.ACTOR_ENV}; update this script")
    config = get_preset(args.preset)
    weights = (
        str(SHARED_MOBILENET) if config.backbone == "mobilenet_v2" and SHARED_MOBILENET.exists() else None
    )
    runtime = RuntimeOptions(batch_size=args.batch_size)
    gpus = int(torch.cuda.is_available())  # one extractor on one GPU, like the model-only measurement
    cluster = ClusterOptions(extractors=Extractors(gpus), chunk_size=args.chunk_size, runtime=runtime)
    folder = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    os.environ.setdefault("LANDMARK_INDEX_RAY_TMP", str(folder / "ray"))
    manifest_url = benchmark_manifest(folder, args.manifest, args.n)
    decoded, decode_s = decode_all(manifest_url)

    ray_start_s, node_cpus, _, niceness = start_ray()
    extractors = cluster.extractors.most
    threads = extraction.extractor_threads(node_cpus, extractors, gpus)
    torch.set_num_threads(threads)
    started = time.perf_counter()
    extractor = build_extractor(config, weights, runtime=runtime)
    extractor.extract(decoded[:2])  # warm-up, like the actor's first chunk
    load_s = time.perf_counter() - started
    in_flight = cluster.max_chunks_in_flight or 4 * extractors

    shapes = sorted({tuple(image.shape[1:]) for image in decoded})
    print(
        f"preset {args.preset}, {args.n} images, {len(shapes)} shapes {shapes[:4]}{'…' * (len(shapes) > 4)}"
    )
    print(f"weights: {weights or 'random init'}; device: {extractor.device}; torch {torch.__version__}")
    print(
        f"batch {args.batch_size}, chunk {args.chunk_size}, shard {args.shard_size}, extractors {extractors}, "
        f"actor threads {threads} (node CPUs {node_cpus}), actor_cpus {cluster.actor_cpus}, "
        f"decode_cpus {cluster.decode_cpus}, chunks in flight {in_flight}, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, niceness {niceness} (Ray workers' and driver's)"
    )
    print(
        f"Ray start-up {ray_start_s:.2f} s; model build + warm-up in the driver {load_s:.2f} s; "
        f"decode {decode_s * 1e3:.1f} ms/image (1 thread); steady-window decode bias ≤ "
        f"{(in_flight - 1) * args.chunk_size * decode_s:.2f} s"
    )
    print(
        "| rep | load avg | model img/s | model per-chunk img/s | e2e run img/s | e2e +Ray start img/s "
        "| e2e steady img/s | actor busy | decode+write task-s | efficiency (steady ÷ model) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    ratios = []
    for rep in range(args.repeat):
        job = ExtractionJob(
            manifest_url, str(folder / f"store-{rep}"), config, weights, shard_size=args.shard_size
        )
        model, chunked, e2e = measure_repeat(rep, job, cluster, extractor, decoded)
        steady = e2e.steady_rows / e2e.steady_s
        ratios.append(steady / model)
        print(
            f"| {rep} | {_load()} | {model:.2f} | {chunked:.2f} | {e2e.rows / e2e.run_s:.2f} | "
            f"{e2e.rows / (e2e.run_s + ray_start_s):.2f} | {steady:.2f} | "
            f"{e2e.actor_busy_s / e2e.steady_s:.2f} | {e2e.cpu_tasks_s:.1f} | {ratios[-1]:.3f} |",
            flush=True,
        )
    print(f"efficiency (median of {len(ratios)} repeats): {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
