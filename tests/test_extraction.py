"""Distributed extraction on a real local Ray: accounting, equality with direct extraction, resume, faults.

Every test checks the product's promise: each manifest row ends in exactly one of "descriptors written" or
"error record", no id twice, and the union of outputs equals one uninterrupted run.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline import boundary, storage, store
from pipeline.config import get_preset
from pipeline.errors import InputError, ResourcesUnavailableError
from pipeline.extraction import (
    ClusterOptions,
    ExtractionJob,
    Extractors,
    Progress,
    decode_rows,
    extractor_device,
    run_extraction,
)
from pipeline.features import Extractor
from pipeline.images import load_image
from pipeline.manifest import read_manifest
from pipeline.model.delg import Delg
from pipeline.ray_runtime import every
from pipeline.store import StoreSettings
from tests.models import calibrated_weights
from tests.raynodes import RayNodes, own_ray_workers
from tests.servers import Fault
from tests.tables import table_rows

CONFIG = get_preset("cpu-small")
EXACT = StoreSettings(global_dtype="float32", local_dtype="float32")
SHAPES = ((96, 128), (128, 96), (112, 112))


def _photo(rng: np.random.Generator, height: int, width: int) -> bytes:
    """A smooth random picture (JPEG), so features are not pure noise."""
    low = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(low).resize((width, height), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def _dataset(folder: Path, good: int, seed: int = 0) -> tuple[list[dict], dict[str, str]]:
    """Good rows (relative urls) and bad rows with the reason each must produce."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(good):
        name = f"images/img{i:03d}.jpg"
        (folder / name).write_bytes(_photo(rng, *SHAPES[i % len(SHAPES)]))
        rows.append({"id": f"img{i:03d}", "url": name})
    (folder / "images/truncated.jpg").write_bytes(_photo(rng, 96, 96)[:300])
    (folder / "images/text.jpg").write_bytes(b"this is not an image")
    bad = {
        "gone": ("images/gone.jpg", "missing"),
        "truncated": ("images/truncated.jpg", "truncated"),
        "text": ("images/text.jpg", "not_an_image"),
        "ftp": ("ftp://example.invalid/x.jpg", "scheme_not_allowed"),
    }
    rows += [{"id": image_id, "url": url} for image_id, (url, _) in bad.items()]
    return rows, {image_id: reason for image_id, (_, reason) in bad.items()}


def _manifest(path: Path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """Seeded, calibrated weights saved to a file, so actors and the test build the same model."""
    return calibrated_weights(CONFIG, tmp_path_factory.mktemp("weights") / "cpu-small.pt")


def _reference(weights: str, folder: Path, rows: list[dict]) -> dict[str, np.ndarray]:
    """Global descriptors by direct, single-process extraction."""
    model = Delg.from_config(CONFIG)
    model.load_state_dict(torch.load(weights, weights_only=True))
    extractor = Extractor(model, CONFIG, device="cpu")
    out = {}
    for row in rows:
        image = load_image({"url": str(folder / row["url"])})
        out[row["id"]] = extractor.extract_single(image).global_descriptor
    return out


def _assert_accounted(out: str, rows: list[dict], bad: dict[str, str], options=None) -> dict[str, np.ndarray]:
    """Every row exactly once: ok ids in global+local, bad ids in errors with their reason."""
    stats = store.store_stats(out, options)
    assert stats["rows"] == len(rows) == stats["ok"] + stats["errors"]
    ids, vectors = store.read_global(out, options)
    errors = store.read_errors(out, options).to_pylist()
    assert len(set(ids)) == len(ids), "an id was written twice"
    assert {e["id"]: e["reason"] for e in errors} == bad
    assert set(ids) | set(bad) == {r["id"] for r in rows}
    assert store.LocalReader(out, options).ids() == set(ids)
    return dict(zip(ids, vectors, strict=True))


def test_every_row_accounted_and_equal_to_direct_extraction(tmp_path, ray_cluster, weights):
    rows, bad = _dataset(tmp_path, good=9)
    job = ExtractionJob(
        _manifest(tmp_path / "m.parquet", rows), str(tmp_path / "out"), CONFIG, weights, EXACT, 4
    )
    seen = []
    summary = run_extraction(job, ClusterOptions(address=ray_cluster, chunk_size=3), on_progress=seen.append)
    assert (summary.rows, summary.ok, summary.errors) == (13, 9, 4)
    assert summary.errors_by_reason == {
        "missing": 1,
        "truncated": 1,
        "not_an_image": 1,
        "scheme_not_allowed": 1,
    }
    assert seen and seen[-1].done_rows == 13
    got = _assert_accounted(job.out_url, rows, bad)
    expected = _reference(weights, tmp_path, [r for r in rows if r["id"] not in bad])
    stacked = np.stack(list(expected.values()))
    assert (stacked @ stacked.T).min() < 0.99, "descriptors collapsed: equality below would prove nothing"
    for image_id, vector in expected.items():
        assert float(vector @ got[image_id]) > 1 - 1e-4, image_id
    info = json.loads((tmp_path / "out/_run.json").read_text())
    assert info["preset"] == "cpu-small" and info["manifest_rows"] == 13 and len(info["weights_sha256"]) == 64
    # The same stage logic without Ray (the execution seam's in-process executor) writes the same store.
    here = replace(job, out_url=str(tmp_path / "here"))
    summary = run_extraction(here, ClusterOptions(chunk_size=3), in_process=True)
    assert (summary.rows, summary.ok, summary.errors, summary.devices) == (13, 9, 4, {"cpu": 1})
    in_process = _assert_accounted(here.out_url, rows, bad)
    for image_id, vector in got.items():
        np.testing.assert_allclose(in_process[image_id], vector, atol=1e-5)


def _opens_of(path: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The modes ``path`` is opened in from now on through pipeline.storage (fsspec's local filesystem, which
    every read of a local file goes through)."""
    from fsspec.implementations.local import LocalFileSystem

    opened: list[str] = []
    real_open = LocalFileSystem._open

    def counted(self, name, mode="rb", *args, **kwargs):
        if Path(name).resolve() == Path(path).resolve():
            opened.append(mode)
        return real_open(self, name, mode, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "_open", counted)
    return opened


def test_resume_redoes_only_uncommitted_shards(tmp_path, weights, monkeypatch):
    rows, bad = _dataset(tmp_path, good=8)
    job = ExtractionJob(
        _manifest(tmp_path / "m.parquet", rows), str(tmp_path / "out"), CONFIG, weights, EXACT, 4
    )
    cluster = ClusterOptions(chunk_size=4)
    run_extraction(job, cluster, in_process=True)
    before = _assert_accounted(job.out_url, rows, bad)
    # A crash between shard 1's data files and its commit marker: the marker is missing.
    (tmp_path / "out/_commits/part-00001.json").unlink()
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "out/global").iterdir() if "00001" not in p.name}
    summary = run_extraction(job, cluster, in_process=True)
    assert summary.shards_resumed == 2 and summary.rows_this_run == 4
    assert {p: p.stat().st_mtime_ns for p in kept} == kept, "committed shards were rewritten"
    after = _assert_accounted(job.out_url, rows, bad)
    assert before.keys() == after.keys()
    for image_id in before:
        np.testing.assert_allclose(before[image_id], after[image_id], atol=1e-5)
    # A finished run re-run does nothing, and downloads the weights once (their settings and checksum).
    weights_opened = _opens_of(weights, monkeypatch)
    assert run_extraction(job, cluster, in_process=True).rows_this_run == 0
    assert weights_opened == ["rb"]


def test_resume_refuses_a_different_run(tmp_path, weights):
    rows, _ = _dataset(tmp_path, good=2)
    job = ExtractionJob(
        _manifest(tmp_path / "m.parquet", rows), str(tmp_path / "out"), CONFIG, weights, EXACT, 4
    )
    run_extraction(job, in_process=True)
    other = replace(job, config=replace(CONFIG, max_local_features=10))
    with pytest.raises(InputError, match=r"different run.*config"):
        run_extraction(other, in_process=True)
    with pytest.raises(InputError, match=r"different run.*decode_draft"):  # other pixels, other features
        run_extraction(replace(job, decode_draft=True), in_process=True)


def test_sigkill_of_an_extractor_actor_loses_no_row(tmp_path, ray_cluster, weights):
    rows, bad = _dataset(tmp_path, good=20)
    job = ExtractionJob(
        _manifest(tmp_path / "m.parquet", rows), str(tmp_path / "out"), CONFIG, weights, EXACT, 3
    )
    killed: list[int] = []

    def kill_at_the_first_commit(progress: Progress) -> None:
        """In the driver's loop, as soon as a shard is committed while chunks are still to extract."""
        if killed or not progress.shards_committed:
            return
        assert progress.done_rows < progress.total_rows, "nothing left to extract: a kill would prove nothing"
        actors = own_ray_workers("ExtractorActor")
        assert actors, "no extractor actor to kill"
        for actor in actors:
            actor.send_signal(signal.SIGKILL)
        killed.extend(actor.pid for actor in actors)

    cluster = ClusterOptions(address=ray_cluster, chunk_size=2)
    summary = run_extraction(job, cluster, on_progress=kill_at_the_first_commit)
    assert killed, "no shard was committed before the end, so nothing was killed"
    assert summary.rows == len(rows)
    _assert_accounted(job.out_url, rows, bad)


def _wait_for_a_commit(driver: subprocess.Popen, commits: Path, log: Path, timeout_s: float) -> None:
    """Return once the running ``driver`` has committed a shard; fail with why when it ends or times out first.

    The driver only starts committing after Ray start-up, model load and the first chunks, which on a loaded
    2-core machine can take minutes: the limit is generous (the rerun after the kill must still fit the test timeout), and a failure says
    what was (not) seen.
    """
    deadline = time.monotonic() + timeout_s
    while not (commits.is_dir() and any(commits.iterdir())):
        if driver.poll() is not None:
            raise AssertionError(
                f"driver ended before its first commit: {log.read_text(errors='replace')[-2000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"no shard committed under {commits} within {timeout_s:.0f} s of the start")
        time.sleep(0.05)


def test_killed_driver_resumes_to_the_same_result(tmp_path, ray_cluster, weights):
    rows, bad = _dataset(tmp_path, good=16)
    manifest = _manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "extract",
        manifest,
        str(out),
        "--weights",
        weights,
        "--preset",
        "cpu-small",
        "--shard-size",
        "3",
        "--chunk-size",
        "3",
        "--address",
        ray_cluster,
        "--global-dtype",
        "float32",
        # Decode and write tasks one at a time beside the extractor on the session's 2 CPUs: the command is a
        # Ray job of its own, whose every new worker imports torch (seconds on 2 busy cores), and these tiny
        # images need no parallel decoding. Cluster settings change no output.
        "--decode-cpus",
        "1",
    ]
    # stderr to a file, not a pipe: an unread pipe that fills up would stall the driver before any commit.
    log = tmp_path / "driver.stderr"
    with log.open("wb") as stderr:
        driver = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        _wait_for_a_commit(driver, out / "_commits", log, timeout_s=240)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    committed = len(list((out / "_commits").iterdir()))
    assert 0 < committed < 7, f"{committed} of 7 shards committed before the kill"
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    got = _assert_accounted(str(out), rows, bad)
    expected = _reference(weights, tmp_path, [r for r in rows if r["id"] not in bad])
    for image_id, vector in expected.items():
        assert float(vector @ got[image_id]) > 1 - 1e-4, image_id
    summary = table_rows(finished.stdout)
    assert summary["rows"] == str(len(rows)) and summary["shards"].endswith(
        f"({committed} from an earlier run)"
    )


def _local_files_layout(tmp_path: Path) -> str:
    """m/m.parquet with rows inside its folder, beside it (../), through a symlink out of it, and /etc."""
    rng = np.random.default_rng(3)
    (tmp_path / "m/images").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "m/images/in.jpg").write_bytes(_photo(rng, 96, 96))
    (tmp_path / "outside/out.jpg").write_bytes(_photo(rng, 96, 96))
    (tmp_path / "m/images/link.jpg").symlink_to(tmp_path / "outside/out.jpg")
    depth = "../" * len(tmp_path.parts)  # from m/ up past the file system root
    rows = [
        {"id": "in", "url": "images/in.jpg"},
        {"id": "up", "url": "../outside/out.jpg"},
        {"id": "link", "url": "images/link.jpg"},
        {"id": "etc", "url": "file:///etc/hostname"},
        {"id": "etc-up", "url": f"{depth}etc/hostname"},
    ]
    return _manifest(tmp_path / "m/m.parquet", rows)


def _decoded(job: ExtractionJob, options=None) -> tuple[list[str], dict[str, str]]:
    """(ids decoded, {id: error reason}) of every row of the job's manifest, as the decode tasks do it."""
    chunk = decode_rows(read_manifest(job.manifest_url, options, job.image_root), job, options)
    return chunk.ids, {e.id: e.reason for e in chunk.errors}


def test_local_files_outside_the_manifest_folder_need_the_opt_in(tmp_path):
    job = ExtractionJob(_local_files_layout(tmp_path), str(tmp_path / "out"), CONFIG)
    refused = {k: "local_file_refused" for k in ("up", "link", "etc", "etc-up")}
    assert _decoded(job) == (["in"], refused)
    # The opt-in reads them all (/etc/hostname is read, then is no image).
    everything = replace(job, allow_local_outside_root=True)
    assert _decoded(everything) == (["in", "up", "link"], {"etc": "not_an_image", "etc-up": "not_an_image"})
    # An image root moves the root: now m/ is outside and outside/ inside.
    rooted = replace(job, image_root=str(tmp_path / "outside"))
    assert _decoded(rooted) == (
        ["up", "link"],
        {"in": "local_file_refused", "etc": "local_file_refused"} | {"etc-up": "local_file_refused"},
    )


def test_a_remote_manifest_reads_no_local_file_without_the_opt_in(tmp_path, s3_bucket):
    image = tmp_path / "local.jpg"
    image.write_bytes(_photo(np.random.default_rng(4), 96, 96))
    storage.write_bytes(f"{s3_bucket.url}/remote.jpg", image.read_bytes(), s3_bucket.options)
    rows = [{"id": "remote", "url": "remote.jpg"}, {"id": "file", "url": image.as_uri()}]
    rows += [{"id": "path", "url": str(image)}]
    manifest_url = f"{s3_bucket.url}/m.parquet"
    storage.write_parquet(manifest_url, pa.Table.from_pylist(rows), s3_bucket.options)
    job = ExtractionJob(manifest_url, str(tmp_path / "out"), CONFIG)
    refused = {"file": "local_file_refused", "path": "local_file_refused"}
    assert _decoded(job, s3_bucket.options) == (["remote"], refused)
    everything = replace(job, allow_local_outside_root=True)
    assert _decoded(everything, s3_bucket.options) == (["remote", "file", "path"], {})


def test_s3_manifest_http_images_and_s3_output(tmp_path, ray_cluster, weights, s3_bucket, http_server):
    """Manifest on S3, images on S3 and over HTTP (with a transient 503 and a 404), descriptors to S3."""
    from tests.servers import Fault

    rng = np.random.default_rng(5)
    web = tmp_path / "web"
    web.mkdir()
    (web / "flaky.jpg").write_bytes(_photo(rng, 96, 96))
    server = http_server(web)
    server.add_fault("/flaky.jpg", Fault(status=503, times=2))
    options = s3_bucket.options
    rows = []
    for i in range(3):
        url = f"{s3_bucket.url}/images/s3img{i}.jpg"
        storage.write_bytes(url, _photo(rng, 96, 128), options)
        rows.append({"id": f"s3img{i}", "url": url})
    rows += [
        {"id": "flaky", "url": server.url("flaky.jpg")},
        {"id": "http404", "url": server.url("nothing.jpg")},
        {"id": "s3missing", "url": f"{s3_bucket.url}/images/nothing.jpg"},
        {"id": "localfile", "url": (web / "flaky.jpg").as_uri()},  # a good image, but a remote manifest's
    ]
    manifest_url = f"{s3_bucket.url}/manifests/m.parquet"
    storage.write_parquet(manifest_url, pa.Table.from_pylist(rows), options)
    storage.upload(weights, f"{s3_bucket.url}/models/w.pt", options)
    out = f"{s3_bucket.url}/descriptors"
    job = ExtractionJob(manifest_url, out, CONFIG, f"{s3_bucket.url}/models/w.pt", shard_size=4)
    summary = run_extraction(job, ClusterOptions(address=ray_cluster), options)
    assert (summary.ok, summary.errors) == (4, 3)
    assert server.hits["/flaky.jpg"] == 3  # two 503s retried, then served
    expected = {"http404": "missing", "s3missing": "missing", "localfile": "local_file_refused"}
    _assert_accounted(out, rows, expected, options)
    everything = b"".join(
        storage.read_bytes(u, options)
        for d in ("", "errors/", "_commits/")
        for u in storage.list_files(f"{out}/{d}", options)
    )
    assert options["secret"].encode() not in everything and options["key"].encode() not in everything


def test_extractor_pool_settings_are_checked_and_named():
    assert Extractors().most == 1 and Extractors(min_extractors=2).most == 2
    assert Extractors(0.5, 1, 3).most == 3
    for bad, flag in (
        (dict(gpus_per_extractor=-1), "--gpus-per-extractor"),
        (dict(gpus_per_extractor=float("nan")), "--gpus-per-extractor"),
        (dict(min_extractors=0), "--min-extractors"),
        (dict(min_extractors=3, max_extractors=2), "--max-extractors"),
        (dict(extractor_wait_timeout=-1), "--extractor-wait-timeout"),
        (dict(extractor_wait_timeout=float("inf")), "--extractor-wait-timeout"),
    ):
        with pytest.raises(ValueError, match=flag):
            Extractors(**bad)


def test_a_gpu_no_node_has_fails_at_the_deadline_naming_request_and_offer(tmp_path, ray_cluster, weights):
    """The session's Ray has 2 CPUs and no GPU: 1-GPU extractors never start, so the run must end at its
    deadline with a user error (exit 2 at the error boundary)."""
    rows, _ = _dataset(tmp_path, good=1)
    job = ExtractionJob(_manifest(tmp_path / "m.parquet", rows), str(tmp_path / "out"), CONFIG, weights)
    pool = Extractors(gpus_per_extractor=1, min_extractors=1, max_extractors=2, extractor_wait_timeout=1.5)
    started = time.monotonic()
    with pytest.raises(ResourcesUnavailableError) as raised:
        run_extraction(job, ClusterOptions(address=ray_cluster, extractors=pool))
    assert 1.5 <= time.monotonic() - started < 60
    assert str(raised.value) == (
        "1 of --min-extractors 1 extractor(s) not ready after --extractor-wait-timeout 1.5 s; each asks for "
        "1 GPU and 1 CPU; the cluster offers GPU 0 (0 free), CPU 2 (2 free) on 1 node(s). Add nodes with "
        "those resources (or let the autoscaler start them in a longer wait), or lower --gpus-per-extractor "
        "/ --min-extractors"
    )
    assert boundary.user_error(raised.value) is raised.value


def test_a_cpu_actor_stays_on_the_cpu_and_a_gpu_actor_without_cuda_falls_back(caplog):
    assert extractor_device(0) == "cpu"
    if torch.cuda.is_available():
        assert extractor_device(1) == "cuda"
    else:
        assert extractor_device(1) == "cpu"
        assert "CUDA is not usable" in caplog.text and "extracting on the CPU" in caplog.text


def test_progress_line_and_its_interval():
    progress = Progress(total_rows=200, skipped_rows=50, done_rows=30, errors=2)
    progress.devices.update({"cuda": 2, "cpu": 1})
    line = progress.describe()
    assert line.startswith("extraction: 80/200 rows (40.0%), ") and line.endswith(
        " images/s, 2 errors, 3 extractors (cpu: 1, cuda: 2)"
    )
    seen: list[int] = []
    hourly, always = every(3600, seen.append), every(0, seen.append)
    for i in range(3):
        hourly(i)
    for i in range(3, 5):
        always(i)
    assert seen == [0, 3, 4]


def _follow(stream, lines: list[str]) -> threading.Thread:
    def read() -> None:
        for line in stream:
            lines.append(line)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def _wait_for_line(lines: list[str], text: str, driver: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in lines):
        if driver.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no {text!r} from the driver ({driver.poll()=}):\n{''.join(lines)[-3000:]}")
        time.sleep(0.2)


@pytest.mark.slow
def test_gpu_extractors_wait_for_gpu_nodes_and_the_pool_grows_as_they_join(tmp_path, weights, http_server):
    """A head without GPUs; the run asks for 1-GPU extractors (min 1, max 2), waits, starts when a 1-GPU node
    joins, grows to 2 actors when a second joins mid-run, and accounts for every row. The nodes' GPUs are
    declared, not real: without CUDA the actors fall back to the CPU."""
    rng = np.random.default_rng(3)
    web = tmp_path / "web"
    web.mkdir()
    rows = []
    for i in range(6):
        (web / f"img{i}.jpg").write_bytes(_photo(rng, *SHAPES[i % len(SHAPES)]))
        rows.append({"id": f"img{i}", "url": f"img{i}.jpg"})
    rows.append({"id": "gone", "url": "gone.jpg"})
    server = http_server(web)
    released = threading.Event()  # every image waits until the pool has grown: work outlasts the joins
    for row in rows:
        server.add_fault(row["url"], Fault(hold=released))
        row["url"] = server.url(row["url"])
    manifest, out = _manifest(tmp_path / "m.parquet", rows), tmp_path / "out"
    nodes = RayNodes()
    driver = None
    try:
        address = nodes.start_head("--num-cpus=2", "--num-gpus=0", "--include-dashboard=false")
        command = [
            sys.executable,
            "-m",
            "pipeline.cli",
            "-v",
            "extract",
            manifest,
            str(out),
            "--weights",
            weights,
        ]
        command += ["--preset", "cpu-small", "--shard-size", "3", "--chunk-size", "1", "--address", address]
        command += ["--gpus-per-extractor", "1", "--min-extractors", "1", "--max-extractors", "2"]
        command += ["--global-dtype", "float32"]
        driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        log: list[str] = []
        _follow(driver.stderr, log)
        _wait_for_line(log, "waiting for 1 more extractor(s) (1 GPU, 1 CPU each)", driver)
        time.sleep(2)
        assert not any("ready on" in line for line in log) and not out.joinpath("_commits").exists()
        nodes.add_node("--num-cpus=1", "--num-gpus=1")
        _wait_for_line(log, "extractor 1 of 2 ready", driver)
        nodes.add_node("--num-cpus=1", "--num-gpus=1")
        _wait_for_line(log, "extractor 2 of 2 ready", driver)
        released.set()
        stdout, _ = driver.communicate(timeout=240)
        assert driver.returncode == 0, "".join(log)[-3000:]
    finally:
        released.set()
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait()
        nodes.stop()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert table_rows(stdout)["extractors"] == f"2 ({device}: 2)"
    assert table_rows(stdout)["rows"] == "7"
    _assert_accounted(str(out), rows, {"gone": "missing"})
