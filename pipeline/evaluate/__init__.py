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

Rooms: :mod:`~pipeline.evaluate.revisitop`, :mod:`~pipeline.evaluate.gldv2` and
:mod:`~pipeline.evaluate.stage` (:func:`evaluate`, the metrics file, per-query AP, relevance labels).
"""

from __future__ import annotations

from pipeline.evaluate.gldv2 import (
    GLDV2_MAX_PREDICTIONS,
    GLDV2_USAGES,
    Gldv2Solution,
    evaluate_gldv2_recognition,
    evaluate_gldv2_retrieval,
    gldv2_average_precision,
    gldv2_query_aps,
    global_average_precision,
    read_gldv2_solution,
    read_landmarks,
    recognition_predictions,
)
from pipeline.evaluate.revisitop import (
    KAPPAS,
    REVISITOP_SETTINGS,
    RevisitopGroundTruth,
    evaluate_revisitop,
    full_ranking,
    junk_removed_positions,
    read_revisitop_gnd,
    revisitop_ap,
    revisitop_precision_at,
    revisitop_query_scores,
)
from pipeline.evaluate.stage import (
    Labeler,
    Metrics,
    evaluate,
    query_aps,
    read_metrics,
    relevance_labeler,
    write_metrics,
)
from pipeline.results import read_rankings  # re-exported: callers read results from here too

__all__ = [
    "GLDV2_MAX_PREDICTIONS",
    "GLDV2_USAGES",
    "KAPPAS",
    "REVISITOP_SETTINGS",
    "Gldv2Solution",
    "Labeler",
    "Metrics",
    "RevisitopGroundTruth",
    "evaluate",
    "evaluate_gldv2_recognition",
    "evaluate_gldv2_retrieval",
    "evaluate_revisitop",
    "full_ranking",
    "gldv2_average_precision",
    "gldv2_query_aps",
    "global_average_precision",
    "junk_removed_positions",
    "query_aps",
    "read_gldv2_solution",
    "read_landmarks",
    "read_metrics",
    "read_rankings",
    "read_revisitop_gnd",
    "recognition_predictions",
    "relevance_labeler",
    "revisitop_ap",
    "revisitop_precision_at",
    "revisitop_query_scores",
    "write_metrics",
]
