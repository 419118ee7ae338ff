"""`landmark-index query` and pipeline.query on the tiny demo index (tests/demo_index.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import store, versions
from pipeline.query import QueryEngine, prepare_photo, query_photos, resolve_version


def test_an_indexed_photo_finds_itself_first_verified(demo_root):
    version = resolve_version(demo_root.root)
    assert version.name == "v000001"
    engine = QueryEngine(version)
    found = engine.query("p", demo_root.photo("camera-1").read_bytes(), k=4)
    assert found["index_version"] == "v000001"
    first = found["results"][0]
    assert first["id"] == "camera-1"
    assert first["inliers"] > 10  # a photo against itself: most features verify
    assert [r["score"] for r in found["results"]] == sorted(
        (r["score"] for r in found["results"]), reverse=True
    )
    # the query's global descriptor is the one the batch extraction stored (float16 in the store)
    features = engine.model.extract([prepare_photo(version, demo_root.photo("camera-1").read_bytes())])[0]
    ids, vectors = store.read_global(version.stores[-1])
    stored = vectors[list(ids).index("camera-1")]
    np.testing.assert_allclose(features.global_descriptor, stored, atol=2e-3)


def test_without_rerank_scores_are_global_and_unverified(demo_root):
    found = query_photos([str(demo_root.photo("query-coffee"))], demo_root.root, k=3, rerank=False)[0]
    assert [r["inliers"] for r in found["results"]] == [None] * 3
    assert len(found["results"]) == 3


def test_a_versioned_root_reads_latest(demo_root):
    photo = str(demo_root.photo("query-retina"))
    before = query_photos([photo], demo_root.root, k=8)[0]
    versions.publish(demo_root.root, versions.version_name(2))
    after = query_photos([photo], demo_root.root, k=8)[0]
    assert (before["index_version"], after["index_version"]) == ("v000001", "v000002")
    assert any(r["id"].startswith("retina") for r in before["results"])
    assert not any(r["id"].startswith("retina") for r in after["results"])  # v2 no longer indexes it


def test_k_out_of_range_and_a_folder_without_index_are_user_errors(demo_root, tmp_path):
    with pytest.raises(ValueError, match="k=0"):
        query_photos([str(demo_root.photo("query-coffee"))], demo_root.root, k=0)
    with pytest.raises(FileNotFoundError, match="neither a versioned root"):
        resolve_version(str(tmp_path))


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "query", *args], capture_output=True, text=True, env=env
    )


def test_cli_json_is_the_library_answer_and_a_bad_photo_is_one_line(demo_root, tmp_path):
    photo = str(demo_root.photo("query-chelsea"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    done = _cli(photo, str(bad), "--index", demo_root.root, "--json", "--k", "5")
    assert done.returncode == 2, done.stderr
    printed = [json.loads(line) for line in done.stdout.splitlines()]
    assert printed[0] == query_photos([photo], demo_root.root, k=5)[0]
    assert printed[1]["error"] == "not_an_image" and "Traceback" not in done.stderr


def _run_layouts(demo_root, tmp_path) -> tuple[str, str, list[str]]:
    """The live version copied into a `run` folder (index/ and index-descriptors/ beside it) and into a bare
    index folder: (run folder, bare index folder, the version's stores)."""
    live = versions.resolve_latest(demo_root.root)
    stores = versions.read_stores(live)
    assert len(stores) == 1  # v000001 is one reindex run's store
    run = tmp_path / "run"
    shutil.copytree(live, run / "index")
    shutil.copytree(stores[0], run / "index-descriptors")
    shutil.copytree(live, tmp_path / "bare")
    return str(run), str(tmp_path / "bare"), stores


def test_index_takes_every_documented_layout(demo_root, tmp_path):
    """--index: a versioned root (its LATEST), a `run` folder, a run's index folder (the run's store found
    beside it) and an index folder with --stores."""
    run, bare, stores = _run_layouts(demo_root, tmp_path)
    root = resolve_version(demo_root.root)
    layouts = [
        resolve_version(run),
        resolve_version(os.path.join(run, "index")),
        resolve_version(bare, stores=stores),
    ]
    assert [(v.index_url, v.stores) for v in layouts] == [
        (os.path.join(run, "index"), (os.path.join(run, "index-descriptors"),)),
        (os.path.join(run, "index"), (os.path.join(run, "index-descriptors"),)),
        (bare, tuple(stores)),
    ]
    params = (
        Path(run) / "index" / "params.json"
    ).read_bytes()  # one index: one name, the model is the root's
    assert {v.name for v in layouts} == {"index-" + hashlib.sha256(params).hexdigest()[:12]}
    assert {(v.extraction, v.weights_sha256, v.rerank) for v in layouts} == {
        (root.extraction, root.weights_sha256, root.rerank)
    }
    with pytest.raises(FileNotFoundError, match=r"no descriptor store at .*index-descriptors"):
        resolve_version(bare)  # no run's store beside it and none given


def test_cli_table_shows_rank_id_score_inliers_of_the_answer(demo_root, tmp_path):
    run, _, _ = _run_layouts(demo_root, tmp_path)
    photo = str(demo_root.photo("query-coffee"))
    done = _cli(photo, "--index", run, "--k", "4")
    assert done.returncode == 0, done.stderr
    expected = query_photos([photo], demo_root.root, k=4)[0]["results"]
    rows = [
        [cell.strip() for cell in line.strip("│").split("│")]
        for line in done.stdout.splitlines()
        if line.startswith("│")
    ]
    assert rows == [
        [str(rank), r["id"], f"{r['score']:.4f}", "" if r["inliers"] is None else str(r["inliers"])]
        for rank, r in enumerate(expected, 1)
    ]
    assert any(r["inliers"] for r in expected)  # re-ranked: the inliers column is filled
    header = next(line for line in done.stdout.splitlines() if line.startswith("┃"))
    assert [cell.strip() for cell in header.strip("┃").split("┃")] == ["rank", "id", "score", "inliers"]
    assert "index-" in done.stdout  # the title names the version answered from
