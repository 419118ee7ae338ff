"""The "gate" score (issue 28): a candidate moves only when its inliers are significant against the query's null."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline import store
from pipeline.rerank import RerankConfig, rerank, rerank_order, rerank_scores, rerank_shortlist
from pipeline.rerank.explain import explain_query
from pipeline.rerank.score import MIN_LOG_SPREAD, gate, null_counts, null_level
from pipeline.rerank.shortlist import null_sample
from tests.test_cli import cli
from tests.test_rerank import random_features, random_transform, sharing_features

Z_95 = 1.6448536269514722  # Φ⁻¹(0.95)


def bound(spread: float, n: int) -> float:
    """The 95% confidence margin of the level's log, z = Φ⁻¹(0.95): standard errors of the median (π/2) and of
    1.4826 · MAD (0.5 / 0.3675), in σ² / n."""
    return Z_95 * spread * np.sqrt((np.pi / 2 + 0.5 / 0.3675 * Z_95**2) / n)


def test_null_level_hand_computed() -> None:
    # log(1 + counts) = log 10 (×2), log 20 (×3), log 30, log 40: median log 20; absolute deviations 0 (×3),
    # log 1.5, log 2 (×3) → MAD log 1.5. 10 candidates at 0.5 false alarms: α = 0.05, z = Φ⁻¹(0.95)
    counts = np.array([9, 19, 19, 9, 29, 39, 19, -1])  # −1 (unverified) is left out
    spread = 1.4826 * np.log(1.5)
    assert null_level(counts, 10, 0.5, confidence=0.5) == pytest.approx(20 * np.exp(Z_95 * spread) - 1)
    expected = 20 * np.exp(Z_95 * spread + bound(spread, 7)) - 1
    assert null_level(counts, 10, 0.5) == pytest.approx(expected)
    # the same distribution measured on 4× the images: the margin shrinks by 2 (the estimate is surer)
    more = np.tile(counts[:-1], 4)
    assert null_level(more, 10, 0.5) == pytest.approx(20 * np.exp(Z_95 * spread + bound(spread, 28)) - 1)
    # identical counts: the spread's floor; fewer than 5 counts: no null, nothing may move
    floor = 6 * np.exp(Z_95 * MIN_LOG_SPREAD + bound(MIN_LOG_SPREAD, 6)) - 1
    assert null_level(np.full(6, 5), 10, 0.5) == pytest.approx(floor)
    assert null_level(np.array([9, 19, 29, 39, -1]), 10, 0.5) == np.inf
    # more candidates tested or fewer false alarms allowed: a higher level
    assert null_level(counts, 100, 0.5) > null_level(counts, 10, 0.5) > null_level(counts, 10, 5.0)


def test_null_counts_top_up_from_the_far_end() -> None:
    shortlist = np.array([50, -1, 7, 8, 9])
    assert null_counts(np.array([3, 4]), shortlist, 4).tolist() == [3, 4, 8, 9]
    assert null_counts(np.array([3, 4]), shortlist, 1).tolist() == [3]
    assert null_counts(np.zeros(0), shortlist, 10).tolist() == [8, 9]  # the far half of the verified ones


def test_gate_scores_hand_computed() -> None:
    g = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    inliers = np.array([10, 60, 5, 80, -1, 70])
    # level 50: positions 1, 3, 5 pass and move up in global order; 0, 2 (below it) and 4 (unverified) follow,
    # in global order
    order = rerank_order(rerank_scores(g, inliers, mode="gate", level=50.0))
    assert order.tolist() == [1, 3, 5, 0, 2, 4]
    # a count equal to the level does not pass; min_inliers still applies; no level: the global order
    assert rerank_order(rerank_scores(g, inliers, mode="gate", level=60.0)).tolist() == [3, 5, 0, 1, 2, 4]
    order = rerank_order(rerank_scores(g, inliers, mode="gate", level=50.0, min_inliers=75))
    assert order.tolist() == [3, 0, 1, 2, 4, 5]
    for level in (np.inf, np.nan):
        assert rerank_order(rerank_scores(g, inliers, mode="gate", level=level)).tolist() == list(range(6))


def test_gate_level_never_below_the_minimal_sample() -> None:
    config = RerankConfig(score="gate", null_size=60, false_alarms=0.01)
    null, level = gate(np.zeros(60, np.int64), np.array([0, 0, 3]), config)
    # expm1(0.25 · (z + margin)) < 3: three matches always fit
    assert null.tolist() == [0] * 60 and level == 3.0
    homography = RerankConfig(score="gate", model="homography", null_size=60, false_alarms=0.01)
    assert gate(np.zeros(60), np.zeros(3), homography)[1] == 4.0


def test_null_sample_fixed_and_prefix_consistent() -> None:
    ids = [f"img{i}" for i in range(50)]
    sample = null_sample(reversed(ids), 20, seed=0)
    assert sample == null_sample(ids, 20, seed=0) and len(set(sample)) == 20
    assert null_sample(ids, 7, seed=0) == sample[:7]
    assert null_sample(ids, 20, seed=1) != sample
    assert sorted(null_sample(ids, 80, seed=0)) == sorted(ids)


def _query_with_false_pairs(rng: np.random.Generator, false_shared: int, n_false: int) -> tuple:
    """A query, false candidates sharing ``false_shared`` features each (moved by their own map), one true one."""
    query = random_features(rng)

    def moved(shared: int):
        return sharing_features(rng, query, random_transform(rng, (320, 320), False), shared=shared)

    return query, [moved(false_shared) for _ in range(n_false)], moved(150)


def test_rerank_shortlist_gate_moves_only_significant_candidates() -> None:
    rng = np.random.default_rng(28)
    # false pairs that still share 12 features (as untrained local features give): their counts are the null
    query, false, true = _query_with_false_pairs(rng, 12, 12)
    config = RerankConfig(score="gate", trials=300, null_size=8, false_alarms=0.1, device="cpu")
    candidates = [*false[:4], true]  # the true match last in the global order
    g = np.linspace(0.9, 0.5, 5)
    result = rerank_shortlist(query, candidates, g, config, null_candidates=false[4:])
    assert result.order.tolist() == [4, 0, 1, 2, 3]
    assert len(result.null_inliers) == 8 and 10 <= np.median(result.null_inliers) <= 13
    assert result.inliers[4] > result.level > result.inliers[:4].max()
    # the same shortlist judged against a null of pairs without shared features: the false candidates'
    # 12 inliers are now significant too; they and the true match move up in global order
    null = [random_features(rng) for _ in range(8)]
    loose = rerank_shortlist(query, candidates, g, config, null_candidates=null)
    assert loose.level < 12 and loose.order.tolist() == [0, 1, 2, 3, 4]
    # no null images: the null is the far half of the shortlist; of 5 candidates, 3 counts are too few to
    # judge by, so nothing moves; of 10 (the true match last), 5 false ones make the null
    alone = rerank_shortlist(query, candidates, g, config)
    assert alone.null_inliers.tolist() == alone.inliers[2:].tolist() and alone.order.tolist() == [
        0,
        1,
        2,
        3,
        4,
    ]
    longer = rerank_shortlist(query, [*false[:9], true], np.linspace(0.9, 0.5, 10), config)
    assert longer.null_inliers.tolist() == longer.inliers[5:].tolist() and longer.order[0] == 9
    # no local features for the query: nothing verified, the global order stays
    assert rerank_shortlist(None, candidates, g, config).order.tolist() == [0, 1, 2, 3, 4]


SHORTLIST = ["f0", "f1", "f2", "true"]  # the true match last; the other 27 false images: the null's pool
SEARCH_SCORES = [0.9, 0.8, 0.7, 0.6]


@pytest.fixture(scope="module")
def gate_stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, dict]:
    """Query and index stores (one query, 31 index images: false pairs sharing 12 features, one true) and
    search results listing SHORTLIST for the query."""
    tmp_path = tmp_path_factory.mktemp("gate")
    rng = np.random.default_rng(5)
    query, false, true = _query_with_false_pairs(rng, 12, 30)
    index = {f"f{i}": f for i, f in enumerate(false)} | {"true": true}
    ones = np.ones(300, np.float32)

    def write(url: str, features: dict) -> None:
        local = [store.LocalFeatures(f.keypoints, ones, ones, f.descriptors) for f in features.values()]
        vectors = rng.normal(size=(len(features), 4)).astype(np.float32)
        store.write_shard(url, 0, list(features), vectors, local)

    write(str(tmp_path / "q"), {"q": query})
    write(str(tmp_path / "i"), index)
    schema = pa.schema(
        [("query_id", pa.string()), ("rank", pa.int32()), ("id", pa.string()), ("score", pa.float32())]
    )
    search = {"query_id": ["q"] * 4, "rank": [1, 2, 3, 4], "id": SHORTLIST, "score": SEARCH_SCORES}
    pq.write_table(pa.table(search).cast(schema), tmp_path / "search.parquet")
    return tmp_path, query, index


GATE = RerankConfig(score="gate", trials=300, null_size=10, device="cpu")


def test_rerank_stage_gate_uses_a_null_sample_outside_the_shortlist(gate_stores) -> None:
    tmp_path, query, index = gate_stores
    urls = [str(tmp_path / n) for n in ("search.parquet", "q", "i", "o.parquet")]
    summary = rerank(*urls, GATE)
    out = pq.read_table(tmp_path / "o.parquet").filter(pc.equal(pc.field("query_id"), "q")).to_pydict()
    assert out["id"] == ["true", "f0", "f1", "f2"] and summary.pairs_verified == 4
    # the same as re-ranking the shortlist by hand against the sample's images outside it
    sample = [index[i] for i in null_sample(index, 10, GATE.seed) if i not in SHORTLIST]
    direct = rerank_shortlist(query, [index[i] for i in SHORTLIST], np.array(SEARCH_SCORES), GATE, sample)
    assert [SHORTLIST[p] for p in direct.order] == out["id"]
    assert out["inliers"] == direct.inliers[direct.order].tolist()


def test_explain_shows_global_score_inliers_null_level_and_position(gate_stores) -> None:
    tmp_path, query, index = gate_stores
    urls = [str(tmp_path / n) for n in ("search.parquet", "q", "i")]
    explained = explain_query(*urls, "q", GATE)
    sample = [index[i] for i in null_sample(index, 10, GATE.seed) if i not in SHORTLIST]
    direct = rerank_shortlist(query, [index[i] for i in SHORTLIST], np.array(SEARCH_SCORES), GATE, sample)
    assert explained.level == direct.level and explained.null_inliers.tolist() == direct.null_inliers.tolist()
    assert [(c.id, c.global_rank, c.rank) for c in explained.candidates] == [
        ("f0", 1, 2),
        ("f1", 2, 3),
        ("f2", 3, 4),
        ("true", 4, 1),
    ]
    assert [c.inliers for c in explained.candidates] == direct.inliers.tolist()
    assert [c.global_score for c in explained.candidates] == pytest.approx(SEARCH_SCORES)
    with pytest.raises(ValueError, match="query 'nope' is not in"):  # the CLI's one-line error, exit 2
        explain_query(*urls, "nope", GATE)
    # the CLI prints it (and writes nothing)
    flags = ["--score", "gate", "--trials", "300", "--null-size", "10", "--device", "cpu"]
    shown = cli("rerank", *urls, str(tmp_path / "unused.parquet"), *flags, "--explain", "q").stdout
    assert f"null level {direct.level:.1f}" in shown
    rows = [line.split("│")[1:-1] for line in shown.splitlines() if line.startswith("│")]
    cells = [[cell.strip() for cell in row] for row in rows]
    true_row = next(row for row in cells if row[1] == "true")
    assert true_row == ["4", "true", "0.6000", str(direct.inliers[3]), f"{direct.level:.1f}", "above", "1"]
    assert next(row for row in cells if row[1] == "f0")[5:] == ["below", "2"]
    assert not (tmp_path / "unused.parquet").exists()
