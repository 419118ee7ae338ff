"""The fault corpus: every fault a user can meet, produced for real and run through the real CLI.

Each row of FAULTS says how a fault is produced, the exit code and a fragment of the one error line the user
must see. Every run must print exactly one error line (naming the file or path and the fault), no traceback,
and no secret. Add a row for every bug found.

Disk full and read-only output are real: the command runs in a mount namespace of its own (``unshare``) where
a tiny or read-only tmpfs covers one folder of the store, so the Ray writer task meets ENOSPC / EROFS the way it
would on a full or read-only volume. Permission denied is a folder chmod 0o555; as root the command runs
without CAP_DAC_OVERRIDE (``setpriv``) so that the mode bits apply to it. Missing buckets and refused
credentials are answers of the real S3 server (tests/servers.py).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import boundary, cli, storage
from pipeline.index import build_index
from pipeline.storage import StorageFault
from tests.stores import write_clustered_store

PYTHON = [sys.executable, "-m", "pipeline.cli"]
DIM = 16
# Distinctive credentials of a manifest row's url and of the AWS environment: none may reach any output.
URL_KEY, URL_SECRET = "AKIAFAULTKEY0001", "fault-SECRET-in-url-0001"
ENV_SECRET = "fault-SECRET-in-env-0001"
WRONG_SECRET = "fault-WRONG-secret-0001"


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str


def check_one_error_line(outcome: Outcome, code: int, fragment: str) -> str:
    """The run failed with ``code`` and one error line containing ``fragment``, and no traceback."""
    assert outcome.code == code, outcome.stderr[-3000:]
    errors_shown = [line for line in outcome.stderr.splitlines() if line.startswith("error:")]
    assert len(errors_shown) == 1, outcome.stderr[-3000:]
    assert "Traceback" not in outcome.stderr + outcome.stdout
    assert "RayTaskError" not in outcome.stderr
    assert fragment in errors_shown[0], errors_shown[0]
    return errors_shown[0]


def run_in_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str]
) -> Outcome:
    """The console entry point (``pipeline.cli.main``) in this process: fast, same error boundary."""
    monkeypatch.setattr(sys, "argv", ["landmark-index", *args])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    out, err = capsys.readouterr()
    return Outcome(int(exited.value.code or 0), out, err)


def run_command(command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )


def finish(process: subprocess.Popen[str], timeout: float = 400) -> Outcome:
    out, err = process.communicate(timeout=timeout)
    return Outcome(process.returncode, out, err)


# ---------------------------------------------------------------------------------------------------------
# The world the faults are made in: stores, an index, results, ground truth (built once per module)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    root: Path
    index: str  # a built index (IDMap2,Flat over 24 vectors)
    queries: str  # a query store of the index's dimension
    results: str  # search results of those queries
    images: Path  # JPEGs and a manifest of them (manifest.parquet)

    def copy_of_index(self, name: str) -> Path:
        """A fresh copy of the built index to break."""
        target = self.root / "broken" / name
        shutil.copytree(self.index, target)
        return target


def _photos(folder: Path, count: int) -> None:
    """``count`` small smooth JPEGs and a manifest listing them."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    rows = []
    for i in range(count):
        low = rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(low).resize((128, 112), Image.BICUBIC).save(buffer, format="JPEG")
        (folder / f"img{i}.jpg").write_bytes(buffer.getvalue())
        rows.append({"id": f"img{i}", "url": f"img{i}.jpg"})
    pq.write_table(pa.Table.from_pylist(rows), folder / "manifest.parquet")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, ray_cluster: str) -> World:
    root = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, DIM)).astype(np.float32)
    write_clustered_store(str(root / "idx"), "img", 24, rng, centres)
    write_clustered_store(str(root / "qry"), "q", 3, rng, centres)
    build_index(str(root / "idx"), str(root / "index"), ray_address=ray_cluster)
    results = root / "results.parquet"
    pq.write_table(
        pa.table({"query_id": ["q000"], "rank": pa.array([1], pa.int32()), "id": ["img000"], "score": [0.9]}),
        results,
    )
    _photos(root / "images", 3)
    return World(root, str(root / "index"), str(root / "qry"), str(results), root / "images")


# ---------------------------------------------------------------------------------------------------------
# Bad input files and S3 faults: (kind, how it is made → CLI args, exit code, fragment of the error line)
# ---------------------------------------------------------------------------------------------------------


def _corrupt_index_faiss(w: World) -> list[str]:
    index = w.copy_of_index("corrupt-faiss")
    (index / "index.faiss").write_bytes(b"garbage, not a faiss index" * 10)
    return ["search", str(index), w.queries, str(w.root / "o.parquet")]


def _missing_index_faiss(w: World) -> list[str]:
    index = w.copy_of_index("no-faiss")
    (index / "index.faiss").unlink()
    return ["search", str(index), w.queries, str(w.root / "o.parquet")]


def _id_map(content: bytes | pa.Table | None) -> Callable[[World], list[str]]:
    def make(w: World) -> list[str]:
        index = w.copy_of_index(f"ids-{type(content).__name__}")
        target = index / "ids.parquet"
        if content is None:
            target.unlink()
        elif isinstance(content, bytes):
            target.write_bytes(content)
        else:
            pq.write_table(content, target)
        return ["search", str(index), w.queries, str(w.root / "o.parquet")]

    return make


def _corrupt_params(w: World) -> list[str]:
    index = w.copy_of_index("params")
    (index / "params.json").write_text('{"dim": 16,')
    return ["search", str(index), w.queries, str(w.root / "o.parquet")]


def _wrong_dimension(w: World) -> list[str]:
    rng = np.random.default_rng(1)
    other = str(w.root / "qry-8d")
    write_clustered_store(other, "q", 2, rng, rng.standard_normal((2, 8)).astype(np.float32))
    return ["search", w.index, other, str(w.root / "o.parquet")]


def _mistyped_query_store(w: World) -> list[str]:
    return ["search", w.index, w.queries + "-typo", str(w.root / "o.parquet")]


def _malformed_commit_marker(w: World) -> list[str]:
    broken = w.root / "qry-bad-marker"
    shutil.copytree(w.queries, broken)
    (broken / "_commits" / "part-00000.json").write_text('{"rows": 8, "ok": 8}')
    return ["search", w.index, str(broken), str(w.root / "o.parquet")]


def _results(content: bytes | pa.Table | None) -> Callable[[World], list[str]]:
    def make(w: World) -> list[str]:
        path = w.root / f"results-{type(content).__name__}.parquet"
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            pq.write_table(content, path)
        gnd = _gnd_file(w, {"imlist": ["img000"], "qimlist": ["q000"], "gnd": [_ANNOTATION]})
        return ["evaluate", str(path), gnd]

    return make


_ANNOTATION = {"bbx": [], "easy": [0], "hard": [], "junk": []}


def _gnd_file(w: World, content: object) -> str:
    path = w.root / f"gnd-{abs(hash(repr(content)))}.pkl"
    path.write_bytes(content if isinstance(content, bytes) else pickle.dumps(content))
    return str(path)


def _ground_truth(content: object) -> Callable[[World], list[str]]:
    return lambda w: ["evaluate", w.results, _gnd_file(w, content)]


def _binary_gldv2_solution(w: World) -> list[str]:
    path = w.root / "solution.csv"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    return ["evaluate", w.results, str(path), "--protocol", "gldv2-retrieval"]


@dataclass(frozen=True)
class Fault:
    kind: str
    make: Callable[[World], list[str]]  # produces the fault, returns the CLI arguments that meet it
    code: int
    fragment: str


FAULTS = [
    # issue 14 #5: faiss's RuntimeError was a traceback
    Fault("corrupt index.faiss", _corrupt_index_faiss, 2, "index.faiss is not a readable faiss index"),
    Fault("missing index.faiss", _missing_index_faiss, 2, "index.faiss is missing"),
    Fault("missing ids.parquet", _id_map(None), 2, "ids.parquet is missing"),
    Fault("ids.parquet not Parquet", _id_map(b"id,image_id\n1,a\n"), 2, "is not a readable Parquet file"),
    Fault(
        "ids.parquet wrong columns",
        _id_map(pa.table({"image_id": ["a"]})),
        2,
        "expected (id: int64, image_id: string)",
    ),
    Fault("params.json not JSON", _corrupt_params, 2, "params.json is not JSON"),
    Fault("query dimension != index dimension", _wrong_dimension, 2, "have 8-d descriptors but index"),
    # issue 14 #6: exit 0, "queries 0", an empty results file
    Fault("mistyped query store", _mistyped_query_store, 2, "no descriptor store at"),
    Fault("malformed commit marker", _malformed_commit_marker, 2, "missing keys ['errors']"),
    Fault("results file missing", _results(None), 2, "results-NoneType.parquet"),
    Fault("results not Parquet", _results(b"query_id,rank\n"), 2, "is not a readable Parquet file"),
    Fault("results wrong columns", _results(pa.table({"query_id": ["q000"]})), 2, "lack columns"),
    Fault(
        "results rank not an integer",
        _results(pa.table({"query_id": ["q000"], "rank": ["1"], "id": ["img000"], "score": [0.5]})),
        2,
        "column 'rank' is string; must be integer",
    ),
    # issue 14 #4: a ground truth that is not a pickle
    Fault(
        "ground truth not a pickle",
        _ground_truth(b"id,images\nq000,img000\n"),
        2,
        "not a revisitop gnd pickle",
    ),
    Fault("ground truth a pickle of a list", _ground_truth([1, 2]), 2, "need a dict with keys imlist"),
    Fault(
        "ground truth index out of range",
        _ground_truth({"imlist": ["img000"], "qimlist": ["q000"], "gnd": [{**_ANNOTATION, "hard": [5]}]}),
        2,
        "gnd[0]['hard'] must list imlist indices",
    ),
    Fault("GLDv2 solution not text", _binary_gldv2_solution, 2, "solution.csv is not UTF-8 text"),
]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.kind for f in FAULTS])
def test_bad_input_is_one_clear_line(fault: Fault, world: World, monkeypatch, capsys):
    outcome = run_in_process(monkeypatch, capsys, fault.make(world))
    check_one_error_line(outcome, fault.code, fault.fragment)


S3_FAULTS = [
    # (kind, bucket: None = a bucket that does not exist, options changed, fragment)
    ("missing bucket", None, {}, "bucket does not exist (NoSuchBucket)"),
    ("wrong secret key", "ok", {"secret": WRONG_SECRET}, "credentials refused"),
    ("unknown access key", "ok", {"key": "NOSUCHACCESSKEY9"}, "credentials refused"),
]


@pytest.mark.parametrize(("kind", "bucket", "changed", "fragment"), S3_FAULTS, ids=[f[0] for f in S3_FAULTS])
def test_s3_faults_name_the_path_and_the_fault(
    kind, bucket, changed, fragment, s3_bucket, world: World, monkeypatch, capsys
):
    """Reading results from S3: the one line names the object and the fault, never a credential."""
    url = f"{s3_bucket.url if bucket else 's3://no-such-bucket-0001'}/results.parquet"
    storage.upload(world.results, f"{s3_bucket.url}/results.parquet", s3_bucket.options)
    options = {**s3_bucket.options, **changed}
    monkeypatch.setenv("LANDMARK_INDEX_STORAGE_OPTIONS", json.dumps(options))
    gnd = _gnd_file(world, {"imlist": ["img000"], "qimlist": ["q000"], "gnd": [_ANNOTATION]})
    outcome = run_in_process(monkeypatch, capsys, ["evaluate", url, gnd])
    line = check_one_error_line(outcome, 2, fragment)
    assert storage.redact(url) in line
    for secret in (options["secret"], WRONG_SECRET):
        assert secret not in outcome.stdout + outcome.stderr


def test_user_errors_raised_in_ray_tasks_are_unwrapped_and_bugs_are_not():
    """A fault raised in a Ray task reaches the driver as RayTaskError(cause): the boundary shows the cause.
    A bug (KeyError) inside a task stays a bug, wrapped or not."""
    from ray.exceptions import RayTaskError

    fault = StorageFault("write /x/local/part-00000.parquet: no space left on device (ENOSPC)")
    wrapped = RayTaskError("write_chunks", "Traceback ...", fault).as_instanceof_cause()
    assert boundary.user_error(wrapped) is fault
    try:
        raise RuntimeError("extraction failed") from wrapped
    except RuntimeError as chained:
        assert boundary.user_error(chained) is fault
    bug = RayTaskError("write_chunks", "Traceback ...", KeyError("id")).as_instanceof_cause()
    assert boundary.user_error(bug) is None
    assert boundary.user_error(KeyError("id")) is None


# ---------------------------------------------------------------------------------------------------------
# Environment faults of a running extraction and a secret-laden run: real subprocesses, started together
# ---------------------------------------------------------------------------------------------------------


def _namespace_available() -> bool:
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    return probe.returncode == 0


def _extract_under_mount(
    world: World, store: Path, mount: str, folder: str, ray_tmp: str
) -> subprocess.Popen[str]:
    """`extract` with a local Ray in a mount namespace where tmpfs ``mount`` options cover STORE/folder;
    after it, the files of the store as the command saw them are listed on stdout after '--files--'."""
    (store / folder).mkdir(parents=True)
    extract = [
        *PYTHON,
        "extract",
        str(world.images / "manifest.parquet"),
        str(store),
        "--preset",
        "cpu-small",
        "--shard-size",
        "10",
        "--min-extractors",
        "1",
    ]
    script = (
        f'mount -t tmpfs -o {mount} tmpfs "{store / folder}" && {{ "$@"; rc=$?; echo --files--; '
        f'find "{store}" -type f; exit $rc; }}'
    )
    return run_command(
        ["unshare", "-rm", "sh", "-c", script, "sh", *extract], {"LANDMARK_INDEX_RAY_TMP": ray_tmp}
    )


@dataclass(frozen=True)
class SecretRun:
    outcome: Outcome
    written: list[Path]  # every file the run wrote: the store and Ray's session folder (logs)


def _secret_run(world: World, s3_bucket, tmp: Path) -> tuple[subprocess.Popen[str], Path, Path]:
    """`extract -v` of images on S3 (credentials in LANDMARK_INDEX_STORAGE_OPTIONS, a decoy secret in the
    AWS environment) plus a row whose url carries KEY:SECRET@ (issue 14 #1)."""
    for image in sorted(world.images.glob("*.jpg")):
        storage.upload(str(image), f"{s3_bucket.url}/{image.name}", s3_bucket.options)
    endpoint = s3_bucket.options["endpoint_url"].split("://", 1)[1]
    rows = [{"id": p.stem, "url": f"{s3_bucket.url}/{p.name}"} for p in sorted(world.images.glob("*.jpg"))]
    rows.append({"id": "leaky", "url": f"s3://{URL_KEY}:{URL_SECRET}@{endpoint}/{s3_bucket.url[5:]}/x.jpg"})
    manifest = tmp / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    store, ray_tmp = tmp / "store", Path(tempfile.mkdtemp(prefix="li-secret-"))
    env = {
        "LANDMARK_INDEX_STORAGE_OPTIONS": json.dumps(s3_bucket.options),
        "AWS_SECRET_ACCESS_KEY": ENV_SECRET,
        "LANDMARK_INDEX_RAY_TMP": str(ray_tmp),
    }
    command = [*PYTHON, "-v", "extract", str(manifest), str(store), "--preset", "cpu-small"]
    return run_command([*command, "--min-extractors", "1"], env), store, ray_tmp


@pytest.fixture(scope="module")
def background(world: World, s3_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The slow runs, one local Ray at a time (Ray gives a raylet 30 s to start, which several start-ups at
    once miss on a loaded 2-core machine): disk full (with permission denied, which needs no Ray, beside it),
    read-only output, then the secret-laden extraction."""
    from tests.servers import S3Bucket

    tmp = tmp_path_factory.mktemp("background")
    locked = tmp / "locked"
    locked.mkdir(mode=0o555)
    drop_override = (
        ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    )
    permission = run_command(
        [*drop_override, *PYTHON, "search", world.index, world.queries, str(locked / "r.parquet")]
    )
    outcomes: dict[str, Outcome] = {}
    stores: dict[str, Path] = {}
    ray_tmps: list[str] = []
    if _namespace_available():
        for name, mount, folder in (("full", "size=4k", "local"), ("readonly", "ro", "global")):
            stores[name] = tmp / name
            ray_tmps.append(tempfile.mkdtemp(prefix="li-fault-"))  # short: Ray's socket paths have a limit
            outcomes[name] = finish(_extract_under_mount(world, stores[name], mount, folder, ray_tmps[-1]))
    outcomes["permission"] = finish(permission)
    bucket = S3Bucket(f"s3://faults-{os.getpid()}", s3_server.options)
    fs, path = storage.filesystem(bucket.url, bucket.options)
    fs.mkdir(path)
    secrets, stores["secrets"], ray_tmp = _secret_run(world, bucket, tmp)
    ray_tmps.append(str(ray_tmp))
    outcomes["secrets"] = finish(secrets)
    written = [p for folder in (stores["secrets"], ray_tmp) for p in folder.rglob("*") if p.is_file()]
    yield {
        "outcomes": outcomes,
        "stores": stores,
        "secret_files": written,
        "s3_secret": bucket.options["secret"],
    }
    for folder in ray_tmps:
        shutil.rmtree(folder, ignore_errors=True)


def _files_seen(outcome: Outcome) -> list[str]:
    return outcome.stdout.split("--files--", 1)[1].split()


@pytest.mark.parametrize(
    ("name", "fragment", "errno_name"),
    [
        ("full", "no space left on device", "ENOSPC"),  # issue 14 #2
        ("readonly", "read-only file system", "EROFS"),  # issue 14 #3
    ],
)
def test_extraction_meets_a_full_or_read_only_disk(background, name, fragment, errno_name):
    """The writer task's OSError used to arrive as a ~110-line RayTaskError traceback with exit 1."""
    if name not in background["outcomes"]:
        pytest.skip("no mount namespace here (unshare -rm failed): a full/read-only tmpfs cannot be made")
    outcome = background["outcomes"][name]
    store = background["stores"][name]
    line = check_one_error_line(outcome, 2, f"{fragment} ({errno_name})")
    assert str(store / ("local" if name == "full" else "global")) in line  # the path written
    # the failed shard leaves no data file (the global file written before local/ filled up is removed)
    leftovers = [f for f in _files_seen(outcome) if "/_run.json" not in f]
    assert leftovers == []


def test_permission_denied_names_the_output(background, world: World):
    outcome = background["outcomes"]["permission"]
    line = check_one_error_line(outcome, 2, "permission denied (EACCES)")
    assert "locked/r.parquet" in line


def test_no_secret_reaches_any_output(background):
    """Issue 14 #1: botocore quotes the bucket 'KEY:SECRET@host' of the leaky row in its message."""
    outcome = background["outcomes"]["secrets"]
    assert outcome.code == 0, outcome.stderr[-3000:]
    assert "INFO" in outcome.stderr  # -v: the run logged at INFO
    store = background["stores"]["secrets"]
    records = pq.read_table(store / "errors" / "part-00000.parquet").to_pylist()
    assert [(r["id"], r["reason"]) for r in records] == [("leaky", "fetch_failed")]
    assert "***" in records[0]["message"]  # the quoted credential was there, and was blanked
    secrets = [URL_KEY, URL_SECRET, ENV_SECRET, background["s3_secret"]]
    texts = {"stdout": outcome.stdout, "stderr": outcome.stderr}
    texts |= {str(p): p.read_bytes().decode("utf-8", "replace") for p in background["secret_files"]}
    assert len(texts) > 10  # the store's files and Ray's logs
    leaks = {(where, s) for where, text in texts.items() for s in secrets if s in text}
    assert leaks == set()


# ---------------------------------------------------------------------------------------------------------
# A run whose every row fails: exit 2 with the reason and its fix (issue 27), not exit 0 and a later
# "committed shards but no descriptors"; manifest problems before any progress bar
# ---------------------------------------------------------------------------------------------------------


def _outside_manifest(world: World, tmp: Path) -> Path:
    """A manifest in a folder of its own whose rows name the world's photos by absolute path: each is a local
    file outside the manifest's folder, refused without --image-root or --allow-local-files."""
    rows = [{"id": p.stem, "url": str(p)} for p in sorted(world.images.glob("*.jpg"))]
    manifest = tmp / "elsewhere" / "manifest.parquet"
    manifest.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    return manifest


REFUSED_FIX = "pass --image-root with the folder they are under, or --allow-local-files"


@pytest.mark.parametrize("command", ["extract", "reindex"])
def test_a_run_whose_every_row_fails_exits_2_naming_the_fix(
    command, world: World, ray_cluster, tmp_path, monkeypatch, capsys
):
    """In this process on the session's Ray (a command of its own would start a new Ray job, whose workers
    import torch anew): the same entry point and error boundary."""
    manifest = _outside_manifest(world, tmp_path)
    out = tmp_path / "out"
    args = [str(manifest), str(out), "--preset", "cpu-small", "--address", ray_cluster]
    outcome = run_in_process(monkeypatch, capsys, [command, *args])
    line = check_one_error_line(outcome, 2, f"none of the {len(list(world.images.glob('*.jpg')))} rows")
    assert "local_file_refused: 3" in line and REFUSED_FIX in line
    assert "committed shards but no descriptors" not in outcome.stderr


def test_a_job_whose_every_row_fails_exits_2(world: World, ray_cluster, tmp_path, capsys):
    from jobs import index_manifest

    manifest = _outside_manifest(world, tmp_path)
    argv = ["--manifest", str(manifest), "--out", str(tmp_path / "o"), "--preset", "cpu-small"]
    assert index_manifest.main([*argv, "--address", ray_cluster]) == 2
    assert REFUSED_FIX in capsys.readouterr().err


def test_a_manifest_error_prints_before_any_progress_bar(world: World, monkeypatch, capsys):
    bad = world.root / "bad-manifest.csv"
    bad.write_text("name,path\na,b.jpg\n")
    outcome = run_in_process(monkeypatch, capsys, ["extract", str(bad), str(world.root / "nothing")])
    check_one_error_line(outcome, 2, "missing column 'id'")
    assert outcome.stderr.startswith("error:"), outcome.stderr  # no empty "extract ━━━ 0/?" above it
