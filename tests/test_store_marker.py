"""Commit markers: a store written from the README's documented format alone is readable; malformed markers
fail with one clear StoreFormatError naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import store


def write_documented_store(root: Path, markers: dict[str, object]) -> np.ndarray:
    """global/part-NNNNN.parquet files and hand-written markers, as a non-Python writer would make them."""
    vectors = np.eye(4, 8, dtype=np.float16)  # (4, 8)
    (root / "global").mkdir(parents=True)
    (root / "_commits").mkdir()
    for name, marker in markers.items():
        table = pa.table(
            {
                "id": pa.array([f"{name}-{i}" for i in range(2)]),
                "global": pa.FixedSizeListArray.from_arrays(pa.array(vectors[:2].reshape(-1)), 8),
            }
        )
        pq.write_table(table, root / "global" / f"{name}.parquet")
        text = marker if isinstance(marker, str) else json.dumps(marker)
        (root / "_commits" / f"{name}.json").write_text(text)
    return vectors


def test_documented_keys_alone_are_readable(tmp_path):
    vectors = write_documented_store(
        tmp_path,
        {"part-00003": {"rows": 2, "ok": 2, "errors": 0}, "part-00001": {"rows": 3, "ok": 2, "errors": 1}},
    )
    commits = store.read_commits(str(tmp_path))
    assert [(c.shard, c.rows, c.ok, c.errors, c.reasons) for c in commits] == [
        (1, 3, 2, 1, {}),
        (3, 2, 2, 0, {}),
    ]
    assert [u.rsplit("/", 1)[1] for u in store.global_shard_urls(str(tmp_path))] == [
        "part-00001.parquet",
        "part-00003.parquet",
    ]
    ids, read = store.read_global(str(tmp_path))
    assert list(ids) == ["part-00001-0", "part-00001-1", "part-00003-0", "part-00003-1"]
    np.testing.assert_array_equal(read, np.concatenate([vectors[:2], vectors[:2]]).astype(np.float32))
    assert store.store_stats(str(tmp_path))["errors"] == 1


def test_written_markers_round_trip(tmp_path):
    empty = store.LocalFeatures(np.zeros((0, 2)), np.zeros(0), np.zeros(0), np.zeros((0, 128)))
    error = store.ErrorRecord("b", "http://x/b", "fetch", "missing", "404")
    written = store.write_shard(str(tmp_path), 7, ["a"], np.ones((1, 8), np.float32), [empty], [error])
    assert store.read_commits(str(tmp_path)) == [written]
    assert written.reasons == {"missing": 1} and written.shard == 7


@pytest.mark.parametrize(
    ("name", "marker", "message"),
    [
        ("part-00000", {"ok": 2, "errors": 0}, r"missing keys \['rows'\]"),
        ("part-00000", {"rows": 2, "ok": 2, "errors": 0, "eror": 1}, r"unknown keys \['eror'\]"),
        ("part-00000", {"rows": "2", "ok": 2, "errors": 0}, "'rows' is '2'; must be an integer"),
        ("part-00000", {"rows": 2, "ok": -1, "errors": 3}, "'ok' is -1"),
        ("part-00000", {"rows": 5, "ok": 2, "errors": 0}, r"rows 5 != ok 2 \+ errors 0"),
        (
            "part-00000",
            {"rows": 2, "ok": 2, "errors": 0, "shard": 4},
            "says shard 4 but is named for shard 0",
        ),
        ("part-00000", {"rows": 2, "ok": 2, "errors": 0, "reasons": ["x"]}, "'reasons' must map"),
        ("part-00000", "{rows: 2", "not JSON"),
        ("part-00000", "[2, 2, 0]", "must be a JSON object, not list"),
        ("shard-0", {"rows": 2, "ok": 2, "errors": 0}, "file name must be part-NNNNN.json"),
    ],
)
def test_malformed_markers_fail_clearly(tmp_path, name, marker, message):
    write_documented_store(tmp_path, {name: marker})
    with pytest.raises(store.StoreFormatError, match=message) as info:
        store.global_shard_urls(str(tmp_path))
    assert f"{name}.json" in str(info.value) and "\n" not in str(info.value)
