"""Ray job: index a whole manifest — extract descriptors into OUT/descriptors, then build OUT/index.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/index_manifest.py --manifest s3://b/m.parquet --out s3://b/indexes/full \
        --preset delg-r50-gldv2 --weights s3://b/w.pt --memory-budget 48GiB

Re-submitting the same command resumes: committed descriptor shards are kept. Storage credentials come
from the environment (AWS_* or LANDMARK_INDEX_STORAGE_OPTIONS), never from flags. Prints a progress line
every --progress-interval seconds while it extracts, and a JSON summary as its last line; exits 2 with the
reason on a bad input, 1 on any other failure.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from typing import Any

from pipeline import settings, storage
from pipeline.boundary import run_job
from pipeline.config import get_preset
from pipeline.extraction import ClusterOptions, ExtractionJob, run_extraction
from pipeline.index import BuildConfig, build_index
from pipeline.ray_runtime import every

# Library fields this job sets itself (from --manifest, --out, --preset, --address) or keeps (input guards;
# in_process: the job builds its index on Ray).
SET_HERE = {
    "manifest_url",
    "out_url",
    "config",
    "address",
    "options",
    "ray_address",
    "in_process",
    *settings.GUARDS,
}
EXTRACTION = settings.settings_of(ExtractionJob, SET_HERE) + settings.settings_of(ClusterOptions, SET_HERE)
INDEX = settings.settings_of(build_index, SET_HERE) + settings.settings_of(BuildConfig, SET_HERE)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True, help="Manifest URL (Parquet/CSV file, folder, glob).")
    parser.add_argument("--out", required=True, help="Output URL: OUT/descriptors and OUT/index.")
    parser.add_argument("--preset", required=True, help="Extraction preset name.")
    settings.add_job_arguments(parser)
    settings.add_arguments(parser, EXTRACTION + INDEX)
    return parser.parse_args(argv)


def index_manifest(args: argparse.Namespace) -> dict[str, Any]:
    """Extraction then index build; the summary of both."""
    options, given = storage.options_from_env(), vars(args)
    address = settings.job_address(args)
    descriptors = storage.join(args.out, "descriptors")
    config = get_preset(args.preset)
    job = settings.build(ExtractionJob, given, manifest_url=args.manifest, out_url=descriptors, config=config)
    extraction = run_extraction(
        job,
        settings.build(ClusterOptions, given, address=address),
        options,
        every(args.progress_interval, lambda progress: print(progress.describe(), flush=True)),
    )
    print(f"index: building from {extraction.ok} descriptors", flush=True)
    index = build_index(
        descriptors,
        storage.join(args.out, "index"),
        **settings.keyword_arguments(build_index, given),
        options=options,
        ray_address=address,
        config=settings.build(BuildConfig, given),
    )
    return {
        "descriptors": storage.redact(descriptors),
        "extraction": {**asdict(extraction), "images_per_s": extraction.images_per_s},
        "index": storage.redact(storage.join(args.out, "index")),
        "factory": index.choice.factory,
        "ntotal": index.ntotal,
        "nprobe": index.nprobe,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_job("index_manifest", lambda: index_manifest(args))


if __name__ == "__main__":
    sys.exit(main())
