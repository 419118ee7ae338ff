"""Ray job: train (or fine-tune) DELG on a labelled manifest with Ray Train; OUT gets weights.pt.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/train.py --manifest s3://b/train_clean.parquet --out s3://b/runs/r50 \
        --preset delg-r50-gldv2 --weights imagenet --steps 100000 --batch-size 256 \
        --config '{"sampling": "balanced"}'

Re-submitting the same command resumes from the newest checkpoint under OUT/checkpoints. Storage
credentials come from the environment (AWS_* or LANDMARK_INDEX_STORAGE_OPTIONS), never from flags. Prints
a JSON summary as its last line; exits 2 with the reason on a bad input, 1 on any other failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from pipeline import storage
from pipeline.errors import run_job
from pipeline.train import TrainCluster, TrainConfig, TrainJob, run_training


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True, help="Labelled manifest URL (landmark_id on every row).")
    parser.add_argument("--out", required=True, help="Output URL: weights.pt, metrics.jsonl, checkpoints/.")
    parser.add_argument("--preset", required=True, help="Extraction preset of the model to train.")
    parser.add_argument("--weights", default="", help="Initial weights URL or 'imagenet'; empty: random.")
    parser.add_argument("--steps", type=int, default=None, help="Optimiser steps (or --epochs).")
    parser.add_argument("--epochs", type=float, default=None, help="Passes over the manifest (or --steps).")
    parser.add_argument("--batch-size", type=int, default=32, help="Global batch size.")
    parser.add_argument("--config", default="{}", help="JSON object of further TrainConfig fields.")
    parser.add_argument("--workers", type=int, default=None, help="Workers; default one per GPU, else 1.")
    parser.add_argument("--gpus-per-worker", type=float, default=None, help="Default 1 with GPUs, else 0.")
    parser.add_argument(
        "--address", default="", help="Ray address; default: $RAY_ADDRESS (set inside a Ray job), else local."
    )
    return parser.parse_args(argv)


def train_config(args: argparse.Namespace) -> TrainConfig:
    extra = json.loads(args.config)
    if not isinstance(extra, dict):
        raise ValueError(f"--config must be a JSON object of TrainConfig fields, got {args.config!r}")
    allowed = {f.name for f in dataclasses.fields(TrainConfig)} - {"steps", "epochs", "batch_size"}
    unknown = sorted(set(extra) - allowed)
    if unknown:
        raise ValueError(f"unknown --config keys {unknown}; allowed: {sorted(allowed)}")
    return TrainConfig(steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, **extra)


def train(args: argparse.Namespace) -> dict[str, Any]:
    job = TrainJob(args.manifest, args.out, args.preset, train_config(args), weights_url=args.weights or None)
    cluster = TrainCluster(
        address=args.address or os.environ.get("RAY_ADDRESS") or None,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
    )
    summary = run_training(job, cluster, storage.options_from_env())
    record = dataclasses.asdict(summary) | {"weights_url": storage.redact(summary.weights_url)}
    return {**record, "images_per_s": summary.images_per_s}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_job("train", lambda: train(args))


if __name__ == "__main__":
    sys.exit(main())
