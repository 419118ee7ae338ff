"""Nightly incremental re-index on a real local Ray: versions, idempotence, in-place updates, retraining,
pruning, the lock, and a crash between building and publishing."""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import storage, store
from pipeline.config import get_preset
from pipeline.index import io as index_io
from pipeline.lease import Lease, LockHeldError
from pipeline.manifest import diff_manifests, read_manifest
from pipeline.reindex import ReindexConfig, compact_globals, reindex
from pipeline.versions import live_version, read_stores, resolve_latest, state_table
from tests.models import calibrated_weights

PRESET = "cpu-small"


def _photo(seed: int, size: int = 64) -> bytes:
    """A smooth random picture (JPEG), different for every seed."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (size // 16 + 1, size // 16 + 1, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(low).resize((size, size), Image.BICUBIC).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class Catalogue:
    """Images on disk and the manifest describing them; each call to ``write`` makes a new manifest file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.rows: dict[str, dict] = {}
        self.writes = 0
        (folder / "images").mkdir(parents=True, exist_ok=True)

    def put(self, image_id: str, seed: int, name: str | None = None) -> None:
        """Add or replace an image (a new name changes the url; the etag follows the content)."""
        path = self.folder / "images" / (name or f"{image_id}.jpg")
        data = _photo(seed)
        path.write_bytes(data)
        self.rows[image_id] = {"id": image_id, "url": str(path), "etag": f"seed-{seed}"}

    def delete(self, image_id: str) -> None:
        del self.rows[image_id]

    def write(self) -> str:
        self.writes += 1
        path = self.folder / f"manifest-{self.writes}.parquet"
        pq.write_table(pa.Table.from_pylist(list(self.rows.values())), path)
        return str(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    return calibrated_weights(get_preset(PRESET), tmp_path_factory.mktemp("weights") / "cpu-small.pt")


def _config(weights: str, **overrides) -> ReindexConfig:
    return ReindexConfig(preset=PRESET, weights_url=weights, shard_size=4, **overrides)


def _catalogue(tmp_path: Path, count: int) -> Catalogue:
    catalogue = Catalogue(tmp_path)
    for i in range(count):
        catalogue.put(f"img{i}", seed=i)
    return catalogue


def _index_vectors(version: str) -> dict[str, np.ndarray]:
    """image id → the vector stored in the version's (exact, IDMap2) index."""
    index = index_io.load_index(version)
    ids, image_ids = index_io.read_id_map(version)
    return {image_id: index.reconstruct(int(i)) for i, image_id in zip(ids, image_ids, strict=True)}


def _newest_descriptors(version: str) -> dict[str, np.ndarray]:
    """image id → global descriptor from the version's stores, the newest store winning."""
    out: dict[str, np.ndarray] = {}
    for store_url in read_stores(version):
        ids, vectors = store.read_global(store_url)
        out |= dict(zip(ids, vectors, strict=True))
    return out


def _assert_consistent(
    root: str, expected_ids: set[str], manifest_ids: set[str] | None = None
) -> dict[str, np.ndarray]:
    """The live version indexes exactly ``expected_ids``, each with its newest descriptor, and its state
    holds the manifest's ids (``expected_ids`` plus the failed ones)."""
    version = resolve_latest(root)
    vectors = _index_vectors(version)
    assert set(vectors) == expected_ids
    newest = _newest_descriptors(version)
    for image_id, vector in vectors.items():
        np.testing.assert_array_equal(vector, newest[image_id])
    state = pq.read_table(Path(version) / "state.parquet")
    assert set(state.column("id").to_pylist()) == (manifest_ids or expected_ids)
    return vectors


class Crash(RuntimeError):
    pass


def _crash_at(stage: str):
    def hook(current: str) -> None:
        if current == stage:
            raise Crash(f"killed at {stage}")

    return hook


def _versions(root: str) -> list[str]:
    return sorted(p.name for p in Path(root, "versions").iterdir())


def _runs(root: str) -> list[str]:
    return sorted(p.name for p in Path(root, "descriptors").iterdir())


def test_lifecycle_build_noop_crash_resume_update_prune_model_change(tmp_path, ray_cluster, weights):
    root = str(tmp_path / "root")
    catalogue = _catalogue(tmp_path, 6)
    # A stale lock of a dead run is taken over.
    storage.write_text(f"{root}/_lock.json", json.dumps({"owner": "dead:1:x", "expires_at": time.time() - 5}))
    config = _config(weights, keep=3, retrain_threshold=1.0)

    first = reindex(catalogue.write(), root, config, ray_address=ray_cluster)
    assert (first.version, first.published, first.retrained) == ("v000001", True, True)
    assert first.reason.startswith("no live version")
    assert (first.added, first.changed, first.removed, first.errors, first.ntotal) == (6, 0, 0, 0, 6)
    assert not Path(root, "_lock.json").exists(), "the lock must be released"
    v1_vectors = _assert_consistent(root, {f"img{i}" for i in range(6)})
    assert json.loads(Path(root, "versions/v000001/report.json").read_text())["version"] == "v000001"

    again = reindex(catalogue.write(), root, config, ray_address=ray_cluster)
    assert (again.published, again.version, again.added, again.changed, again.removed) == (
        False,
        "v000001",
        0,
        0,
        0,
    )
    assert "nothing to do" in again.reason
    assert _versions(root) == ["v000001"] and len(_runs(root)) == 1

    catalogue.put("img6", seed=60)  # new
    catalogue.put("img1", seed=11, name="img1-v2.jpg")  # changed url
    catalogue.put("img2", seed=12)  # same url, new content and etag
    catalogue.delete("img3")
    catalogue.rows["img4"]["url"] = str(tmp_path / "images" / "gone.jpg")  # changed, and now fails
    update = catalogue.write()
    with pytest.raises(Crash):
        reindex(update, root, config, ray_address=ray_cluster, on_stage=_crash_at("written"))
    assert live_version(root) == "v000001", "a crash before the publish leaves the old version live"
    assert Path(root, "versions/v000002/report.json").exists(), "the crash came after writing v000002"
    _assert_consistent(root, {f"img{i}" for i in range(6)})
    assert not Path(root, "_lock.json").exists()
    (run,) = [name for name in _runs(root) if name.startswith("v000001-")]
    commits = {p.name: p.stat().st_mtime_ns for p in Path(root, "descriptors", run, "_commits").iterdir()}

    second = reindex(update, root, config, ray_address=ray_cluster)
    assert (second.version, second.previous, second.retrained, second.run_name) == (
        "v000002",
        "v000001",
        False,
        run,
    )
    assert {p.name: p.stat().st_mtime_ns for p in Path(root, "descriptors", run, "_commits").iterdir()} == (
        commits
    ), "the re-run must resume the crashed run's extraction, not redo it"
    assert "updated in place" in second.reason
    assert (second.added, second.changed, second.removed) == (1, 3, 4)  # removed: img1, img2, img3, img4
    assert (second.errors, second.errors_by_reason) == (1, {"missing": 1})
    assert second.error_records[0]["id"] == "img4"
    current = {"img0", "img1", "img2", "img5", "img6"}
    v2_vectors = _assert_consistent(root, current, set(catalogue.rows))
    for image_id in ("img1", "img2"):
        assert not np.array_equal(v2_vectors[image_id], v1_vectors[image_id])
    np.testing.assert_array_equal(v2_vectors["img0"], v1_vectors["img0"])
    # Searching with img1's new descriptor finds img1 first.
    version = resolve_latest(root)
    scores, hits = index_io.load_index(version).search(v2_vectors["img1"][None], 1)
    ids, image_ids = index_io.read_id_map(version)
    assert image_ids[np.searchsorted(ids, hits[0, 0])] == "img1"
    assert scores[0, 0] == pytest.approx(float(v2_vectors["img1"] @ v2_vectors["img1"]), rel=1e-5)
    assert [Path(s).name for s in read_stores(version)] == [first.run_name, run]

    # Other weights: every image is extracted again and the index retrained; with keep=1 the old versions
    # and every store that only they used are removed.
    other = calibrated_weights(get_preset(PRESET), tmp_path / "other.pt", seed=1)
    third = reindex(catalogue.write(), root, _config(other, keep=1), ray_address=ray_cluster)
    assert (third.version, third.retrained, third.changed, third.added, third.removed) == (
        "v000003",
        True,
        6,
        0,
        5,
    )
    assert "weights changed" in third.reason
    assert _versions(root) == ["v000003"]
    assert [Path(s).name for s in read_stores(resolve_latest(root))] == [third.run_name]
    assert _runs(root) == [third.run_name]
    v3_vectors = _assert_consistent(root, current, set(catalogue.rows))
    assert not np.array_equal(v3_vectors["img0"], v2_vectors["img0"])


def test_retrain_above_threshold_on_compacted_descriptors(tmp_path, ray_cluster, weights):
    root = str(tmp_path / "root")
    catalogue = _catalogue(tmp_path, 4)
    config = _config(weights, retrain_threshold=0.4)
    first = reindex(catalogue.write(), root, config, ray_address=ray_cluster)
    catalogue.put("img4", seed=40)
    catalogue.put("img0", seed=50)
    catalogue.delete("img1")
    report = reindex(catalogue.write(), root, config, ray_address=ray_cluster)
    assert report.retrained, report.reason
    assert "2 new + changed = 50.0% of 4 live vectors > retrain_threshold 40.0%" in report.reason
    assert (report.added, report.changed, report.removed) == (1, 1, 2)
    _assert_consistent(root, {"img0", "img2", "img3", "img4"})
    version = Path(resolve_latest(root))
    assert not (version / "_compact").exists(), "the compacted build input is removed after the build"
    assert json.loads((version / "params.json").read_text())["ntotal"] == 4
    # Both stores still supply descriptors (img2, img3 from the first; img0, img4 from the second).
    assert [Path(s).name for s in read_stores(str(version))] == [first.run_name, report.run_name]


def test_lock_held_blocks_a_second_run(tmp_path, weights):
    root = str(tmp_path / "root")
    catalogue = _catalogue(tmp_path, 2)
    lock = {"owner": "other-host:7:abc", "expires_at": time.time() + 600}
    storage.write_text(f"{root}/_lock.json", json.dumps(lock))
    with pytest.raises(LockHeldError, match="held by other-host:7:abc"):
        reindex(catalogue.write(), root, _config(weights))
    assert json.loads(Path(root, "_lock.json").read_text()) == lock, "a refused run must not touch the lock"
    assert not Path(root, "versions").exists()


def test_lease_renewal_notices_a_lost_lock(tmp_path):
    root = str(tmp_path / "root")
    lease = Lease(root, seconds=0.03)
    lease.acquire()
    first = json.loads(Path(root, "_lock.json").read_text())
    time.sleep(0.02)
    lease.renew_if_due()  # a third of the lease has passed: renewed
    renewed = json.loads(Path(root, "_lock.json").read_text())
    assert renewed["owner"] == first["owner"] and renewed["expires_at"] > first["expires_at"]
    storage.write_text(f"{root}/_lock.json", json.dumps({"owner": "thief", "expires_at": time.time() + 60}))
    time.sleep(0.02)
    with pytest.raises(LockHeldError, match=r"lost .* to thief"):
        lease.renew_if_due()
    lease.release()
    assert json.loads(Path(root, "_lock.json").read_text())["owner"] == "thief", "release keeps others' locks"


def test_state_detects_inline_image_and_etag_changes(tmp_path):
    def manifest(rows: list[dict], name: str) -> pa.Table:
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / name)
        return read_manifest(str(tmp_path / name))

    old = manifest(
        [
            {"id": "a", "url": "", "image": _photo(1), "etag": None},
            {"id": "b", "url": "", "image": _photo(2), "etag": None},
            {"id": "c", "url": str(tmp_path / "c.jpg"), "image": None, "etag": "1"},
            {"id": "d", "url": str(tmp_path / "d.jpg"), "image": None, "etag": "1"},
        ],
        "old.parquet",
    )
    new = manifest(
        [
            {"id": "a", "url": "", "image": _photo(1), "etag": None},
            {"id": "b", "url": "", "image": _photo(3), "etag": None},
            {"id": "c", "url": str(tmp_path / "c.jpg"), "image": None, "etag": "2"},
            {"id": "d", "url": str(tmp_path / "d.jpg"), "image": None, "etag": "1"},
        ],
        "new.parquet",
    )
    state = state_table(old)
    assert state.column("image").to_pylist()[0] == hashlib.sha256(_photo(1)).digest()
    diff = diff_manifests(state, state_table(new))
    assert (diff.added, diff.changed, diff.deleted) == ((), ("b", "c"), ())


def test_resolve_latest_before_any_publish(tmp_path):
    with pytest.raises(FileNotFoundError, match="no published version"):
        resolve_latest(str(tmp_path / "root"))


NO_LOCAL = store.LocalFeatures(
    np.zeros((0, 2), np.float32),
    np.zeros(0, np.float32),
    np.zeros(0, np.float32),
    np.zeros((0, 128), np.float32),
)


def test_compact_globals_newest_store_wins(tmp_path):
    rng = np.random.default_rng(0)
    vectors = {name: rng.standard_normal((3, 4)).astype(np.float32) for name in ("old", "new", "unused")}
    stores = {name: str(tmp_path / name) for name in vectors}
    for name, ids in (("unused", ["a", "b", "c"]), ("old", ["a", "b", "c"]), ("new", ["b", "x", "y"])):
        store.write_shard(stores[name], 0, ids, vectors[name], [NO_LOCAL] * 3)
    order = [stores["unused"], stores["old"], stores["new"]]
    out = str(tmp_path / "compact")
    used = compact_globals(order, {"a", "b", "x"}, out)
    assert used == [stores["old"], stores["new"]]
    ids, got = store.read_global(out)
    as_float16 = {k: v.astype(np.float16).astype(np.float32) for k, v in vectors.items()}
    expected = {"a": as_float16["old"][0], "b": as_float16["new"][0], "x": as_float16["new"][1]}
    assert sorted(ids) == sorted(expected)
    for image_id, vector in zip(ids, got, strict=True):
        np.testing.assert_array_equal(vector, expected[image_id])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"preset": "nope"}, "unknown preset 'nope'"),
        ({"keep": 0}, "keep=0"),
        ({"retrain_threshold": -0.1}, "retrain_threshold=-0.1"),
        ({"lease_seconds": 0}, "lease_seconds=0"),
        ({"factory": "Flat", "memory_budget": "1GiB"}, "factory or memory_budget"),
    ],
)
def test_bad_config_is_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        replace(ReindexConfig(preset=PRESET), **overrides)
