"""The Ray job entry points (jobs/), submitted through the Ray Jobs API to a real local Ray cluster: a head node
of our own (tests/raynodes.py) with the dashboard (the job server) on 127.0.0.1."""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from jobs import index_manifest, nightly_reindex
from pipeline.index import io as index_io
from tests.raynodes import RayNodes

REPO = Path(__file__).resolve().parents[1]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _client(url: str, timeout: float = 120.0):
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout
    while True:
        try:
            return JobSubmissionClient(url)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.fixture(scope="module")
def job_client() -> Iterator:
    """A JobSubmissionClient of a fresh 2-CPU head node with the dashboard (job server) on 127.0.0.1."""
    nodes = RayNodes()
    try:
        nodes.start_head("--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1")
        yield _client(f"http://127.0.0.1:{nodes.ports['--dashboard-port']}")
    finally:
        nodes.stop()


def _runtime_env() -> dict:
    """The example's working_dir and excludes (its pip list needs a network; the venv here has it all)."""
    example = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    return {"working_dir": str(REPO), "excludes": example["excludes"]}


def _run(client, entrypoint: list[str], timeout: float = 300.0) -> tuple[str, str]:
    """Submit, follow to a terminal status; (status, logs)."""
    job = client.submit_job(
        entrypoint=" ".join([sys.executable, *(f"'{a}'" for a in entrypoint)]), runtime_env=_runtime_env()
    )
    deadline = time.monotonic() + timeout
    status = str(client.get_job_status(job))
    while status.split(".")[-1] not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1)
        status = str(client.get_job_status(job))
    logs = client.get_job_logs(job)
    if status.split(".")[-1] not in TERMINAL:
        client.stop_job(job)
        pytest.fail(f"job {job} still {status} after {timeout} s; logs:\n{logs[-3000:]}")
    return status.split(".")[-1], logs


def _summary(logs: str) -> dict:
    """The JSON summary a job prints as its last line of stdout."""
    for line in reversed(logs.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON summary in the logs:\n{logs[-3000:]}")


def _manifest(folder: Path, count: int) -> str:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        low = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(low).resize((64, 64), Image.BICUBIC).save(buffer, format="JPEG")
        path = folder / f"img{i}.jpg"
        path.write_bytes(buffer.getvalue())
        rows.append({"id": f"img{i}", "url": str(path)})
    pq.write_table(pa.Table.from_pylist(rows), folder / "manifest.parquet")
    return str(folder / "manifest.parquet")


def test_index_manifest_job_extracts_and_builds(job_client, tmp_path):
    manifest = _manifest(tmp_path, 3)
    out = tmp_path / "out"
    status, logs = _run(
        job_client,
        [
            "jobs/index_manifest.py",
            "--manifest",
            manifest,
            "--out",
            str(out),
            "--preset",
            "cpu-small",
            "--weights",
            "",
            "--memory-budget",
            "1GiB",
            "--shard-size",
            "2",
            "--progress-interval",
            "0",
        ],
    )
    assert status == "SUCCEEDED", logs[-3000:]
    summary = _summary(logs)
    lines = logs.splitlines()
    progress = [i for i, line in enumerate(lines) if line.startswith("extraction: ")]
    assert progress and progress[-1] < lines.index(json.dumps(summary, sort_keys=True)), logs[-3000:]
    assert lines[progress[-1]].startswith("extraction: 3/3 rows (100.0%), ")
    assert lines[progress[-1]].endswith(" images/s, 0 errors, 1 extractors (cpu: 1)")
    assert "index: building from 3 descriptors" in lines
    assert (summary["extraction"]["extractors"], summary["extraction"]["devices"]) == (1, {"cpu": 1})
    assert (summary["extraction"]["rows"], summary["extraction"]["ok"], summary["extraction"]["shards"]) == (
        3,
        3,
        2,
    )
    assert (summary["factory"], summary["ntotal"]) == ("IDMap2,Flat", 3)  # exact for tiny N
    assert sorted(p.name for p in (out / "descriptors" / "_commits").iterdir()) == [
        "part-00000.json",
        "part-00001.json",
    ]
    _, image_ids = index_io.read_id_map(str(out / "index"))
    assert sorted(image_ids) == ["img0", "img1", "img2"]
    assert index_io.load_index(str(out / "index")).ntotal == 3


def test_index_manifest_job_fails_with_the_reason(job_client, tmp_path):
    missing = str(tmp_path / "missing.parquet")
    status, logs = _run(
        job_client,
        [
            "jobs/index_manifest.py",
            "--manifest",
            missing,
            "--out",
            str(tmp_path / "out"),
            "--preset",
            "cpu-small",
        ],
    )
    assert status == "FAILED"
    assert "index_manifest failed: ManifestError" in logs
    assert f"manifest {missing!r}: no such file" in logs
    assert not (tmp_path / "out").exists()


def test_nightly_reindex_job_publishes_then_refuses_while_locked(job_client, tmp_path):
    manifest = _manifest(tmp_path, 2)
    root = tmp_path / "root"
    arguments = [
        "jobs/nightly_reindex.py",
        "--manifest",
        manifest,
        "--root",
        str(root),
        "--preset",
        "cpu-small",
        "--weights",
        "",
        "--keep",
        "2",
        "--retrain-threshold",
        "0.2",
        "--progress-interval",
        "0",
    ]
    status, logs = _run(job_client, arguments)
    assert status == "SUCCEEDED", logs[-3000:]
    report = _summary(logs)
    lines = logs.splitlines()
    assert lines.index("reindex: extracted") < lines.index("reindex: built") < lines.index("reindex: written")
    progress = [i for i, line in enumerate(lines) if line.startswith("extraction: 2/2 rows (100.0%), ")]
    assert progress and progress[-1] < lines.index("reindex: extracted"), logs[-3000:]
    assert (report["version"], report["added"], report["retrained"], report["ntotal"]) == (
        "v000001",
        2,
        True,
        2,
    )
    assert (root / "LATEST").read_text().strip() == "v000001"

    lock = {"owner": "other-host:1:x", "expires_at": time.time() + 600}
    (root / "_lock.json").write_text(json.dumps(lock))
    status, logs = _run(job_client, arguments)
    assert status == "FAILED"
    assert "nightly_reindex refused" in logs and "held by other-host:1:x" in logs


@pytest.mark.parametrize(
    ("job", "place"),
    [(index_manifest, ["--out", "o"]), (nightly_reindex, ["--root", "r"])],
)
@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--min-extractors", "0"], "--min-extractors"),
        (["--min-extractors", "2", "--max-extractors", "1"], "--max-extractors"),
        (["--gpus-per-extractor", "-1"], "--gpus-per-extractor"),
    ],
)
def test_a_bad_extractor_pool_is_a_bad_input(job, place, flags, named, capsys, tmp_path):
    """Exit 2 naming the flag, before anything is read or started (no Ray, no manifest)."""
    argv = ["--manifest", str(tmp_path / "none.parquet"), *place, "--preset", "cpu-small", *flags]
    assert job.main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and named in error and "ConfigError" in error
