"""Evaluation of search results against ground truth: Revisited Oxford/Paris and Google Landmarks v2.

Input is the search-results Parquet (``query_id``, ``rank`` (1 = best), ``id``, ``score``), as written by
``search`` or ``rerank``; ids are image names. Three protocols:

- ``revisitop``: mAP and mP@{1,5,10} for the Easy / Medium / Hard settings of Radenović et al. (2018), from a
  ``gnd_*.pkl`` ground truth. AP is the trapezoidal rule of the original Oxford protocol, junk removed first.
- ``gldv2-retrieval``: mAP@100 of the Google Landmark Retrieval challenge, from its solution CSV
  (``id,images,Usage``).
- ``gldv2-recognition``: GAP (micro-AP, Perronnin et al. 2009) and top-1 accuracy of the Google Landmark
  Recognition challenge, from its solution CSV (``id,landmarks,Usage``); the predicted landmark of a query is the
  landmark of its top-1 retrieved image, its confidence that image's score.

All figures are fractions in [0, 1]; ``queries`` entries are counts.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.choices import PROTOCOLS
from pipeline.errors import ConfigError, InputError
from pipeline.results import Ranking, read_rankings
from pipeline.storage import Options

KAPPAS = (1, 5, 10)  # the revisitop mP@k cut-offs
GLDV2_MAX_PREDICTIONS = 100  # mAP@100
GLDV2_USAGES = ("Public", "Private", "Ignored")

# Revisitop settings: which annotation lists count as positives ("ok") and which are removed ("junk").
REVISITOP_SETTINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# Revisited Oxford / Paris
# ---------------------------------------------------------------------------------------------------------


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles containers of plain values and numpy arrays only: a ground-truth file cannot run code."""

    ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise InputError(
                f"ground truth pickle refers to {module}.{name}; only plain data and numpy arrays"
            )
        return super().find_class(module, name)


@dataclass(frozen=True)
class RevisitopGroundTruth:
    imlist: list[str]  # database image names
    qimlist: list[str]  # query image names
    gnd: list[dict[str, Any]]  # per query: bbx, easy, hard, junk (indices into imlist)


def read_revisitop_gnd(url: str, options: Options = None) -> RevisitopGroundTruth:
    """Read a revisitop ``gnd_*.pkl`` (dict with ``imlist``, ``qimlist``, ``gnd``); ValueError naming the
    file for anything else."""
    data = storage.read_bytes(url, options)
    try:
        loaded = _PlainUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # the unpickler runs no code, so any failure means "not a gnd pickle"
        raise InputError(
            f"{storage.redact(url)} is not a revisitop gnd pickle ({type(exc).__name__}: {exc})"
        ) from None
    problem = _gnd_problem(loaded)
    if problem:
        raise InputError(f"{storage.redact(url)} is not a revisitop gnd file: {problem}")
    return RevisitopGroundTruth(list(loaded["imlist"]), list(loaded["qimlist"]), list(loaded["gnd"]))


def _gnd_problem(data: Any) -> str | None:
    """What makes ``data`` no revisitop ground truth, or None: per query, easy/hard/junk lists of imlist
    indices (the ``bbx`` entry is not used here)."""
    if not isinstance(data, dict) or not {"imlist", "qimlist", "gnd"} <= data.keys():
        return "need a dict with keys imlist, qimlist, gnd"
    if not all(isinstance(v, (list, tuple)) for v in (data["imlist"], data["qimlist"], data["gnd"])):
        return "imlist, qimlist and gnd must be lists"
    if len(data["gnd"]) != len(data["qimlist"]):
        return f"{len(data['gnd'])} gnd entries for {len(data['qimlist'])} queries"
    for position, entry in enumerate(data["gnd"]):
        if not isinstance(entry, dict) or not {"easy", "hard", "junk"} <= entry.keys():
            return f"gnd[{position}] must be a dict with keys easy, hard, junk"
        for key in ("easy", "hard", "junk"):
            indices = np.asarray(entry[key])
            if indices.size and (
                indices.ndim != 1
                or not np.issubdtype(indices.dtype, np.integer)
                or indices.min() < 0
                or indices.max() >= len(data["imlist"])
            ):
                return f"gnd[{position}][{key!r}] must list imlist indices (0 to {len(data['imlist']) - 1})"
    return None


def revisitop_ap(positions: np.ndarray, n_positives: int) -> float:
    """Trapezoidal AP of the Oxford protocol.

    ``positions``: sorted 0-based ranks of the retrieved positives after junk removal. The j-th positive
    (0-based) at rank r adds the trapezoid between precision j/r (1 at r = 0) and (j+1)/(r+1) over a recall
    step of 1/n_positives.
    """
    r = positions.astype(np.float64)
    j = np.arange(len(r), dtype=np.float64)
    precision_0 = np.divide(j, r, out=np.ones_like(r), where=r > 0)
    precision_1 = (j + 1) / (r + 1)
    return float(np.sum((precision_0 + precision_1) / 2) / n_positives)


def revisitop_precision_at(positions: np.ndarray, k: int) -> float:
    """Revisitop mP@k term: precision at min(k, rank of the last positive) (1-based), so a query whose
    positives are all found before k is not penalised for having fewer than k of them."""
    ranks_1 = positions + 1
    cut = min(int(ranks_1.max()), k)
    return float(np.count_nonzero(ranks_1 <= cut) / cut)


def junk_removed_positions(ranking: np.ndarray, ok: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based ranks of the ``ok`` images in ``ranking`` (N,) once the ``junk`` images are taken out of it."""
    positives = np.flatnonzero(np.isin(ranking, ok))
    junk_positions = np.flatnonzero(np.isin(ranking, junk))
    # A positive moves up by the number of junk images strictly before it.
    return positives - np.searchsorted(junk_positions, positives, side="left")


def full_ranking(
    ranked_ids: Sequence[str], index_of: Mapping[str, int], n_images: int, query: str
) -> np.ndarray:
    """imlist indices (n_images + distractors,): the returned images in rank order, then the unreturned imlist
    images in imlist order. Returned ids outside imlist (distractors, e.g. R1M) are negatives, index -1."""
    returned = np.fromiter((index_of.get(i, -1) for i in ranked_ids), dtype=np.int64, count=len(ranked_ids))
    known = returned[returned >= 0]
    if len(np.unique(known)) != len(known):
        raise InputError(f"query {query!r}: results list an image more than once")
    rest = np.setdiff1d(np.arange(n_images), known, assume_unique=True)
    return np.concatenate([returned, rest])


def evaluate_revisitop(rankings: Mapping[str, Sequence[str]], gt: RevisitopGroundTruth) -> dict[str, dict]:
    """mAP and mP@{1,5,10} for Easy / Medium / Hard, over every query of the ground truth.

    ``rankings`` maps each query name (a ``qimlist`` entry) to its ranked database names; names outside imlist
    are distractors (negatives). Images a query's ranking does not return are ranked after all returned ones,
    in imlist order (so a truncated shortlist is scored as the full ranking it starts). Queries with no
    positives in a setting are left out of its mean.
    """
    per_setting = revisitop_query_scores(rankings, gt)
    return {
        setting: _revisitop_means(np.asarray(list(rows.values()))) for setting, rows in per_setting.items()
    }


def revisitop_query_scores(
    rankings: Mapping[str, Sequence[str]], gt: RevisitopGroundTruth
) -> dict[str, dict[str, list[float]]]:
    """Per setting, per query with positives in it: [AP, P@1, P@5, P@10] (see :func:`evaluate_revisitop`)."""
    unknown = sorted(set(rankings) - set(gt.qimlist))
    if unknown:
        raise InputError(f"result queries {unknown[:5]} are not in the ground truth qimlist")
    missing = [q for q in gt.qimlist if q not in rankings]
    if missing:
        raise InputError(f"results have no rows for {len(missing)} ground-truth queries, e.g. {missing[:5]}")
    index_of = {name: i for i, name in enumerate(gt.imlist)}
    if not any(i in index_of for ranked in rankings.values() for i in ranked):
        example = next((ranked[:3] for ranked in rankings.values() if ranked), [])
        raise InputError(
            f"no result id is a ground-truth imlist name (e.g. {example}); ids must be imlist entries"
        )
    per_setting: dict[str, dict[str, list[float]]] = {s: {} for s in REVISITOP_SETTINGS}
    for query, annotation in zip(gt.qimlist, gt.gnd, strict=True):
        ranking = full_ranking(rankings[query], index_of, len(gt.imlist), query)
        for setting, (ok_keys, junk_keys) in REVISITOP_SETTINGS.items():
            ok = np.concatenate([np.asarray(annotation[k], dtype=np.int64) for k in ok_keys])
            if len(ok) == 0:
                continue
            junk = np.concatenate([np.asarray(annotation[k], dtype=np.int64) for k in junk_keys])
            positions = junk_removed_positions(ranking, ok, junk)
            per_setting[setting][query] = [revisitop_ap(positions, len(ok))] + [
                revisitop_precision_at(positions, k) for k in KAPPAS
            ]
    return per_setting


def _revisitop_means(rows: np.ndarray) -> dict[str, Any]:
    """Means of the per-query rows (Q, 1 + len(KAPPAS)): AP, P@k..., and the query count Q."""
    names = ["mAP"] + [f"mP@{k}" for k in KAPPAS]
    if len(rows) == 0:
        return {**dict.fromkeys(names), "queries": 0}  # null in JSON: no query has positives
    return {**{n: float(v) for n, v in zip(names, rows.mean(axis=0), strict=True)}, "queries": len(rows)}


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


# ---------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------


def evaluate(
    results_url: str,
    ground_truth_url: str,
    protocol: str,
    options: Options = None,
    *,
    landmarks_url: str | None = None,
    out_url: str | None = None,
) -> dict[str, dict]:
    """Score a results file (pipeline.results) against ground truth; figures are fractions in [0, 1].

    With ``out_url``, the figures are also written there as JSON.

    - ``revisitop``: ``ground_truth_url`` is a ``gnd_*.pkl``; returns ``{"easy"|"medium"|"hard": {"mAP",
      "mP@1", "mP@5", "mP@10", "queries"}}``. Result ids and query ids are imlist / qimlist names (result ids
      outside imlist count as distractors); images a query's results do not return are ranked after all
      returned ones (in imlist order).
    - ``gldv2-retrieval``: a solution CSV ``id,images,Usage``; returns ``{"all"|"public"|"private":
      {"mAP@100", "queries"}}``.
    - ``gldv2-recognition``: a solution CSV ``id,landmarks,Usage`` and ``landmarks_url``, a CSV or Parquet
      mapping index ``id`` to ``landmark_id``; returns ``{"all"|"public"|"private": {"GAP", "accuracy",
      "queries"}}``.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; allowed: {list(PROTOCOLS)}")
    if protocol == "gldv2-recognition" and landmarks_url is None:
        raise ConfigError("protocol 'gldv2-recognition' needs landmarks_url (index id -> landmark_id)")
    rankings = read_rankings(results_url, options)
    ranked_ids = {q: ranking.ids for q, ranking in rankings.items()}
    if protocol == "revisitop":
        metrics = evaluate_revisitop(ranked_ids, read_revisitop_gnd(ground_truth_url, options))
    elif protocol == "gldv2-retrieval":
        metrics = evaluate_gldv2_retrieval(
            ranked_ids, read_gldv2_solution(ground_truth_url, "images", options)
        )
    else:
        solution = read_gldv2_solution(ground_truth_url, "landmarks", options)
        assert landmarks_url is not None
        metrics = evaluate_gldv2_recognition(rankings, solution, read_landmarks(landmarks_url, options))
    if out_url is not None:
        storage.write_text(out_url, json.dumps(metrics, indent=2) + "\n", options)
    return metrics


def query_aps(
    results_url: str, ground_truth_url: str, protocol: str, options: Options = None
) -> tuple[str, dict[str, float]]:
    """Each query's AP and what it is: revisitop's Medium AP (queries with Medium positives), GLDv2's AP@100;
    ("", {}) for gldv2-recognition, whose GAP is over all predictions together (no per-query AP)."""
    ranked = {q: ranking.ids for q, ranking in read_rankings(results_url, options).items()}
    if protocol == "revisitop":
        scores = revisitop_query_scores(ranked, read_revisitop_gnd(ground_truth_url, options))["medium"]
        return "AP (Medium)", {q: row[0] for q, row in scores.items()}
    if protocol == "gldv2-retrieval":
        solution = read_gldv2_solution(ground_truth_url, "images", options)
        return "AP@100", gldv2_query_aps(ranked, solution)
    return "", {}


Labeler = Callable[[str, str], "str | None"]


def relevance_labeler(
    protocol: str, ground_truth_url: str, options: Options = None, *, landmarks_url: str | None = None
) -> Labeler:
    """(query id, result id) → "positive" | "negative" | "junk" by the ground truth; None for unknown queries."""
    if protocol == "revisitop":
        return _revisitop_labeler(read_revisitop_gnd(ground_truth_url, options))
    if protocol == "gldv2-retrieval":
        solution = read_gldv2_solution(ground_truth_url, "images", options)
        relevant = {q: set(ids) for q, ids in solution.truth.items()}
        return lambda query, hit: (
            None if query not in relevant else ("positive" if hit in relevant[query] else "negative")
        )
    solution = read_gldv2_solution(ground_truth_url, "landmarks", options)
    landmarks = read_landmarks(landmarks_url or "", options)
    truth = {q: set(ids) for q, ids in solution.truth.items()}
    return lambda query, hit: (
        None if query not in truth else ("positive" if landmarks.get(hit) in truth[query] else "negative")
    )


def _revisitop_labeler(gt: RevisitopGroundTruth) -> Labeler:
    position = {name: i for i, name in enumerate(gt.qimlist)}

    def label(query: str, hit: str) -> str | None:
        if query not in position:
            return None
        entry = gt.gnd[position[query]]
        names = {kind: {gt.imlist[i] for i in entry.get(kind, [])} for kind in ("easy", "hard", "junk")}
        if hit in names["junk"]:
            return "junk"
        return "positive" if hit in names["easy"] | names["hard"] else "negative"

    return label
