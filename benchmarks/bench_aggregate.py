"""Aggregated local features against GeM on the shared real sets (issue 29): all-vs-all mAP@100.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_aggregate.py --workdir /tmp/bench-aggregate

Extracts landmarks-mini and a COIL-100 subset (every ``--coil-step``-th view of each object) once with the
preset ``delg-mobilenetv2-imagenet`` and the shared ImageNet MobileNetV2 weights (cached in the workdir), then
ranks every image against all others (the query itself removed) three ways:
- GeM: the stores' global descriptors (exact inner product);
- VLAD: ``pipeline.aggregate`` over the stores' local features, codebook (``--clusters``) trained on the same
  store — unsupervised, no labels seen — power 0.5 + L2, exact inner product;
- ASMK: ``asmk_similarity`` (α = 3, τ = 0) over the same codebook, every pair scored.
Positives: same landmark / object. Figures and the command go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from bench_local_head import PRESET, WEIGHTS, write_manifest
from bench_rerank_real import labels, load_store, mean_ap, shortlists

from pipeline import store
from pipeline.aggregate import AggregateConfig, aggregate_store, asmk_similarity, train_codebook
from pipeline.config import get_preset
from pipeline.extraction import ExtractionJob, run_extraction

SETS = {"landmarks-mini": "landmark", "coil100-subset": "object"}


def extracted(work: Path, folder: str, coil_step: int) -> str:
    url = str(work / f"store-{folder}")
    if not (work / f"store-{folder}" / "_commits").exists():
        manifest = write_manifest(folder, work / f"{folder}.parquet", None)
        if folder == "coil100-subset":
            import pyarrow.parquet as pq

            table = pq.read_table(manifest)
            angles = {r: int(a) for r, a in labels(folder, "angle_deg").items()}
            keep = [angles[i] % (5 * coil_step) == 0 for i in table.column("id").to_pylist()]
            pq.write_table(table.filter(keep), manifest)
        job = ExtractionJob(manifest, url, get_preset(PRESET), str(WEIGHTS), allow_local_outside_root=True)
        summary = run_extraction(job)
        print(f"extracted {folder}: {summary.ok} ok, {summary.errors} errors, {summary.seconds:.0f} s")
    return url


def asmk_lists(ids: list[str], feats: dict, codebook: np.ndarray) -> list[tuple]:
    """All-vs-all ASMK shortlists in the (query, ids, scores) form of ``shortlists``."""
    n = len(ids)
    sim = np.zeros((n, n))
    for a in range(n):
        for b in range(a + 1, n):
            sim[a, b] = sim[b, a] = asmk_similarity(
                feats[ids[a]].descriptors, feats[ids[b]].descriptors, codebook
            )
    out = []
    for row, query in enumerate(ids):
        order = [j for j in np.argsort(-sim[row], kind="stable") if j != row][:100]
        out.append((query, [ids[j] for j in order], sim[row, order].astype(np.float32)))
    return out


def ranked_map(lists: list[tuple], ids: list[str], label: dict) -> float:
    """mAP@100 of shortlists taken in their own order."""
    return mean_ap(lists, [np.arange(len(hits)) for _, hits, _ in lists], ids, label)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--clusters", type=int, default=64)
    parser.add_argument(
        "--coil-step", type=int, default=6, help="COIL: every n-th 5° view (6: 30°, 204 images)"
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"load average before: {os.getloadavg()}")
    print(f"| dataset | images | GeM | VLAD-{args.clusters} | ASMK-{args.clusters} | VLAD s | ASMK s |")
    print("|---|---|---|---|---|---|---|")
    for folder, key in SETS.items():
        url = extracted(args.workdir, folder, args.coil_step)
        ids, _, feats = load_store(url)
        label = labels(folder, key)
        gem = dict(zip(*store.read_global(url), strict=True))
        gem_map = ranked_map(shortlists(ids, ids, gem), ids, label)
        start = time.perf_counter()
        config = AggregateConfig(clusters=args.clusters, sample_images=len(ids))
        codebook = train_codebook(url, config)
        vlad_url = str(args.workdir / f"vlad-{folder}-{args.clusters}")
        aggregate_store(url, vlad_url, codebook, config)
        vlad = dict(zip(*store.read_global(vlad_url), strict=True))
        vlad_map = ranked_map(shortlists(ids, ids, vlad), ids, label)
        vlad_seconds = time.perf_counter() - start
        start = time.perf_counter()
        asmk_map = ranked_map(asmk_lists(ids, feats, codebook), ids, label)
        asmk_seconds = time.perf_counter() - start
        print(
            f"| {folder} | {len(ids)} | {gem_map:.4f} | {vlad_map:.4f} | {asmk_map:.4f} | "
            f"{vlad_seconds:.1f} | {asmk_seconds:.1f} |",
            flush=True,
        )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
