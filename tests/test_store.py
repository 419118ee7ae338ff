"""Descriptor store: round trips, atomic commits, selective local reads, accounting."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import storage, store
from pipeline.store import ErrorRecord, LocalFeatures, StoreSettings


def _features(rng: np.random.Generator, n: int, dim: int = 128) -> LocalFeatures:
    desc = rng.standard_normal((n, dim)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    return LocalFeatures(
        keypoints=rng.uniform(0, 500, (n, 2)).astype(np.float32),
        scales=rng.choice([0.5, 1.0, 2.0], n).astype(np.float32),
        scores=rng.uniform(0, 10, n).astype(np.float32),
        descriptors=desc,
    )


def _shard(rng: np.random.Generator, prefix: str, n: int, dim: int = 16):
    ids = [f"{prefix}{i:03d}" for i in rng.permutation(n)]
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    local = [_features(rng, int(rng.integers(0, 40))) for _ in range(n)]
    return ids, vectors, local


def test_round_trip_float32_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    ids, vectors, local = _shard(rng, "a", 20)
    settings = StoreSettings(global_dtype="float32", local_dtype="float32", row_group_size=4)
    store.write_shard(str(tmp_path), 0, ids, vectors, local, settings=settings)
    got_ids, got_vectors = store.read_global(str(tmp_path))
    by_id = dict(zip(got_ids, got_vectors, strict=True))
    for i, image_id in enumerate(ids):
        np.testing.assert_array_equal(by_id[image_id], vectors[i])
    got_local = store.read_local(str(tmp_path), ids)
    for i, image_id in enumerate(ids):
        for name in ("keypoints", "scales", "scores", "descriptors"):
            np.testing.assert_array_equal(getattr(got_local[image_id], name), getattr(local[i], name))


def test_float16_and_int8_are_close_and_renormalised(tmp_path):
    rng = np.random.default_rng(1)
    ids, vectors, local = _shard(rng, "b", 10)
    store.write_shard(str(tmp_path), 3, ids, vectors, local, settings=StoreSettings(local_dtype="int8"))
    _, got = store.read_global(str(tmp_path))
    assert got.dtype == np.float32
    got_local = store.read_local(str(tmp_path), ids)
    for image_id, sent in zip(ids, local, strict=True):
        assert got_local[image_id].descriptors.shape == sent.descriptors.shape
        assert np.abs(got_local[image_id].descriptors - sent.descriptors).max(initial=0.0) < 0.02
    every = np.concatenate([got_local[image_id].descriptors for image_id in ids])
    assert len(every) and np.allclose(np.linalg.norm(every, axis=1), 1.0, atol=1e-5)


def test_only_committed_shards_are_visible(tmp_path):
    rng = np.random.default_rng(2)
    ids, vectors, local = _shard(rng, "c", 5)
    store.write_shard(str(tmp_path), 0, ids, vectors, local)
    # A writer killed after its data files but before its commit marker: shard 1 must not be read.
    store.write_shard(str(tmp_path), 1, *_shard(rng, "d", 5))
    storage.remove(str(tmp_path / "_commits" / "part-00001.json"))
    assert store.committed_shards(str(tmp_path)) == [0]
    got_ids, _ = store.read_global(str(tmp_path))
    assert sorted(got_ids) == sorted(ids)
    assert store.store_stats(str(tmp_path))["rows"] == 5


def test_read_local_reads_only_needed_row_groups(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    ids, vectors, local = _shard(rng, "e", 64)
    store.write_shard(str(tmp_path), 0, ids, vectors, local, settings=StoreSettings(row_group_size=8))
    reader = store.LocalReader(str(tmp_path))
    read_groups: list[list[int]] = []
    original = pq.ParquetFile.read_row_groups

    def spy(self, row_groups, *args, **kwargs):
        read_groups.append(list(row_groups))
        return original(self, row_groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    wanted = sorted(ids)[:2] + sorted(ids)[-1:]
    got = reader.read(wanted)
    assert set(got) == set(wanted)
    assert read_groups == [[0, 7]]  # sorted ids: the first two in group 0, the last in group 7
    with pytest.raises(KeyError, match="nope"):
        reader.read(["nope"])


def test_errors_and_accounting(tmp_path):
    rng = np.random.default_rng(4)
    ids, vectors, local = _shard(rng, "f", 3)
    errors = [ErrorRecord("bad1", "file:///x.jpg", "decode", "truncated", "image file is truncated")]
    commit = store.write_shard(str(tmp_path), 0, ids, vectors, local, errors, rows=4)
    assert (commit.ok, commit.errors, commit.reasons) == (3, 1, {"truncated": 1})
    assert store.read_errors(str(tmp_path)).column("reason").to_pylist() == ["truncated"]
    stats = store.store_stats(str(tmp_path))
    assert stats == {"shards": 1, "rows": 4, "ok": 3, "errors": 1, "errors_by_reason": {"truncated": 1}}
    with pytest.raises(ValueError, match="5 manifest rows but 3 ok"):
        store.write_shard(str(tmp_path), 1, ids, vectors, local, errors, rows=5)
    with pytest.raises(ValueError, match="appears twice"):
        dup = [ErrorRecord(ids[0], "u", "fetch", "missing", "")]
        store.write_shard(str(tmp_path), 1, ids, vectors, local, dup)


def test_error_records_carry_no_credentials(tmp_path):
    """Whatever a library put in a message, the stored record holds no known secret."""
    storage.remember_secrets(options={"key": "AKIASTOREKEY", "secret": "st0re-secret"})
    message = 'Invalid bucket name "AKIASTOREKEY:st0re-secret@host:8080": Bucket name must match'
    errors = [
        ErrorRecord("x", "s3://AKIASTOREKEY:st0re-secret@host:8080/b/x.jpg", "fetch", "fetch_failed", message)
    ]
    store.write_shard(str(tmp_path), 0, [], np.zeros((0, 8), np.float32), [], errors)
    stored = store.read_errors(str(tmp_path)).to_pylist()[0]
    assert stored["url"] == "s3://host:8080/b/x.jpg"
    assert "st0re-secret" not in stored["message"] and "AKIASTOREKEY" not in stored["message"]
    assert stored["message"].startswith('Invalid bucket name "***@host:8080"')


def test_a_failed_shard_leaves_no_data_files(tmp_path):
    rng = np.random.default_rng(5)
    ids, vectors, local = _shard(rng, "f", 3)
    (tmp_path / "local").write_text("a file where the local/ folder should be")  # the write fails
    with pytest.raises(OSError):
        store.write_shard(str(tmp_path), 0, ids, vectors, local)
    assert not list((tmp_path / "global").glob("*.parquet")), "the global file of the failed shard remains"
    assert not (tmp_path / "_commits").exists()


def test_a_missing_store_is_an_error_and_an_empty_one_is_not(tmp_path):
    for read in (store.read_global, store.read_errors, store.store_stats):
        with pytest.raises(FileNotFoundError, match=r"no descriptor store at .*typo"):
            read(str(tmp_path / "typo"))
    store.write_run_info(str(tmp_path / "new"), {"preset": "x"})
    ids, _ = store.read_global(str(tmp_path / "new"))
    assert len(ids) == 0 and store.store_stats(str(tmp_path / "new"))["rows"] == 0


def test_empty_shard_and_bad_settings(tmp_path):
    errors = [ErrorRecord("x", "u", "fetch", "missing", "404")]
    store.write_shard(str(tmp_path), 0, [], np.zeros((0, 8), np.float32), [], errors)
    ids, vectors = store.read_global(str(tmp_path))
    assert len(ids) == 0 and vectors.shape == (0, 8)
    with pytest.raises(ValueError, match="local_dtype='bf16'"):
        StoreSettings(local_dtype="bf16")


def test_run_info_round_trip(tmp_path):
    assert store.read_run_info(str(tmp_path)) is None
    store.write_run_info(str(tmp_path), {"preset": "cpu-small", "manifest": "abc"})
    assert store.read_run_info(str(tmp_path)) == {"preset": "cpu-small", "manifest": "abc"}


def test_local_reader_over_several_stores_prefers_the_newest(tmp_path):
    rng = np.random.default_rng(5)
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    ids, vectors, local = _shard(rng, "g", 4)
    store.write_shard(old, 0, ids, vectors, local)
    changed = [_features(rng, 3)]
    store.write_shard(new, 0, [ids[0]], vectors[:1], changed)
    reader = store.LocalReader([old, new])
    assert reader.ids() == set(ids)
    got = reader.read(ids)
    assert len(got[ids[0]]) == 3  # the newer store's version of the changed image
    np.testing.assert_allclose(got[ids[0]].keypoints, changed[0].keypoints)
    np.testing.assert_allclose(got[ids[1]].keypoints, local[1].keypoints)


def _wide_store(tmp_path, rng: np.random.Generator, settings: StoreSettings = StoreSettings()):
    """Two shards of 24 images × 200 float16 features (~55 kB each): sizes where a footer is small."""
    url, ids = str(tmp_path / "wide"), []
    for shard in range(2):
        shard_ids = [f"w{shard}-{i:02d}" for i in range(24)]
        local = [_features(rng, 200) for _ in shard_ids]
        store.write_shard(url, shard, shard_ids, np.zeros((24, 4), np.float32), local, settings=settings)
        ids += shard_ids
    return url, ids


def _assert_same_features(a: dict[str, LocalFeatures], b: dict[str, LocalFeatures]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        for name in ("keypoints", "scales", "scores", "descriptors"):
            np.testing.assert_array_equal(getattr(a[key], name), getattr(b[key], name))


def test_reads_cost_about_the_bytes_of_the_images_used(tmp_path):
    url, ids = _wide_store(tmp_path, np.random.default_rng(6))
    reader = store.LocalReader(url)
    wanted = [ids[3], ids[4], ids[5], ids[17], ids[30]]  # a run of three neighbours, two strays, two shards
    got = reader.read(wanted)
    index = pq.read_table(str(tmp_path / "wide" / "local_index" / "part-00000.parquet")).to_pydict()
    assert index["row_group"][:24] == list(range(24))  # one row group per image
    stats = reader.stats
    assert (stats.images, stats.requests) == (5, 2 + 3)  # 2 footers + the runs {3, 4, 5}, {17} and {30}
    assert stats.bytes_wanted > 5 * 200 * 128 * 2  # at least the float16 descriptors
    assert stats.bytes_read <= 1.5 * stats.bytes_wanted
    everything = store.LocalReader(url).read(ids)
    _assert_same_features(got, {k: v for k, v in everything.items() if k in wanted})


def test_node_local_cache_serves_repeat_reads(tmp_path):
    url, ids = _wide_store(tmp_path, np.random.default_rng(7))
    cache = str(tmp_path / "cache")
    cold = store.LocalReader(url, cache_dir=cache)
    first = cold.read(ids[:6])
    warm = store.LocalReader(url, cache_dir=cache)
    again = warm.read(ids[:6])
    _assert_same_features(first, again)
    assert (warm.stats.bytes_read, warm.stats.requests) == (0, 0)
    assert warm.stats.cache_bytes == cold.stats.bytes_read


def test_old_store_is_read_then_migrated_to_identical_features(tmp_path, caplog):
    url, ids = _wide_store(tmp_path, np.random.default_rng(8), StoreSettings(row_group_size=16))
    storage.remove(str(tmp_path / "wide" / "local_index"), recursive=True)  # as written before the index
    with caplog.at_level("WARNING", logger="pipeline.store"):
        old = store.LocalReader(url).read(ids)
    assert "migrate-store" in caplog.text
    summary = store.migrate_store(url)
    assert (summary.shards, summary.migrated) == (2, 2)
    migrated = store.LocalReader(url)
    _assert_same_features(old, migrated.read(ids))
    assert pq.ParquetFile(str(tmp_path / "wide" / "local" / "part-00001.parquet")).num_row_groups == 24
    assert store.migrate_store(url).migrated == 0  # idempotent: run again, nothing to do
    storage.remove(str(tmp_path / "wide" / "local_index" / "part-00001.parquet"))  # killed mid-way
    assert store.migrate_store(url).migrated == 1
    _assert_same_features(old, store.LocalReader(url).read(ids))


def test_reads_from_s3_are_range_requests_of_the_images_used(s3_bucket):
    rng = np.random.default_rng(9)
    url = f"{s3_bucket.url}/store"
    ids = [f"s{i:02d}" for i in range(12)]
    local = [_features(rng, 150) for _ in ids]
    store.write_shard(url, 0, ids, np.zeros((12, 4), np.float32), local, options=s3_bucket.options)
    reader = store.LocalReader(url, s3_bucket.options)
    got = reader.read([ids[2], ids[3], ids[9]])
    assert (reader.stats.requests, reader.stats.images) == (1 + 2, 3)  # the footer, runs {2, 3} and {9}
    assert reader.stats.bytes_read <= 1.5 * reader.stats.bytes_wanted
    for i in (2, 3, 9):
        np.testing.assert_array_equal(got[ids[i]].keypoints, local[i].keypoints)
