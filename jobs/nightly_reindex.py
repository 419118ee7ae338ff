"""Ray job: the nightly incremental re-index of ROOT from the current manifest (pipeline.reindex).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/nightly_reindex.py --manifest s3://b/manifests/latest.parquet --root s3://b/indexes/nightly \
        --preset delg-r50-gldv2 --weights s3://b/w.pt --keep 7 --retrain-threshold 0.2

Publishes ROOT/versions/vN and moves ROOT/LATEST; a re-run after a crash resumes. Prints the run report as
JSON on its last line; exits 3 when another run holds the lock, 2 on a bad input, 1 on any other failure.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline import storage
from pipeline.errors import run_job
from pipeline.lease import LockHeldError
from pipeline.reindex import ReindexConfig, reindex


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True, help="The current manifest URL.")
    parser.add_argument("--root", required=True, help="Root URL of the versioned index.")
    parser.add_argument("--preset", required=True, help="Extraction preset name.")
    parser.add_argument("--weights", default="", help="Model state dict URL; empty: none (random init).")
    parser.add_argument("--keep", type=int, default=3, help="Published versions to keep.")
    parser.add_argument(
        "--retrain-threshold",
        type=float,
        default=0.2,
        help="Retrain when (new + changed) / live vectors exceeds this.",
    )
    parser.add_argument("--memory-budget", default="", help="Memory budget of a retrained index, e.g. 48GiB.")
    parser.add_argument("--shard-size", type=int, default=1000, help="Manifest rows per descriptor shard.")
    parser.add_argument(
        "--image-root",
        default="",
        help="Image root of an id-only manifest (GLDv2 index.csv): ROOT/a/b/c/ID.jpg.",
    )
    parser.add_argument(
        "--lease-seconds", type=float, default=6 * 3600.0, help="Lock lease, renewed as it runs."
    )
    parser.add_argument(
        "--dba", action="store_true", help="Keep DBA vectors beside every version (re-rank --method dba...)."
    )
    parser.add_argument(
        "--address", default="", help="Ray address; default: $RAY_ADDRESS (set inside a Ray job), else local."
    )
    return parser.parse_args(argv)


def run_reindex(args: argparse.Namespace) -> dict:
    config = ReindexConfig(
        preset=args.preset,
        weights_url=args.weights or None,
        shard_size=args.shard_size,
        keep=args.keep,
        retrain_threshold=args.retrain_threshold,
        lease_seconds=args.lease_seconds,
        memory_budget=args.memory_budget or None,
        image_root=args.image_root or None,
        dba=args.dba,
    )
    address = args.address or os.environ.get("RAY_ADDRESS") or None
    return reindex(
        args.manifest, args.root, config, storage.options_from_env(), ray_address=address
    ).to_dict()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run_job("nightly_reindex", lambda: run_reindex(args))
    except LockHeldError as exc:
        print(f"nightly_reindex refused: {storage.redact_text(str(exc))}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
