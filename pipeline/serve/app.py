"""The query service on Ray Serve: an HTTP gateway in front of extraction, search and verification deployments.

    POST /v1/search   an image body (image/jpeg, image/png, ...; application/octet-stream), a multipart upload
                      (field ``image``), or with --allow-urls a JSON body {"url": ...}; options k, rerank,
                      matches as query parameters (or form / JSON fields). Answers the JSON of
                      ``landmark-index query --json`` (plus inlier points with matches=true).
    GET  /healthz     the gateway is up; /readyz: it serves an index version; /version: which one.
    POST /v1/search/view  the same search for the page at /: {"answer": ..., "html": the report's drawing}.
    GET  /            the search page (pipeline/serve/page.html).

Every refusal is a JSON ``{"error": reason, "message": ...}`` with a 4xx status; over capacity a 503 with
Retry-After. Response header Server-Timing gives each deployment's share of the request.

Run it with ``landmark-index serve --index ROOT`` or ``serve run pipeline.serve.app:build index=ROOT``.

Deployment defaults (autoscaling on ongoing requests per replica, ServeSettings for the ceilings):

    deployment     replicas   target ongoing   batch   resources
    Gateway        1..2       32               -       0 CPU (async I/O; decoding in a thread)
    Extraction     1..4       2                8       1 CPU, or 1 GPU when the cluster has GPUs
    Search         1..2       8                32      0.5 CPU, the index in memory once per replica
    Verification   1..4       4                8       0.5 CPU (GPU verification needs a GPU replica)
"""

import importlib.metadata
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from pipeline import images, settings, storage
from pipeline.errors import ConfigError
from pipeline.query import (
    Hit,
    IndexVersion,
    Shortlist,
    answer,
    prepare_photo,
    resolve_version,
    shortlist_size,
    unverified,
)
from pipeline.serve.deployments import Extraction, Search, Verification
from pipeline.serve.page import ImageSources, page_html, results_html
from pipeline.serve.settings import ServeSettings
from pipeline.serve.versions import LatestWatcher, PartCache, by_name

log = logging.getLogger(__name__)

IMAGE_TYPES = frozenset(
    {
        "image/jpeg",
        "image/png",
        "image/webp",
        "image/bmp",
        "image/tiff",
        "image/gif",
        "application/octet-stream",
    }
)
OPTIONS = ("k", "rerank", "matches")
INDEX_ENV = "INDEX_ROOT"  # the index root `build` serves when its arguments name none
URL_SCHEMES = frozenset({"http", "https", "s3", "gs"})
# ImageError reasons → HTTP status: too big is 413, everything else about the bytes is 422
IMAGE_STATUS = {"too_large": 413}

api = FastAPI(title="landmark-index query service", docs_url=None, redoc_url=None)


class ApiError(Exception):
    """A refused request: ``status`` (4xx/503), a stable ``reason`` and a message for people."""

    def __init__(
        self, status: int, reason: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.headers = status, reason, message, dict(headers or {})


def error_response(error: ApiError) -> JSONResponse:
    body = {"error": error.reason, "message": storage.redact_text(error.message)}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


# ------------------------------------------------------------------------------------------ request parsing


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it passes ``limit`` bytes, without reading the rest."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "too_large", f"upload of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "too_large", f"upload exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", f"the client went away after {size} bytes") from None
    return b"".join(chunks)


def parse_options(values: Mapping[str, str], max_k: int) -> dict[str, Any]:
    """k (1..max_k), rerank and matches (true/false) from query parameters or form fields."""
    unknown = sorted(set(values) - set(OPTIONS))
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown field(s) {unknown}; allowed: {list(OPTIONS)}")
    out: dict[str, Any] = {"k": 10, "rerank": True, "matches": False}
    if "k" in values:
        k = str(values["k"])
        if not k.lstrip("-").isdigit() or not 1 <= int(k) <= max_k:
            raise ApiError(400, "bad_k", f"k={k!r}; must be an integer between 1 and {max_k}")
        out["k"] = int(k)
    for name in ("rerank", "matches"):
        if name in values:
            flag = str(values[name]).lower()
            if flag not in ("true", "false", "1", "0"):
                raise ApiError(400, f"bad_{name}", f"{name}={values[name]!r}; must be true or false")
            out[name] = flag in ("true", "1")
    return out


async def photo_and_options(request: Request, config: ServeSettings) -> tuple[str, bytes, dict[str, Any]]:
    """(photo name, image bytes, options) of a search request, or an ApiError saying what is wrong."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    query = dict(request.query_params)
    if media not in IMAGE_TYPES | {"multipart/form-data", "application/json"}:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"content type {media or 'none'!r}; send an image ({', '.join(sorted(IMAGE_TYPES))}), "
            "multipart/form-data with a file field 'image', or application/json",
        )
    body = await read_body(request, config.max_upload_bytes)
    if not body:
        raise ApiError(400, "empty", "empty request body: send the photo's bytes")
    if media == "multipart/form-data":
        return await _multipart(request, body, query, config)
    if media == "application/json":
        return await _by_reference(body, query, config)
    return "upload", body, parse_options(query, config.max_k)


async def _multipart(
    request: Request, body: bytes, query: dict[str, str], config: ServeSettings
) -> tuple[str, bytes, dict[str, Any]]:
    request._body = body  # starlette parses the form from the body already read (and size-checked)
    try:
        form = await request.form(max_files=1, max_fields=len(OPTIONS))
    except Exception as exc:  # malformed multipart: starlette raises its own or python-multipart's errors
        raise ApiError(400, "bad_multipart", f"cannot parse the multipart body: {exc}") from None
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise ApiError(400, "missing_image", "multipart upload without a file field 'image'")
    fields = {k: v for k, v in form.items() if k != "image"}
    data = await upload.read()
    if not data:
        raise ApiError(400, "empty", "the uploaded file 'image' is empty")
    return upload.filename or "upload", data, parse_options({**query, **fields}, config.max_k)  # type: ignore[dict-item]


async def _by_reference(
    body: bytes, query: dict[str, str], config: ServeSettings
) -> tuple[str, bytes, dict[str, Any]]:
    """A JSON body naming the image: {"url": ...}, refused unless the server allows URLs / local files."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "bad_json", "the JSON body does not parse") from None
    if not isinstance(request, dict) or not isinstance(request.get("url"), str):
        raise ApiError(400, "bad_json", 'a JSON body must be an object {"url": "...", ...}')
    url = request.pop("url")
    options = parse_options(
        {**query, **{k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in request.items()}},
        config.max_k,
    )
    scheme = images.url_scheme(url)
    allowed = (URL_SCHEMES if config.allow_urls else set()) | (
        {images.LOCAL, "file"} if config.allow_local_files else set()
    )
    if scheme not in allowed:
        what = "a local path" if scheme in (images.LOCAL, "file") else f"a {scheme} URL"
        raise ApiError(403, "reference_refused", f"{what} is refused: this server takes uploaded images only")
    local = images.LocalFiles(root=None, allow_outside_root=config.allow_local_files)
    try:
        data = await run_in_threadpool(
            images.fetch_image_bytes, url, None, storage.options_from_env(), allowed, local
        )
    except images.ImageError as exc:
        raise ApiError(422, exc.reason, str(exc)) from None
    return storage.redact(url), data, options


# ------------------------------------------------------------------------------------------ the gateway


@dataclass(frozen=True)
class Found:
    """One search, before it is rendered as JSON or as the page's view. (Defined before Gateway: Serve pickles
    the deployment class when it is decorated, with the module globals that exist by then.)"""

    version: IndexVersion
    photo: str
    data: bytes
    options: dict[str, Any]
    shortlist: Shortlist
    hits: list[Hit]
    timing: dict[str, float]


@serve.deployment(
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32},
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=256,
)
@serve.ingress(api)
class Gateway:
    """HTTP in, JSON out: validates and decodes the photo, pins the live version, calls the three deployments."""

    def __init__(self, config: ServeSettings, extraction: Any, search: Any, verification: Any) -> None:
        storage.install_log_redaction()
        self.config = config
        self.extraction, self.search, self.verification = extraction, search, verification
        self.in_flight = 0
        self.counts: Counter[str] = Counter()
        options = storage.options_from_env()
        self.watcher = LatestWatcher(config.index, config.poll_s, self._warm, options)
        # the deployments load the live version on start-up; later versions are warmed up before the switch
        self.version: IndexVersion = resolve_version(config.index, options)
        self.watcher.current = self.version
        self.watcher.start()
        self.options = options
        self.sources: PartCache[ImageSources] = PartCache(lambda v: ImageSources(v, options), by_name)

    def _warm(self, version: IndexVersion) -> None:
        """Have every deployment load ``version`` before any request is pinned to it (runs in the watcher's
        thread, so requests keep flowing on the old version meanwhile), then switch."""
        for handle in (self.extraction, self.search, self.verification):
            handle.load.remote(version).result()
        self.version = version  # one assignment: a request sees the old version or the new one

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        return JSONResponse({"status": "ready", "index_version": self.version.name})

    @api.get("/version")
    async def version_info(self) -> dict[str, Any]:
        return {
            "index_version": self.version.name,
            "index": storage.redact(self.config.index),
            "package_version": importlib.metadata.version("landmark-index"),
            "counts": dict(self.counts),
        }

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(page_html())

    @api.post("/v1/search")
    async def search_photo(self, request: Request) -> JSONResponse:
        return await self._respond(request, self._json)

    @api.post("/v1/search/view")
    async def search_view(self, request: Request) -> JSONResponse:
        """The page's search: the answer and its results drawn as the HTML report draws them."""
        return await self._respond(request, self._view)

    async def _json(self, found: Found) -> dict[str, Any]:
        return answer(found.photo, found.version.name, found.hits, found.options["matches"])

    async def _view(self, found: Found) -> dict[str, Any]:
        sources = await run_in_threadpool(self.sources.get, found.version)
        shown = found.hits if found.options["rerank"] else None
        html = await run_in_threadpool(
            results_html,
            found.photo,
            found.data,
            found.shortlist,
            shown,
            sources,
            found.options["k"],
            self.options,
        )
        return {"answer": await self._json(found), "html": html}

    async def _respond(
        self, request: Request, render: Callable[[Found], Awaitable[dict[str, Any]]]
    ) -> JSONResponse:
        """Admission (503 beyond max_in_flight), the search, its rendering; every failure a JSON error."""
        retry = {"Retry-After": str(self.config.retry_after_s)}
        if self.in_flight >= self.config.max_in_flight:
            message = f"{self.in_flight} requests in flight; retry in {self.config.retry_after_s} s"
            return self._refused(ApiError(503, "over_capacity", message, retry))
        self.in_flight += 1
        try:
            found = await self._search(request)
            body = await render(found)
        except ApiError as error:
            return self._refused(error)
        except Exception as exc:  # a bug or a failed replica: logged here, never a traceback to the client
            if isinstance(exc, BackPressureError):
                return self._refused(ApiError(503, "over_capacity", "the service is at capacity", retry))
            log.exception("search failed: %s", storage.redact_text(f"{type(exc).__name__}: {exc}"))
            self.counts["internal_error"] += 1
            return JSONResponse({"error": "internal", "message": "internal error (logged)"}, status_code=500)
        finally:
            self.in_flight -= 1
        self.counts["ok"] += 1
        server_timing = ", ".join(
            f"{name};dur={1000 * seconds:.1f}" for name, seconds in found.timing.items()
        )
        return JSONResponse(body, headers={"Server-Timing": server_timing})

    def _refused(self, error: ApiError) -> JSONResponse:
        self.counts[error.reason] += 1
        return error_response(error)

    async def _search(self, request: Request) -> Found:
        version = self.version  # pinned: every part of this request uses it
        timing: dict[str, float] = {}
        start = time.perf_counter()
        photo, data, options = await photo_and_options(request, self.config)
        try:
            prepared = await run_in_threadpool(prepare_photo, version, data, self.config.max_pixels)
        except images.ImageError as exc:
            raise ApiError(IMAGE_STATUS.get(exc.reason, 422), exc.reason, str(exc)) from None
        timing["decode"] = time.perf_counter() - start
        k, rerank = options["k"], options["rerank"]
        start = time.perf_counter()
        features = await self.extraction.extract.remote((version, prepared))
        timing["extract"], start = time.perf_counter() - start, time.perf_counter()
        shortlist = await self.search.search.remote((version, features, shortlist_size(version, k, rerank)))
        timing["search"], start = time.perf_counter() - start, time.perf_counter()
        if rerank:
            hits = await self.verification.verify.remote((version, features, shortlist, k))
            timing["verify"] = time.perf_counter() - start
        else:
            hits = unverified(shortlist, k)
        return Found(version, photo, data, options, shortlist, hits, timing)


def _gpus_in_cluster() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0


def _deployment(
    cls: type,
    config: ServeSettings,
    replicas: int,
    target: int,
    cpus: float,
    gpus: float,
    ongoing: int,
    queued: int,
) -> serve.Application:
    """``cls`` as an autoscaled deployment (1..``replicas``), bound to ``config``."""
    return serve.deployment(
        cls,
        autoscaling_config={"min_replicas": 1, "max_replicas": replicas, "target_ongoing_requests": target},
        ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
        max_ongoing_requests=ongoing,
        max_queued_requests=queued,
    ).bind(config)


def build_app(config: ServeSettings) -> serve.Application:
    """The application graph; the extractor asks for a GPU when the cluster has one (``extractor_gpus``)."""
    gpus = config.extractor_gpus if config.extractor_gpus is not None else float(_gpus_in_cluster() > 0)
    config = replace(config, extractor_gpus=gpus)
    # (replicas at most, target ongoing requests per replica, CPUs, GPUs, ongoing cap, queue cap): a full
    # queue answers 503 (back-pressure), never an unbounded wait
    extraction = _deployment(
        Extraction, config, config.max_extractors, 2, config.extractor_cpus, gpus, 16, 64
    )
    search = _deployment(Search, config, config.max_searchers, 8, config.backend_cpus, 0, 64, 256)
    verification = _deployment(Verification, config, config.max_verifiers, 4, config.backend_cpus, 0, 16, 64)
    gateway = Gateway.options(
        autoscaling_config={
            "min_replicas": 1,
            "max_replicas": config.max_gateways,
            "target_ongoing_requests": 32,
        }
    )
    return gateway.bind(config, extraction, search, verification)


def build(args: dict[str, str]) -> serve.Application:
    """``serve run pipeline.serve.app:build index=ROOT [max_k=50 ...]``: settings by their field names; without
    ``index``, $INDEX_ROOT (the Kubernetes ConfigMap's)."""
    if "index" not in args and os.environ.get(INDEX_ENV):
        args = {**args, "index": os.environ[INDEX_ENV]}
    known = {s.key: s for s in settings.settings_of(ServeSettings)}
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; allowed: {sorted(known)}")
    values = {key: settings.check_value(known[key], _literal(text), key) for key, text in args.items()}
    return build_app(settings.build(ServeSettings, values))


def _literal(text: str) -> Any:
    """A `serve run` argument as the JSON value it spells (numbers, true/false), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
