"""The query service on a real local Ray Serve: same answers as `landmark-index query`, every bad input a 4xx
JSON error, a hot swap under load without a failed request, 503 with Retry-After over capacity."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from pipeline import versions
from pipeline.query import query_photos
from pipeline.serve.app import build_app
from pipeline.serve.settings import ServeSettings

PHOTOS = ("query-astronaut", "query-coffee", "query-retina")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(root: str, **changes) -> ServeSettings:
    # 2 CPUs in the test cluster: 1 for extraction, half each for search and verification; 2 torch threads
    # like this process (tests/conftest.py), so float sums run in the same order
    return ServeSettings(
        index=root, poll_s=0.2, max_upload_bytes=200_000, max_pixels=2_000_000, extractor_threads=2, **changes
    )


@pytest.fixture(scope="module")
def service(demo_index, ray_cluster):
    from ray import serve

    versions.publish(demo_index.root, versions.version_name(1))
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(_settings(demo_index.root)), name="landmark-index", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}", demo_index
    finally:
        serve.shutdown()


def _post(url: str, photo: Path, **params) -> requests.Response:
    return requests.post(
        f"{url}/v1/search",
        data=photo.read_bytes(),
        params=params,
        headers={"Content-Type": "image/jpeg"},
        timeout=120,
    )


def test_the_service_answers_what_query_prints(service):
    url, demo = service
    paths = [demo.photo(p) for p in PHOTOS]
    printed = query_photos([str(p) for p in paths], demo.root, k=5)
    for path, expected in zip(paths, printed, strict=True):
        body = _post(url, path, k=5)
        assert body.status_code == 200, body.text
        assert body.json() == {**expected, "photo": "upload"}
        assert {"decode", "extract", "search", "verify"} <= {
            part.split(";")[0] for part in body.headers["Server-Timing"].split(", ")
        }
    with path.open("rb") as f:  # multipart upload with options as form fields
        form = requests.post(
            f"{url}/v1/search", files={"image": ("x.jpg", f, "image/jpeg")}, data={"k": "5"}, timeout=120
        )
    assert form.json() == {**printed[-1], "photo": "x.jpg"}
    info = requests.get(f"{url}/version", timeout=10).json()
    assert info["index_version"] == "v000001"
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
    assert requests.get(f"{url}/readyz", timeout=10).json()["index_version"] == "v000001"
