"""Batched re-ranking vs the per-pair reference verifier, same inputs, one run.

A query of 1000 features against a shortlist of 100 candidates of 1000 features each (128-d unit
descriptors). 20 candidates show the query's scene (100–300 shared features moved by a random affine map,
plus wrong matches), 80 do not (30–150 descriptor matches at random positions), so every pair has putative
matches to verify, as with DELG features. Reported:
- batched (ours): match + verify of the 100 pairs as one call, ms per query and pairs/s (median of repeats);
- reference: cKDTree matching + scikit-image ransac(AffineTransform, 3, 20 px, 1000 trials) per pair, timed
  on a subset of pairs (it costs ~0.1–0.5 s a pair) and extrapolated to 100 pairs;
- agreement of inlier counts on that subset.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_rerank.py [--device cuda] [--reference-pairs 12]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package (reference verifier)

from pipeline.rerank import RerankConfig, verify, verify_candidates
from pipeline.rerank.match import gather_points, match, pad
from tests.reference_verifier import reference_inliers, reference_matches


class Features:
    def __init__(self, keypoints: np.ndarray, descriptors: np.ndarray) -> None:
        self.keypoints = keypoints.astype(np.float32)  # (N, 2)
        self.descriptors = descriptors.astype(np.float32)  # (N, 128)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def shortlist(
    rng: np.random.Generator, n: int = 1000, candidates: int = 100, true: int = 20
) -> tuple[Features, list[Features]]:
    """One query and its shortlist: the first ``true`` candidates share geometry with the query."""
    query = Features(rng.uniform(0, 1024, (n, 2)), unit(rng.normal(size=(n, 128))))
    out = []
    for c in range(candidates):
        kp, desc = rng.uniform(0, 1024, (n, 2)), unit(rng.normal(size=(n, 128)))
        shared = rng.integers(100, 300) if c < true else rng.integers(30, 150)
        picked = rng.choice(n, shared, replace=False)
        desc[:shared] = unit(query.descriptors[picked] + rng.normal(0, 0.03, (shared, 128)))
        if c < true:  # geometrically consistent: a random affine map of the query positions
            angle, scale = rng.uniform(-0.5, 0.5), rng.uniform(0.7, 1.4)
            a = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            kp[:shared] = (
                query.keypoints[picked] @ a.T + rng.uniform(-100, 100, 2) + rng.normal(0, 2, (shared, 2))
            )
            kp[: shared // 4] = rng.uniform(0, 1024, (shared // 4, 2))  # some wrong matches among them
        out.append(Features(kp, desc))
    return query, out


def timed(fn, repeats: int, sync) -> tuple[float, float, object]:
    """Median wall seconds and median process CPU seconds of ``repeats`` calls (after a warm-up), last result.

    CPU time is shown beside wall time because the machine may be shared: wall/CPU ≫ 1 means waiting.
    """
    result = fn()
    walls, cpus = [], []
    for _ in range(repeats):
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        result = fn()
        sync()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return float(np.median(walls)), float(np.median(cpus)), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--reference-pairs", type=int, default=12, help="pairs timed with the reference")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = RerankConfig(device=args.device)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    query, cands = shortlist(rng)
    print(f"device {device}  torch threads {torch.get_num_threads()}  torch {torch.__version__}")

    seconds, cpu, (matches, result) = timed(
        lambda: verify_candidates(query, cands, config), args.repeats, sync
    )
    counts = matches.counts.cpu().numpy()
    inliers = result.inliers.cpu().numpy()
    print(
        f"putative matches per pair: median {np.median(counts):.0f}, max {counts.max()}; inliers: true pairs "
        f"median {np.median(inliers[:20]):.0f}, other pairs max {inliers[20:].max()}"
    )
    print(
        f"batched match+verify: {1000 * seconds:.1f} ms/query (100 pairs; CPU time {1000 * cpu:.0f} ms), "
        f"{100 / seconds:.0f} pairs/s"
    )

    # each half alone, on the same inputs
    cand_kp, _ = pad([c.keypoints for c in cands], device)
    query_kp = torch.as_tensor(query.keypoints, device=device)[None]
    src, dst = gather_points(query_kp, matches.query_idx), gather_points(cand_kp, matches.cand_idx)
    # the reference's direction (and the default): candidate → query, threshold in query pixels
    verify_s, verify_cpu, _ = timed(lambda: verify(dst, src, matches.valid), args.repeats, sync)
    cand_desc, cand_mask = pad([c.descriptors for c in cands], device)
    query_desc = torch.as_tensor(query.descriptors, device=device)
    match_s, match_cpu, _ = timed(
        lambda: match(query_desc, cand_desc, cand_mask=cand_mask), args.repeats, sync
    )
    print(
        f"  match alone {1000 * match_s:.1f} ms (CPU {1000 * match_cpu:.0f} ms), "
        f"verify alone {1000 * verify_s:.1f} ms (CPU {1000 * verify_cpu:.0f} ms) per query"
    )

    half = args.reference_pairs // 2
    subset = np.r_[0:half, 20 : 20 + args.reference_pairs - half]  # true and false pairs
    match_time = ransac_time = 0.0
    reference = []
    for i in subset:
        start = time.perf_counter()
        q, c = reference_matches(query.descriptors, cands[i].descriptors)
        middle = time.perf_counter()
        reference.append(reference_inliers(cands[i].keypoints[c], query.keypoints[q])[0])
        match_time, ransac_time = match_time + middle - start, ransac_time + time.perf_counter() - middle
    per_pair = (match_time + ransac_time) / len(subset)
    ransac_pair = ransac_time / len(subset)
    print(
        f"reference on {len(subset)} pairs: {1000 * per_pair:.0f} ms/pair (cKDTree matching "
        f"{1000 * match_time / len(subset):.0f} ms + skimage ransac {1000 * ransac_pair:.0f} ms) "
        f"→ {100 * per_pair:.1f} s/query, {1 / per_pair:.2f} pairs/s"
    )
    ours = inliers[subset]
    print(f"inliers ours {ours.tolist()}")
    print(f"inliers ref  {reference}")
    print(f"max |ours − ref| {int(np.abs(ours - np.array(reference)).max())}")
    print(f"speed-up, match+verify vs reference per query: {100 * per_pair / seconds:.0f}×")
    print(f"speed-up, verify vs skimage ransac per query: {100 * ransac_pair / verify_s:.0f}×")


if __name__ == "__main__":
    main()
