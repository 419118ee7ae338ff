"""Server fixtures (a pytest plugin): a real S3 server (OpenStack Swift + s3api) and a local HTTP server.

- ``s3_server`` (session): started on first use, stopped at session end. Attributes ``endpoint_url``,
  ``key``, ``secret``, ``options`` (storage options for :mod:`pipeline.storage`).
- ``s3_bucket`` (function): a fresh, empty bucket: ``.url`` (``s3://name``) and ``.options``.
- ``http_server`` (function): ``http_server(directory) -> HttpTestServer`` serving that folder on
  127.0.0.1, with per-path faults (``add_fault``), request counts (``hits``), the User-Agents it was sent
  (``user_agents``) and the most requests it had in flight at once (``max_in_flight``).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest

from pipeline import storage

LAUNCHER = Path(__file__).resolve().parents[1] / "scripts" / "swift_s3.py"


def load_launcher() -> ModuleType:
    """scripts/ is not a package: load the Swift launcher from its file."""
    spec = importlib.util.spec_from_file_location("swift_s3", LAUNCHER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def s3_server() -> Iterator[Any]:
    """A single-node Swift with s3api on free ports of 127.0.0.1 (≈ 5-10 s to start), in its own temp dir."""
    swift_s3 = load_launcher()
    if any(shutil.which(b) is None for b in swift_s3.BINARIES):
        pytest.fail(f"the s3_server fixture needs OpenStack Swift: {swift_s3.INSTALL_HINT}", pytrace=False)
    with swift_s3.SwiftS3.start() as server:
        _startups.append(server.startup_s)
        yield server


_startups: list[float] = []  # seconds each s3_server took to start, for the terminal summary


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for seconds in _startups:
        terminalreporter.write_line(f"s3_server: Swift + s3api started in {seconds:.1f} s")


@dataclass(frozen=True)
class S3Bucket:
    url: str  # s3://name, no trailing slash
    options: dict[str, Any]


@pytest.fixture
def s3_bucket(s3_server: Any) -> S3Bucket:
    """A new empty bucket on the session's S3 server (buckets are not reused between tests)."""
    bucket = S3Bucket(f"s3://test-{uuid.uuid4().hex[:16]}", s3_server.options)
    fs, path = storage.filesystem(bucket.url, bucket.options)
    fs.mkdir(path)
    return bucket


@dataclass(frozen=True)
class Fault:
    """How the HTTP test server misbehaves for one path."""

    status: int | None = None  # answer this status (e.g. 503, 404) instead of the file; None: serve it
    times: int | None = None  # only for the first N requests of the path; None: every request
    delay: float = 0.0  # seconds to wait before answering (for client timeouts)
    headers: tuple[tuple[str, str], ...] = ()  # extra headers of the error answer, e.g. Retry-After
    hold: threading.Event | None = None  # answer only once this is set (a client may time out and retry)


class HttpTestServer(ThreadingHTTPServer):
    """A threaded stdlib HTTP server for one folder; counts requests per path and injects faults."""

    daemon_threads = True

    def __init__(self, directory: Path) -> None:
        super().__init__(("127.0.0.1", 0), partial(_FaultyHandler, directory=str(directory)))
        self.faults: dict[str, Fault] = {}
        self.hits: Counter[str] = Counter()  # requests per URL path, faulty ones included
        self.user_agents: list[str] = []  # User-Agent of every request, in arrival order
        self.in_flight = 0
        self.max_in_flight = 0  # most requests being answered at the same time
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/{path.lstrip('/')}"

    def add_fault(self, path: str, fault: Fault) -> None:
        with self.lock:
            self.faults["/" + path.lstrip("/")] = fault

    def fault_for(self, path: str) -> Fault | None:
        """Count the request and return the fault it should get, if any."""
        with self.lock:
            self.hits[path] += 1
            fault = self.faults.get(path)
            if fault is None or (fault.times is not None and self.hits[path] > fault.times):
                return None
            return fault

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that time out hang up on slow answers: not an error of the server."""

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=5)


class _FaultyHandler(SimpleHTTPRequestHandler):
    server: HttpTestServer

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.user_agents.append(self.headers.get("User-Agent", ""))
            self.server.in_flight += 1
            self.server.max_in_flight = max(self.server.max_in_flight, self.server.in_flight)
        try:
            serve = self.apply_fault()
        finally:  # before the file is written: a client holding its answer may already send its next request
            with self.server.lock:
                self.server.in_flight -= 1
        if serve:
            super().do_GET()

    def do_HEAD(self) -> None:
        if self.apply_fault():
            super().do_HEAD()

    def apply_fault(self) -> bool:
        """Delay and/or answer an error status; True when the file should still be served."""
        fault = self.server.fault_for(urlsplit(self.path).path)
        if fault is None:
            return True
        time.sleep(fault.delay)
        if fault.hold is not None:
            fault.hold.wait()
        if fault.status is None:
            return True
        self.send_response(fault.status)
        for name, value in fault.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()
        return False

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests assert on ``hits``, not on an access log."""


@pytest.fixture
def http_server() -> Iterator[Callable[[Path], HttpTestServer]]:
    """``http_server(directory)`` starts a server for that folder; all are stopped after the test."""
    servers: list[HttpTestServer] = []

    def start(directory: Path) -> HttpTestServer:
        servers.append(HttpTestServer(Path(directory)))
        return servers[-1]

    yield start
    for server in servers:
        server.close()
