"""The Revisited Oxford / Paris protocol (revisitop): Easy / Medium / Hard ground truth, junk removed from
the ranking before AP, AP by the trapezoidal rule of the original Oxford protocol, mP@k."""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.errors import InputError
from pipeline.storage import Options

KAPPAS = (1, 5, 10)  # the revisitop mP@k cut-offs

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
