"""Decode → extractor transfer (issue 11): bytes per image shipped and decode time, before/after capping in
the decode task, and what JPEG draft decoding (``decode_draft``) does to the features.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_decode.py [--preset delg-mobilenetv2-imagenet]

Three paths over the same photos (``../shared/data/landmarks-mini`` by default):

- ``full``: the old chunk: the full decode (3, H, W) uint8 is shipped; the actor caps it;
- ``exact``: decode, then the exact cap (``prepare_image``) in the decode task: the chunk holds the capped crop;
- ``draft``: JPEG DCT-domain decode (``decode_reduced``), then the same exact cap.

Bytes are the pickled size of each path's ``DecodedChunk`` per image (what Ray stores and moves), decode time is
the decode task's work per image (best of ``--repeat``), plus the actor's capping time for ``full``. With the
shared MobileNetV2 weights, features of ``exact`` and ``draft`` are compared with ``full``'s: global descriptor
cosine, local keypoints (positions in original pixels), and all-vs-all global mAP@100 by landmark (self excluded).
"""

from __future__ import annotations

import argparse
import csv
import pickle
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import images
from pipeline.config import get_preset
from pipeline.evaluate import gldv2_average_precision
from pipeline.extraction import DecodedChunk
from pipeline.features import ImageFeatures, PreparedImage, build_extractor, prepare_image

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data" / "landmarks-mini"
WEIGHTS = SHARED / "weights" / "mobilenetv2_imagenet_features.pt"


def _best_seconds(work: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = work()
        best = min(best, time.perf_counter() - start)
    return best, result


def _chunk_bytes(prepared: list[PreparedImage]) -> int:
    return len(pickle.dumps(DecodedChunk([str(i) for i in range(len(prepared))], prepared, []), protocol=5))


def _paths(data: bytes, max_side: int, repeat: int) -> dict[str, tuple[float, PreparedImage]]:
    """path → (decode-task seconds, what the actor gets); ``full`` ships the uncapped image."""
    full_s, pixels = _best_seconds(lambda: images.decode_image(data), repeat)
    full = PreparedImage(pixels.numpy(), (0, 0), tuple(pixels.shape[-2:]))  # the old chunk's payload

    def draft() -> PreparedImage:
        reduced = images.decode_reduced(data, max_side)
        return prepare_image(reduced.pixels, max_side, full_size=reduced.full_size)

    exact_s, exact = _best_seconds(lambda: prepare_image(images.decode_image(data), max_side), repeat)
    draft_s, drafted = _best_seconds(draft, repeat)
    return {"full": (full_s, full), "exact": (exact_s, exact), "draft": (draft_s, drafted)}


def _keypoint_agreement(a: ImageFeatures, b: ImageFeatures) -> tuple[float, float]:
    """(max |Δ| over keypoints when both have the same ones in the same order, else nan; share of b's
    (x, y, scale) also in a)."""
    same_order = a.keypoints.shape == b.keypoints.shape and np.array_equal(a.scales, b.scales)
    delta = float(np.abs(a.keypoints - b.keypoints).max(initial=0.0)) if same_order else float("nan")
    keys_a = {
        (round(float(x), 3), round(float(y), 3), float(s))
        for (x, y), s in zip(a.keypoints, a.scales, strict=True)
    }
    shared = sum(
        (round(float(x), 3), round(float(y), 3), float(s)) in keys_a
        for (x, y), s in zip(b.keypoints, b.scales, strict=True)
    )
    return delta, shared / max(len(b.keypoints), 1)


def _map100(ids: list[str], landmark: dict[str, str], vectors: np.ndarray) -> float:
    """All-vs-all global retrieval mAP@100 (self excluded) over queries with at least one positive."""
    scores = vectors @ vectors.T
    aps = []
    for q, query in enumerate(ids):
        relevant = [i for i in ids if i != query and landmark[i] == landmark[query]]
        if relevant:
            ranked = [ids[j] for j in np.argsort(-scores[q], kind="stable") if j != q]
            aps.append(gldv2_average_precision(ranked, relevant))
    return float(np.mean(aps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="delg-mobilenetv2-imagenet")
    parser.add_argument("--data", type=Path, default=DATA, help="a folder with labels.csv (id,file,landmark)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-features", action="store_true", help="bytes and times only")
    args = parser.parse_args()
    config = get_preset(args.preset)
    labels = list(csv.DictReader((args.data / "labels.csv").open()))
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  {platform.node()}  torch threads "
        f"{torch.get_num_threads()}  preset {args.preset} (max_side {config.max_side})  {len(labels)} photos"
    )

    runs = {
        r["id"]: _paths((args.data / r["file"]).read_bytes(), config.max_side, args.repeat) for r in labels
    }
    cap_s = sum(
        _best_seconds(
            lambda p=p: prepare_image(torch.from_numpy(p["full"][1].pixels), config.max_side), args.repeat
        )[0]
        for p in runs.values()
    )
    n = len(runs)
    print(f"{'path':6} {'bytes/image':>12} {'max bytes':>10} {'decode ms/image':>16}")
    for path in ("full", "exact", "draft"):
        size = [_chunk_bytes([p[path][1]]) for p in runs.values()]
        seconds = sum(p[path][0] for p in runs.values())
        print(f"{path:6} {np.mean(size):12.0f} {max(size):10d} {1000 * seconds / n:16.1f}")
    print(
        f"full path: the actor then caps each image: {1000 * cap_s / n:.1f} ms/image more; "
        f"bound max_side² · 3 = {config.max_side**2 * 3} B"
    )
    big = [k for k, p in runs.items() if p["full"][1].pixels[0].size >= 4e6]
    if big:
        for path in ("full", "exact", "draft"):
            print(
                f"  photos ≥ 4 MP ({len(big)}), {path}: {np.mean([_chunk_bytes([runs[k][path][1]]) for k in big]):.0f} "
                f"B/image, {1000 * np.mean([runs[k][path][0] for k in big]):.1f} ms/image"
            )
    if not args.no_features:
        _compare_features(runs, config, {r["id"]: r["landmark"] for r in labels})


def _compare_features(runs: dict[str, Any], config: Any, landmark: dict[str, str]) -> None:
    extractor = build_extractor(config, str(WEIGHTS), device="cpu")
    ids = list(runs)
    feats = {
        path: [
            extractor.extract_prepared(
                [
                    prepare_image(torch.from_numpy(runs[i][path][1].pixels), config.max_side)
                    if path == "full"
                    else runs[i][path][1]
                ]
            )[0]
            for i in ids
        ]
        for path in ("full", "exact", "draft")
    }
    for path in ("exact", "draft"):
        cos = [
            float(a.global_descriptor @ b.global_descriptor)
            for a, b in zip(feats["full"], feats[path], strict=True)
        ]
        kp = [_keypoint_agreement(a, b) for a, b in zip(feats["full"], feats[path], strict=True)]
        print(
            f"{path} vs full: global cosine min {min(cos):.6f} mean {np.mean(cos):.6f}; keypoints max |Δ| "
            f"{np.nanmax([d for d, _ in kp]) if not all(np.isnan(d) for d, _ in kp) else float('nan'):.3g} px "
            f"(same list in {sum(not np.isnan(d) for d, _ in kp)}/{len(kp)} photos), shared (x, y, scale) "
            f"mean {np.mean([s for _, s in kp]):.3f} min {min(s for _, s in kp):.3f}"
        )
    for path in ("full", "exact", "draft"):
        vectors = np.stack([f.global_descriptor for f in feats[path]])
        print(
            f"global mAP@100 (all-vs-all by landmark, self excluded), {path}: {_map100(ids, landmark, vectors):.4f}"
        )


if __name__ == "__main__":
    main()
