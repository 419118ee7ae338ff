"""pipeline.storage on local disk, memory:// and a real S3 server (Swift + s3api), plus http(s) fetches
through a fault-injecting local server: round trips, atomic writes, retries, and no credential leaks."""

from __future__ import annotations

import io
import logging
import os
import pickle
import random
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from pipeline import storage
from pipeline.images import ImageError, fetch_image_bytes
from tests.servers import Fault, load_launcher


@pytest.fixture(params=["local", "memory", "s3"])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any] | None]:
    """An empty folder URL on each backend and its options (s3 starts the Swift server on first use)."""
    if request.param == "local":
        return str(tmp_path / "store"), None
    if request.param == "memory":
        return f"memory://test-{uuid.uuid4().hex}", None
    bucket = request.getfixturevalue("s3_bucket")
    return storage.join(bucket.url, "run"), bucket.options


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=2)  # several row groups: readers must seek
    return sink.getvalue()


def test_round_trip(base: tuple[str, dict[str, Any] | None]) -> None:
    root, options = base
    blob = random.Random(0).randbytes(70_000)
    table = pa.table({"id": list(range(5)), "name": [f"img{i}" for i in range(5)]})
    files = {"a/x.bin": blob, "a/y.txt": b"hello", "a/t.parquet": _parquet_bytes(table), "a/sub/z.bin": b"z"}
    for name, data in files.items():
        storage.write_bytes(storage.join(root, name), data, options)

    for name, data in files.items():
        assert storage.read_bytes(storage.join(root, name), options) == data
    assert storage.exists(storage.join(root, "a/x.bin"), options)
    assert not storage.exists(storage.join(root, "a/missing.bin"), options)
    assert storage.info(storage.join(root, "a/x.bin"), options)["size"] == len(blob)
    assert storage.isdir(storage.join(root, "a/sub"), options)
    assert storage.list_files(storage.join(root, "a"), options) == [
        storage.join(root, n) for n in ("a/t.parquet", "a/x.bin", "a/y.txt")
    ]
    assert storage.list_files(storage.join(root, "a"), options, suffix=".bin") == [
        storage.join(root, "a/x.bin")
    ]
    assert storage.list_files(storage.join(root, "nowhere"), options) == []
    assert storage.glob(storage.join(root, "a/*.bin"), options) == [storage.join(root, "a/x.bin")]
    with storage.open_input(storage.join(root, "a/t.parquet"), options) as f:
        assert pq.ParquetFile(f).metadata.num_row_groups == 3
        assert pq.read_table(f).equals(table)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "a/missing.bin"), options)

    storage.remove(storage.join(root, "a/y.txt"), options)
    assert not storage.exists(storage.join(root, "a/y.txt"), options)
    storage.remove(storage.join(root, "a/y.txt"), options)  # already gone: not an error
    storage.remove(storage.join(root, "a"), options, recursive=True)  # on Swift: multi-object delete
    assert storage.list_files(storage.join(root, "a"), options) == []
    assert not storage.exists(storage.join(root, "a/sub/z.bin"), options)


def test_copy_within_a_backend_and_across_backends(base, tmp_path: Path) -> None:
    """storage.copy: the backend's own copy (CopyObject on S3: no bytes through this process), or a stream
    from another backend; the reindex copies index files this way (issue 27: it read each whole file)."""
    root, options = base
    blob = random.Random(1).randbytes(3 * 2**20 + 11)
    storage.write_bytes(storage.join(root, "a/index.faiss"), blob, options)
    storage.copy(storage.join(root, "a/index.faiss"), storage.join(root, "b/c/index.faiss"), options)
    assert storage.read_bytes(storage.join(root, "b/c/index.faiss"), options) == blob
    local = tmp_path / "local.bin"
    local.write_bytes(blob[:1000])
    storage.copy(str(local), storage.join(root, "from-local.bin"), options)
    assert storage.read_bytes(storage.join(root, "from-local.bin"), options) == blob[:1000]
    with pytest.raises(FileNotFoundError):
        storage.copy(storage.join(root, "absent.bin"), storage.join(root, "x.bin"), options)


def test_download_upload_local_copies(tmp_path: Path, s3_bucket: Any) -> None:
    source = tmp_path / "index.faiss"
    source.write_bytes(b"\x00index" * 1000)
    url = storage.join(s3_bucket.url, "index/ivf.faiss")
    storage.upload(str(source), url, s3_bucket.options)
    storage.download(url, str(tmp_path / "copy" / "ivf.faiss"), s3_bucket.options)
    assert (tmp_path / "copy" / "ivf.faiss").read_bytes() == source.read_bytes()


def test_swift_multi_delete_needs_content_md5(s3_bucket: Any) -> None:
    """Without the option Swift refuses botocore's DeleteObjects (CRC32 only); with it the prefix goes."""
    prefix = storage.join(s3_bucket.url, "shards")
    for i in range(3):
        storage.write_bytes(storage.join(prefix, f"{i}.parquet"), b"x" * i, s3_bucket.options)
    plain = {k: v for k, v in s3_bucket.options.items() if k != "content_md5"}
    with pytest.raises(storage.StorageError, match="Content-MD5"):
        storage.remove(prefix, plain, recursive=True)
    assert len(storage.list_files(prefix, s3_bucket.options)) == 3

    storage.remove(prefix, s3_bucket.options, recursive=True)
    assert storage.list_files(prefix, s3_bucket.options) == []


def test_content_md5_filesystem_pickled_to_another_process_still_deletes(s3_bucket: Any) -> None:
    """What Ray does with a filesystem: pickle it to a worker process, which must rebuild the MD5 hook."""
    prefix = storage.join(s3_bucket.url, "shipped")
    for i in range(2):
        storage.write_bytes(storage.join(prefix, f"{i}.bin"), b"x", s3_bucket.options)
    fs, path = storage.filesystem(prefix, s3_bucket.options)
    worker = "import pickle, sys; pickle.loads(sys.stdin.buffer.read()).rm(sys.argv[1], recursive=True)"
    subprocess.run([sys.executable, "-c", worker, path], input=pickle.dumps(fs), check=True, timeout=60)
    assert storage.list_files(prefix, s3_bucket.options) == []


def test_content_md5_option_is_for_s3_only(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="content_md5 applies to s3"):
        storage.read_bytes("gs://bucket/x", {"content_md5": True})


def test_launcher_without_swift_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    swift_s3 = load_launcher()
    monkeypatch.setenv("PATH", str(tmp_path))  # no swift-*-server binaries on it
    with pytest.raises(RuntimeError, match=r"swift-account-server.*run scripts/install-test-deps.sh"):
        swift_s3.swift_python()


# --- atomic local writes -----------------------------------------------------------------------


def test_failed_local_write_leaves_old_content_and_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out" / "shard.parquet"
    storage.write_bytes(str(target), b"old version")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # the new bytes are in the temp file, the commit fails
    # one line naming the file and the fault (README "Failure modes"), never retried
    with pytest.raises(
        storage.StorageFault, match=r"write .*/shard\.parquet: no space left on device \(ENOSPC\)"
    ):
        storage.write_bytes(str(target), b"new version that never lands")
    assert target.read_bytes() == b"old version"
    assert sorted(p.name for p in target.parent.iterdir()) == ["shard.parquet"]

    with pytest.raises(storage.StorageFault, match="no space left"):
        storage.write_bytes(str(tmp_path / "out" / "fresh.bin"), b"partial")
    assert not (tmp_path / "out" / "fresh.bin").exists()


def test_list_files_hides_temp_files_of_crashed_writers(tmp_path: Path) -> None:
    (tmp_path / ".tmp-0123-a.bin").write_bytes(b"half")
    storage.write_bytes(str(tmp_path / "a.bin"), b"whole")
    assert storage.list_files(str(tmp_path)) == [str(tmp_path / "a.bin")]


# --- retries -----------------------------------------------------------------------------------


class FlakyMemoryFileSystem(MemoryFileSystem):
    """memory:// whose reads fail with a connection error the first ``failures`` times."""

    protocol = "flaky"

    def __init__(self, failures: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.failures = failures
        self.reads = 0

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        self.reads += 1
        if self.reads <= self.failures:
            raise ConnectionResetError(f"injected failure {self.reads}")
        return super().cat_file(path, start, end, **kwargs)


@pytest.fixture
def flaky() -> str:
    fsspec.register_implementation("flaky", FlakyMemoryFileSystem, clobber=True)
    FlakyMemoryFileSystem.clear_instance_cache()  # fresh read counters: instances are cached per options
    url = f"flaky://test-{uuid.uuid4().hex}/obj.bin"
    storage.write_bytes(url, b"payload")
    return url


def _retry_delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    return [float(m) for m in re.findall(r"retry \d/\d in ([0-9.]+)s", caplog.text)]


def test_transient_errors_are_retried_with_growing_backoff(
    flaky: str, caplog: pytest.LogCaptureFixture
) -> None:
    random.seed(0)
    with caplog.at_level(logging.WARNING, logger="pipeline.storage"):
        assert storage.read_bytes(flaky, {"failures": 3}) == b"payload"
    fs, _ = storage.filesystem(flaky, {"failures": 3})
    assert fs.reads == 4
    delays = _retry_delays(caplog)
    # base 0.2 s doubling, jitter x[0.5, 1.5): attempt k waits within 0.2 * 2**(k-1) * [0.5, 1.5)
    assert len(delays) == 3
    for k, delay in enumerate(delays):
        assert 0.1 * 2**k <= delay < 0.3 * 2**k + 0.01


def test_persistent_transient_errors_end_in_storage_error(flaky: str) -> None:
    with pytest.raises(
        storage.StorageError, match=r"read flaky://.*obj.bin failed after 4 attempts: Connection"
    ):
        storage.read_bytes(flaky, {"failures": 99})
    fs, _ = storage.filesystem(flaky, {"failures": 99})
    assert fs.reads == 4


def test_missing_object_is_not_retried(flaky: str) -> None:
    missing = flaky.replace("obj.bin", "missing.bin")
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(missing, {"failures": 0})
    fs, _ = storage.filesystem(missing, {"failures": 0})
    assert fs.reads == 1


# --- http(s) fetches ---------------------------------------------------------------------------


@pytest.fixture
def site(tmp_path: Path, http_server: Any) -> Any:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(random.Random(1).randbytes(5000))
    return http_server(tmp_path)


def test_http_read(site: Any, tmp_path: Path) -> None:
    assert storage.read_bytes(site.url("img/a.jpg")) == (tmp_path / "img" / "a.jpg").read_bytes()
    assert site.hits["/img/a.jpg"] == 1


def test_http_503_is_retried_until_served(site: Any, tmp_path: Path) -> None:
    site.add_fault("img/a.jpg", Fault(status=503, times=2))
    assert storage.read_bytes(site.url("img/a.jpg")) == (tmp_path / "img" / "a.jpg").read_bytes()
    assert site.hits["/img/a.jpg"] == 3


def test_http_404_fails_at_once_with_the_url(site: Any) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(site.url("img/none.jpg"))):
        storage.read_bytes(site.url("img/none.jpg"))
    assert site.hits["/img/none.jpg"] == 1


def test_http_timeout_is_retried(site: Any, tmp_path: Path) -> None:
    site.add_fault("img/a.jpg", Fault(delay=1.5, times=1))
    options = {"http": {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=0.5)}}}
    assert storage.read_bytes(site.url("img/a.jpg"), options) == (tmp_path / "img" / "a.jpg").read_bytes()
    assert site.hits["/img/a.jpg"] == 2


# --- credentials -------------------------------------------------------------------------------

SIGNATURE = "X-Amz-Signature=5ec12e7deadbeef"


def _chain_text(exc: BaseException | None) -> str:
    """Messages of an exception and everything chained to it (what a traceback would print)."""
    texts = []
    while exc is not None:
        texts.append(f"{type(exc).__name__}: {exc} {exc.args}")
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return "\n".join(texts)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            # redacting remembers the user name as a secret process-wide: not a common word like "user"
            "https://usr7:pa55@img.example.com:8443/a/b.jpg?" + SIGNATURE,
            "https://img.example.com:8443/a/b.jpg",
        ),
        ("s3://AKIA:s3cret@bucket/k/x.parquet", "s3://bucket/k/x.parquet"),
        ("http://host/p.jpg?token=abc#frag", "http://host/p.jpg"),
        ("/data/local/file.bin", "/data/local/file.bin"),
    ],
)
def test_redact(url: str, expected: str) -> None:
    assert storage.redact(url) == expected


def test_redact_text_redacts_every_url() -> None:
    text = f"GET 'https://u:pw@h/x?{SIGNATURE}' then s3://k:sec@b/y failed"
    assert storage.redact_text(text) == "GET 'https://h/x' then s3://b/y failed"


def test_http_errors_do_not_leak_signed_urls(site: Any, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(FileNotFoundError) as missing:
        storage.read_bytes(site.url("img/none.jpg") + "?" + SIGNATURE)
    assert site.url("img/none.jpg") in str(missing.value)
    site.add_fault("img/a.jpg", Fault(status=503))
    with (
        caplog.at_level(logging.WARNING, logger="pipeline.storage"),
        pytest.raises(storage.StorageError) as failed,
    ):
        storage.read_bytes(site.url("img/a.jpg") + "?" + SIGNATURE)
    assert "503" in str(failed.value)
    for text in (_chain_text(missing.value), _chain_text(failed.value), caplog.text):
        assert "5ec12e7deadbeef" not in text


def test_s3_errors_do_not_contain_the_secret(s3_bucket: Any, caplog: pytest.LogCaptureFixture) -> None:
    url = storage.join(s3_bucket.url, "x.bin")
    storage.write_bytes(url, b"x", s3_bucket.options)
    wrong = {**s3_bucket.options, "secret": "wr0ng-s3cret-value"}
    with caplog.at_level(logging.DEBUG, logger="pipeline.storage"), pytest.raises(PermissionError) as denied:
        storage.read_bytes(url, wrong)
    for text in (_chain_text(denied.value), caplog.text):
        assert "wr0ng-s3cret-value" not in text
        assert s3_bucket.options["secret"] not in text


def test_known_secret_values_are_blanked_wherever_they_appear() -> None:
    storage.remember_secrets(options={"s3": {"key": "AKIAEXAMPLEKEY", "secret": "v3ry-s3cret/Value"}})
    text = 'Invalid bucket name "AKIAEXAMPLEKEY:v3ry-s3cret/Value@host": bad; again v3ry-s3cret/Value'
    redacted = storage.redact_text(text)
    assert "AKIAEXAMPLEKEY" not in redacted and "v3ry-s3cret" not in redacted
    assert redacted.endswith("again ***")


def test_schemeless_user_info_is_removed() -> None:
    assert storage.redact_text("bucket 'K3Y:unknown-pass@10.0.0.1:9000' x") == "bucket '***@10.0.0.1:9000' x"
    assert storage.redact_text("mail me at someone@example.com") == "mail me at someone@example.com"


def test_credentials_in_a_row_url_never_reach_the_error(
    s3_bucket: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """botocore quotes the bucket name 'KEY:SECRET@host' of such a url without its scheme."""
    host = urlsplit(s3_bucket.options["endpoint_url"]).netloc
    url = f"s3://AKIAROWKEY:r0w-secret-9@{host}/{s3_bucket.url[5:]}/x.jpg"
    with (
        caplog.at_level(logging.DEBUG, logger="pipeline.storage"),
        pytest.raises(storage.StorageError) as failed,
    ):
        storage.read_bytes(url, s3_bucket.options)
    with pytest.raises(ImageError) as row_error:
        fetch_image_bytes(url, None, s3_bucket.options)
    for text in (_chain_text(failed.value), caplog.text, str(row_error.value)):
        assert "r0w-secret-9" not in text and "AKIAROWKEY" not in text
    assert "retry" not in caplog.text, "an invalid bucket name cannot succeed on retry"


@pytest.mark.parametrize(
    ("status", "retried"), [(400, False), (403, False), (410, False), (408, True), (429, True), (500, True)]
)
def test_only_retryable_statuses_are_retried(site: Any, tmp_path: Path, status: int, retried: bool) -> None:
    site.add_fault("img/a.jpg", Fault(status=status, times=2))
    if retried:
        assert storage.read_bytes(site.url("img/a.jpg")) == (tmp_path / "img" / "a.jpg").read_bytes()
        assert site.hits["/img/a.jpg"] == 3
    else:
        with pytest.raises(storage.StorageError, match=str(status)):
            storage.read_bytes(site.url("img/a.jpg"))
        assert site.hits["/img/a.jpg"] == 1


# ----------------------------------------------------------------------------- gcs and azure extras (offline)

AZURE_KEY = "c2VjcmV0LWF6dXJlLWtleS0xMjM0NTY3OA=="  # base64, as Azure account keys are
PEM_KEY = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----\n"


@pytest.mark.parametrize(
    ("url", "options", "backend", "path"),
    [
        ("gs://bucket/descriptors/x.parquet", {"token": "anon"}, "gcsfs", "bucket/descriptors/x.parquet"),
        ("gcs://bucket/x.parquet", {"gcs": {"token": "anon"}}, "gcsfs", "bucket/x.parquet"),
        (
            "az://container/index/params.json",
            {"az": {"account_name": "acct", "account_key": AZURE_KEY}, "https": {"ignored": 1}},
            "adlfs",
            "container/index/params.json",
        ),
        (
            "abfs://container/x",
            {"account_name": "acct", "sas_token": "sv=2024&sig=Zm9v"},
            "adlfs",
            "container/x",
        ),
    ],
)
def test_gcs_and_azure_urls_resolve_to_their_backends_with_their_options(
    url: str, options: dict[str, Any], backend: str, path: str
) -> None:
    """Flat options go to every object store; per-protocol ones only to theirs (no network is touched)."""
    fs, resolved = storage.filesystem(url, options)
    assert type(fs).__module__.split(".")[0] == backend and resolved == path
    if backend == "adlfs":
        assert fs.account_name == "acct"


def test_gcs_and_azure_credentials_are_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    service_account = {"type": "service_account", "private_key_id": "0123abcd9876", "private_key": PEM_KEY}
    storage.remember_secrets("gs://b/x", {"gs": {"token": service_account}})
    storage.remember_secrets("az://c/x", {"az": {"account_name": "acct", "connection_string": "DefaultEnd"}})
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "az-client-s3cret")
    text = (
        f"token {service_account} failed; DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={AZURE_KEY};"
        " EndpointSuffix=core.windows.net; SharedAccessSignature=sv=2024&sig=Zm9vYmFy; secret az-client-s3cret"
    )
    redacted = storage.redact_text(text)
    for secret in ("0123abcd9876", "MIIEvQIBADANBg", AZURE_KEY, "Zm9vYmFy", "az-client-s3cret"):
        assert secret not in redacted, secret
    assert "AccountName=acct;AccountKey=***;" in redacted


def test_a_missing_backend_extra_is_a_user_error_naming_it() -> None:
    """Without gcsfs / adlfs installed: one line naming the extra to install, not an ImportError traceback."""
    probe = (
        "import sys\n"
        "sys.modules['gcsfs'] = sys.modules['adlfs'] = None  # as if not installed\n"
        "from pipeline import boundary, storage\n"
        "for url in ('gs://b/x', 'az://c/x'):\n"
        "    try:\n"
        "        storage.filesystem(url)\n"
        "    except Exception as exc:\n"
        "        assert boundary.user_error(exc) is exc\n"
        "        print(exc)\n"
    )
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == [
        "gs://b/x: gs:// needs the 'gcs' extra: pip install 'landmark-index[gcs]'",
        "az://c/x: az:// needs the 'azure' extra: pip install 'landmark-index[azure]'",
    ]


def test_s3_calls_have_one_retry_layer(site: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """botocore and s3fs make one attempt per call; pipeline.storage retries (4 attempts in all), so a
    server that keeps failing sees 4 requests, not 4 × 5 (the S3 "server" here is the HTTP test site: a read
    of bucket img, key a.jpg is a HEAD, then a GET answered with the file)."""
    options = {"endpoint_url": site.url(""), "key": "test-key", "secret": "test-secret"}
    site.add_fault("img/a.jpg", Fault(status=503, times=2))
    with caplog.at_level(logging.WARNING, logger="pipeline.storage"):
        assert storage.read_bytes("s3://img/a.jpg", options) == (tmp_path / "img" / "a.jpg").read_bytes()
    assert site.hits["/img/a.jpg"] == 4  # two failed HEADs, then HEAD + GET
    retries = [re.search(r"retry (\d)/4", r.getMessage()) for r in caplog.records]
    assert [m[1] for m in retries if m] == ["1", "2"]  # the retries were ours
    site.hits.clear()
    site.add_fault("img/a.jpg", Fault(status=503))
    with pytest.raises(storage.StorageError, match="after 4 attempts"):
        storage.read_bytes("s3://img/a.jpg", options)
    assert site.hits["/img/a.jpg"] == 4


def test_a_missing_object_is_a_missing_input_naming_the_path(tmp_path: Path) -> None:
    from pipeline.errors import MissingInputError

    for url in (str(tmp_path / "nope.parquet"), f"file://{tmp_path}/nope.parquet"):
        with pytest.raises(MissingInputError, match=r"read .*nope\.parquet: not found") as missing:
            storage.read_bytes(url)
        assert isinstance(missing.value, FileNotFoundError)  # callers that test "not there" still work
