"""Google Landmarks v2: retrieval mAP@100 and recognition GAP (micro-AP over all predictions), each over
all / public / private queries of a solution CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import InputError
from pipeline.results import Ranking
from pipeline.storage import Options

GLDV2_MAX_PREDICTIONS = 100  # mAP@100
GLDV2_USAGES = ("Public", "Private", "Ignored")


# ---------------------------------------------------------------------------------------------------------
# Google Landmarks v2
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gldv2Solution:
    truth: dict[str, list[str]]  # query id -> relevant index ids (retrieval) or landmark ids (recognition)
    usage: dict[str, str]  # query id -> "Public" | "Private" (Ignored queries are kept out of both maps)
    ignored: frozenset[str]


def read_gldv2_solution(url: str, column: str, options: Options = None) -> Gldv2Solution:
    """Read a GLDv2 solution CSV with header ``id,<column>,Usage``; ``column`` holds space-separated ids."""
    rows = list(csv.DictReader(io.StringIO(storage.read_text(url, options))))
    if not rows or not {"id", column, "Usage"} <= rows[0].keys():
        raise InputError(
            f"{storage.redact(url)} is not a GLDv2 solution CSV: need a header id,{column},Usage"
        )
    truth, usage, ignored = {}, {}, set()
    for row in rows:
        if row["Usage"] not in GLDV2_USAGES:
            raise InputError(f"query {row['id']!r} has Usage {row['Usage']!r}; allowed: {list(GLDV2_USAGES)}")
        if row["Usage"] == "Ignored":
            ignored.add(row["id"])
            continue
        truth[row["id"]] = (row[column] or "").split()
        usage[row["id"]] = row["Usage"]
    return Gldv2Solution(truth, usage, frozenset(ignored))


def _scored_queries(rankings: Mapping[str, Any], solution: Gldv2Solution) -> dict[str, Any]:
    """The rankings of the solution's non-ignored queries; a query the solution lacks is an error."""
    unknown = sorted(set(rankings) - set(solution.truth) - solution.ignored)
    if unknown:
        raise InputError(f"result queries {unknown[:5]} are not in the GLDv2 solution")
    return {q: r for q, r in rankings.items() if q in solution.truth}


def gldv2_average_precision(predicted: Sequence[str], relevant: Sequence[str]) -> float:
    """AP@100: Σ_{k≤100} P(k)·rel(k) / min(n_relevant, 100); a repeated prediction counts once."""
    relevant_set = set(relevant)
    seen: set[str] = set()
    correct, total = 0, 0.0
    for k, image in enumerate(predicted[:GLDV2_MAX_PREDICTIONS], start=1):
        if image in seen:
            continue
        seen.add(image)
        if image in relevant_set:
            correct += 1
            total += correct / k
    return total / min(len(relevant_set), GLDV2_MAX_PREDICTIONS)


def _subsets(solution: Gldv2Solution) -> dict[str, list[str]]:
    """Query ids of all scored queries and of the Public / Private splits (empty splits left out)."""
    subsets = {"all": list(solution.truth)}
    for usage in ("Public", "Private"):
        queries = [q for q, u in solution.usage.items() if u == usage]
        if queries:
            subsets[usage.lower()] = queries
    return subsets


def evaluate_gldv2_retrieval(
    rankings: Mapping[str, Sequence[str]], solution: Gldv2Solution
) -> dict[str, dict]:
    """mAP@100 over the solution's non-ignored queries; a query without results scores AP 0 (challenge rule)."""
    empty = [q for q, images in solution.truth.items() if not images]
    if empty:
        raise InputError(
            f"retrieval solution queries {empty[:5]} list no relevant images and are not Ignored"
        )
    aps = gldv2_query_aps(rankings, solution)
    return {
        name: {"mAP@100": float(np.mean([aps[q] for q in queries])), "queries": len(queries)}
        for name, queries in _subsets(solution).items()
    }


def gldv2_query_aps(rankings: Mapping[str, Sequence[str]], solution: Gldv2Solution) -> dict[str, float]:
    """AP@100 of each of the solution's non-ignored queries (0 for a query without results)."""
    scored = _scored_queries(rankings, solution)
    return {q: gldv2_average_precision(scored.get(q, []), relevant) for q, relevant in solution.truth.items()}


def read_landmarks(url: str, options: Options = None) -> dict[str, str]:
    """Index id -> landmark id from a CSV or Parquet file with columns ``id`` and ``landmark_id``.

    A GLDv2 ``train.csv`` (``id,url,landmark_id``) or a single-file index manifest with a ``landmark_id``
    column both qualify. Landmark ids are compared as strings; rows without a landmark are left out.
    """
    if url.endswith(".parquet"):
        with storage.open_input(url, options) as f:
            names = pq.read_schema(f).names
            if not {"id", "landmark_id"} <= set(names):
                raise InputError(f"{storage.redact(url)} needs columns id, landmark_id; found {names}")
            table = pq.read_table(f, columns=["id", "landmark_id"])
        pairs = zip(table["id"].to_pylist(), table["landmark_id"].to_pylist(), strict=True)
        return {i: str(landmark) for i, landmark in pairs if landmark is not None}
    if url.endswith(".csv"):
        rows = csv.DictReader(io.StringIO(storage.read_text(url, options)))
        if not {"id", "landmark_id"} <= set(rows.fieldnames or ()):
            raise InputError(f"{storage.redact(url)} needs columns id, landmark_id; found {rows.fieldnames}")
        return {row["id"]: row["landmark_id"].strip() for row in rows if (row["landmark_id"] or "").strip()}
    raise InputError(f"landmark map {storage.redact(url)}: expected a .csv or .parquet file")


def recognition_predictions(
    rankings: Mapping[str, Ranking], landmarks: Mapping[str, str]
) -> dict[str, tuple[str, float]]:
    """Per query, (landmark of its top-1 retrieved image, that image's score)."""
    predictions = {}
    for query, ranking in rankings.items():
        top_id, score = ranking.ids[0], float(ranking.scores[0])
        if top_id not in landmarks:
            raise InputError(
                f"query {query!r}: top-1 image {top_id!r} has no landmark_id in the landmark map"
            )
        predictions[query] = (landmarks[top_id], score)
    return predictions


def global_average_precision(
    predictions: Mapping[str, tuple[str, float]], truth: Mapping[str, Sequence[str]]
) -> float:
    """GAP = (1/M) Σ_i P(i)·rel(i) over all predictions sorted by confidence (ties: query id, then landmark).

    M counts the queries with a ground-truth landmark; a confident prediction on a query without one lowers
    P(i) for every prediction after it.
    """
    n_with_landmark = sum(1 for landmarks in truth.values() if landmarks)
    if n_with_landmark == 0:
        raise InputError("GAP is undefined: no query of the solution has a ground-truth landmark")
    ordered = sorted(predictions.items(), key=lambda item: (-item[1][1], item[0], item[1][0]))
    correct, total = 0, 0.0
    for i, (query, (landmark, _)) in enumerate(ordered, start=1):
        if landmark in truth[query]:
            correct += 1
            total += correct / i
    return total / n_with_landmark


def evaluate_gldv2_recognition(
    rankings: Mapping[str, Ranking], solution: Gldv2Solution, landmarks: Mapping[str, str]
) -> dict[str, dict]:
    """GAP and top-1 accuracy (over queries with a landmark) per subset, top-1 retrieval as the prediction."""
    predictions = recognition_predictions(_scored_queries(rankings, solution), landmarks)
    metrics = {}
    for name, queries in _subsets(solution).items():
        truth = {q: solution.truth[q] for q in queries}
        subset_predictions = {q: p for q, p in predictions.items() if q in truth}
        with_landmark = [q for q in queries if truth[q]]
        correct = sum(1 for q in with_landmark if q in predictions and predictions[q][0] in truth[q])
        metrics[name] = {
            "GAP": global_average_precision(subset_predictions, truth),
            "accuracy": correct / len(with_landmark),
            "queries": len(queries),
        }
    return metrics
