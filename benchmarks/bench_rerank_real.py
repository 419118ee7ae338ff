"""Re-ranking on the shared real data (issue 17): mAP@100 before / after, per dataset, from extracted stores.

Extract once (preset ``delg-mobilenetv2-imagenet``, shared ImageNet MobileNetV2 weights), e.g. for landmarks-mini:

    landmark-index extract lm.parquet STORES/store-lm --preset delg-mobilenetv2-imagenet \\
        --weights ../shared/weights/mobilenetv2_imagenet_features.pt

(likewise ``store-coil`` for coil100-subset and ``store-pairs`` for the four images of data/pairs; manifests:
``id,url`` with the labels.csv ids and the pair file names), then:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_rerank_real.py --stores STORES

Datasets (all-vs-all, the query itself removed from its shortlist; shortlist = exact global top 100):
landmarks-mini (positives: same landmark), landmarks-mini queries against landmarks-mini + coil100 distractors,
coil100 objects (positives: same object), the graffiti + DSC pairs (positive: the other image of the pair).
"before" = the former CLI defaults (reference settings with the threshold in candidate pixels, score
"inliers"); "after" = what ``rerank`` picks now: the stores' recorded settings (``config_from_stores``) plus
any ``--set field=value``. Shortlists are re-ranked with ``rerank_shortlist``, the stage's own function.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import store
from pipeline.evaluate import gldv2_average_precision
from pipeline.rerank import RerankConfig, config_from_stores, rerank_shortlist
from pipeline.rerank.config import from_settings, settings_of

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PAIR_OF = {"graf1.png": "graf", "graf3.png": "graf", "DSC_0410.JPG": "dsc", "DSC_0411.JPG": "dsc"}
BEFORE = RerankConfig(residual_in="candidate")  # the CLI's defaults before issue 17


def labels(folder: str, key: str) -> dict[str, str]:
    return {r["id"]: r[key] for r in csv.DictReader((DATA / folder / "labels.csv").open())}


def load_store(url: str) -> tuple[list[str], np.ndarray, dict]:
    ids, vectors = store.read_global(url)
    return list(ids), vectors.astype(np.float32), store.LocalReader(url).read(list(ids))


def datasets(stores: Path, names: list[str], coil_step: int = 1) -> dict[str, tuple]:
    """name → (store url, query ids, index ids, vectors by id, features by id, label by id)."""
    loaded = {
        n: load_store(str(stores / f"store-{n}")) for n in {"lm", "coil", "pairs"} if n in "".join(names)
    }

    def union(*parts: str) -> tuple[list[str], dict, dict]:
        ids = [i for p in parts for i in loaded[p][0]]
        vectors = {i: v for p in parts for i, v in zip(loaded[p][0], loaded[p][1], strict=True)}
        return ids, vectors, {k: v for p in parts for k, v in loaded[p][2].items()}

    out = {}
    for name in names:
        if name == "lm":
            ids, vec, feats = union("lm")
            out[name] = ("lm", ids, ids, vec, feats, labels("landmarks-mini", "landmark"))
        elif name == "lm+coil":
            ids, vec, feats = union("lm", "coil")
            label = {**labels("landmarks-mini", "landmark"), **{i: "coil" for i in loaded["coil"][0]}}
            out[name] = ("lm", loaded["lm"][0], ids, vec, feats, label)
        elif name == "coil":
            ids, vec, feats = union("coil")
            out[name] = ("coil", ids[::coil_step], ids, vec, feats, labels("coil100-subset", "object"))
        elif name == "pairs":
            ids, vec, feats = union("pairs")
            out[name] = ("pairs", ids, ids, vec, feats, PAIR_OF)
    return out


def shortlists(queries: list[str], index: list[str], vectors: dict, k: int = 100) -> list[tuple]:
    """(query, candidate ids, global scores) by exact inner product, the query itself left out."""
    q = np.stack([vectors[i] for i in queries])
    x = np.stack([vectors[i] for i in index])
    sim = q @ x.T
    result = []
    for row, query in enumerate(queries):
        order = [j for j in np.argsort(-sim[row], kind="stable") if index[j] != query][:k]
        result.append((query, [index[j] for j in order], sim[row, order].astype(np.float32)))
    return result


def mean_ap(lists: list[tuple], orders: list[np.ndarray], index: list[str], label: dict) -> float:
    aps = []
    for (query, ids, _), order in zip(lists, orders, strict=True):
        relevant = [i for i in index if label[i] == label[query] and i != query]
        aps.append(gldv2_average_precision([ids[j] for j in order], relevant))
    return float(np.mean(aps))


def rerank_all(lists: list[tuple], feats: dict, config: RerankConfig) -> tuple[list[np.ndarray], float]:
    start = time.perf_counter()
    orders = [rerank_shortlist(feats[q], [feats[i] for i in ids], g, config).order for q, ids, g in lists]
    return orders, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--stores", type=Path, required=True, help="folder with store-lm, store-coil, store-pairs"
    )
    parser.add_argument("--datasets", default="lm,lm+coil,coil,pairs")
    parser.add_argument("--set", action="append", default=[], help="override, field=value (JSON value)")
    parser.add_argument(
        "--coil-query-step",
        type=int,
        default=1,
        help="coil: every n-th image as a query (the index keeps all)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = {k: json.loads(v) for k, _, v in (s.partition("=") for s in args.set)}
    print("| dataset | queries | global | re-ranked before | re-ranked after | after − global |")
    print("|---|---|---|---|---|---|")
    for name, (source, queries, index, vectors, feats, label) in datasets(
        args.stores, args.datasets.split(","), args.coil_query_step
    ).items():
        url = str(args.stores / f"store-{source}")
        after = config_from_stores(url, url, overrides)
        lists = shortlists(queries, index, vectors)
        identity = [np.arange(len(ids)) for _, ids, _ in lists]
        global_map = mean_ap(lists, identity, index, label)
        before_orders, t_before = rerank_all(
            lists, feats, from_settings(settings_of(BEFORE), {"device": "cpu"})
        )
        after_orders, t_after = rerank_all(lists, feats, from_settings(settings_of(after), {"device": "cpu"}))
        before_map = mean_ap(lists, before_orders, index, label)
        after_map = mean_ap(lists, after_orders, index, label)
        print(
            f"| {name} | {len(queries)} | {global_map:.4f} | {before_map:.4f} | {after_map:.4f} | "
            f"{after_map - global_map:+.4f} |",
            flush=True,
        )
        print(
            f"  after = {settings_of(after)}; re-rank s before {t_before:.0f}, after {t_after:.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
