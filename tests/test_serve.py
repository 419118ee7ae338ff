"""The query service on a real local Ray Serve: same answers as `landmark-index query`, every bad input a 4xx
JSON error, a hot swap under load without a failed request, 503 with Retry-After over capacity."""

from __future__ import annotations

import io
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from PIL import Image

from pipeline import report, storage, versions
from pipeline.config import get_preset
from pipeline.query import Hit, IndexVersion, Shortlist, query_photos
from pipeline.rerank import RerankConfig
from pipeline.serve.page import ImageSources, results_html

PHOTOS = ("query-astronaut", "query-coffee", "query-retina")


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


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_bad_input_gets_its_4xx_json_error(service):
    url, demo = service
    jpeg = demo.photo("query-coffee").read_bytes()
    search = f"{url}/v1/search"
    image = {"Content-Type": "image/jpeg"}
    cases = {
        "too large upload": (requests.post, dict(data=b"\xff" * 200_001, headers=image), 413, "too_large"),
        "too many pixels": (
            requests.post,
            dict(data=_png(2000, 1001), headers={"Content-Type": "image/png"}),
            413,
            "too_large",
        ),
        "not an image": (requests.post, dict(data=b"hello, world", headers=image), 422, "not_an_image"),
        "truncated jpeg": (requests.post, dict(data=jpeg[: len(jpeg) // 2], headers=image), 422, "truncated"),
        "wrong content type": (
            requests.post,
            dict(data=jpeg, headers={"Content-Type": "text/plain"}),
            415,
            "unsupported_media_type",
        ),
        "empty body": (requests.post, dict(data=b"", headers=image), 400, "empty"),
        "unknown field": (
            requests.post,
            dict(data=jpeg, headers=image, params={"colour": "red"}),
            400,
            "unknown_field",
        ),
        "unknown form field": (
            requests.post,
            dict(files={"image": ("a.jpg", jpeg, "image/jpeg")}, data={"k": "3", "colour": "red"}),
            400,
            "unknown_field",
        ),
        "k = 0": (requests.post, dict(data=jpeg, headers=image, params={"k": 0}), 400, "bad_k"),
        "k above max_k": (requests.post, dict(data=jpeg, headers=image, params={"k": 101}), 400, "bad_k"),
        "k not a number": (requests.post, dict(data=jpeg, headers=image, params={"k": "ten"}), 400, "bad_k"),
        "a URL": (
            requests.post,
            dict(json={"url": "https://example.com/a.jpg?X-Amz-Signature=SECRET42"}),
            403,
            "reference_refused",
        ),
        "a local path": (
            requests.post,
            dict(json={"url": str(demo.photo("query-coffee"))}),
            403,
            "reference_refused",
        ),
        "bad JSON": (
            requests.post,
            dict(data=b"{nope", headers={"Content-Type": "application/json"}),
            400,
            "bad_json",
        ),
    }
    for name, (method, kwargs, status, reason) in cases.items():
        response = method(search, timeout=60, **kwargs)
        assert (response.status_code, response.json()["error"]) == (status, reason), (name, response.text)
        assert "Traceback" not in response.text and "SECRET42" not in response.text, name


def test_a_client_disconnecting_mid_upload_harms_nothing(service):
    """Serve's proxy sees the disconnect and cancels the request (its log: 499); the gateway answers the
    next request and has counted no internal error."""
    url, demo = service
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(
            b"POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n"
            + b"\xff\xd8" * 100
        )
    assert _post(url, demo.photo("query-coffee"), k=1, rerank="false").status_code == 200
    assert "internal_error" not in requests.get(f"{url}/version", timeout=10).json()["counts"]


def test_a_hot_swap_under_8_clients_fails_nothing_and_mixes_no_versions(service):
    url, demo = service
    photo = demo.photo("query-retina")  # v000002 no longer indexes retina: its answers show which index ran
    answers: list[list[tuple[int, str | None, list[str]]]] = [[] for _ in range(8)]
    stop = threading.Event()

    def client(seen: list) -> None:
        while not stop.is_set():
            response = _post(url, photo, k=3, rerank="false")
            body = response.json()
            seen.append(
                (response.status_code, body.get("index_version"), [r["id"] for r in body.get("results", [])])
            )

    def served(version: str) -> int:
        return sum(v == version for seen in answers for _, v, _ in seen)

    with ThreadPoolExecutor(8) as pool:
        for seen in answers:
            pool.submit(client, seen)
        deadline = time.monotonic() + 300
        while served("v000001") < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        versions.publish(demo.root, versions.version_name(2))
        while served("v000002") < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        stop.set()
    assert served("v000001") >= 4 and served("v000002") >= 4
    for seen in answers:
        assert [status for status, _, _ in seen] == [200] * len(seen)
        names = [v for _, v, _ in seen]
        assert names == sorted(names), names  # each client sees v1, then v2: the version changes once
        for _, version, ids in seen:
            assert any(i.startswith("retina") for i in ids) == (version == "v000001")
    assert requests.get(f"{url}/version", timeout=10).json()["index_version"] == "v000002"


def test_over_capacity_is_503_with_retry_after(service):
    url, demo = service
    with ThreadPoolExecutor(16) as pool:
        responses = list(
            pool.map(lambda _: _post(url, demo.photo("query-coffee"), k=1, rerank="false"), range(16))
        )
    refused = [r for r in responses if r.status_code == 503]
    assert refused and len(refused) < 16, [r.status_code for r in responses]
    assert all(r.headers["Retry-After"] == "1" and r.json()["error"] == "over_capacity" for r in refused)
    assert all(r.status_code == 200 for r in responses if r.status_code != 503)


def test_the_page_shows_results_for_an_uploaded_photo_in_chromium(service):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium on PATH: the page test drives the system Chromium through Playwright")
    from playwright.sync_api import sync_playwright

    url, demo = service
    outside: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        page = browser.new_page()
        page.on(
            "request",
            lambda r: None if r.url.startswith(url) or r.url.startswith("data:") else outside.append(r.url),
        )
        page.goto(url)
        page.set_input_files("#file", str(demo.photo("query-chelsea")))
        page.wait_for_selector("#results svg.match line", timeout=240_000)
        status = page.text_content("#status")
        first = page.text_content("#results .ranking:nth-child(2) .hit .id")
        lines = page.locator("#results svg.match line").count()
        thumbs = page.locator("#results .hit img").count()
        browser.close()
    assert "results from index v00000" in status
    assert "chelsea" in first  # the re-ranked ranking's first hit shows the same photo
    assert lines > 0 and thumbs > 0
    assert outside == []  # no external assets


def test_the_page_shows_the_hits_images_reading_only_their_row_groups_of_the_state(tmp_path, monkeypatch):
    """The page's thumbnails are the state's images of the ids shown, as a lookup in the whole id → url map
    draws them; the lookup reads the row groups holding those ids (state.parquet is sorted by id), not every
    row (GLDv2: 762k)."""
    monkeypatch.setattr(versions, "STATE_GROUP_ROWS", 16)
    ids = [f"img{i:03d}" for i in range(200)]
    urls = {image_id: str(tmp_path / f"{image_id}.jpg") for image_id in ids}  # only those shown exist
    shown = {"img007": (200, 40, 40), "img123": (40, 200, 40), "img150": (40, 40, 200)}
    for image_id, colour in shown.items():
        Image.new("RGB", (64, 48), colour).save(urls[image_id])
    order = np.random.default_rng(0).permutation(len(ids))  # manifests come in any order
    manifest = pa.table(
        {
            "id": [ids[i] for i in order],
            "url": [urls[ids[i]] for i in order],
            "image": pa.nulls(len(ids), pa.binary()),
        }
    )
    version_url = str(tmp_path / "v000001")
    versions.write_version_files(version_url, manifest, [], {})
    state = pq.ParquetFile(tmp_path / "v000001" / versions.STATE)
    assert state.metadata.num_row_groups == 13 and state.read().column("id").to_pylist() == ids

    version = IndexVersion(
        "v000001", version_url, (), get_preset("cpu-small"), None, None, False, RerankConfig()
    )
    sources = ImageSources(version)
    photo = Path(urls["img123"]).read_bytes()
    shortlist = Shortlist(np.array(["img150", "gone", "img007"], dtype=object), np.float32([0.9, 0.8, 0.7]))
    hits = [Hit("img123", 41.0, 40), Hit("img150", 0.9, None)]
    page = results_html("q.jpg", photo, shortlist, hits, sources, k=3)

    def hit(image_id: str, score: float, inliers: int | None = None) -> report.Hit:
        return report.Hit(image_id, score, urls.get(image_id) if image_id in shown else None, inliers)

    scores = [float(s) for s in shortlist.scores]
    expected = report.query_section(
        report.QueryView(
            "q.jpg",
            photo,
            [hit("img150", scores[0]), hit("gone", scores[1]), hit("img007", scores[2])],
            [hit("img123", 41.0, 40), hit("img150", 0.9)],
        )
    )
    assert page == expected
    assert page.count("<img ") == 1 + 4  # the photo and the four hits with an image; "gone" has none
    assert sources.state.rows_read == 3 * 16  # the groups of img007, img123 and img150 of 13


def test_state_lookups_read_only_their_row_groups_on_s3(s3_bucket, monkeypatch):
    """On object storage (each read one range request, no read-ahead) a lookup finds the same urls."""
    monkeypatch.setattr(versions, "STATE_GROUP_ROWS", 16)
    ids = [f"img{i:03d}" for i in range(100)]
    urls = [f"s3://images/{i}.jpg" for i in ids]
    table = pa.table({"id": ids[::-1], "url": urls[::-1], "image": pa.nulls(len(ids), pa.binary())})
    version = storage.join(s3_bucket.url, "versions", "v000001")
    versions.write_version_files(version, table, [], {}, s3_bucket.options)
    state = versions.StateUrls(version, s3_bucket.options)
    assert state.urls(["img042", "img099", "other"]) == {"img042": urls[42], "img099": urls[99]}
    assert state.rows_read == 16 + 4  # rows 32-47 and 96-99 (the last group) of 100
