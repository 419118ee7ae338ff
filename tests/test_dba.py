"""DBA vectors beside an index: incremental add/remove equals a rebuild from scratch; the file round-trips."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from pipeline.execution import Workers
from pipeline.index import dba
from pipeline.index.dba import (
    DbaTable,
    add_rows,
    compute_dba,
    read_dba,
    remove_rows,
    update_dba,
    write_dba,
)


def clustered(seed: int, n: int, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors in a few tight clusters (so neighbour lists change when images come and go)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, dim))
    x = centres[rng.integers(0, 5, n)] + 0.3 * rng.normal(size=(n, dim))
    ids = np.array([f"img{seed}-{i:03d}" for i in range(n)], dtype=object)
    return ids, (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def assert_same(table: DbaTable, scratch: DbaTable) -> None:
    """Same rows (by id), same refined vectors, same neighbour ids and similarities."""
    order = {image_id: i for i, image_id in enumerate(table.ids)}
    rows = np.array([order[i] for i in scratch.ids])
    np.testing.assert_array_equal(table.vectors[rows], scratch.vectors)
    np.testing.assert_allclose(table.refined[rows], scratch.refined, rtol=1e-5, atol=1e-6)
    assert [list(table.ids[n]) for n in table.neighbours[rows]] == [
        list(scratch.ids[n]) for n in scratch.neighbours
    ]
    np.testing.assert_allclose(table.sims[rows], scratch.sims, rtol=1e-5, atol=1e-6)


def test_add_then_remove_equals_scratch() -> None:
    ids, vectors = clustered(0, 60)
    table = compute_dba(ids[:40], vectors[:40], k=4, alpha=3.0)
    table = add_rows(table, ids[40:], vectors[40:])
    assert_same(table, compute_dba(ids, vectors, k=4, alpha=3.0))
    gone = ids[::3]  # every third image, old and new
    table = remove_rows(table, gone)
    left = ~np.isin(ids, gone)
    assert_same(table, compute_dba(ids[left], vectors[left], k=4, alpha=3.0))


def test_incremental_changes_only_rows_whose_neighbours_change() -> None:
    ids, vectors = clustered(1, 30)
    table = compute_dba(ids, vectors, k=3)
    twin = vectors[:1] * 0.999 + 0.001 * vectors[1:2]  # a near-duplicate of row 0: enters row 0's top 3
    grown = add_rows(table, ["twin"], twin / np.linalg.norm(twin))
    changed = np.flatnonzero(np.any(grown.refined[:30] != table.refined, axis=1))
    assert 0 in changed and len(changed) < 30
    assert "twin" in grown.ids[grown.neighbours[0]]


def test_fewer_images_than_k() -> None:
    ids, vectors = clustered(2, 6)
    table = remove_rows(compute_dba(ids, vectors, k=10), ids[:3])
    assert_same(table, compute_dba(ids[3:], vectors[3:], k=10))
    assert table.neighbours.shape == (3, 2)
    table = add_rows(table, ids[:3], vectors[:3])
    assert_same(table, compute_dba(ids, vectors, k=10))
    single = compute_dba(ids[:1], vectors[:1], k=10)
    np.testing.assert_allclose(single.refined, vectors[:1], rtol=1e-6)  # no neighbours: itself


def test_file_round_trip_and_update(tmp_path: Path) -> None:
    ids, vectors = clustered(3, 25)
    index = str(tmp_path / "index")
    update_dba(index, (ids, vectors), [])  # no DBA file: nothing to keep in step
    assert not (tmp_path / "index").exists()
    write_dba(index, compute_dba(ids[:20], vectors[:20], k=5, alpha=2.0))
    back = read_dba(index)
    assert (back.k, back.alpha) == (5, 2.0)
    assert_same(back, compute_dba(ids[:20], vectors[:20], k=5, alpha=2.0))
    update_dba(index, (ids[20:], vectors[20:]), ids[:4])
    assert_same(read_dba(index), compute_dba(ids[4:], vectors[4:], k=5, alpha=2.0))


def test_missing_file_and_bad_parameters(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="landmark-index dba"):
        read_dba(str(tmp_path / "nothing"))
    ids, vectors = clustered(4, 5)
    with pytest.raises(ValueError, match="k=0"):
        compute_dba(ids, vectors, k=0)


def write_global_store(url: str, ids: np.ndarray, vectors: np.ndarray) -> None:
    """A committed store (one local feature per image: the index reads only the global vectors)."""
    from pipeline import store

    one = np.ones(1, np.float32)
    local = [store.LocalFeatures(np.zeros((1, 2), np.float32), one, one, np.ones((1, 4), np.float32))] * len(
        ids
    )
    store.write_shard(url, 0, list(ids), vectors, local)


def test_index_add_and_remove_keep_dba_equal_to_scratch(tmp_path: Path, ray_cluster: str) -> None:
    from pipeline import store
    from pipeline.index import add_shards, build_index, remove_ids
    from pipeline.index import io as index_io
    from pipeline.index.dba import build_dba

    ids, vectors = clustered(5, 90)
    vectors = vectors.astype(np.float16).astype(np.float32)  # what the store (float16 globals) gives back
    first, second, index = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "index")
    write_global_store(first, ids[:60], vectors[:60])
    write_global_store(second, ids[60:], vectors[60:])
    build_index(first, index, ray_address=ray_cluster)
    build_dba(index, [first], k=4, alpha=3.0)
    assert_same(read_dba(index), compute_dba(ids[:60], vectors[:60], k=4))
    add_shards(index, store.global_shard_urls(second))
    gone = ids[::5]
    remove_ids(index, list(gone))
    left = ~np.isin(ids, gone)
    table = read_dba(index)
    assert_same(table, compute_dba(ids[left], vectors[left], k=4))
    assert set(table.ids) == set(index_io.read_id_map(index)[1])


@pytest.fixture(scope="module")
def reindex_weights(tmp_path_factory) -> str:
    from pipeline.config import get_preset
    from tests.models import calibrated_weights

    return calibrated_weights(get_preset("cpu-small"), tmp_path_factory.mktemp("weights") / "cpu-small.pt")


def test_nightly_reindex_keeps_dba_equal_to_scratch(
    tmp_path: Path, ray_cluster: str, reindex_weights: str
) -> None:
    """First build, an in-place update (add, change, delete) and a retrain, the DBA neighbour search on the
    run's Ray workers: each version's DBA = from scratch = what `run`'s DBA stage (build_dba) writes."""
    import shutil

    from pipeline.index import io as index_io
    from pipeline.index.dba import build_dba, dba_url
    from pipeline.reindex import ReindexConfig, reindex
    from pipeline.versions import read_stores, resolve_latest
    from tests.test_reindex import Catalogue, _newest_descriptors

    def check(config: ReindexConfig) -> None:
        version = resolve_latest(root)
        _, indexed = index_io.read_id_map(version)
        newest = _newest_descriptors(version)
        scratch = compute_dba(indexed, np.stack([newest[i] for i in indexed]), k=config.dba_k, alpha=3.0)
        assert_same(read_dba(version), scratch)
        run_path = shutil.copytree(version, tmp_path / f"run-{Path(version).name}")
        Path(dba_url(str(run_path))).unlink()
        build_dba(str(run_path), read_stores(version), config.dba_k, 3.0, workers=config.workers)
        assert_same(read_dba(version), read_dba(str(run_path)))

    root = str(tmp_path / "root")
    catalogue = Catalogue(tmp_path)
    for i in range(6):
        catalogue.put(f"img{i}", seed=i)
    in_place = ReindexConfig(
        preset="cpu-small",
        weights_url=reindex_weights,
        shard_size=4,
        dba=True,
        dba_k=3,
        workers=Workers(address=ray_cluster),  # each DBA step on one Ray worker
    )
    in_place = dataclasses.replace(in_place, retrain_threshold=10.0)
    assert reindex(catalogue.write(), root, in_place, ray_address=ray_cluster).retrained  # first build
    check(in_place)
    catalogue.put("img6", seed=60)
    catalogue.put("img0", seed=70)
    catalogue.delete("img3")
    assert not reindex(catalogue.write(), root, in_place, ray_address=ray_cluster).retrained
    check(in_place)
    catalogue.put("img7", seed=80)
    retrain = dataclasses.replace(in_place, retrain_threshold=0.0)
    assert reindex(catalogue.write(), root, retrain, ray_address=ray_cluster).retrained
    check(retrain)


def test_dba_batched_on_two_ray_workers_equals_one_process(ray_cluster: str, monkeypatch) -> None:
    ids, vectors = clustered(11, 90)
    here = compute_dba(ids, vectors, k=4)
    monkeypatch.setattr(dba, "ROWS_PER_BATCH", 16)  # 6 batches over the two workers
    there = compute_dba(ids, vectors, k=4, workers=Workers(min_workers=2))
    assert_same(there, here)
    np.testing.assert_array_equal(there.neighbours, here.neighbours)
