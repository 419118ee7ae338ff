"""Inlier accuracy against ground-truth homographies (issue 28): which RANSAC threshold and matcher settings
give inliers that are true correspondences, measured where the geometry is known rather than by mAP.

Pairs: graffiti 1 → 3 (../shared/data/pairs, H1to3p.xml; viewpoint) and Oxford boat 1 → 2..6 (the set
benchmarks/data/fetch_multiview.py writes, homographies rescaled to the downscaled photos; zoom + rotation).
Features: the stores of bench_rerank_datasets.py (preset ``delg-mobilenetv2-imagenet``). For each setting:
putative matches, inliers, and the share of inliers whose query point maps within 16 px (8 px) of its match
under the ground truth; "false" = the median inlier count of the same query against the fetched sets' other
photos and landmarks-mini (surely not matches), the level a true pair must clear.

    OMP_NUM_THREADS=1 PYTHONPATH=.:benchmarks python benchmarks/bench_inlier_accuracy.py \\
        --stores STORES --mv MV
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from bench_rerank_real import DATA, load_store

from pipeline.rerank import RerankConfig, verify_candidates
from tests.test_rerank import project, read_opencv_matrix

THRESHOLDS = (8.0, 12.0, 20.0, 30.0)
FALSE_STEP = 3  # every 3rd surely-false image (24 of 72) measures the false pairs' level
MATCHERS = {"NN < 1.0": {}, "mutual NN": {"mutual": True}, "NN, ratio 0.95": {"ratio": 0.95}}


def pairs(stores: Path, mv: Path) -> tuple[list[tuple[str, str, str, np.ndarray]], dict, list[str]]:
    """(name, query id, candidate id, H query → candidate), features by id, ids of surely-false images."""
    lm, pair_store, fetched = (load_store(str(stores / f"store-{n}")) for n in ("lm", "pairs", "mv"))
    features = {**lm[2], **pair_store[2], **fetched[2]}
    found = [("graf 1→3", "graf1.png", "graf3.png", read_opencv_matrix(DATA / "pairs" / "H1to3p.xml"))]
    found += [
        (f"boat 1→{k}", "boat_img1", f"boat_img{k}", np.loadtxt(mv / "boat" / f"H1to{k}p"))
        for k in range(2, 7)
    ]
    false = [i for i in [*lm[0], *fetched[0]] if not i.startswith("boat")]
    return found, features, false[::FALSE_STEP]


def accuracy(query, candidate, h: np.ndarray, config: RerankConfig) -> tuple[int, int, float, float]:
    """Putative matches, inliers, share of inliers within 16 px and 8 px of the ground-truth mapping."""
    matches, result = verify_candidates(query, [candidate], config)
    mask = result.inlier_mask[0] & matches.valid[0]
    src = query.keypoints[matches.query_idx[0][mask].numpy()]
    dst = candidate.keypoints[matches.cand_idx[0][mask].numpy()]
    error = np.linalg.norm(project(h, src) - dst, axis=1)
    within = [float((error < px).mean()) if len(error) else float("nan") for px in (16, 8)]
    return int(matches.valid[0].sum()), int(mask.sum()), *within


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stores", type=Path, required=True)
    parser.add_argument("--mv", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    found, features, false = pairs(args.stores, args.mv)
    base = RerankConfig(device="cpu")
    print(
        "| matcher | threshold px | pair | putative | inliers | ≤ 16 px | ≤ 8 px | false pairs' median inliers |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (matcher, settings), threshold in itertools.product(MATCHERS.items(), THRESHOLDS):
        config = replace(base, threshold=threshold, **settings)
        shares = []
        for name, query_id, cand_id, h in found:
            putative, inliers, within16, within8 = accuracy(features[query_id], features[cand_id], h, config)
            nulls = [features[i] for i in false]
            null = np.median(verify_candidates(features[query_id], nulls, config)[1].inliers.numpy())
            shares.append((within16 * inliers, inliers))
            print(
                f"| {matcher} | {threshold:g} | {name} | {putative} | {inliers} | {within16:.3f} | "
                f"{within8:.3f} | {null:g} |",
                flush=True,
            )
        pooled = sum(s for s, _ in shares) / max(sum(n for _, n in shares), 1)
        print(
            f"| {matcher} | {threshold:g} | **all pairs, pooled** | | {sum(n for _, n in shares)} | {pooled:.3f} | | |"
        )


if __name__ == "__main__":
    main()
