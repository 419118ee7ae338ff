"""Ray job: the nightly incremental re-index of ROOT from the current manifest (pipeline.reindex).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/nightly_reindex.py --manifest s3://b/manifests/latest.parquet --root s3://b/indexes/nightly \
        --preset delg-r50-gldv2 --weights s3://b/w.pt --keep 7 --retrain-threshold 0.2

Publishes ROOT/versions/vN and moves ROOT/LATEST; a re-run after a crash resumes. Prints a progress line
every --progress-interval seconds while it extracts, one per finished stage, and the run report as JSON on
its last line; exits 3 when another run holds the lock, 2 on a bad input, 1 on any other failure.
"""

from __future__ import annotations

import argparse
import sys

from pipeline import settings, storage
from pipeline.boundary import run_job
from pipeline.lease import LockHeldError
from pipeline.ray_runtime import every
from pipeline.reindex import ReindexConfig, reindex


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True, help="The current manifest URL.")
    parser.add_argument("--root", required=True, help="Root URL of the versioned index.")
    settings.add_job_arguments(parser)
    settings.add_arguments(parser, settings.settings_of(ReindexConfig, {"Workers.address"}))  # --address
    return parser.parse_args(argv)


def run_reindex(args: argparse.Namespace) -> dict:
    config = settings.build(ReindexConfig, vars(args))
    address = settings.job_address(args)
    return reindex(
        args.manifest,
        args.root,
        config,
        storage.options_from_env(),
        ray_address=address,
        on_stage=lambda stage: print(f"reindex: {stage}", flush=True),
        on_progress=every(args.progress_interval, lambda progress: print(progress.describe(), flush=True)),
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
