"""The distributed FAISS index: equivalence with a single-process build, ids, sampling, parameters, quality,
incremental updates and search output. Small data (5k × 64-d, IVF64,PQ8np) and one local Ray per module."""

from __future__ import annotations

import json
import math
import os
import tracemalloc
from dataclasses import asdict, replace
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import store
from pipeline.errors import ConfigError
from pipeline.execution import Workers
from pipeline.index import (
    BuildConfig,
    IndexAddSummary,
    IndexRemoveSummary,
    QualityConfig,
    SearchConfig,
    add_shards,
    build_index,
    choose_index,
    io,
    new_shards,
    parse_size,
    quality_report,
    recall_at,
    refine,
    remove_ids,
    search,
)
from pipeline.index.add import faiss_threads
from pipeline.index.build import (
    draw_samples,
    memory_request,
    merge_in_ram,
    part_urls,
    resolve_choice,
    run_step,
    sample_rows,
    shard_rows,
    step_memory_bytes,
    train,
    train_size,
    train_step,
)
from pipeline.index.params import HNSW_QUANTIZER_FROM, MIN_POINTS_PER_LIST, choose_nlist
from pipeline.index.quality import drop_self, exact_knn
from pipeline.index.search import keep_ids
from pipeline.results import RESULTS_SCHEMA

N, DIM, SHARDS = 5000, 64, 4
FACTORY = "IVF64,PQ8np"
FAST = BuildConfig(tasks=3, keep_intermediate=True, quality=QualityConfig(queries=100, max_nprobe=64))


@pytest.fixture(autouse=True)
def local_ray(ray_cluster):
    """Builds that test distribution run their steps on the session's real local Ray; builds that test the
    index's logic run in process (``in_process=True``), through the same steps."""


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """(n, dim) L2-normalised vectors around 50 centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, dim))
    x = centres[rng.integers(0, 50, n)] + 0.5 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_store(
    url: str, vectors: np.ndarray, image_ids: list[str], shards: int, first_shard: int = 0
) -> None:
    empty = store.LocalFeatures(
        np.zeros((0, 2), np.float32),
        np.zeros(0, np.float32),
        np.zeros(0, np.float32),
        np.zeros((0, 128), np.float32),
    )
    for shard, rows in enumerate(np.array_split(np.arange(len(vectors)), shards), start=first_shard):
        store.write_shard(url, shard, [image_ids[r] for r in rows], vectors[rows], [empty] * len(rows))


def image_names(n: int) -> list[str]:
    return [f"img{i:06d}" for i in range(n)]  # sorted = row order (write_shard sorts ids within a shard)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    # float16 round trip: the store keeps float16, so references must use the stored values
    return clustered(N, DIM).astype(np.float16).astype(np.float32)


@pytest.fixture(scope="module")
def built(tmp_path_factory, data) -> tuple[str, str, dict]:
    root = tmp_path_factory.mktemp("built")
    store_url, out = str(root / "store"), str(root / "index")
    write_store(store_url, data, image_names(N), SHARDS)
    return store_url, out, build_index(store_url, out, factory=FACTORY, config=FAST)


def invlist_contents(index: faiss.Index) -> dict[int, tuple[int, bytes]]:
    """id → (list number, PQ code) over all inverted lists: what a merge must preserve exactly."""
    ivf = faiss.extract_index_ivf(index)
    out = {}
    for lst in range(ivf.nlist):
        size = ivf.invlists.list_size(lst)
        ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), size).copy()
        codes = faiss.rev_swig_ptr(ivf.invlists.get_codes(lst), size * ivf.code_size).copy()
        for j, i in enumerate(ids):
            assert i not in out, f"id {i} stored twice"
            out[int(i)] = (lst, codes[j * ivf.code_size : (j + 1) * ivf.code_size].tobytes())
    return out


def single_process(out: str, vectors: np.ndarray) -> faiss.Index:
    index = io.read_index(os.path.join(out, io.TRAINED))
    index.add_with_ids(vectors, np.arange(len(vectors), dtype=np.int64))
    return index


def test_in_process_build_gives_the_ray_build_s_index(built, data, tmp_path):
    """The same steps without Ray (the execution seam's in-process executor): the same trained index, the
    same inverted lists, the same search setting."""
    store_url, out, summary = built
    with faiss_threads(2):  # conftest.py's OMP_NUM_THREADS, whatever ran before; the add tasks use 1
        here = build_index(store_url, str(tmp_path / "here"), factory=FACTORY, config=FAST, in_process=True)
        # The build leaves this process's OpenMP threads as they were, torch's included (one runtime): it once
        # left 1, and a later test's torch (test_train's calibrated weights) then summed in another order.
        assert (faiss.omp_get_max_threads(), torch.get_num_threads()) == (2, 2)
    assert invlist_contents(io.load_index(str(tmp_path / "here"))) == invlist_contents(io.load_index(out))
    assert here.choice.factory == summary.choice.factory
    same = ("ntotal", "next_id", "train_points", "nprobe", "k_factor")
    assert {k: getattr(here, k) for k in same} == {k: getattr(summary, k) for k in same}


def test_distributed_build_equals_single_process(built, data):
    _, out, summary = built
    merged = io.load_index(out)
    reference = single_process(out, data)
    assert summary.ntotal == merged.ntotal == N
    assert invlist_contents(merged) == invlist_contents(reference)
    for index in (merged, reference):
        io.set_search_params(index, 8)
    d1, i1 = merged.search(data[:200], 20)
    d2, i2 = reference.search(data[:200], 20)
    np.testing.assert_array_equal(d1, d2)
    np.testing.assert_array_equal(np.sort(i1, axis=1), np.sort(i2, axis=1))
    id_keys, image_ids = io.read_id_map(out)
    np.testing.assert_array_equal(id_keys, np.arange(N))
    assert list(image_ids) == image_names(N)


def test_merge_keeps_ids_whatever_the_part_order(built):
    """Tasks hold non-contiguous shards (task 0: shards 0 and 3); merging must not shift or renumber ids."""
    _, out, _ = built
    parts = [part_urls(out, t)[0] for t in range(3)]
    part0 = pq.read_table(part_urls(out, 0)[1]).column("id").to_numpy()
    bounds = np.cumsum([0, *shard_rows(store.global_shard_urls(built[0]))])
    np.testing.assert_array_equal(part0, np.r_[bounds[0] : bounds[1], bounds[3] : bounds[4]])
    forward = merge_in_ram(io.read_index(os.path.join(out, io.TRAINED)), parts)
    backward = merge_in_ram(io.read_index(os.path.join(out, io.TRAINED)), parts[::-1])
    assert invlist_contents(forward) == invlist_contents(backward) == invlist_contents(io.load_index(out))


def test_training_sample_is_random_across_shards(built, data):
    store_url, _, _ = built
    urls = store.global_shard_urls(store_url)
    counts = shard_rows(urls)
    train, queries = draw_samples(N, 500, 100, seed=0)
    assert len(set(train)) == 500 and not set(train) & set(queries)
    assert not np.array_equal(train, np.arange(500))
    assert all(
        np.any((train >= lo) & (train < lo + c))
        for lo, c in zip(np.cumsum([0, *counts])[:-1], counts, strict=True)
    )
    np.testing.assert_array_equal(draw_samples(N, 500, 100, seed=0)[0], train)
    assert not np.array_equal(draw_samples(N, 500, 100, seed=1)[0], train)
    np.testing.assert_array_equal(sample_rows(urls, counts, train), data[train])


def test_training_sample_is_held_once(tmp_path):
    """The sample is filled into one array shard by shard: gathering per-shard parts and concatenating them
    held it twice (a 16 GB peak for a 1M × 2048 sample). tracemalloc sees numpy's allocations."""
    vectors = clustered(8000, DIM).astype(np.float16).astype(np.float32)
    write_store(str(tmp_path), vectors, image_names(len(vectors)), shards=16)
    urls = store.global_shard_urls(str(tmp_path))
    counts, rows = shard_rows(urls), np.arange(len(vectors))
    tracemalloc.start()
    try:
        sample = sample_rows(urls, counts, rows)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(sample, vectors)
    assert peak < 1.5 * sample.nbytes, (peak, sample.nbytes)


def test_build_trains_on_the_drawn_sample(built, data):
    """faiss training is deterministic, so the stored trained index pins down which rows it saw."""
    _, out, summary = built
    rows, _ = draw_samples(N, summary.train_points, 100, seed=0)
    sample = data[rows[: len(rows) // 2]]  # a different sample must give a different trained index
    expected = io.index_to_bytes(train(FACTORY, data[rows], DIM))
    assert Path(out, io.TRAINED).read_bytes() == expected != io.index_to_bytes(train(FACTORY, sample, DIM))


def test_training_as_a_ray_task_equals_training_in_process(tmp_path, built):
    """build_index trains in a Ray task (memory request, off the driver); the same step in this process must
    write byte-identical trained and refinement indexes."""
    store_url, out, summary = built
    urls = store.global_shard_urls(store_url)
    choice = resolve_choice(FACTORY, None, N, DIM, FAST.refine)
    assert choice.refine == summary.choice.refine != "none"
    n_train, _ = train_step(choice, urls, shard_rows(urls), str(tmp_path), FAST, None)
    assert n_train == summary.train_points > 0
    for name in (io.TRAINED, refine.QUANTIZER):
        assert Path(tmp_path, name).read_bytes() == Path(out, name).read_bytes(), name


def test_memory_request_never_exceeds_the_largest_node():
    """Otherwise a large estimate on a small (local) Ray waits forever for a node that cannot exist."""
    import ray

    largest = max(n["Resources"]["memory"] for n in ray.nodes() if n["Alive"])
    assert memory_request(2**20) == 2**20
    assert memory_request(10**15) == int(largest) < 10**15


def test_build_steps_use_a_whole_node_unless_told():
    """k-means and the merge are serial steps: by default they get every CPU of the largest node (as a
    single-process faiss build gets every core), or exactly the CPUs asked for."""
    import ray

    cores = int(max(n["Resources"]["CPU"] for n in ray.nodes() if n["Alive"]))
    assert run_step(faiss.omp_get_max_threads, 2**20, None, 0) == cores
    assert run_step(faiss.omp_get_max_threads, 2**20, 1, 0) == 1


def test_step_memory_request_is_the_held_data_with_headroom():
    # 1000 float32 vectors of 64 dims = 256,000 B, plus a 10,000 B index, twice, plus the 512 MiB worker base
    assert step_memory_bytes(1000, 64, 10_000) == 2 * (256_000 + 10_000) + 512 * 2**20 == 537_402_912
    assert step_memory_bytes(0, 2048) == 512 * 2**20


@pytest.mark.parametrize("n", [250_000, 1_000_000, 100_000_000])
def test_auto_params_nlist_and_quantizer(n):
    choice = choose_index(n, 2048)
    assert 4 * math.sqrt(n) <= choice.nlist <= 16 * math.sqrt(n) and choice.nlist & (choice.nlist - 1) == 0
    assert ("HNSW" in choice.factory) == (choice.nlist >= HNSW_QUANTIZER_FROM)
    assert f"nlist={choice.nlist}" in choice.reason and "PCAR" in choice.reason
    index = faiss.index_factory(2048, choice.factory, faiss.METRIC_INNER_PRODUCT)
    assert faiss.extract_index_ivf(index).nlist == choice.nlist


@pytest.mark.parametrize("budget", ["40MB", "100MB", "1GiB", "8GB"])
def test_auto_params_honour_the_budget(budget):
    choice = choose_index(1_000_000, 2048, parse_size(budget))
    assert choice.estimated_bytes <= parse_size(budget)
    assert str(parse_size(budget)) in choice.reason
    index = faiss.index_factory(2048, choice.factory, faiss.METRIC_INNER_PRODUCT)
    assert faiss.extract_index_ivf(index).code_size == choice.code_bytes
    bigger = choose_index(1_000_000, 2048, 2 * parse_size(budget))
    exactness = ["store", "sq8", "fp16"]  # a larger budget never gets a coarser refinement
    assert exactness.index(bigger.refine) >= exactness.index(choice.refine)
    if bigger.refine == choice.refine:
        assert bigger.code_bytes >= choice.code_bytes


@pytest.mark.parametrize(
    ("budget", "refine_kind", "pq"), [("8GB", "fp16", 64), ("3GB", "sq8", 64), ("1GiB", "store", 256)]
)
def test_refinement_tier_follows_the_budget(budget, refine_kind, pq):
    """1M × 2048: fp16 codes take 4.1 GB, SQ8 2.1 GB (+10 % slack); below that the vectors stay on disk."""
    choice = choose_index(1_000_000, 2048, parse_size(budget))
    assert (choice.refine, choice.code_bytes) == (
        refine_kind,
        pq,
    ) and f"refine={refine_kind}" in choice.reason
    assert choose_index(1_000_000, 2048).refine == "fp16"  # no budget: the default
    assert choose_index(1_000_000, 2048, refine="none").refine == "none"


def test_auto_nlist_keeps_39_points_per_list_below_the_sqrt_range():
    """At 20k no power of 2 in [4√N, 16√N] = [566, 2263] gets 39 points per list: the floor wins (512)."""
    choice = choose_index(20_000, 2048)
    assert choice.nlist == 512 and "no power of 2" in choice.reason
    assert train_size(choice.factory, 20_000, 2048, BuildConfig()) >= MIN_POINTS_PER_LIST * choice.nlist
    for n in (9_984, 15_000, 20_000, 24_335, 24_336, 50_000, 10**6, 10**8):
        nlist = choose_nlist(n)
        assert nlist & (nlist - 1) == 0 and n >= MIN_POINTS_PER_LIST * nlist
        assert 2 * nlist > 16 * math.sqrt(n) or n < MIN_POINTS_PER_LIST * 2 * nlist  # the largest allowed


def test_auto_params_tiny_and_impossible():
    tiny = choose_index(500, 64)
    assert tiny.factory == "IDMap2,Flat" and tiny.nlist == 0 and "exact" in tiny.reason
    with pytest.raises(ValueError, match="memory budget"):
        choose_index(1_000_000, 2048, parse_size("1MB"))
    assert parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size("512k") == 512_000 and parse_size(7) == 7
    for bad in ["", "12 parsecs", "-3GB", "0", 0]:
        with pytest.raises(ValueError, match=r"(size|memory budget) .*(expected a number|must be > 0)"):
            parse_size(bad)


def test_flat_index_reports_perfect_recall(tmp_path):
    vectors = clustered(300, 32, seed=3).astype(np.float16).astype(np.float32)
    write_store(str(tmp_path / "s"), vectors, image_names(300), 2)
    summary = build_index(str(tmp_path / "s"), str(tmp_path / "i"), config=FAST, in_process=True)
    assert (
        summary.choice.factory == "IDMap2,Flat"
        and "exact" in summary.choice.reason
        and summary.nprobe is None
    )
    [row] = json.loads((tmp_path / "i" / io.QUALITY).read_text())["rows"]
    assert row["1-recall@1"] == row["10-recall@10"] == row["100-recall@100"] == 1.0


def leave_one_out(ranked: np.ndarray, query_rows: np.ndarray, k: int) -> np.ndarray:
    """The first k ids of each row of ``ranked`` once that row's query id is taken out (a plain loop)."""
    return np.array([[i for i in row if i != q][:k] for row, q in zip(ranked, query_rows, strict=True)])


def test_recall_values_match_an_independent_computation(built, data):
    """Leave-one-out: quality.json's figures are recall against exact search with each query's own id taken
    out of both rankings."""
    _, out, _ = built
    quality = json.loads(Path(out, io.QUALITY).read_text())
    assert quality["leave_one_out"] and quality["query_set"].startswith("leave-one-out: 100 stored vectors")
    _, query_rows = draw_samples(N, N, 100, seed=0)  # FAST trains on all 5000 rows (≤ 256 × 256 points)
    ranked = np.argsort(-(data[query_rows] @ data.T), axis=1, kind="stable")[:, :101]  # (q, 101)
    exact = leave_one_out(ranked, query_rows, 100)
    index = io.load_index(out)
    for row in (r for r in quality["rows"] if r["k_factor"] is None):
        io.set_search_params(index, row["nprobe"])
        approx = leave_one_out(index.search(data[query_rows], 101)[1], query_rows, 100)
        for k in (1, 10, 100):
            hits = (
                np.mean([len(np.intersect1d(a[:k], e[:k])) for a, e in zip(approx, exact, strict=True)]) / k
            )
            assert row[f"{k}-recall@{k}"] == pytest.approx(hits, abs=1e-9)
    base_rows = [r for r in quality["rows"] if r["k_factor"] is None]
    recalls = [r["100-recall@100"] for r in base_rows]
    assert [r["nprobe"] for r in base_rows] == [1, 2, 4, 8, 16, 32, 64]
    assert recalls[-1] > recalls[0]
    assert recall_at(np.array([[3, 1, -1]]), np.array([[1, 2, 3]]), 3) == pytest.approx(2 / 3)


def test_incremental_add_equals_building_with_all(tmp_path, data, built):
    names = image_names(N)
    cut = 3 * N // 4
    write_store(str(tmp_path / "old"), data[:cut], names[:cut], 3)
    write_store(str(tmp_path / "new"), data[cut:], names[cut:], 1, first_shard=3)
    trained = os.path.join(built[1], io.TRAINED)
    config = BuildConfig(tasks=2, trained_url=trained, quality=QualityConfig(queries=20, max_nprobe=4))
    build_index(str(tmp_path / "old"), str(tmp_path / "inc"), factory=FACTORY, config=config, in_process=True)
    new = store.global_shard_urls(str(tmp_path / "new"))
    assert new_shards(str(tmp_path / "inc"), str(tmp_path / "new")) == new
    assert add_shards(str(tmp_path / "inc"), new) == IndexAddSummary(added=N - cut, ntotal=N)
    assert new_shards(str(tmp_path / "inc"), str(tmp_path / "new")) == []
    incremental, full = io.load_index(str(tmp_path / "inc")), io.load_index(built[1])
    assert invlist_contents(incremental) == invlist_contents(full)
    for a, b in zip(io.read_id_map(str(tmp_path / "inc")), io.read_id_map(built[1]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert io.read_params(str(tmp_path / "inc"))["next_id"] == N
    with pytest.raises(ValueError, match="already in the index"):
        add_shards(str(tmp_path / "inc"), new)


def test_remove_ids_removes_exactly_those(tmp_path, data, built):
    out = str(tmp_path / "idx")
    build_index(
        built[0],
        out,
        factory=FACTORY,
        config=BuildConfig(
            tasks=2,
            trained_url=os.path.join(built[1], io.TRAINED),
            quality=QualityConfig(queries=20, max_nprobe=4),
        ),
        in_process=True,
    )
    before = invlist_contents(io.load_index(out))
    gone = ["img000007", "img002500", "img004999"]
    assert remove_ids(out, gone) == IndexRemoveSummary(removed=3, ntotal=N - 3)
    after = invlist_contents(io.load_index(out))
    assert after == {i: v for i, v in before.items() if i not in (7, 2500, 4999)}
    id_keys, image_ids = io.read_id_map(out)
    assert set(image_ids) == set(image_names(N)) - set(gone) and 2500 not in id_keys
    with pytest.raises(ValueError, match="not in the index"):
        remove_ids(out, ["img000007"])


def test_search_writes_ranked_results_and_handles_k_above_n(tmp_path):
    vectors = clustered(300, 32, seed=5).astype(np.float16).astype(np.float32)
    names = [f"db{i:04d}" for i in range(300)]
    write_store(str(tmp_path / "db"), vectors, names, 3)
    build_index(str(tmp_path / "db"), str(tmp_path / "i"), config=FAST, in_process=True)
    write_store(str(tmp_path / "q"), vectors[[5, 123, 299]], ["q5", "q123", "q299"], 1)
    out = str(tmp_path / "results.parquet")
    summary = search(str(tmp_path / "i"), str(tmp_path / "q"), out, SearchConfig(k=500))
    table = pq.read_table(out)
    assert table.schema == RESULTS_SCHEMA and summary.rows == table.num_rows == 3 * 300
    rows = table.to_pylist()
    for query, row in (("q5", 5), ("q123", 123), ("q299", 299)):
        hits = [r for r in rows if r["query_id"] == query]
        assert [h["rank"] for h in hits] == list(range(1, 301))
        scores = vectors @ vectors[row]
        expected = np.argsort(-scores, kind="stable")
        assert hits[0]["id"] == names[row]
        np.testing.assert_allclose([h["score"] for h in hits], scores[expected], rtol=1e-5, atol=1e-6)
        assert {h["id"] for h in hits} == set(names)


def test_on_disk_merge_searches_like_the_in_ram_index(tmp_path, data, built):
    out = str(tmp_path / "disk")
    config = BuildConfig(
        tasks=3,
        merge="disk",
        trained_url=os.path.join(built[1], io.TRAINED),
        quality=QualityConfig(queries=20, max_nprobe=4),
    )
    assert build_index(built[0], out, factory=FACTORY, config=config, in_process=True).on_disk
    on_disk, in_ram = io.load_index(out), io.load_index(built[1])
    assert invlist_contents(on_disk) == invlist_contents(in_ram)
    for index in (on_disk, in_ram):
        io.set_search_params(index, 8)
    np.testing.assert_array_equal(on_disk.search(data[:50], 10)[0], in_ram.search(data[:50], 10)[0])
    write_store(str(tmp_path / "q"), data[:4], ["a", "b", "c", "d"], 1)
    for index_url, name in ((out, "disk.parquet"), (built[1], "ram.parquet")):
        search(index_url, str(tmp_path / "q"), str(tmp_path / name), SearchConfig(k=5, nprobe=8))
    disk, ram = pq.read_table(str(tmp_path / "disk.parquet")), pq.read_table(str(tmp_path / "ram.parquet"))
    assert disk.num_rows == 20 and disk.column("score").equals(ram.column("score"))
    assert set(zip(*disk.select(["query_id", "id"]).to_pydict().values(), strict=True)) == set(
        zip(*ram.select(["query_id", "id"]).to_pydict().values(), strict=True)
    )


def test_bad_inputs(tmp_path, built):
    with pytest.raises(ValueError, match="not both"):
        build_index(built[0], str(tmp_path / "x"), factory=FACTORY, memory_budget="1GB")
    with pytest.raises(FileNotFoundError, match="no descriptor store at"):
        build_index(str(tmp_path / "typo"), str(tmp_path / "x"))
    store.write_run_info(str(tmp_path / "empty"), {"preset": "none"})
    with pytest.raises(ValueError, match="no committed global shards"):
        build_index(str(tmp_path / "empty"), str(tmp_path / "x"))
    with pytest.raises(ValueError, match="not a faiss index_factory"):
        build_index(built[0], str(tmp_path / "x"), factory="IVF64,PQ7x3y")
    with pytest.raises(ValueError, match="has d=64"):
        other = str(tmp_path / "wide")
        write_store(other, clustered(50, 32), image_names(50), 1)
        build_index(
            other, str(tmp_path / "x"), config=BuildConfig(trained_url=str(Path(built[1], io.TRAINED)))
        )
    with pytest.raises(ValueError, match="merge="):
        BuildConfig(merge="tape")
    with pytest.raises(ValueError, match="local output"):
        build_index(
            built[0],
            "memory://idx",
            factory=FACTORY,
            config=BuildConfig(
                merge="disk", trained_url=os.path.join(built[1], io.TRAINED), quality=QualityConfig(queries=5)
            ),
        )


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k: scores (q, k) and row ids (q, k)."""
    scores = queries @ vectors.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, top, 1), top


def refined_index(out: str, nprobe: int, k_factor: float):
    index = refine.attach(io.load_index(out), out, io.read_params(out))
    refine.configure(index, nprobe, k_factor)
    return index


def test_refinement_lifts_recall_capped_by_pq(built, data):
    """PQ8 over 64 dims cannot order close neighbours, whatever nprobe; the fp16-refined shortlist reaches the
    default target (100-recall@100 ≥ 0.98 and 1-recall@1 ≥ 0.99), and the stored setting is the cheapest that
    does."""
    _, out, summary = built
    quality = json.loads(Path(out, io.QUALITY).read_text())
    base = [r for r in quality["rows"] if r["k_factor"] is None]
    # even probing every list, the PQ order misses the true first neighbour for ≥ 10 % of the queries
    assert max(r["1-recall@1"] for r in base) <= 0.9 and max(r["10-recall@10"] for r in base) < 0.5, base
    assert summary.choice.refine == "fp16" and summary.k_factor is not None
    assert (quality["target"], quality["target_r1"]) == (0.98, 0.99)
    met = [r for r in quality["rows"] if r["100-recall@100"] >= 0.98 and r["1-recall@1"] >= 0.99]
    [chosen] = [r for r in met if (r["nprobe"], r["k_factor"]) == (summary.nprobe, summary.k_factor)]
    assert chosen["cost_bytes"] == min(r["cost_bytes"] for r in met)
    _, query_rows = draw_samples(N, N, 100, seed=0)
    found = refined_index(out, summary.nprobe, summary.k_factor).search(data[query_rows], 101)[1]
    ids = leave_one_out(found, query_rows, 100)
    exact = leave_one_out(exact_top(data, data[query_rows], 101)[1], query_rows, 100)
    assert recall_at(ids, exact, 100) == pytest.approx(chosen["100-recall@100"], abs=1e-9)
    assert recall_at(ids, exact, 1) >= 0.99 and recall_at(ids, exact, 10) > 0.9


def test_refinement_codes_and_search_equal_a_single_process_build(built, data):
    """The add tasks' codes files, concatenated in id order, are the single-process encoding of all vectors,
    so the merged refined index searches exactly like a single-process IndexRefine."""
    _, out, _ = built
    quantizer = io.read_index(os.path.join(out, refine.QUANTIZER))
    files = sorted(Path(out).glob("refine-*.codes"))
    assert len(files) == SHARDS
    assert b"".join(f.read_bytes() for f in files) == quantizer.sa_encode(data).tobytes()
    quantizer.add(data)
    single = faiss.IndexRefine(single_process(out, data), quantizer)
    refine.configure(single, 8, 4)
    merged = refined_index(out, 8, 4)
    for a, b in zip(merged.search(data[:200], 20), single.search(data[:200], 20), strict=True):
        np.testing.assert_array_equal(a, b)


def reuse_trained(built, kind: str) -> BuildConfig:
    return BuildConfig(
        tasks=2,
        refine=kind,
        trained_url=os.path.join(built[1], io.TRAINED),
        quality=QualityConfig(queries=20, max_nprobe=4, k_factors=(1,)),
    )


@pytest.mark.parametrize("kind", ["fp16", "store"])
def test_float16_refinement_of_the_whole_shortlist_is_exact(tmp_path, built, data, kind):
    """fp16 codes (in RAM) and the memory-mapped float16 copy hold the store's values: re-scoring every vector
    gives exact search."""
    out = str(tmp_path / kind)
    assert (
        build_index(
            built[0], out, factory=FACTORY, config=reuse_trained(built, kind), in_process=True
        ).choice.refine
        == kind
    )
    scores, ids = refined_index(out, 64, N / 10).search(data[:50], 10)  # k · k_factor = N candidates
    expected_scores, expected_ids = exact_top(data, data[:50], 10)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-6)


def test_incremental_updates_keep_the_refinement_consistent(tmp_path, built, data):
    """Added ids are refined (their codes continue the id order); removed ids never come back, although their
    codes stay behind."""
    names, cut, out = image_names(N), 3 * N // 4, str(tmp_path / "inc")
    write_store(str(tmp_path / "old"), data[:cut], names[:cut], 3)
    write_store(str(tmp_path / "new"), data[cut:], names[cut:], 1, first_shard=3)
    build_index(
        str(tmp_path / "old"), out, factory=FACTORY, config=reuse_trained(built, "store"), in_process=True
    )
    add_shards(out, store.global_shard_urls(str(tmp_path / "new")))
    assert sorted(p.name for p in Path(out).glob("refine-*.codes"))[-1] == f"refine-{cut:012d}.codes"
    queries = data[cut - 5 : cut + 15]  # old and added images
    _, ids = refined_index(out, 64, N / 10).search(queries, 10)
    np.testing.assert_array_equal(ids, exact_top(data, queries, 10)[1])

    gone = list(range(cut - 5, cut + 5))
    remove_ids(out, [names[i] for i in gone])
    kept = np.setdiff1d(np.arange(N), gone)
    _, ids = refined_index(out, 64, N / 10).search(queries, 10)
    assert not set(ids.ravel()) & set(gone)
    np.testing.assert_array_equal(ids, kept[exact_top(data[kept], queries, 10)[1]])


def test_leave_one_out_drops_only_the_query_itself_among_duplicates(tmp_path):
    """Exact duplicates of a query stay in its ground truth; only its own id goes, even when ties rank it
    below k + 1 (then the k + 1-th result goes instead)."""
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((40, 8)).astype(np.float16).astype(np.float32)  # as the store keeps them
    vectors[[7, 21, 33]] = vectors[3]  # four identical vectors: 3, 7, 21, 33
    write_store(str(tmp_path / "s"), vectors, image_names(40), 2)
    urls = store.global_shard_urls(str(tmp_path / "s"))
    scores, ids = exact_knn(vectors[[3, 5]], urls, [0, 20], 3, exclude=np.array([3, 5]))
    assert sorted(ids[0]) == [7, 21, 33] and 5 not in ids[1]
    others = np.delete(vectors, 5, 0) @ vectors[5]
    np.testing.assert_allclose(scores[1], -np.sort(-others)[:3], rtol=1e-6)
    # the query (3, 5) ranked first, second, or (tied) beyond k + 1 = 4; 8 is not there at all
    ranked = np.array([[3, 7, 21, 33], [9, 5, 2, 4], [7, 21, 33, 6]])
    kept_scores, kept = drop_self(ranked / 10, ranked, np.array([3, 5, 3]), 3)
    np.testing.assert_array_equal(kept, [[7, 21, 33], [9, 2, 4], [7, 21, 33]])
    np.testing.assert_array_equal(kept_scores, kept / 10)


def test_self_including_recall_overstates_what_users_get(data):
    """IVF at nprobe 1 finds every stored query in its own list, so counting the query as its own neighbour
    reads 1-recall@1 = 1.0; its true nearest other vector often lies across a cell border, which leave-one-out
    shows (and an outside computation confirms)."""
    quantizer = faiss.IndexFlatIP(DIM)
    index = faiss.IndexIVFFlat(quantizer, DIM, 64, faiss.METRIC_INNER_PRODUCT)
    index.train(data)
    index.add(data)
    rows = np.arange(0, N, 25)  # 200 stored vectors as queries
    config = QualityConfig(queries=len(rows), max_nprobe=1)
    truth_with_self = exact_top(data, data[rows], 100)[1]
    old = quality_report(index, data[rows], truth_with_self, 64, config)
    truth = leave_one_out(exact_top(data, data[rows], 101)[1], rows, 100)
    new = quality_report(index, data[rows], truth, 64, config, exclude=rows)
    [old_row], [new_row] = old["rows"], new["rows"]
    assert old_row["1-recall@1"] == 1.0 and new_row["1-recall@1"] < 0.95
    assert old_row["100-recall@100"] > new_row["100-recall@100"]
    found = leave_one_out(index.search(data[rows], 101)[1], rows, 100)
    for k in (1, 100):
        assert new_row[f"{k}-recall@{k}"] == pytest.approx(recall_at(found, truth, k), abs=1e-9)


def test_quality_on_a_query_store_agrees_with_recall_measured_outside(tmp_path, built, data):
    """--recall-queries STORE: independent queries, recorded as such; the stored setting's recall equals a
    fresh exact search's, and a store of another dimension is refused."""
    queries = clustered(300, DIM, seed=9).astype(np.float16).astype(np.float32)  # same centres, new draws
    query_store = str(tmp_path / "queries")
    write_store(query_store, queries, [f"q{i:04d}" for i in range(300)], 2)
    out = str(tmp_path / "index")
    config = replace(
        reuse_trained(built, "auto"), quality=QualityConfig(queries=200, query_store=query_store)
    )
    summary = build_index(built[0], out, factory=FACTORY, config=config, in_process=True)
    quality = json.loads(Path(out, io.QUALITY).read_text())
    assert not quality["leave_one_out"] and quality["query_set"] == f"query store {query_store}"
    assert quality["queries"] == 200
    picked = np.sort(np.random.default_rng(0).choice(300, 200, replace=False))
    _, ids = refined_index(out, summary.nprobe, summary.k_factor).search(queries[picked], 100)
    exact = exact_top(data, queries[picked], 100)[1]
    [row] = [r for r in quality["rows"] if (r["nprobe"], r["k_factor"]) == (summary.nprobe, summary.k_factor)]
    for k in (1, 10, 100):
        assert abs(row[f"{k}-recall@{k}"] - recall_at(ids, exact, k)) <= 0.01
    assert row["100-recall@100"] >= 0.98 and row["1-recall@1"] >= 0.99
    other = str(tmp_path / "wide")
    write_store(other, clustered(20, 2 * DIM), image_names(20), 1)
    wrong = replace(config, quality=QualityConfig(queries=10, query_store=other))
    with pytest.raises(
        ValueError, match=r"recall query store .* has 128-d descriptors, the index store 64-d"
    ):
        build_index(built[0], str(tmp_path / "x"), factory=FACTORY, config=wrong)
    empty = replace(config, quality=QualityConfig(query_store=str(tmp_path / "none")))
    with pytest.raises(FileNotFoundError, match=r"no descriptor store at .*none"):
        build_index(built[0], str(tmp_path / "x"), factory=FACTORY, config=empty)
    assert not Path(tmp_path, "x").exists()  # refused before any step wrote there


def test_a_finished_build_keeps_only_what_search_needs(tmp_path, built):
    out = str(tmp_path / "tidy")
    summary = build_index(
        built[0],
        out,
        factory=FACTORY,
        config=replace(reuse_trained(built, "auto"), keep_intermediate=False),
        in_process=True,
    )
    names = sorted(p.name for p in Path(out).iterdir())
    assert io.PARTS not in names and io.TRAINED not in names and io.INDEX in names
    assert summary.index_bytes == sum(Path(out, n).stat().st_size for n in names) == io.index_bytes(out)
    params = io.read_params(out)
    assert params == summary.params() and summary.to_dict() == {**params, "index_bytes": summary.index_bytes}
    assert list(summary.to_dict())[:7] == [*asdict(summary.choice), "dim"]  # printed in the choice's order
    assert sorted(p.name for p in Path(built[1]).iterdir() if p.name in (io.PARTS, io.TRAINED)) == [
        io.PARTS,
        io.TRAINED,
    ]


def test_search_on_two_ray_workers_equals_one_process(tmp_path, data, built):
    _, index_url, _ = built
    write_store(str(tmp_path / "q"), data[:40], [f"q{i:02d}" for i in range(40)], 2)
    config = SearchConfig(k=10, batch_size=7)  # several batches per query shard, spread over the workers
    here, there = str(tmp_path / "here.parquet"), str(tmp_path / "there.parquet")
    search(index_url, str(tmp_path / "q"), here, config)
    summary = search(index_url, str(tmp_path / "q"), there, config, workers=Workers(min_workers=2))
    assert summary.queries == 40 and pq.read_table(there).equals(pq.read_table(here))


def test_fast_scan_lists_merge_in_ram_split_into_shards_and_lose_removed_ids(tmp_path, built, data):
    """Fast-scan codes (PQ…x4fs) pack 32 vectors per block: the parts merge in RAM (never on disk: refused up
    front) into the single-process index, a shard copy keeps exactly its id range, removals take effect."""
    factory = "IVF64,PQ32x4fsr"
    with pytest.raises(ConfigError, match="fast-scan"):
        config = replace(FAST, merge="disk")
        build_index(built[0], str(tmp_path / "disk"), factory=factory, config=config, in_process=True)
    out = str(tmp_path / "fs")
    summary = build_index(
        built[0], out, factory=factory, config=replace(FAST, refine="none"), in_process=True
    )
    assert not summary.on_disk and summary.choice.refine == "none"
    merged, single = io.load_index(out), single_process(out, data)
    assert io.packed_in_blocks(merged) and not io.packed_in_blocks(io.load_index(built[1]))
    for index in (merged, single):
        io.set_search_params(index, 16)
    (merged_scores, merged_ids), (single_scores, single_ids) = (
        merged.search(data[:50], 10),
        single.search(data[:50], 10),
    )
    np.testing.assert_array_equal(merged_scores, single_scores)
    assert (merged_ids == single_ids).mean() > 0.99  # equal scores may tie in another list order
    part = keep_ids(merged, 1000, 3000)
    assert part.ntotal == 2000 and set(invlist_ids(part)) == set(range(1000, 3000))
    assert asdict(remove_ids(out, ["img000007", "img002500"])) == {"removed": 2, "ntotal": N - 2}
    assert not {7, 2500} & set(invlist_ids(io.load_index(out)))


def invlist_ids(index: faiss.Index) -> list[int]:
    ivf = faiss.extract_index_ivf(index)
    sizes = [ivf.invlists.list_size(i) for i in range(ivf.nlist)]
    return [int(i) for lst, n in enumerate(sizes) for i in faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), n)]
