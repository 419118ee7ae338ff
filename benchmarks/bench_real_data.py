"""Real-data check (issue 7): the whole pipeline on real landmark photos with real distractors.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_real_data.py --out /tmp/real-data \
        --variant mutual=true --variant mutual=true,score=saturate

Data (from ../shared beside the checkout; the script exits with a message when it is absent):

- index: the 38 photos of ``landmarks-mini`` (9 places) + the 1,224 ``coil100-subset`` images as distractors;
- queries: the 38 ``landmarks-mini`` photos themselves (all-vs-all);
- ground truth (GLDv2 retrieval solution CSV): a query's positives are the *other* photos of its landmark.

Model: preset ``delg-mobilenetv2-imagenet`` with the shared ImageNet MobileNetV2 weights (backbone registry;
local features from the backbone-only local head).

``run_pipeline`` runs every stage (local Ray, outputs under ``--out``; a re-run reuses finished stages). Since
each query is also in the index, its own image comes first in the shortlist: the headline mAP@100 is computed
on filtered copies of ``search.parquet`` and ``reranked.parquet`` with the self-match removed and the ranks
renumbered (``*-noself.parquet``). The pipeline's own ``metrics.json`` scores the unfiltered shortlists (the
self-match counts as a miss at rank 1) and is printed for reference only.

``--global-pools`` instead compares the global pooling heads off-the-shelf (no Ray, no re-ranking): the preset's
block4 maps at its global scales, pooled by each of GeM, MAC, SPoC, R-MAC and NetVLAD (centroids: k-means on the
index's own block4 features, no labels), summed over scales, L2-normalised, exact cosine search; mAP@100 with
and without the COIL distractors (self-match removed).

Also printed: per-landmark AP, stage timings, a landmarks-only index without distractors (built from the query
store, no extra extraction), inlier counts of true pairs vs negatives, and any ``--variant`` of the re-ranking
config (comma-separated ``field=value`` of ``RerankConfig``; the headline figures use the defaults).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import platform
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.evaluate import evaluate, gldv2_average_precision, read_gldv2_solution, read_rankings
from pipeline.rerank import RerankConfig
from pipeline.results import read_columns

SHARED = Path(__file__).resolve().parents[2] / "shared"
LANDMARKS_MINI = SHARED / "data" / "landmarks-mini"
COIL100 = SHARED / "data" / "coil100-subset"
WEIGHTS = SHARED / "weights" / "mobilenetv2_imagenet_features.pt"
PRESET = "delg-mobilenetv2-imagenet"
DISTRACTOR = "coil100"  # the landmark label given to every distractor


@dataclass(frozen=True)
class RealData:
    index_manifest: str  # Parquet id, url: landmarks-mini + coil100 distractors
    query_manifest: str  # Parquet id, url: landmarks-mini
    ground_truth: str  # GLDv2 retrieval solution CSV: id,images,Usage (self excluded)
    landmark_of: Mapping[str, str]  # every index id → its landmark (DISTRACTOR for coil100)
    queries: tuple[str, ...]  # the landmarks-mini ids


# ---------------------------------------------------------------------------------------------- data


def _labels(folder: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((folder / "labels.csv").read_text())))


def _manifest_rows(folder: Path, labels: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"id": r["id"], "url": str(folder / r["file"])} for r in labels]


def write_real_data(folder: str) -> RealData:
    """Manifests and ground truth under ``folder`` for the shared images (read in place)."""
    photos, distractors = _labels(LANDMARKS_MINI), _labels(COIL100)
    data = RealData(
        index_manifest=storage.join(folder, "index.parquet"),
        query_manifest=storage.join(folder, "queries.parquet"),
        ground_truth=storage.join(folder, "ground_truth.csv"),
        landmark_of={
            **{r["id"]: r["landmark"] for r in photos},
            **{r["id"]: DISTRACTOR for r in distractors},
        },
        queries=tuple(r["id"] for r in photos),
    )
    query_rows = _manifest_rows(LANDMARKS_MINI, photos)
    storage.write_parquet(data.query_manifest, pa.Table.from_pylist(query_rows))
    index_rows = query_rows + _manifest_rows(COIL100, distractors)
    storage.write_parquet(data.index_manifest, pa.Table.from_pylist(index_rows))
    lines = ["id,images,Usage"]
    for row in photos:
        positives = [r["id"] for r in photos if r["landmark"] == row["landmark"] and r["id"] != row["id"]]
        if not positives:
            raise ValueError(f"landmark {row['landmark']!r} has one photo; all-vs-all needs ≥ 2")
        lines.append(f"{row['id']},{' '.join(positives)},Public")
    storage.write_text(data.ground_truth, "\n".join(lines) + "\n")
    return data


# ---------------------------------------------------------------------------------------------- results


def without_self_matches(results_url: str, out_url: str) -> tuple[str, int]:
    """Copy of a results Parquet without rows whose id is their query's, ranks renumbered 1..n per query.

    Returns (out_url, number of queries whose self-match was at rank 1).
    """
    columns, optional = ["query_id", "rank", "id", "score"], ("inliers", "global_score", "matches")
    table = read_columns(
        results_url, columns, optional=optional
    )  # a file or a parts folder, (query, rank) order
    query_ids = np.asarray(table.column("query_id").to_pylist(), dtype=object)
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    ranks = table.column("rank").to_numpy()
    is_self = query_ids == ids
    self_first = int(np.count_nonzero(is_self & (ranks == 1)))
    kept = table.filter(pa.array(~is_self))
    kept_queries = query_ids[~is_self]
    is_first = np.r_[True, kept_queries[1:] != kept_queries[:-1]]  # first row of each query
    group_start = np.flatnonzero(is_first)[np.cumsum(is_first) - 1]
    new_rank = np.arange(len(kept_queries)) - group_start + 1
    kept = kept.set_column(kept.schema.get_field_index("rank"), "rank", pa.array(new_rank, type=pa.int32()))
    storage.write_parquet(out_url, kept)
    return out_url, self_first


def mean_ap(results_url: str, data: RealData) -> float:
    return evaluate(results_url, data.ground_truth, "gldv2-retrieval").figures["all"]["mAP@100"]


def per_query_ap(results_url: str, data: RealData) -> dict[str, float]:
    solution = read_gldv2_solution(data.ground_truth, "images")
    rankings = read_rankings(results_url)
    return {
        q: gldv2_average_precision(rankings[q].ids if q in rankings else [], relevant)
        for q, relevant in solution.truth.items()
    }


def per_landmark(aps: Mapping[str, float], landmark_of: Mapping[str, str]) -> dict[str, tuple[int, float]]:
    """landmark → (queries, mean AP)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for query, ap in aps.items():
        groups[landmark_of[query]].append(ap)
    return {name: (len(v), float(np.mean(v))) for name, v in sorted(groups.items())}


def inlier_profile(reranked_url: str, data: RealData) -> dict[str, list[int]]:
    """Inlier counts of the verified pairs (self-matches left out) by kind of pair."""
    table = read_columns(reranked_url, ["query_id", "id", "inliers"]).to_pylist()
    kinds: dict[str, list[int]] = defaultdict(list)
    for row in table:
        if row["inliers"] < 0 or row["id"] == row["query_id"]:
            continue
        hit, query = data.landmark_of[row["id"]], data.landmark_of[row["query_id"]]
        kind = "same landmark" if hit == query else DISTRACTOR if hit == DISTRACTOR else "other landmark"
        kinds[kind].append(row["inliers"])
    return dict(sorted(kinds.items()))


def ordered_pair_fraction(reranked_url: str, data: RealData, column: str) -> float:
    """Share of (positive, negative) shortlist pairs of a query that ``column`` orders correctly (ties: ½),
    averaged over queries: how well inliers or global scores separate true pairs from the rest."""
    rows = read_columns(reranked_url, ["query_id", "id", column]).to_pylist()
    by_query: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for row in rows:
        if row["id"] == row["query_id"]:
            continue
        same = data.landmark_of[row["id"]] == data.landmark_of[row["query_id"]]
        by_query[row["query_id"]][0 if same else 1].append(float(row[column]))
    fractions = []
    for positives, negatives in by_query.values():
        if positives and negatives:
            p, n = np.asarray(positives)[:, None], np.asarray(negatives)[None, :]
            fractions.append(float(np.mean((p > n) + 0.5 * (p == n))))
    return float(np.mean(fractions))


# ---------------------------------------------------------------------------------------------- pooling heads

NETVLAD_CLUSTERS = 16


def block4_maps(data: RealData, batch_size: int) -> dict[str, list[Any]]:
    """id → the preset's block4 maps (C, h, w), one per global scale, preprocessed as extraction does
    (images of one capped shape run in batches)."""
    import torch

    from pipeline.config import get_preset
    from pipeline.features import build_extractor, capped_size, pil_bilinear, resize, scaled_size
    from pipeline.images import load_image

    config = get_preset(PRESET)
    model = build_extractor(config, str(WEIGHTS), device="cpu").model
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (config.pixel_mean, config.pixel_std))
    groups: dict[tuple[int, int], dict[str, Any]] = defaultdict(dict)
    for row in storage.read_parquet(data.index_manifest).to_pylist():
        pixels = load_image(row)
        capped = pil_bilinear(pixels, capped_size(*pixels.shape[-2:], config.max_side))
        groups[tuple(capped.shape[-2:])][row["id"]] = capped
    maps: dict[str, list[Any]] = defaultdict(list)
    with torch.inference_mode():
        for size, images in groups.items():
            ids = list(images)
            for start in range(0, len(ids), batch_size):
                chunk = ids[start : start + batch_size]
                batch = torch.stack([images[i] for i in chunk]).float()
                for scale in config.global_scales:
                    x = (resize(batch, scaled_size(*size, scale)) - mean) / std
                    block4 = model.backbone.forward_global(model.backbone.forward_local(x))
                    for image_id, one in zip(chunk, block4, strict=True):
                        maps[image_id].append(one)
    return maps


def netvlad_from_kmeans(maps: Mapping[str, list[Any]], clusters: int, seed: int = 0) -> Any:
    """NetVLAD initialised from k-means (faiss, cosine) of L2-normalised block4 features of every map."""
    import faiss
    import torch

    from pipeline.model import NetVLAD

    features = torch.cat([m.flatten(1).T for ms in maps.values() for m in ms])  # (N, C)
    features = torch.nn.functional.normalize(features, dim=1).numpy().astype(np.float32)
    kmeans = faiss.Kmeans(features.shape[1], clusters, niter=25, seed=seed, spherical=True)
    kmeans.train(features)
    pool = NetVLAD(features.shape[1], clusters)
    pool.init_from_centroids(torch.from_numpy(kmeans.centroids))
    return pool


def pooled(maps: Mapping[str, list[Any]], pool: str, netvlad: Any) -> tuple[list[str], np.ndarray]:
    """(ids, (N, D) L2-normalised global descriptors): per-scale pooled, L2-normalised, summed, L2."""
    import torch
    import torch.nn.functional as F

    from pipeline.model import gem, mac, rmac, spoc

    heads = {"gem": lambda x: gem(x, 3.0), "mac": mac, "spoc": spoc, "rmac": rmac, "netvlad": netvlad}
    ids, rows = list(maps), []
    with torch.inference_mode():
        for image_id in ids:
            per_scale = [F.normalize(heads[pool](m[None]), dim=-1)[0] for m in maps[image_id]]
            rows.append(F.normalize(torch.stack(per_scale).sum(0), dim=0).numpy())
    return ids, np.stack(rows)


def retrieval_map(ids: list[str], descriptors: np.ndarray, data: RealData, index_ids: set[str]) -> float:
    """mAP@100 of the landmarks-mini queries against ``index_ids`` (exact cosine, self removed)."""
    row = {image_id: i for i, image_id in enumerate(ids)}
    candidates = [i for i in ids if i in index_ids]
    matrix = descriptors[[row[i] for i in candidates]]
    aps = []
    for query in data.queries:
        order = np.argsort(-(matrix @ descriptors[row[query]]), kind="stable")
        ranking = [candidates[j] for j in order if candidates[j] != query][:100]
        relevant = [i for i in data.queries if i != query and data.landmark_of[i] == data.landmark_of[query]]
        aps.append(gldv2_average_precision(ranking, relevant))
    return float(np.mean(aps))


def pooling_table(data: RealData, batch_size: int) -> None:
    started = time.perf_counter()
    maps = block4_maps(data, batch_size)
    print(f"block4 maps of {len(maps)} images in {time.perf_counter() - started:.0f} s; load {_load()}")
    netvlad = netvlad_from_kmeans(maps, NETVLAD_CLUSTERS)
    print("\n| global pooling | dims | mAP@100 landmarks-mini alone | mAP@100 + COIL distractors |")
    print("|---|---|---|---|")
    for pool in ("gem", "mac", "spoc", "rmac", "netvlad"):
        ids, descriptors = pooled(maps, pool, netvlad)
        alone = retrieval_map(ids, descriptors, data, set(data.queries))
        full = retrieval_map(ids, descriptors, data, set(ids))
        print(f"| {pool} | {descriptors.shape[1]} | {alone:.4f} | {full:.4f} |", flush=True)


# ---------------------------------------------------------------------------------------------- variants


def _typed(field: str, text: str, default: Any) -> Any:
    """``text`` as the type of RerankConfig's default for ``field`` (ratio's None default: a float)."""
    if isinstance(default, bool):
        if text.lower() not in ("true", "false"):
            raise ValueError(f"{field}={text!r}; allowed: true, false")
        return text.lower() == "true"
    if default is None:
        return None if text.lower() == "none" else float(text)
    return type(default)(text)


def parse_variant(text: str) -> RerankConfig:
    """``"mutual=true,min_inliers=8"`` → RerankConfig with those fields changed."""
    default = RerankConfig()
    fields = {f.name for f in dataclasses.fields(RerankConfig)}
    changes = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or key not in fields:
            raise ValueError(f"variant item {item!r}; expected field=value with field in {sorted(fields)}")
        changes[key] = _typed(key, value, getattr(default, key))
    return dataclasses.replace(default, **changes)


# ---------------------------------------------------------------------------------------------- runs


def landmarks_only(run_out: str, data: RealData, rerank_config: RerankConfig) -> tuple[float, float]:
    """(global, re-ranked) mAP@100 on landmarks-mini alone: an index of the query store, no distractors."""
    from pipeline.index import SearchConfig, build_index, search
    from pipeline.rerank import rerank
    from pipeline.run import RunPaths

    paths = RunPaths(run_out)
    folder = storage.join(run_out, "landmarks-only")
    index_url = storage.join(folder, "index")
    search_url = storage.join(folder, "search.parquet")
    reranked_url = storage.join(folder, "reranked.parquet")
    build_index(paths.query_store, index_url)
    search(index_url, paths.query_store, search_url, SearchConfig(k=len(data.queries)))
    rerank(search_url, paths.query_store, paths.query_store, reranked_url, rerank_config)
    figures = []
    for url in (search_url, reranked_url):
        filtered, _ = without_self_matches(url, url.replace(".parquet", "-noself.parquet"))
        figures.append(mean_ap(filtered, data))
    return figures[0], figures[1]


def variant_map(run_out: str, data: RealData, config: RerankConfig, name: str) -> tuple[float, float]:
    """(mAP@100, seconds) of re-ranking the pipeline's global shortlist with ``config``."""
    from pipeline.rerank import rerank
    from pipeline.run import RunPaths

    paths = RunPaths(run_out)
    url = storage.join(run_out, "variants", f"{name}.parquet")
    start = time.perf_counter()
    rerank(paths.search, paths.query_store, paths.index_store, url, config)
    seconds = time.perf_counter() - start
    filtered, _ = without_self_matches(url, url.replace(".parquet", "-noself.parquet"))
    return mean_ap(filtered, data), seconds


def whitened_map(run_out: str, data: RealData, dims: int | None, power: float) -> tuple[float, float]:
    """(global, α-QE) mAP@100 of an index of the run's index store with learned PCA whitening to ``dims``
    (None: none) and eigenvalue ``power``, fitted on the index's own descriptors (landmarks + distractors,
    no labels)."""
    from pipeline.index import BuildConfig, SearchConfig, build_index, search
    from pipeline.rerank import rerank
    from pipeline.run import RunPaths

    paths = RunPaths(run_out)
    folder = storage.join(run_out, f"whitening-{dims or 'off'}-{power}")
    index_url = storage.join(folder, "index")
    config = BuildConfig(whitening=dims, whitening_power=power)
    build_index(paths.index_store, index_url, config=config)
    figures = []
    search_url = storage.join(folder, "search.parquet")
    search(index_url, paths.query_store, search_url, SearchConfig(k=100))
    qe_url = storage.join(folder, "qe.parquet")
    rerank(search_url, paths.query_store, paths.index_store, qe_url, method="qe", index_url=index_url)
    for url in (search_url, qe_url):
        filtered, _ = without_self_matches(url, url.replace(".parquet", "-noself.parquet"))
        figures.append(mean_ap(filtered, data))
    return figures[0], figures[1]


def _load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _profile_line(name: str, counts: list[int]) -> str:
    values = np.asarray(counts)
    return (
        f"| {name} | {len(values)} | {np.median(values):.0f} | {np.percentile(values, 90):.0f} | "
        f"{values.max()} | {np.mean(values >= 8):.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=None, help="output folder (a re-run reuses finished stages)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument(
        "--variant", action="append", default=[], help="RerankConfig fields, e.g. mutual=true"
    )
    parser.add_argument("--skip-landmarks-only", action="store_true", help="no second, distractor-free index")
    parser.add_argument(
        "--global-pools", action="store_true", help="only compare the global pooling heads (no Ray)"
    )
    parser.add_argument(
        "--whitening",
        default="",
        help="comma-separated learned PCA whitenings to compare with none: DIMS or DIMS@POWER "
        "(eigenvalue power, default 0.5), e.g. 64,128@0.25,256@0",
    )
    args = parser.parse_args()
    missing = [p for p in (LANDMARKS_MINI, COIL100, WEIGHTS) if not p.exists()]
    if missing:
        raise SystemExit(
            f"shared data missing: {', '.join(map(str, missing))}; this benchmark needs ../shared"
        )
    variants = {text: parse_variant(text) for text in args.variant}  # fail on a typo before the long run
    whitening = [
        (int(d), float(p or 0.5)) for d, _, p in (w.partition("@") for w in args.whitening.split(",") if w)
    ]

    from pipeline.run import RunPaths, run_pipeline
    from pipeline.runconfig import parse_run_config

    out = args.out or tempfile.mkdtemp(prefix="bench-real-data-")
    os.environ.setdefault("LANDMARK_INDEX_RAY_TMP", storage.join(out, "ray"))
    data = write_real_data(storage.join(out, "data"))
    if args.global_pools:
        print(
            f"machine: {_cpu_model()}, {os.cpu_count()} CPUs; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
        )
        pooling_table(data, args.batch_size)
        print(f"load average at the end: {_load()}; date {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
        return
    run_out = storage.join(out, "run")
    config = parse_run_config(
        {
            "out": run_out,
            "data": {
                "index": data.index_manifest,
                "queries": data.query_manifest,
                "ground_truth": data.ground_truth,
                "protocol": "gldv2-retrieval",
            },
            "extract": {"preset": PRESET, "weights": str(WEIGHTS), "batch_size": args.batch_size},
        }
    )
    print(
        f"machine: {_cpu_model()}, {os.cpu_count()} CPUs; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )
    print(f"index {len(data.landmark_of)} images, queries {len(data.queries)}; preset {PRESET}; out {out}")
    print(f"load average before: {_load()}")
    started = time.perf_counter()
    results = run_pipeline(
        config, say=lambda text: print(f"  [{time.strftime('%H:%M:%S')}] {text}", flush=True)
    )
    total = time.perf_counter() - started
    print(f"load average after the run: {_load()}")

    print("\nstage timings (s):")
    for name, result in results.items():
        print(f"  {name:16s} {result.seconds:7.1f}{'  (reused)' if result.reused else ''}")
    print(f"  {'total wall':16s} {total:7.1f}")
    print(f"  extract-index summary: {json.dumps(results['extract-index'].summary, default=str)}")
    print(f"  build-index: {results['build-index'].summary.get('factory')}")

    paths = RunPaths(run_out)
    global_url, global_self = without_self_matches(
        paths.search, storage.join(run_out, "search-noself.parquet")
    )
    rerank_url, rerank_self = without_self_matches(
        paths.reranked, storage.join(run_out, "reranked-noself.parquet")
    )
    print(
        f"\nself-match at rank 1: global {global_self}/{len(data.queries)}, re-ranked {rerank_self}/{len(data.queries)} (removed before scoring)"
    )
    pipeline_metrics = json.loads(storage.read_text(paths.metrics))
    print(
        "pipeline metrics.json (unfiltered, self counts as a miss): "
        f"global {pipeline_metrics['global']['all']['mAP@100']:.4f}, "
        f"re-ranked {pipeline_metrics['reranked']['all']['mAP@100']:.4f}"
    )
    print("\n| setting | mAP@100 (self-match removed) |\n|---|---|")
    full, alone_size = f"{len(data.landmark_of):,}-image index", f"landmarks-mini alone, {len(data.queries)}"
    global_map, rerank_map = mean_ap(global_url, data), mean_ap(rerank_url, data)
    print(f"| global only ({full}) | {global_map:.4f} |")
    print(f"| + re-ranking, defaults ({full}) | {rerank_map:.4f} |")
    if not args.skip_landmarks_only:
        alone = landmarks_only(run_out, data, RerankConfig())
        print(f"| global only ({alone_size}) | {alone[0]:.4f} |")
        print(f"| + re-ranking, defaults ({alone_size}) | {alone[1]:.4f} |")

    print("\n| landmark | queries | AP global | AP re-ranked |\n|---|---|---|---|")
    global_aps = per_landmark(per_query_ap(global_url, data), data.landmark_of)
    rerank_aps = per_landmark(per_query_ap(rerank_url, data), data.landmark_of)
    for name, (n, ap) in global_aps.items():
        print(f"| {name} | {n} | {ap:.3f} | {rerank_aps[name][1]:.3f} |")

    print("\ninliers of verified pairs (default config, self-matches left out):")
    print("| pair kind | pairs | median | p90 | max | share ≥ 8 |\n|---|---|---|---|---|---|")
    for name, counts in inlier_profile(paths.reranked, data).items():
        print(_profile_line(name, counts))
    print(
        "share of (positive, negative) shortlist pairs ordered correctly, mean over queries: "
        f"by global score {ordered_pair_fraction(paths.reranked, data, 'global_score'):.3f}, "
        f"by inliers {ordered_pair_fraction(paths.reranked, data, 'inliers'):.3f}"
    )

    if variants:
        print("\n| re-ranking variant | mAP@100 | rerank s |\n|---|---|---|")
        for index, (text, variant) in enumerate(variants.items()):
            figure, seconds = variant_map(run_out, data, variant, f"variant-{index}")
            print(f"| {text} | {figure:.4f} | {seconds:.1f} |", flush=True)
    if whitening:
        print("\n| index whitening: dims | power | mAP@100 global | mAP@100 α-QE |\n|---|---|---|---|")
        for dims, power in ((None, 0.5), *whitening):
            figures = whitened_map(run_out, data, dims, power)
            print(
                f"| {dims or 'none'} | {power if dims else '–'} | {figures[0]:.4f} | {figures[1]:.4f} |",
                flush=True,
            )
    print(f"\nload average at the end: {_load()}; date {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")


if __name__ == "__main__":
    main()
