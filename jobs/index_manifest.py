"""Ray job: index a whole manifest — extract descriptors into OUT/descriptors, then build OUT/index.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/index_manifest.py --manifest s3://b/m.parquet --out s3://b/indexes/full \
        --preset delg-r50-gldv2 --weights s3://b/w.pt --memory-budget 48GiB

Re-submitting the same command resumes: committed descriptor shards are kept. Storage credentials come
from the environment (AWS_* or LANDMARK_INDEX_STORAGE_OPTIONS), never from flags. Prints a JSON summary
as its last line; exits 2 with the reason on a bad input, 1 on any other failure.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from typing import Any

from pipeline import storage
from pipeline.config import get_preset
from pipeline.errors import run_job
from pipeline.extraction import ClusterOptions, ExtractionJob, run_extraction
from pipeline.index import build_index


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True, help="Manifest URL (Parquet/CSV file, folder, glob).")
    parser.add_argument("--out", required=True, help="Output URL: OUT/descriptors and OUT/index.")
    parser.add_argument("--preset", required=True, help="Extraction preset name.")
    parser.add_argument("--weights", default="", help="Model state dict URL; empty: none (random init).")
    parser.add_argument(
        "--memory-budget", default="", help="Index memory budget, e.g. 48GiB; empty: automatic."
    )
    parser.add_argument("--factory", default="", help="faiss factory string instead of a memory budget.")
    parser.add_argument("--shard-size", type=int, default=1000, help="Manifest rows per descriptor shard.")
    parser.add_argument(
        "--image-root",
        default="",
        help="Image root of an id-only manifest (GLDv2 index.csv): ROOT/a/b/c/ID.jpg.",
    )
    parser.add_argument(
        "--address", default="", help="Ray address; default: $RAY_ADDRESS (set inside a Ray job), else local."
    )
    return parser.parse_args(argv)


def index_manifest(args: argparse.Namespace) -> dict[str, Any]:
    """Extraction then index build; the summary of both."""
    options = storage.options_from_env()
    address = args.address or os.environ.get("RAY_ADDRESS") or None
    descriptors = storage.join(args.out, "descriptors")
    job = ExtractionJob(
        manifest_url=args.manifest,
        out_url=descriptors,
        config=get_preset(args.preset),
        weights_url=args.weights or None,
        shard_size=args.shard_size,
        image_root=args.image_root or None,
    )
    extraction = run_extraction(job, ClusterOptions(address=address), options)
    index = build_index(
        descriptors,
        storage.join(args.out, "index"),
        factory=args.factory or None,
        memory_budget=args.memory_budget or None,
        options=options,
        ray_address=address,
    )
    return {
        "descriptors": storage.redact(descriptors),
        "extraction": {**asdict(extraction), "images_per_s": extraction.images_per_s},
        "index": storage.redact(storage.join(args.out, "index")),
        "factory": index["factory"],
        "ntotal": index["ntotal"],
        "nprobe": index["nprobe"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_job("index_manifest", lambda: index_manifest(args))


if __name__ == "__main__":
    sys.exit(main())
