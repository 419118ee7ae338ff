"""Global re-ranking (issue 16): α-QE, DBA, SuperGlobal, alone and followed by verification, vs verification.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_global_rerank.py \
        --cache /work/wt/global-cache

Data: the stores of one ``bench_real_data.py``-style extraction under ``CACHE/run`` (preset
``delg-mobilenetv2-imagenet``, shared ImageNet MobileNetV2 weights): index = landmarks-mini (38) + coil100-subset
(1,224), queries = landmarks-mini. A missing cache is extracted first (the run pipeline with re-ranking off).
Three datasets, every index exact (``IDMap2,Flat``), self-matches removed before scoring (mAP@100, GLDv2
retrieval protocol):

- ``landmarks+coil``: 38 queries against the 1,262-image index, shortlist 100;
- ``landmarks``: 38 queries against an index of the 38 alone, shortlist 38;
- ``coil``: COIL all-vs-all, 1,224 queries against the 1,224 COIL images (positives: the other views of the same
  object), shortlist 100. Verification runs on every ``--coil-verify-every``-th query only (its cost), so
  that row's global-only figures are also given on the same subset.

Each method re-ranks the same global shortlist through ``pipeline.rerank.rerank`` (the stage, I/O included);
seconds per query are the stage's wall time ÷ queries, all methods in one run, one torch thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_data import (
    COIL100,
    PRESET,
    WEIGHTS,
    _cpu_model,
    _labels,
    _load,
    parse_variant,
    without_self_matches,
    write_real_data,
)

from pipeline import storage
from pipeline.evaluate import evaluate
from pipeline.rerank.global_rerank import GlobalRerankConfig
from pipeline.results import RESULTS_SCHEMA, read_columns

METHODS = (
    "verify",
    "qe",
    "dba",
    "dba+qe",
    "superglobal",
    "qe+verify",
    "dba+verify",
    "dba+qe+verify",
    "superglobal+verify",
)


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    search: str  # global shortlists
    query_store: str
    index_store: str
    index: str  # index URL (its dba.parquet serves the DBA methods)
    ground_truth: str
    queries: int


def extract(cache: str) -> None:
    """The stores, index and search of landmarks-mini + COIL (skipped stage by stage when already there)."""
    from pipeline.run import run_pipeline
    from pipeline.runconfig import parse_run_config

    os.environ.setdefault("LANDMARK_INDEX_RAY_TMP", storage.join(cache, "ray"))
    data = write_real_data(storage.join(cache, "data"))
    source = {"index": data.index_manifest, "queries": data.query_manifest}
    extract_section = {"preset": PRESET, "weights": str(WEIGHTS), "batch_size": 1}
    config = parse_run_config(
        {
            "out": storage.join(cache, "run"),
            "data": {**source, "ground_truth": data.ground_truth},
            "extract": extract_section,
            "rerank": {"enabled": False},
            "report": {"enabled": False},
        }
    )
    run_pipeline(config, say=lambda text: print(f"  [{time.strftime('%H:%M:%S')}] {text}", flush=True))


def coil_ground_truth(url: str, queries: list[str]) -> None:
    labels = _labels(COIL100)
    by_object: dict[str, list[str]] = {}
    for row in labels:
        by_object.setdefault(row["object"], []).append(row["id"])
    object_of = {row["id"]: row["object"] for row in labels}
    lines = ["id,images,Usage"]
    for query in queries:
        positives = [i for i in by_object[object_of[query]] if i != query]
        lines.append(f"{query},{' '.join(positives)},Public")
    storage.write_text(url, "\n".join(lines) + "\n")


def datasets(cache: str) -> list[Dataset]:
    """The three datasets' indexes, searches and ground truths (built once under CACHE/bench)."""
    from pipeline.index import SearchConfig, build_index, search
    from pipeline.index.dba import build_dba, has_dba
    from pipeline.reindex import compact_globals
    from pipeline.run import RunPaths

    run = RunPaths(storage.join(cache, "run"))
    bench = storage.join(cache, "bench")
    data = write_real_data(storage.join(cache, "data"))
    out = [
        Dataset(
            "landmarks+coil", run.search, run.query_store, run.index_store, run.index, data.ground_truth, 38
        )
    ]
    alone = storage.join(bench, "landmarks")
    coil = storage.join(bench, "coil")
    coil_store = storage.join(coil, "store")
    coil_ids = [r["id"] for r in _labels(COIL100)]
    if not storage.exists(storage.join(alone, "search.parquet")):
        build_index(run.query_store, storage.join(alone, "index"))
        search(
            storage.join(alone, "index"),
            run.query_store,
            storage.join(alone, "search.parquet"),
            SearchConfig(k=38),
        )
    if not storage.exists(storage.join(coil, "search.parquet")):
        compact_globals([run.index_store], set(coil_ids), coil_store)
        build_index(coil_store, storage.join(coil, "index"))
        search(
            storage.join(coil, "index"), coil_store, storage.join(coil, "search.parquet"), SearchConfig(k=100)
        )
        coil_ground_truth(storage.join(coil, "ground_truth.csv"), coil_ids)
    out.append(
        Dataset(
            "landmarks",
            storage.join(alone, "search.parquet"),
            run.query_store,
            run.query_store,
            storage.join(alone, "index"),
            data.ground_truth,
            38,
        )
    )
    out.append(
        Dataset(
            "coil",
            storage.join(coil, "search.parquet"),
            run.index_store,
            run.index_store,
            storage.join(coil, "index"),
            storage.join(coil, "ground_truth.csv"),
            len(coil_ids),
        )
    )
    stores = {"landmarks+coil": [run.index_store], "landmarks": [run.query_store], "coil": [run.index_store]}
    for d in out:
        if not has_dba(d.index):
            build_dba(d.index, stores[d.name])  # published defaults: k = 10, α = 3
    return out


def subset(d: Dataset, every: int, folder: str) -> Dataset:
    """``d`` restricted to every ``every``-th query (sorted ids): its search results and ground truth."""
    table = read_columns(d.search, RESULTS_SCHEMA.names)  # search's parts folder
    queries = sorted(set(table.column("query_id").to_pylist()))[::every]
    search_url, truth_url = storage.join(folder, "search.parquet"), storage.join(folder, "ground_truth.csv")
    storage.write_parquet(search_url, table.filter(pc.is_in(table["query_id"], pa.array(queries))))
    lines = storage.read_text(d.ground_truth).splitlines()
    kept = set(queries)
    storage.write_text(
        truth_url, "\n".join([lines[0], *(x for x in lines[1:] if x.split(",")[0] in kept)]) + "\n"
    )
    return dataclasses.replace(d, search=search_url, ground_truth=truth_url, queries=len(queries))


def score(url: str, ground_truth: str) -> float:
    filtered, _ = without_self_matches(url, url.replace(".parquet", "-noself.parquet"))
    return evaluate(filtered, ground_truth, "gldv2-retrieval").figures["all"]["mAP@100"]


def run_methods(
    d: Dataset, search_url: str, methods: tuple[str, ...], verify_config, global_config, folder: str
) -> None:
    from pipeline.rerank import rerank

    queries = len(set(read_columns(search_url, ["query_id"]).column("query_id").to_pylist()))
    print(
        f"| {d.name} ({queries} queries) | global | {score(search_url, d.ground_truth):.4f} | – |", flush=True
    )
    for method in methods:
        out = storage.join(folder, method.replace("+", "_") + ".parquet")
        summary = rerank(
            search_url,
            d.query_store,
            d.index_store,
            out,
            verify_config,
            method=method,
            global_config=global_config,
            index_url=d.index,
        )
        per_query = summary.seconds / max(summary.queries, 1) * 1000
        print(
            f"| {d.name} ({queries} queries) | {method} | {score(out, d.ground_truth):.4f} | {per_query:.1f} |",
            flush=True,
        )


def _pairs(text: str) -> list[tuple[str, str]]:
    return [tuple(item.split("=", 1)) for item in text.split(",") if item]  # type: ignore[misc]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", required=True, help="extraction cache (outside the repo), reused")
    parser.add_argument("--verify", default="mutual=true,score=saturate", help="RerankConfig of verification")
    parser.add_argument("--coil-verify-every", type=int, default=24, help="COIL queries verified: every n-th")
    parser.add_argument("--datasets", default="landmarks+coil,landmarks,coil")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    parser.add_argument(
        "--global-config",
        default="",
        help="GlobalRerankConfig changes, e.g. qe_k=2,sg_k=2 (DBA is built once)",
    )
    args = parser.parse_args()
    global_config = GlobalRerankConfig(
        **{k: (int if k.endswith(("_k", "_m")) else float)(v) for k, v in _pairs(args.global_config)}
    )
    methods = tuple(args.methods.split(","))
    verify_config = dataclasses.replace(parse_variant(args.verify), device="cpu")
    wanted = args.datasets.split(",")
    if not storage.exists(storage.join(args.cache, "run", "search.parquet")):
        extract(args.cache)
    print(
        f"machine: {_cpu_model()}, {os.cpu_count()} CPUs; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )
    print(f"verification config: {args.verify}; global: {global_config}; load average before: {_load()}")
    print("\n| dataset | method | mAP@100 | ms/query |\n|---|---|---|---|")
    for d in datasets(args.cache):
        if d.name not in wanted:
            continue
        variant = f"-{args.global_config.replace(',', '-')}" if args.global_config else ""
        folder = storage.join(args.cache, "bench", "results", d.name + variant)
        if d.name != "coil":
            run_methods(d, d.search, methods, verify_config, global_config, folder)
            continue
        global_methods = tuple(m for m in methods if "verify" not in m)
        run_methods(d, d.search, global_methods, verify_config, global_config, folder)
        few = subset(d, args.coil_verify_every, storage.join(folder, "subset"))
        run_methods(few, few.search, methods, verify_config, global_config, storage.join(folder, "subset"))
    print(f"\nload average at the end: {_load()}; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")


if __name__ == "__main__":
    main()
