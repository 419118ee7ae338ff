"""Ray job: train (or fine-tune) DELG on a labelled manifest with Ray Train; OUT gets weights.pt.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/train.py --manifest s3://b/train_clean.parquet --out s3://b/runs/r50 \
        --preset delg-r50-gldv2 --weights imagenet --steps 100000 --batch-size 256 \
        --sampling balanced

Re-submitting the same command resumes from the newest checkpoint under OUT/checkpoints. Storage
credentials come from the environment (AWS_* or LANDMARK_INDEX_STORAGE_OPTIONS), never from flags. Prints
a progress line every --progress-interval seconds and a JSON summary as its last line; exits 2 with the reason on a bad input, 1 on any other failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from pipeline import settings, storage
from pipeline.boundary import run_job
from pipeline.ray_runtime import every
from pipeline.train import TrainCluster, TrainJob, run_training

# Library fields this job sets itself (from --manifest, --out, --address) or keeps (input guards, and the
# fault injection of the resume tests).
SET_HERE = {"manifest_url", "out_url", "address", "crash_after_step", *settings.GUARDS}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True, help="Labelled manifest URL (landmark_id on every row).")
    parser.add_argument("--out", required=True, help="Output URL: weights.pt, metrics.jsonl, checkpoints/.")
    settings.add_job_arguments(parser)
    found = settings.settings_of(TrainJob, SET_HERE) + settings.settings_of(TrainCluster, SET_HERE)
    settings.add_arguments(parser, found)
    return parser.parse_args(argv)


def progress_line(line: dict[str, Any]) -> str:
    """One progress line from a rank-0 metrics line."""
    return (
        f"train: step {line['step']}/{line['total_steps']}, loss {line['loss']:.4f}, "
        f"{line['images_per_s']:.1f} images/s"
    )


def train(args: argparse.Namespace) -> dict[str, Any]:
    given = vars(args)
    job = settings.build(TrainJob, given, manifest_url=args.manifest, out_url=args.out)
    address = settings.job_address(args)
    cluster = settings.build(TrainCluster, given, address=address)
    show = every(args.progress_interval, lambda line: print(progress_line(line), flush=True))
    summary = run_training(job, cluster, storage.options_from_env(), on_progress=show)
    record = dataclasses.asdict(summary) | {"weights_url": storage.redact(summary.weights_url)}
    return {**record, "images_per_s": summary.images_per_s}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_job("train", lambda: train(args))


if __name__ == "__main__":
    sys.exit(main())
