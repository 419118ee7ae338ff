"""Learned PCA whitening as an index option: the formula by hand, the stored file, and every vector the index
sees (added, refined, exact, queried, incrementally added, re-ranked) in the whitened space."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import store
from pipeline.index import (
    BuildConfig,
    QualityConfig,
    SearchConfig,
    add_shards,
    build_index,
    io,
    search,
    whitening,
)
from pipeline.index.build import sample_rows, shard_rows
from pipeline.rerank import RerankConfig, rerank
from pipeline.rerank.global_rerank import GlobalRerankConfig, GlobalVectors, refine_shortlists
from tests.test_index import clustered, image_names, write_store

DIM, WHITENED = 64, 16
FAST = BuildConfig(
    tasks=2, whitening=WHITENED, keep_intermediate=True, quality=QualityConfig(queries=50, max_nprobe=16)
)


@pytest.fixture(autouse=True)
def local_ray(ray_cluster):
    """Builds run their add tasks on the session's real local Ray."""


def test_fit_by_hand():
    # Points (±2, 0), (0, ±1): mean 0, covariance diag(2, 0.5). One dim keeps the x axis, scaled by 1/√2.
    sample = np.array([[2, 0], [-2, 0], [0, 1], [0, -1]], np.float32)
    one = whitening.fit(sample, 1)
    np.testing.assert_allclose(np.abs(one.projection), [[1 / math.sqrt(2)], [0]], atol=1e-7)
    np.testing.assert_allclose(np.abs(one(np.array([[3, 5]], np.float32))), [[1]])
    # Two dims: (1, 1) → (1/√2, 1/√0.5) = (0.7071, 1.4142), normalised (0.4472, 0.8944) (axis signs free).
    two = whitening.fit(sample, 2)
    np.testing.assert_allclose(
        np.abs(two(np.array([[1, 1]], np.float32))), [[0.4472136, 0.8944272]], rtol=1e-6
    )
    # Power 0.25 divides by 2^0.25 and 0.5^0.25: (1, 1) → (0.8409, 1.1892), normalised (0.5774, 0.8165).
    shrunk = whitening.fit(sample, 2, power=0.25)
    np.testing.assert_allclose(
        np.abs(shrunk(np.array([[1, 1]], np.float32))), [[0.5773503, 0.8164966]], rtol=1e-6
    )
    # Power 0: PCA only, the projection is the (orthonormal) principal axes.
    np.testing.assert_allclose(np.abs(whitening.fit(sample, 2, power=0).projection), np.eye(2), atol=1e-7)


def test_fit_decorrelates_the_sample():
    rng = np.random.default_rng(0)
    sample = (rng.standard_normal((500, 12)) @ rng.standard_normal((12, 12))).astype(np.float32)
    fitted = whitening.fit(sample, 8)
    projected = (sample - fitted.mean) @ fitted.projection  # before the L2 normalisation
    np.testing.assert_allclose(np.cov(projected.T, bias=True), np.eye(8), atol=1e-4)
    assert np.allclose(np.linalg.norm(fitted(sample), axis=1), 1, atol=1e-6)


def test_fit_rejects_what_it_cannot_whiten():
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match=r"must be in \[1, 4\]"):
        whitening.fit(rng.standard_normal((50, 4)), 5)
    with pytest.raises(ValueError, match="needs more than 8 training vectors, got 6"):
        whitening.fit(rng.standard_normal((6, 16)), 8)
    flat = rng.standard_normal((100, 2)) @ rng.standard_normal((2, 8))  # a 2-d subspace of 8 dims
    with pytest.raises(ValueError, match="spans only 2 dims"):
        whitening.fit(flat, 4)
    with pytest.raises(ValueError, match=r"power 1\.5: must be in \[0, 1\]"):
        whitening.fit(rng.standard_normal((50, 4)), 2, power=1.5)


def test_file_round_trip_and_malformed_file(tmp_path):
    fitted = whitening.fit(np.random.default_rng(2).standard_normal((40, 6)).astype(np.float32), 3)
    again = whitening.from_bytes(whitening.to_bytes(fitted), "x")
    np.testing.assert_array_equal(again.projection, fitted.projection)
    with pytest.raises(ValueError, match=r"broken\.npz: not a whitening file"):
        whitening.from_bytes(b"not numpy", "broken.npz")
    with pytest.raises(ValueError, match=r"whitening\.npz is missing"):
        whitening.space(str(tmp_path), {"whitening": 3, "dim": 3})
    with pytest.raises(ValueError, match=r"expects \(n, 6\)"):
        fitted(np.zeros((2, 5), np.float32))


def _store(root, n: int, shards: int, seed: int = 0) -> tuple[str, np.ndarray]:
    vectors = clustered(n, DIM, seed).astype(np.float16).astype(np.float32)  # the store's float16 values
    url = str(root / "store")
    write_store(url, vectors, image_names(n), shards)
    return url, vectors


def test_exact_index_searches_the_whitened_space(tmp_path):
    store_url, vectors = _store(tmp_path, 2000, 3)  # < 9984: an exact flat index
    out = str(tmp_path / "index")
    summary = build_index(store_url, out, config=FAST)
    assert (summary.dim, summary.input_dim, summary.whitening) == (WHITENED, DIM, WHITENED)
    fitted = whitening.load(out)
    reference = whitening.fit(vectors, WHITENED)  # the sample is every row here: the same fit
    np.testing.assert_allclose(np.abs(fitted.projection), np.abs(reference.projection), rtol=1e-3, atol=1e-5)
    search(out, store_url, str(tmp_path / "results.parquet"), SearchConfig(k=5))
    table = pq.read_table(tmp_path / "results.parquet").to_pydict()
    whitened = fitted(vectors)
    exact = np.argsort(-(whitened[:20] @ whitened.T), axis=1, kind="stable")[:, :5]
    names = image_names(2000)
    for q in range(20):
        got = [i for query, i in zip(table["query_id"], table["id"], strict=True) if query == names[q]]
        assert got == [names[j] for j in exact[q]]
    quality = json.loads((tmp_path / "index" / io.QUALITY).read_text())
    assert quality["rows"][-1][f"{quality['k']}-recall@{quality['k']}"] == 1.0


def test_ivf_pq_build_and_incremental_add_whiten_every_vector(tmp_path):
    store_url, vectors = _store(tmp_path, 12_000, 4)
    full = str(tmp_path / "full")
    build_index(store_url, full, factory="IVF64,PQ8np", config=FAST)
    fitted = whitening.load(full)
    trained = io.read_index(os.path.join(full, io.TRAINED))
    assert trained.d == WHITENED
    # recall is measured against exact search of the whitened vectors: with every list probed and the SQ8
    # refinement it is near 1 (against the raw vectors' neighbours it would not be)
    quality = json.loads((tmp_path / "full" / io.QUALITY).read_text())
    assert max(row[f"{quality['k']}-recall@{quality['k']}"] for row in quality["rows"]) >= 0.95
    # an index built on the first three shards, then given the fourth, equals the one built with all four
    urls = store.global_shard_urls(store_url)
    first = str(tmp_path / "first")
    config = BuildConfig(
        tasks=2,
        whitening=WHITENED,
        trained_url=os.path.join(full, io.TRAINED),
        quality=QualityConfig(queries=50, max_nprobe=16),
    )
    partial = str(tmp_path / "partial")
    write_store(partial, vectors[:9000], image_names(9000), 3)
    build_index(partial, first, config=config)
    np.testing.assert_array_equal(whitening.load(first).projection, fitted.projection)  # reused, not refitted
    add_shards(first, [urls[-1]])
    a, b = io.load_index(full), io.load_index(first)
    queries = fitted(sample_rows(urls, shard_rows(urls), np.arange(0, 12_000, 97)))
    for index in (a, b):
        io.set_search_params(index, 8)
    np.testing.assert_array_equal(a.search(queries, 10)[1], b.search(queries, 10)[1])


def test_a_rebuild_without_whitening_drops_the_file_and_query_dims_are_checked(tmp_path):
    store_url, _ = _store(tmp_path, 1000, 2)
    out = str(tmp_path / "index")
    build_index(store_url, out, config=FAST)
    assert os.path.exists(os.path.join(out, whitening.FILE))
    build_index(store_url, out, config=BuildConfig(tasks=2, quality=QualityConfig(queries=20)))
    assert not os.path.exists(os.path.join(out, whitening.FILE))
    build_index(store_url, out, config=FAST)
    other = str(tmp_path / "other")
    write_store(other, clustered(10, 32), image_names(10), 1)
    with pytest.raises(ValueError, match=r"index .* takes 64-d ones"):
        search(out, other, str(tmp_path / "r.parquet"))
    with pytest.raises(ValueError, match=r"2000 dims: must be in \[1, 64\]"):
        build_index(store_url, str(tmp_path / "wide"), config=BuildConfig(whitening=2000))


def test_global_rerank_works_in_the_index_space(tmp_path):
    store_url, vectors = _store(tmp_path, 1000, 2)
    out = str(tmp_path / "index")
    build_index(store_url, out, config=FAST)
    results = str(tmp_path / "search.parquet")
    search(out, store_url, results, SearchConfig(k=20))
    reranked = str(tmp_path / "qe.parquet")
    config = GlobalRerankConfig(qe_k=3)
    rerank(
        results,
        store_url,
        store_url,
        reranked,
        RerankConfig(device="cpu"),
        method="qe",
        global_config=config,
        index_url=out,
    )
    fitted, names = whitening.load(out), image_names(1000)
    space = GlobalVectors.of(names, fitted(vectors))
    table = pq.read_table(results).to_pydict()
    got = pq.read_table(reranked).to_pydict()
    for q in names[:5]:
        ids = np.array([i for query, i in zip(table["query_id"], table["id"], strict=True) if query == q])
        scores = np.array(
            [s for query, s in zip(table["query_id"], table["score"], strict=True) if query == q]
        )
        ((order, _),) = refine_shortlists("qe", space, space, [(q, ids, scores)], config)
        assert [i for query, i in zip(got["query_id"], got["id"], strict=True) if query == q] == ids[
            order
        ].tolist()


def test_cli_and_run_config_take_the_option(tmp_path, ray_cluster):
    from pipeline.runconfig import parse_run_config

    store_url, _ = _store(tmp_path, 300, 1)
    out = str(tmp_path / "index")
    command = [sys.executable, "-m", "pipeline.cli", "build-index", store_url, out, "--whitening", "8"]
    done = subprocess.run(
        [*command, "--tasks", "1", "--address", ray_cluster], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "index" / io.PARAMS).read_text())["whitening"] == 8
    data = {"index": "i.parquet", "queries": "q.parquet"}
    assert parse_run_config({"out": "o", "data": data, "index": {"whitening": 8}}).index.whitening == 8
    with pytest.raises(ValueError, match=r"index\.whitening='8' must be int"):
        parse_run_config({"out": "o", "data": data, "index": {"whitening": "8"}})
