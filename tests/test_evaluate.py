"""Evaluation protocols: hand-computed rankings, an independent AP reference, error cases, real revisitop files."""

from __future__ import annotations

import io
import json
import os
import pickle
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.evaluate import (
    evaluate,
    junk_removed_positions,
    revisitop_ap,
    revisitop_precision_at,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
IMLIST = ["a", "b", "c", "d", "e"]


def write_results(
    url: str, rankings: dict[str, list[str]], scores: dict[str, list[float]] | None = None
) -> str:
    """Search-results Parquet, rows deliberately out of rank order."""
    scores = scores or {}
    query_ids = [q for q, ids in rankings.items() for _ in ids]
    ranks = [r for ids in rankings.values() for r in range(1, len(ids) + 1)]
    images = [image for ids in rankings.values() for image in ids]
    values = [s for q, ids in rankings.items() for s in scores.get(q, 1.0 - 0.01 * np.arange(len(ids)))]
    table = pa.table(
        {
            "query_id": pa.array(query_ids, pa.string()),
            "rank": pa.array(ranks, pa.int32()),
            "id": pa.array(images, pa.string()),
            "score": pa.array(values, pa.float32()),
        }
    )
    table = table.take(np.random.default_rng(0).permutation(len(table)))
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(url, buffer.getvalue())
    return url


def write_gnd(path: Path, qimlist: list[str], gnd: list[dict]) -> str:
    path.write_bytes(pickle.dumps({"imlist": IMLIST, "qimlist": qimlist, "gnd": gnd}))
    return str(path)


@pytest.fixture
def small_gnd(tmp_path: Path) -> str:
    # q1: easy a, hard c, junk b.   q2: only a hard positive d, no easy ones (skipped in the Easy setting).
    return write_gnd(
        tmp_path / "gnd.pkl",
        ["q1", "q2"],
        [
            {"bbx": [0, 0, 1, 1], "easy": [0], "hard": [2], "junk": [1]},
            {"bbx": [0, 0, 1, 1], "easy": [], "hard": [3], "junk": []},
        ],
    )


# ---------------------------------------------------------------------------------------------------------
# revisitop
# ---------------------------------------------------------------------------------------------------------


def test_trapezoidal_ap_by_hand() -> None:
    # positives at 0-based ranks 0 and 2 of 2: trapezoids (1 + 1)/2 and (1/2 + 2/3)/2, each over recall 1/2
    # -> (1 + 7/12) / 2 = 19/24
    assert revisitop_ap(np.array([0, 2]), 2) == pytest.approx(19 / 24, abs=1e-12)
    # one positive of three retrieved, at rank 1: (0/1 + 1/2)/2 / 3 = 1/12
    assert revisitop_ap(np.array([1]), 3) == pytest.approx(1 / 12, abs=1e-12)


def test_precision_at_k_stops_at_last_positive() -> None:
    # 1-based positive ranks 1, 3: P@1 = 1; P@5 is taken at min(5, 3) = 3 -> 2/3, not 2/5.
    positions = np.array([0, 2])
    assert revisitop_precision_at(positions, 1) == 1.0
    assert revisitop_precision_at(positions, 5) == pytest.approx(2 / 3)
    # positives at 1-based 2 and 7: P@5 = 1/5 (the last positive is beyond 5)
    assert revisitop_precision_at(np.array([1, 6]), 5) == pytest.approx(1 / 5)


def reference_trapezoidal_ap(ranking: list[int], ok: set[int], junk: set[int]) -> float:
    """Walk the ranking with junk deleted; trapezoid between the precisions before and after each positive."""
    kept = [image for image in ranking if image not in junk]
    hits, ap = 0, Fraction(0)
    for rank, image in enumerate(kept):
        if image in ok:
            before = Fraction(1) if rank == 0 else Fraction(hits, rank)
            hits += 1
            ap += (before + Fraction(hits, rank + 1)) / 2 / len(ok)
    return float(ap)


def test_junk_removal_matches_independent_reference() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(5, 40))
        labels = rng.integers(0, 3, n)  # 0 negative, 1 positive, 2 junk
        if not (labels == 1).any():
            continue
        ranking = rng.permutation(n)
        ok, junk = np.flatnonzero(labels == 1), np.flatnonzero(labels == 2)
        positions = junk_removed_positions(ranking, ok, junk)
        expected = reference_trapezoidal_ap(ranking.tolist(), set(ok.tolist()), set(junk.tolist()))
        assert revisitop_ap(positions, len(ok)) == pytest.approx(expected, abs=1e-12)


def test_revisitop_settings_by_hand(tmp_path: Path, small_gnd: str) -> None:
    # q1 ranking d b a e c; q2 returns only d (a b c e follow in imlist order).
    results = write_results(str(tmp_path / "r.parquet"), {"q1": ["d", "b", "a", "e", "c"], "q2": ["d"]})
    metrics = evaluate(results, small_gnd, "revisitop").figures
    # q1 medium: ok {a, c}, junk {b} -> d a e c: positives at 1, 3:
    #   (0/1 + 1/2)/2 = 1/4 and (1/3 + 2/4)/2 = 5/12, AP = (1/4 + 5/12)/2 = 1/3;
    #   P@1 = 0, P@5 = P@10 = P@min(k, 4) = 2/4 (4 = 1-based rank of the last positive)
    # q2 medium: ok {d} first -> AP 1, P@k 1.
    assert metrics["medium"]["mAP"] == pytest.approx((1 / 3 + 1) / 2)
    assert metrics["medium"]["mP@1"] == pytest.approx((0 + 1) / 2)
    assert metrics["medium"]["mP@5"] == pytest.approx((2 / 4 + 1) / 2)
    assert metrics["medium"]["mP@10"] == pytest.approx((2 / 4 + 1) / 2)
    # q1 easy: ok {a}, junk {b, c} -> d a e: AP (0 + 1/2)/2 = 1/4; P@5 = P@2 = 1/2. q2 has no easy positives.
    assert metrics["easy"] == pytest.approx(
        {"mAP": 1 / 4, "mP@1": 0.0, "mP@5": 1 / 2, "mP@10": 1 / 2, "queries": 1}
    )
    # q1 hard: ok {c}, junk {a, b} -> d e c: AP (0 + 1/3)/2 = 1/6, P@5 = P@3 = 1/3; q2 hard: AP 1.
    assert metrics["hard"]["mAP"] == pytest.approx((1 / 6 + 1) / 2)
    assert metrics["hard"]["mP@5"] == pytest.approx((1 / 3 + 1) / 2)
    assert metrics["medium"]["queries"] == metrics["hard"]["queries"] == 2


def test_junk_removal_changes_ap_exactly(tmp_path: Path) -> None:
    ranking = {"q1": ["d", "b", "a", "e", "c"]}
    results = write_results(str(tmp_path / "r.parquet"), ranking)
    with_junk = write_gnd(tmp_path / "j.pkl", ["q1"], [{"bbx": [], "easy": [0], "hard": [2], "junk": [1]}])
    without_junk = write_gnd(tmp_path / "n.pkl", ["q1"], [{"bbx": [], "easy": [0], "hard": [2], "junk": []}])
    # Medium with b kept as a negative: positives a, c at ranks 2, 4:
    #   (0/2 + 1/3)/2 = 1/6 and (1/4 + 2/5)/2 = 13/40 -> AP = (1/6 + 13/40)/2 = 59/240; with b removed: 1/3.
    assert evaluate(results, without_junk, "revisitop").figures["medium"]["mAP"] == pytest.approx(59 / 240)
    assert evaluate(results, with_junk, "revisitop").figures["medium"]["mAP"] == pytest.approx(1 / 3)
    # Easy treats the hard image c as junk: ranked c a ..., a counts as first (AP 1), not second (AP 1/4).
    hard_first = write_results(str(tmp_path / "h.parquet"), {"q1": ["c", "a", "b", "d", "e"]})
    assert evaluate(hard_first, with_junk, "revisitop").figures["easy"]["mAP"] == 1.0
    assert (
        evaluate(hard_first, without_junk, "revisitop").figures["easy"]["mAP"] == 1.0
    )  # hard is junk for Easy anyway


def test_unreturned_images_rank_after_returned_in_imlist_order(tmp_path: Path, small_gnd: str) -> None:
    truncated = write_results(str(tmp_path / "t.parquet"), {"q1": ["d", "b"], "q2": ["e"]})
    full = write_results(
        str(tmp_path / "f.parquet"), {"q1": ["d", "b", "a", "c", "e"], "q2": ["e", "a", "b", "c", "d"]}
    )
    assert evaluate(truncated, small_gnd, "revisitop") == evaluate(full, small_gnd, "revisitop")


def test_ids_outside_imlist_are_distractors(tmp_path: Path, small_gnd: str) -> None:
    # q2 hard: ok {d} behind two distractors -> rank 2: AP (0/2 + 1/3)/2 = 1/6 (no junk for q2).
    # q1 hard: a, then b c d e; junk {a, b} removed -> c first: AP 1.
    with_distractors = write_results(str(tmp_path / "r.parquet"), {"q1": ["a"], "q2": ["x1", "x2", "d"]})
    assert evaluate(with_distractors, small_gnd, "revisitop").figures["hard"]["mAP"] == pytest.approx(
        (1 + 1 / 6) / 2
    )


def test_results_through_fsspec_url_and_json_output(tmp_path: Path, small_gnd: str, capsys) -> None:
    results = write_results("memory://eval-test/results.parquet", {"q1": ["a", "c"], "q2": ["d"]})
    out = str(tmp_path / "metrics.json")
    metrics = evaluate(results, small_gnd, "revisitop", out_url=out)
    assert json.loads(Path(out).read_text()) == metrics.to_dict() == metrics.figures
    assert metrics.protocol == "revisitop" and metrics.figures["medium"]["mAP"] == 1.0
    assert capsys.readouterr().out == ""  # the library does not print; the CLI presents


def test_setting_without_any_positive_query_is_null_in_json(tmp_path: Path) -> None:
    gnd = write_gnd(tmp_path / "g.pkl", ["q"], [{"bbx": [], "easy": [], "hard": [0], "junk": []}])
    results = write_results(str(tmp_path / "r.parquet"), {"q": ["a"]})
    out = str(tmp_path / "m.json")
    evaluate(results, gnd, "revisitop", out_url=out)
    assert json.loads(Path(out).read_text())["easy"] == {
        "mAP": None,
        "mP@1": None,
        "mP@5": None,
        "mP@10": None,
        "queries": 0,
    }


# ---------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------


def test_unknown_protocol(tmp_path: Path, small_gnd: str) -> None:
    results = write_results(str(tmp_path / "r.parquet"), {"q1": ["a"]})
    with pytest.raises(ValueError, match=r"unknown protocol 'oxford'.*revisitop"):
        evaluate(results, small_gnd, "oxford")


def test_results_missing_columns(tmp_path: Path, small_gnd: str) -> None:
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"query_id": ["q1"], "id": ["a"]}), path)
    with pytest.raises(ValueError, match=r"lack columns \['rank', 'score'\]"):
        evaluate(str(path), small_gnd, "revisitop")


@pytest.mark.parametrize(
    ("rankings", "message"),
    [
        ({"q1": ["a"], "q2": ["d"], "q9": ["a"]}, r"queries \['q9'\] are not in the ground truth qimlist"),
        ({"q1": ["a"]}, r"no rows for 1 ground-truth queries, e.g. \['q2'\]"),
        (
            {"q1": ["a.jpg"], "q2": ["d.jpg"]},
            r"no result id is a ground-truth imlist name \(e.g. \['a.jpg'\]\)",
        ),
        ({"q1": ["a", "a"], "q2": ["d"]}, r"more than once"),
    ],
)
def test_revisitop_bad_results(tmp_path: Path, small_gnd: str, rankings: dict, message: str) -> None:
    results = write_results(str(tmp_path / "r.parquet"), rankings)
    with pytest.raises(ValueError, match=message):
        evaluate(results, small_gnd, "revisitop")


def test_gnd_pickle_cannot_run_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [os.getcwd]}))
    results = write_results(str(tmp_path / "r.parquet"), {"q": ["a"]})
    with pytest.raises(ValueError, match=r"refers to posix.getcwd"):
        evaluate(results, str(path), "revisitop")


@pytest.mark.parametrize(
    "content",
    [b"id,landmark_id\nq,1\n", b"", pickle.dumps({"imlist": []})[:-3], b"\x80\x05K"],
    ids=["csv", "empty", "truncated", "bad-opcode"],
)
def test_gnd_file_that_is_not_a_pickle_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "gnd.pkl"
    path.write_bytes(content)
    results = write_results(str(tmp_path / "r.parquet"), {"q": ["a"]})
    with pytest.raises(ValueError, match=r"gnd\.pkl is not a revisitop gnd"):
        evaluate(results, str(path), "revisitop")


# ---------------------------------------------------------------------------------------------------------
# GLDv2
# ---------------------------------------------------------------------------------------------------------


def test_gldv2_retrieval_map_at_100(tmp_path: Path) -> None:
    many = [f"m{i}" for i in range(150)]
    solution = tmp_path / "retrieval_solution.csv"
    solution.write_text(
        "id,images,Usage\n"
        "q1,x y,Public\n"
        "q2,z,Private\n"
        f"q3,{' '.join(many)},Private\n"
        "q4,x,Public\n"
        "q5,None,Ignored\n"
    )
    rankings = {
        "q1": ["x", "n", "y"],  # (1/1 + 2/3) / 2 = 5/6
        "q2": ["n", "n", "z"],  # the repeated n still uses rank 2: z at rank 3 -> 1/3
        "q3": many[:120],  # 100 hits in the first 100, divided by min(150, 100) -> 1
        "q5": ["x"],  # Ignored: not scored, not an error
    }  # q4 has no results: AP 0
    metrics = evaluate(
        write_results(str(tmp_path / "r.parquet"), rankings), str(solution), "gldv2-retrieval"
    ).figures
    assert metrics["all"] == pytest.approx({"mAP@100": (5 / 6 + 1 / 3 + 1 + 0) / 4, "queries": 4})
    assert metrics["public"] == pytest.approx({"mAP@100": (5 / 6 + 0) / 2, "queries": 2})
    assert metrics["private"] == pytest.approx({"mAP@100": (1 / 3 + 1) / 2, "queries": 2})


def test_gldv2_bad_usage_and_unknown_query(tmp_path: Path) -> None:
    results = write_results(str(tmp_path / "r.parquet"), {"q1": ["x"], "zz": ["x"]})
    bad = tmp_path / "bad.csv"
    bad.write_text("id,images,Usage\nq1,x,Secret\n")
    with pytest.raises(ValueError, match=r"Usage 'Secret'; allowed"):
        evaluate(results, str(bad), "gldv2-retrieval")
    good = tmp_path / "good.csv"
    good.write_text("id,images,Usage\nq1,x,Public\n")
    with pytest.raises(ValueError, match=r"queries \['zz'\] are not in the GLDv2 solution"):
        evaluate(results, str(good), "gldv2-retrieval")


@pytest.fixture
def recognition_case(tmp_path: Path) -> tuple[str, Path]:
    solution = tmp_path / "recognition_solution.csv"
    solution.write_text(
        "id,landmarks,Usage\nqa,1,Public\nqb,2,Public\nqc,,Private\nqd,3,Private\nqe,,Ignored\n"
    )
    results = write_results(
        str(tmp_path / "r.parquet"),
        {"qa": ["i1", "i2"], "qb": ["i2"], "qc": ["i3"], "qe": ["i1"]},
        {"qa": [0.9, 0.1], "qb": [0.5], "qc": [0.8], "qe": [1.0]},
    )
    return results, solution


def test_gldv2_recognition_gap_by_hand(tmp_path: Path, recognition_case: tuple[str, Path]) -> None:
    results, solution = recognition_case
    csv_map = tmp_path / "train.csv"
    csv_map.write_text("id,url,landmark_id\ni1,u,1\ni2,u,2\ni3,u,1\n")
    parquet_map = tmp_path / "index.parquet"
    pq.write_table(pa.table({"id": ["i1", "i2", "i3", "i4"], "landmark_id": [1, 2, 1, None]}), parquet_map)
    # Predictions by confidence: qa 0.9 (1, correct), qc 0.8 (no landmark: wrong), qb 0.5 (2, correct).
    # M = 3 queries with a landmark (qa, qb, qd); GAP = (1/1 + 2/3) / 3 = 5/9; accuracy 2/3.
    expected = {
        "all": {"GAP": 5 / 9, "accuracy": 2 / 3, "queries": 4},
        "public": {"GAP": 1.0, "accuracy": 1.0, "queries": 2},
        "private": {"GAP": 0.0, "accuracy": 0.0, "queries": 2},
    }
    for landmarks in (csv_map, parquet_map):
        metrics = evaluate(results, str(solution), "gldv2-recognition", landmarks_url=str(landmarks)).figures
        assert metrics.keys() == expected.keys()
        for subset, figures in expected.items():
            assert metrics[subset] == pytest.approx(figures)


def test_gldv2_recognition_needs_landmarks(tmp_path: Path, recognition_case: tuple[str, Path]) -> None:
    results, solution = recognition_case
    with pytest.raises(ValueError, match=r"needs landmarks_url"):
        evaluate(results, str(solution), "gldv2-recognition")
    partial = tmp_path / "partial.csv"
    partial.write_text("id,landmark_id\ni1,1\ni2,2\ni3,\n")  # i3 without a landmark
    with pytest.raises(ValueError, match=r"top-1 image 'i3' has no landmark_id"):
        evaluate(results, str(solution), "gldv2-recognition", landmarks_url=str(partial))
    with pytest.raises(ValueError, match=r"expected a .csv or .parquet"):
        evaluate(results, str(solution), "gldv2-recognition", landmarks_url=str(tmp_path / "map.json"))


# ---------------------------------------------------------------------------------------------------------
# real Revisited Oxford ground truth (opt-in)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def roxford() -> tuple[str, dict]:
    path = SHARED / "data" / "revisitop" / "gnd_roxford5k.pkl"
    if not path.exists():
        pytest.skip(f"real revisitop ground truth absent ({path}); ../shared is optional")
    with path.open("rb") as f:
        return str(path), pickle.load(f)


def ranking_by_annotation(gnd: dict, reverse: bool) -> dict[str, list[str]]:
    """Per query: easy, hard, junk, then the unannotated images (or that whole order reversed)."""
    rankings = {}
    for query, ann in zip(gnd["qimlist"], gnd["gnd"], strict=True):
        first = [*ann["easy"], *ann["hard"], *ann["junk"]]
        order = first + sorted(set(range(len(gnd["imlist"]))) - set(first))
        rankings[query] = [gnd["imlist"][i] for i in (order[::-1] if reverse else order)]
    return rankings


def reversed_ap(n_images: int, n_ok: int, n_junk: int) -> float:
    """AP when the n_ok positives are the last n_ok of the n_images - n_junk ranked after junk removal."""
    first = n_images - n_junk - n_ok  # 0-based rank of the first positive
    return (
        sum(((j / (first + j) if first + j else 1.0) + (j + 1) / (first + j + 1)) / 2 for j in range(n_ok))
        / n_ok
    )


@pytest.mark.shared
def test_roxford_perfect_and_reversed(tmp_path: Path, roxford: tuple[str, dict]) -> None:
    gnd_url, gnd = roxford
    perfect = evaluate(
        write_results(str(tmp_path / "p.parquet"), ranking_by_annotation(gnd, False)), gnd_url, "revisitop"
    ).figures
    # 70 queries; two have no easy positives, so Easy averages over 68.
    assert {s: perfect[s]["queries"] for s in perfect} == {"easy": 68, "medium": 70, "hard": 70}
    for figures in perfect.values():
        assert {k: v for k, v in figures.items() if k != "queries"} == pytest.approx(
            {"mAP": 1.0, "mP@1": 1.0, "mP@5": 1.0, "mP@10": 1.0}, abs=1e-12
        )

    reversed_ = evaluate(
        write_results(str(tmp_path / "r.parquet"), ranking_by_annotation(gnd, True)), gnd_url, "revisitop"
    ).figures
    n = len(gnd["imlist"])
    medium = [reversed_ap(n, len(a["easy"]) + len(a["hard"]), len(a["junk"])) for a in gnd["gnd"]]
    hard = [reversed_ap(n, len(a["hard"]), len(a["junk"]) + len(a["easy"])) for a in gnd["gnd"]]
    # Easy: the hard images ranked just before the easy ones are junk here, so they must be removed.
    easy = [reversed_ap(n, len(a["easy"]), len(a["junk"]) + len(a["hard"])) for a in gnd["gnd"] if a["easy"]]
    assert reversed_["easy"]["mAP"] == pytest.approx(np.mean(easy), rel=1e-9)
    assert reversed_["medium"]["mAP"] == pytest.approx(np.mean(medium), rel=1e-9)
    assert reversed_["hard"]["mAP"] == pytest.approx(np.mean(hard), rel=1e-9)
    assert reversed_["medium"]["mAP"] < 0.05 and reversed_["medium"]["mP@10"] == 0.0
