"""Metric-learning objectives on real photos (issue 29): global mAP@100 on COIL objects never trained on.

    cd benchmarks && OMP_NUM_THREADS=2 ../.venv/bin/python bench_losses.py --workdir /tmp/bench-losses

Fine-tunes the ImageNet MobileNetV2 (preset ``delg-mobilenetv2-imagenet``, shared weights, the whole network)
with each objective through ``run_training`` (Ray Train, one CPU worker, balanced sampling: 4 images per
object and batch) on the first half of COIL-100's objects, then extracts the other half's views with the
trained weights (the run's ``trained_preset``) and ranks every held-out image against all others (itself
removed, positives = same object). The quadruplet loss orders each object's views by the manifest's ``view``
column (the turntable angle). "ImageNet" is the untrained start, extracted the same way.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from bench_local_head import PRESET, WEIGHTS
from bench_rerank_real import DATA, labels, load_store, mean_ap, shortlists

from pipeline.config import get_preset, trained_preset
from pipeline.extraction import ExtractionJob, run_extraction
from pipeline.train import TrainCluster, TrainConfig, TrainJob, run_training

OBJECTIVES = ("triplet", "margin", "quadruplet")


def coil_manifest(path: Path, objects: list[str], step: int) -> str:
    """COIL rows of ``objects`` every ``step``-th 5° view, labelled, with the angle as ``view``."""
    rows = [
        {
            "id": r["id"],
            "url": str(DATA / "coil100-subset" / r["file"]),
            "landmark_id": r["object"],
            "view": float(r["angle_deg"]),
        }
        for r in csv.DictReader((DATA / "coil100-subset" / "labels.csv").open())
        if r["object"] in objects and int(r["angle_deg"]) % (5 * step) == 0
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def held_out_map(work: Path, name: str, manifest: str, preset: str, weights: Path) -> float:
    folder = work / f"store-{name}-{Path(manifest).stem}"
    url = str(folder)
    if not (folder / "_commits").exists():
        run_extraction(
            ExtractionJob(manifest, url, get_preset(preset), str(weights), allow_local_outside_root=True)
        )
    ids, vectors, _ = load_store(url)
    lists = shortlists(ids, ids, dict(zip(ids, vectors, strict=True)))
    return mean_ap(
        lists, [np.arange(len(hits)) for _, hits, _ in lists], ids, labels("coil100-subset", "object")
    )


def train(work: Path, objective: str, manifest: str, args: argparse.Namespace) -> Path:
    out = work / f"train-{objective}"
    if not (out / "weights.pt").exists():
        config = TrainConfig(
            steps=args.steps,
            batch_size=16,
            image_size=128,
            lr=args.lr,
            objective=objective,
            mining="distance-weighted" if objective == "margin" else "hard",
            sampling="balanced",
            images_per_class=4,
            batchnorm="frozen",
            log_every=args.steps // 4,
            checkpoint_every=args.steps,
        )
        job = TrainJob(
            manifest, str(out), PRESET, config, weights_url=str(WEIGHTS), allow_local_outside_root=True
        )
        summary = run_training(job, TrainCluster(workers=1, decode_threads=2))
        print(
            f"  {objective}: {summary.steps} steps, final loss {summary.final_loss:.4f}, {summary.seconds:.0f} s"
        )
    return out / "weights.pt"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument("--test-step", type=int, default=1, help="held-out views: every n-th 5° view")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()}")
    objects = sorted({r["object"] for r in csv.DictReader((DATA / "coil100-subset" / "labels.csv").open())})
    trained_on, held_out = objects[: len(objects) // 2], objects[len(objects) // 2 :]
    train_manifest = coil_manifest(args.workdir / "train.parquet", trained_on, step=2)
    test_path = args.workdir / f"test-step{args.test_step}.parquet"
    test_manifest = coil_manifest(test_path, held_out, step=args.test_step)
    print(
        f"trained on {len(trained_on)} objects (every 10°), evaluated on {len(held_out)} others "
        f"(every {5 * args.test_step}°)"
    )
    figures = {
        "ImageNet (no training)": held_out_map(args.workdir, "imagenet", test_manifest, PRESET, WEIGHTS)
    }
    for objective in args.objectives.split(","):
        weights = train(args.workdir, objective, train_manifest, args)
        figures[objective] = held_out_map(
            args.workdir, objective, test_manifest, trained_preset(PRESET), weights
        )
    print("| objective | held-out mAP@100 |")
    print("|---|---|")
    for name, value in figures.items():
        print(f"| {name} | {value:.4f} |", flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
