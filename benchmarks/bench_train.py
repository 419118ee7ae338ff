"""Training throughput on Ray Train: images/s with 1 and 2 workers on the same global batch, one run each.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_train.py --preset cpu-small --steps 12

Images: scikit-image's bundled photos (4 sizes, 4 classes), repeated to --images rows of a Parquet manifest.
Throughput is the mean of the metrics lines after the first (which include start-up); each worker gets
--cpus-per-worker CPUs. On CUDA machines pass --gpus-per-worker 1 and --workers-list 1,2,... . --decode
tasks decodes in Ray tasks of --decode-cpus CPUs, --decode-chunk images each, instead of --decode-threads
threads in each worker.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from skimage import data

from pipeline.train import TrainCluster, TrainConfig, TrainJob, run_training

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # 512×512, 400×600, 300×451, 427×640


def write_manifest(folder: Path, count: int) -> str:
    """``count`` rows cycling over the photos (label = photo), as JPEG files, in a Parquet manifest."""
    for name in PHOTOS:
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.jpg", quality=90)
    rows = [
        {"id": str(i), "url": str(folder / f"{PHOTOS[i % 4]}.jpg"), "landmark_id": PHOTOS[i % 4]}
        for i in range(count)
    ]
    pq.write_table(pa.Table.from_pylist(rows), folder / "manifest.parquet")
    return str(folder / "manifest.parquet")


def steady_images_per_s(out: str) -> float:
    lines = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    steady = lines[1:] or lines
    return float(np.mean([line["images_per_s"] for line in steady]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--trainable", default="all")
    parser.add_argument("--workers-list", default="1,2")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    parser.add_argument("--decode", default="auto", help="threads, tasks or auto (TrainCluster.decode)")
    parser.add_argument("--decode-threads", type=int, default=2)
    parser.add_argument("--decode-cpus", type=float, default=1.0)
    parser.add_argument("--decode-chunk", type=int, default=8)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-train-"))
    manifest = write_manifest(folder, args.images)
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        image_size=args.image_size,
        trainable=args.trainable,
        log_every=2,
    )
    print(
        f"preset {args.preset}  image {args.image_size}px  global batch {args.batch_size}  steps {args.steps}  "
        f"decode {args.decode}"
    )
    print(f"load average before: {os.getloadavg()}")
    results = {}
    for workers in (int(w) for w in args.workers_list.split(",")):
        out = str(folder / f"out-{workers}")
        cluster = TrainCluster(
            workers=workers,
            cpus_per_worker=args.cpus_per_worker,
            gpus_per_worker=args.gpus_per_worker,
            decode=args.decode,
            decode_threads=args.decode_threads,
            decode_cpus=args.decode_cpus,
            decode_chunk=args.decode_chunk,
        )
        started = time.perf_counter()
        run_training(TrainJob(manifest, out, args.preset, config), cluster)
        wall = time.perf_counter() - started
        results[workers] = steady_images_per_s(out)
        print(
            f"{workers} worker(s): {results[workers]:.2f} images/s steady ({results[workers] / workers:.2f} per "
            f"worker), {wall:.1f} s wall incl. start-up; load average {os.getloadavg()}"
        )
    first = min(results)
    for workers, rate in results.items():
        print(
            f"scaling {first}→{workers} workers: {rate / results[first]:.2f}× (ideal {workers / first:.0f}×)"
        )


if __name__ == "__main__":
    main()
