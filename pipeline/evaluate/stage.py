"""The evaluate stage: a results file scored under one protocol, the metrics file (its one writer and
reader), per-query AP and relevance labels for the report."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline import storage
from pipeline.choices import PROTOCOLS
from pipeline.errors import ConfigError, InputError
from pipeline.evaluate.gldv2 import (
    evaluate_gldv2_recognition,
    evaluate_gldv2_retrieval,
    gldv2_query_aps,
    read_gldv2_solution,
    read_landmarks,
)
from pipeline.evaluate.revisitop import (
    RevisitopGroundTruth,
    evaluate_revisitop,
    read_revisitop_gnd,
    revisitop_query_scores,
)
from pipeline.results import read_rankings
from pipeline.storage import Options

# ---------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metrics:
    """One results file's figures under one protocol: setting → figure → value (fractions in [0, 1];
    ``queries`` a count). Settings: revisitop's easy / medium / hard, GLDv2's all / public / private."""

    protocol: str
    figures: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, dict[str, float]]:
        """The figures as the metrics file and the CLI's table hold them."""
        return {setting: dict(values) for setting, values in self.figures.items()}


def evaluate(
    results_url: str,
    ground_truth_url: str,
    protocol: str,
    options: Options = None,
    *,
    landmarks_url: str | None = None,
    out_url: str | None = None,
) -> Metrics:
    """Score a results file (pipeline.results) against ground truth; figures are fractions in [0, 1].

    With ``out_url``, the figures are also written there as JSON.

    - ``revisitop``: ``ground_truth_url`` is a ``gnd_*.pkl``; figures ``{"easy"|"medium"|"hard": {"mAP",
      "mP@1", "mP@5", "mP@10", "queries"}}``. Result ids and query ids are imlist / qimlist names (result ids
      outside imlist count as distractors); images a query's results do not return are ranked after all
      returned ones (in imlist order).
    - ``gldv2-retrieval``: a solution CSV ``id,images,Usage``; figures ``{"all"|"public"|"private":
      {"mAP@100", "queries"}}``.
    - ``gldv2-recognition``: a solution CSV ``id,landmarks,Usage`` and ``landmarks_url``, a CSV or Parquet
      mapping index ``id`` to ``landmark_id``; figures ``{"all"|"public"|"private": {"GAP", "accuracy",
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
        write_metrics(out_url, metrics, options)
    return Metrics(protocol, metrics)


def write_metrics(url: str, metrics: Mapping[str, Any], options: Options = None) -> None:
    """The one writer of metrics files (``evaluate --out``; a run's metrics.json, one entry per results
    file): the figures as a JSON object."""
    storage.write_text(url, json.dumps(metrics, indent=2) + "\n", options)


def read_metrics(url: str, options: Options = None) -> dict[str, Any]:
    """A metrics file written by :func:`write_metrics`; InputError when it is not a JSON object."""
    try:
        metrics = json.loads(storage.read_text(url, options))
    except json.JSONDecodeError as exc:
        raise InputError(f"{storage.redact(url)}: not a metrics file ({exc.msg})") from None
    if not isinstance(metrics, dict):
        raise InputError(f"{storage.redact(url)}: not a metrics file (a JSON object)")
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
