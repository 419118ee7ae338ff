"""The answer side at scale: re-ranking as committed parts on the execution seam (in process and on Ray),
resumed after a driver crash, completed after a worker is killed, identical everywhere."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import results, store
from pipeline.execution import InProcessExecutor, RayExecutor, Workers, executor_for
from pipeline.rerank import RerankConfig, RerankRun, rerank
from pipeline.store import LocalFeatures
from tests.raynodes import own_ray_workers

if TYPE_CHECKING:
    from pipeline.index import SearchSummary

CONFIG = RerankConfig(top=5, trials=64, queries_per_batch=2)
QUERIES, CANDIDATES, FEATURES = 6, 5, 60


def _features(rng: np.random.Generator, keypoints: np.ndarray | None = None) -> LocalFeatures:
    desc = rng.standard_normal((FEATURES, 128)).astype(np.float32)
    points = rng.uniform(0, 400, (FEATURES, 2)) if keypoints is None else keypoints
    ones = np.ones(FEATURES, np.float32)
    return LocalFeatures(points.astype(np.float32), ones, ones, desc / np.linalg.norm(desc, axis=1)[:, None])


def _moved(rng: np.random.Generator, query: LocalFeatures, shared: int) -> LocalFeatures:
    """An image sharing ``shared`` of the query's features, shifted and slightly noisy: inliers to find."""
    other = _features(rng)
    other.keypoints[:shared] = (
        query.keypoints[:shared] + np.float32([30, -12]) + rng.normal(0, 0.5, (shared, 2))
    )
    noisy = query.descriptors[:shared] + rng.normal(0, 0.02, (shared, 128)).astype(np.float32)
    other.descriptors[:shared] = noisy / np.linalg.norm(noisy, axis=1)[:, None]
    return other


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Stores and search results: each query's candidates share 0–40 features with it; one candidate of
    each odd query is missing from the index store; one query has no features at all."""
    tmp, rng = tmp_path_factory.mktemp("answers"), np.random.default_rng(24)
    queries = {f"q{i}": _features(rng) for i in range(QUERIES)}
    index, rows = {}, []
    for q, (query_id, query) in enumerate(queries.items()):
        for c in range(CANDIDATES):
            image_id = f"{query_id}-c{c}"
            if not (q % 2 and c == 1):
                index[image_id] = _moved(rng, query, shared=8 * ((c + q) % CANDIDATES))
            rows.append((query_id, c + 1, image_id, 0.9 - 0.1 * c))
    rows += [("q-none", 1, "q0-c0", 0.5)]  # a query without local features
    urls = {"q": str(tmp / "q"), "i": str(tmp / "i"), "search": str(tmp / "search.parquet")}
    store.write_shard(urls["q"], 0, list(queries), np.zeros((QUERIES, 4), np.float32), list(queries.values()))
    items = list(index.items())
    for shard, start in enumerate(range(0, len(items), 10)):  # several shards: reads cross files
        part = items[start : start + 10]
        ids, local = [k for k, _ in part], [v for _, v in part]
        store.write_shard(urls["i"], shard, ids, np.zeros((len(ids), 4), np.float32), local)
    columns = list(zip(*rows, strict=True))
    search = {"query_id": columns[0], "rank": pa.array(columns[1], pa.int32()), "id": columns[2]}
    pq.write_table(pa.table({**search, "score": pa.array(columns[3], pa.float32())}), urls["search"])
    return urls


def _run(inputs: dict[str, str], out: Path, **kwargs) -> tuple:
    summary = rerank(inputs["search"], inputs["q"], inputs["i"], str(out), CONFIG, **kwargs)
    return summary, _rows(str(out))


def _rows(url: str) -> list[tuple]:
    """(query, rank, id, score, inliers) of every row, in (query, rank) order."""
    hits = results.read_hits(url, limit=1000)
    return [(q, r, h.id, h.score, h.inliers) for q in sorted(hits) for r, h in enumerate(hits[q], 1)]


@pytest.fixture(scope="module")
def reference(inputs: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The single-process run in one part: what every other way of running must give."""
    out = tmp_path_factory.mktemp("reference") / "reranked.parquet"
    return _run(inputs, out, run=RerankRun(queries_per_part=1000))


def test_reference_counts_and_finds_the_planted_matches(reference: tuple) -> None:
    summary, rows = reference
    assert summary.queries == QUERIES + 1 and summary.queries_without_features == 1
    assert summary.candidates_without_features == QUERIES // 2  # one per odd query, counted as before
    assert summary.pairs_verified == QUERIES * CANDIDATES - QUERIES // 2
    assert summary.bytes_read <= 1.5 * summary.bytes_wanted + 4 * 4096  # + the shards' footers, once each
    best = {q: i for q, rank, i, _, inliers in rows if rank == 1}
    assert best["q0"] == "q0-c4" and best["q1"] == "q1-c3"  # the most shared features win


def test_parts_resume_after_a_driver_crash_without_loss_or_duplicates(
    inputs: dict, reference: tuple, tmp_path
):
    out = tmp_path / "reranked.parquet"
    run = RerankRun(queries_per_part=2)

    def crash(progress) -> None:
        if progress.done >= 4:
            raise RuntimeError("injected driver crash")

    with pytest.raises(RuntimeError, match="injected"):
        _run(inputs, out, run=run, on_progress=crash)
    assert sorted(results.read_part_commits(str(out))) == [0, 1]
    (out / "part-00002.parquet").write_bytes(b"a data file whose marker was never written")
    summary, rows = _run(inputs, out, run=run)
    assert summary.parts_resumed == 2
    assert rows == reference[1]  # same order, scores and inlier counts; every query once
    assert (summary.pairs_verified, summary.candidates_without_features) == (
        reference[0].pairs_verified,
        reference[0].candidates_without_features,
    )
    again, _ = _run(inputs, out, run=run)  # all committed: nothing redone
    assert again.parts_resumed == 4 and again.bytes_read == 0
    changed, _ = _run(inputs, out, run=RerankRun(queries_per_part=3))  # other parts: starts over
    assert changed.parts_resumed == 0 and _rows(str(out)) == reference[1]


def test_in_process_executor_sets_up_once_and_keeps_order() -> None:
    batches = [(k, list(range(k, k + 3))) for k in range(5)]
    seen: list[tuple[int, list[int]]] = []
    InProcessExecutor().run(_Squares(), batches, lambda k, r: seen.append((k, r)))
    assert seen == [(k, [x * x for x in b]) for k, b in batches]
    assert isinstance(executor_for(Workers()), InProcessExecutor)
    assert isinstance(executor_for(Workers(max_workers=2)), RayExecutor)
    with pytest.raises(ValueError, match="max_workers"):
        Workers(min_workers=3, max_workers=2)


class _Squares:
    setups = 0

    def setup(self) -> None:
        _Squares.setups += 1
        assert _Squares.setups == 1

    def __call__(self, batch: list[int]) -> list[int]:
        return [x * x for x in batch]


def test_two_ray_workers_with_one_killed_give_the_single_process_result(
    ray_cluster: str, inputs: dict, reference: tuple, tmp_path: Path
) -> None:
    killed: list[int] = []

    def kill_a_worker(progress) -> None:
        if killed:
            return
        workers = own_ray_workers("_WorkerActor")
        assert workers and progress.done < progress.total  # batches are still to come
        workers[0].send_signal(signal.SIGKILL)
        killed.append(workers[0].pid)

    run = RerankRun(workers=Workers(min_workers=2), queries_per_part=1)
    summary, rows = _run(inputs, tmp_path / "reranked.parquet", run=run, on_progress=kill_a_worker)
    assert killed and rows == reference[1]
    counted = ("queries", "pairs_verified", "queries_without_features", "candidates_without_features")
    assert [getattr(summary, k) for k in counted] == [getattr(reference[0], k) for k in counted]


# ---------------------------------------------------------------------------------------------- search


DISTINCT, COPIES, DIM = (
    60,
    3,
    16,
)  # every vector stored three times, far apart in id order: ties across shards


def _search_store(url: str, ids: list[str], vectors: np.ndarray, shards: int = 1) -> None:
    """A store of global descriptors only (their images have no local features)."""
    none = np.zeros((0, 2), np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32)
    empty = LocalFeatures(*none, np.zeros((0, 128), np.float32))
    for shard, rows in enumerate(np.array_split(np.arange(len(ids)), shards)):
        store.write_shard(url, shard, [ids[r] for r in rows], vectors[rows], [empty] * len(rows))


@pytest.fixture(scope="module", params=["IVF4,Flat", "IDMap2,Flat"])
def tied_index(request, ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An index whose images come in three identical copies (ids i, i + 60, i + 120) and a query store of
    noisy copies of them: every query's best hits tie in threes, one in each of three id-range shards."""
    from pipeline.index import BuildConfig, QualityConfig, build_index

    tmp, rng = tmp_path_factory.mktemp("search"), np.random.default_rng(7)
    base = rng.standard_normal((DISTINCT, DIM)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    vectors = np.tile(base, (COPIES, 1))
    urls = {"db": str(tmp / "db"), "index": str(tmp / "index"), "q": str(tmp / "q")}
    _search_store(urls["db"], [f"db{i:04d}" for i in range(len(vectors))], vectors, shards=3)
    quality = QualityConfig(queries=20, max_nprobe=4, target=0.5, target_r1=0.5)
    build_index(
        urls["db"], urls["index"], factory=request.param, config=BuildConfig(tasks=2, quality=quality)
    )
    queries = base[:24] + 0.05 * rng.standard_normal((24, DIM)).astype(np.float32)
    _search_store(urls["q"], [f"q{i:02d}" for i in range(24)], queries)
    return urls


def _search(urls: dict[str, str], out: Path, **kwargs) -> tuple[SearchSummary, pa.Table]:
    from pipeline.index import SearchConfig, search

    config = SearchConfig(**{"k": 4, "nprobe": 4, "batch_size": 5, **kwargs.pop("config", {})})
    summary = search(urls["index"], urls["q"], str(out), config, **kwargs)
    return summary, results.read_columns(str(out), results.RESULTS_SCHEMA.names)


def test_search_resumes_after_a_driver_crash_and_redoes_only_unfinished_batches(tied_index, tmp_path) -> None:
    _, reference = _search(tied_index, tmp_path / "reference")
    out = tmp_path / "search.parquet"

    def crash(progress) -> None:
        if progress.done >= 10:
            raise RuntimeError("injected driver crash")

    with pytest.raises(RuntimeError, match="injected"):
        _search(tied_index, out, on_progress=crash)
    assert sorted(results.read_part_commits(str(out))) == [0, 1]
    (out / "part-00002.parquet").write_bytes(b"a data file whose marker was never written")
    redone: list[int] = []
    summary, table = _search(tied_index, out, on_progress=lambda p: redone.append(p.done))
    assert summary.parts_resumed == 2 and redone == [15, 20, 24]  # parts 2, 3 and 4 (4 queries)
    assert table.equals(reference) and table.num_rows == 24 * 4  # every query once, in (query, rank) order
    assert results.read_rankings(str(out)).keys() == {f"q{i:02d}" for i in range(24)}
    again, _ = _search(tied_index, out)
    assert again.parts_resumed == 5
    _, other = _search(tied_index, out, config={"k": 2})  # other settings: starts over
    assert other.num_rows == 24 * 2


def test_sharded_search_merges_exactly_with_ties_ordered_by_id(tied_index, tmp_path) -> None:
    from pipeline.index import io
    from pipeline.index.search import shard_ranges

    id_keys, _ = io.read_id_map(tied_index["index"])
    assert shard_ranges(id_keys, 3) == [(0, 60), (60, 120), (120, 180)]  # one copy of each vector per shard
    for k in (2, 4):  # the cut inside the first tie group, then inside the second
        _, single = _search(tied_index, tmp_path / f"single{k}", config={"k": k})
        _, sharded = _search(tied_index, tmp_path / f"sharded{k}", config={"k": k, "shards": 3})
        assert sharded.equals(single)
        rows = single.to_pylist()
        for query in range(24):
            hits = [r["id"] for r in rows if r["query_id"] == f"q{query:02d}"]
            copies = [f"db{query + c * DISTINCT:04d}" for c in range(COPIES)]  # tied: lowest id first
            assert hits[:COPIES] == copies[:k]
    with pytest.raises(ValueError, match="shards=999"):
        shard_ranges(id_keys, 999)


TWO_NODE_DRIVER = """
import sys
from pipeline.execution import Workers
from pipeline.index import SearchConfig, search
from pipeline.index.dba import build_dba
from pipeline.rerank import RerankRun, rerank
from tests.test_answers import CONFIG

address, index, queries, db, searched, rerank_search, rerank_q, rerank_i, reranked = sys.argv[1:]
workers = Workers(address=address, min_workers=2)  # one CPU each: one on each node
sharded = SearchConfig(k=4, nprobe=4, batch_size=5, shards=2)  # one worker per shard: a shard on each node
search(index, queries, searched, sharded, workers=Workers(address=address))
build_dba(index, [db], 3, 3.0, workers=workers)
rerank(rerank_search, rerank_q, rerank_i, reranked, CONFIG, run=RerankRun(workers, queries_per_part=1))
"""


@pytest.mark.parametrize("tied_index", ["IVF4,Flat"], indirect=True)
def test_search_dba_and_rerank_on_a_two_node_cluster_equal_one_process(
    tied_index: dict, inputs: dict, reference: tuple, tmp_path: Path
) -> None:
    """A real second node joins by `ray start`; the driver (a process of its own) runs the three stages with a
    worker on each node (search: two shards, one on each node): their outputs equal the single-process
    (unsharded) ones."""
    import shutil
    import subprocess
    import sys

    from pipeline.index.dba import build_dba, read_dba
    from tests.raynodes import RayNodes

    here, there = (shutil.copytree(tied_index["index"], tmp_path / name) for name in ("here", "there"))
    _, searched = _search(tied_index, tmp_path / "searched-here")
    build_dba(str(here), [tied_index["db"]], 3, 3.0)
    nodes = RayNodes()
    try:
        address = nodes.start_head("--num-cpus=1", "--num-gpus=0", "--include-dashboard=false")
        nodes.add_node("--num-cpus=1", "--num-gpus=0")
        paths = [str(there), tied_index["q"], tied_index["db"], str(tmp_path / "searched")]
        paths += [inputs["search"], inputs["q"], inputs["i"], str(tmp_path / "reranked")]
        driver = subprocess.run(
            [sys.executable, "-c", TWO_NODE_DRIVER, address, *paths],
            capture_output=True,
            text=True,
            timeout=300,
            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        )
    finally:
        nodes.stop()
    assert driver.returncode == 0, driver.stderr[-3000:]
    assert results.read_columns(paths[3], results.RESULTS_SCHEMA.names).equals(searched)
    ours, theirs = read_dba(str(here)), read_dba(str(there))
    np.testing.assert_array_equal(theirs.neighbours, ours.neighbours)
    np.testing.assert_array_equal(theirs.refined, ours.refined)
    assert _rows(paths[-1]) == reference[1]
