"""Issue 13's experiment: train the local head of ``delg-mobilenetv2-imagenet`` on COIL, re-rank landmarks-mini.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_local_head.py --workdir WORK

1. Manifest from ../shared/data/coil100-subset/labels.csv (``landmark_id`` = object: 17 objects × 72 views).
2. ``run_training`` (what ``landmark-index train --trainable local-head`` runs): attention + autoencoder on
   the frozen shared ImageNet MobileNetV2 (and frozen BatchNorm statistics), one CPU worker.
3. landmarks-mini extracted twice: preset ``delg-mobilenetv2-imagenet`` (backbone-only local head, as today)
   and ``delg-mobilenetv2-imagenet-learned`` with the trained weights.pt (the backbone and global
   descriptor are the same, so is the global shortlist: the script checks it).
4. All-vs-all re-ranking of the shared global top 100 (``bench_rerank_real``): mAP@100 with each store's
   recorded settings (what ``rerank`` picks) and with each scoring for both heads.

Re-running with the same --workdir reuses the finished training and stores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from bench_rerank_real import DATA, labels, load_store, mean_ap, rerank_all, shortlists

from pipeline.config import get_preset, trained_preset
from pipeline.extraction import ExtractionJob, run_extraction
from pipeline.rerank import RerankConfig, config_from_stores
from pipeline.train import TrainCluster, TrainConfig, TrainJob, run_training

PRESET = "delg-mobilenetv2-imagenet"
WEIGHTS = DATA.parent / "weights" / "mobilenetv2_imagenet_features.pt"


def write_manifest(folder: str, path: Path, label_column: str | None) -> str:
    """id, url (and landmark_id from ``label_column``) rows of a shared data set's labels.csv."""
    rows = []
    for row in csv.DictReader((DATA / folder / "labels.csv").open()):
        entry = {"id": row["id"], "url": str(DATA / folder / row["file"])}
        rows.append(entry | ({"landmark_id": row[label_column]} if label_column else {}))
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def train(work: Path, args: argparse.Namespace) -> Path:
    out = work / "train"
    if not (out / "weights.pt").exists():
        manifest = write_manifest("coil100-subset", work / "coil.parquet", "object")
        config = TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            image_size=args.image_size,
            lr=args.lr,
            trainable="local-head",
            batchnorm="frozen",
            log_every=10,
            checkpoint_every=args.steps,
        )
        job = TrainJob(
            manifest, str(out), PRESET, config, weights_url=str(WEIGHTS), allow_local_outside_root=True
        )
        run_training(job, TrainCluster(workers=1, decode_threads=2), on_progress=_show)
    run = json.loads((out / "_run.json").read_text())
    print(f"trained {run['steps']} steps, {run['images']} images in {run['seconds']:.0f} s (incl. start-up)")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "attention", "reconstruction"):
        print(
            f"training {key}: step {lines[0]['step']} {lines[0][key]:.4f} → step {lines[-1]['step']} "
            f"{lines[-1][key]:.4f}"
        )
    return out / "weights.pt"


def _show(line: dict) -> None:
    print(
        f"  step {line['step']}/{line['total_steps']}: loss {line['loss']:.4f}, "
        f"{line['images_per_s']:.1f} images/s",
        flush=True,
    )


def extract(work: Path, name: str, preset: str, weights: Path) -> str:
    url = str(work / f"store-{name}")
    manifest = write_manifest("landmarks-mini", work / "lm.parquet", None)
    job = ExtractionJob(manifest, url, get_preset(preset), str(weights), allow_local_outside_root=True)
    summary = run_extraction(job)
    print(f"extracted {name} ({preset}): {summary.ok} ok, {summary.errors} errors, {summary.seconds:.0f} s")
    return url


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()}")
    trained = train(args.workdir, args)
    urls = {
        "backbone": extract(args.workdir, "backbone", PRESET, WEIGHTS),
        "learned": extract(args.workdir, "learned", trained_preset(PRESET), trained),
    }
    loaded = {head: load_store(url) for head, url in urls.items()}
    ids = loaded["backbone"][0]
    vectors = dict(zip(ids, loaded["backbone"][1], strict=True))
    learned = dict(zip(loaded["learned"][0], loaded["learned"][1], strict=True))
    drift = max(float(np.abs(vectors[i] - learned[i]).max()) for i in ids)
    print(f"global descriptors, learned vs backbone store: max |difference| {drift:.2e}")
    label = labels("landmarks-mini", "landmark")
    lists = shortlists(ids, ids, vectors)
    print(f"global mAP@100: {mean_ap(lists, [np.arange(len(s[1])) for s in lists], ids, label):.4f}")
    print("| local head | score inliers | score shortlist | the store's choice (what rerank picks) |")
    print("|---|---|---|---|")
    for head, url in urls.items():
        maps = {
            score: mean_ap(
                lists, rerank_all(lists, loaded[head][2], RerankConfig(score=score))[0], ids, label
            )
            for score in ("inliers", "shortlist")
        }
        chosen = config_from_stores(url, url).score
        print(f"| {head} | {maps['inliers']:.4f} | {maps['shortlist']:.4f} | {chosen} |", flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
