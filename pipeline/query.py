"""One photo in, verified landmarks out: the query path of a built index, in one process or split by the service.

A query runs what the batch pipeline runs, on one index version and its stores' recorded settings:
extraction with the preset, weights and decoding recorded in the stores' ``_run.json``, search with the index's
stored nprobe / k_factor, geometric re-ranking with the stores' recorded re-ranking settings. The three parts
(:class:`QueryModel`, :class:`QuerySearcher`, :class:`QueryVerifier`) are what the service's deployments
hold (pipeline.serve), so the service answers exactly what ``landmark-index query`` prints.

An answer names the version that produced it: the name LATEST held for a versioned root (pipeline.versions),
else ``index-`` + a digest of the index's params.json.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from pipeline import images, storage, store, versions
from pipeline.config import ExtractionConfig
from pipeline.errors import ConfigError, InputError, MissingInputError
from pipeline.extraction import ExtractionJob, prepare_row
from pipeline.features import ImageFeatures, PreparedImage, build_extractor
from pipeline.index import io as index_io
from pipeline.index.search import OpenIndex, open_index
from pipeline.rerank.config import RerankConfig, from_settings
from pipeline.rerank.shortlist import nulls_for, read_null_sample, rerank_shortlist, stored_settings
from pipeline.runpaths import RunPaths
from pipeline.storage import Options

SCORE_DECIMALS = 6
MAX_K = 1000  # results per query a caller may ask for


@dataclass(frozen=True)
class IndexVersion:
    """Everything a query needs to know about one index version (small and picklable: the service ships it)."""

    name: str  # "v000003", or "index-<digest>" for an unversioned index folder
    index_url: str
    stores: tuple[str, ...]  # descriptor stores of the indexed images, newest last
    extraction: ExtractionConfig  # what the stores were extracted with
    weights_url: str | None
    weights_sha256: str | None
    decode_draft: bool
    rerank: RerankConfig  # the stores' recorded re-ranking settings

    def job(self) -> ExtractionJob:
        """The extraction job whose decoding the stores' rows went through (a query photo goes through it too)."""
        return ExtractionJob(
            manifest_url="",
            out_url=self.stores[-1],
            config=self.extraction,
            weights_url=self.weights_url,
            decode_draft=self.decode_draft,
        )


def _locate(path: str, options: Options) -> tuple[str, str, list[str]]:
    """(version name, index URL, its default stores) of a versioned root, a `run` folder or an index folder."""
    live = versions.live_version(path, options)
    if live is not None:
        index_url = versions.version_url(path, live)
        return live, index_url, versions.read_stores(index_url, options)
    index_folder = (path, RunPaths(path.rstrip("/").rsplit("/", 1)[0]))  # a run's index/: the store beside it
    run_folder = (RunPaths(path).index, RunPaths(path))
    for index_url, run in (index_folder, run_folder):
        params_url = storage.join(index_url, index_io.PARAMS)
        if storage.exists(params_url, options):
            digest = hashlib.sha256(storage.read_text(params_url, options).encode()).hexdigest()
            return f"index-{digest[:12]}", index_url, [run.index_store]
    raise MissingInputError(
        f"{storage.redact(path)} is neither a versioned root (no {versions.LATEST}), a run folder (no "
        f"index/{index_io.PARAMS}) nor an index folder (no {index_io.PARAMS})"
    )


def resolve_version(
    root_or_index: str,
    options: Options = None,
    stores: Sequence[str] | None = None,
    weights_url: str | None = None,
) -> IndexVersion:
    """The live version of a versioned root (its LATEST), the index of a `run` folder, or an index folder.

    ``stores``: the index images' descriptor stores; default: the version's stores.json, or the
    ``index-descriptors`` store of the run (beside its ``index/``). ``weights_url``: where to load the
    recorded weights from when the recorded path is not reachable here; its checksum must match the recorded
    one.
    """
    name, index_url, found = _locate(root_or_index, options)
    stores = list(stores or found)
    for url in stores:
        store.require_store(url, options)
    info = store.read_run_info(stores[-1], options) or {}
    if "config" not in info:
        raise InputError(f"{storage.redact(stores[-1])} records no extraction config in {store.RUN_INFO}")
    recorded = info.get("weights")
    if recorded is None:
        raise InputError(
            f"{storage.redact(stores[-1])} was extracted with randomly initialised weights: no query can load "
            "that model again (extract the index with --weights)"
        )
    return IndexVersion(
        name=name,
        index_url=index_url,
        stores=tuple(stores),
        extraction=ExtractionConfig.from_dict(info["config"]),
        weights_url=weights_url or recorded,
        weights_sha256=info.get("weights_sha256"),
        decode_draft=bool(info.get("decode_draft", False)),
        rerank=from_settings(stored_settings(stores[-1], options)),
    )


# ------------------------------------------------------------------------------------------ the three parts


def prepare_photo(
    version: IndexVersion, data: bytes, max_pixels: int = images.DEFAULT_MAX_PIXELS
) -> PreparedImage:
    """Decode and cap one photo's bytes as the version's batch extraction did (no model needed: the
    service does it before a photo takes an extractor's time); pipeline.images.ImageError for bad bytes."""
    job = replace(version.job(), max_pixels=max_pixels)
    return prepare_row({"url": None, "image": data}, job, None, images.ANY_LOCAL_FILE)


class QueryModel:
    """The version's extractor, loaded once; photos are decoded as the batch extraction decodes them."""

    def __init__(self, version: IndexVersion, options: Options = None, device: str | None = None) -> None:
        self.version = version
        self.extractor = build_extractor(version.extraction, version.weights_url, options, device)
        wanted, loaded = version.weights_sha256, self.extractor.weights_id
        if wanted is not None and loaded != wanted:
            raise InputError(
                f"weights {storage.redact(version.weights_url or '')} (sha256 {loaded[:12]}…) are not the ones "
                f"the index was extracted with (sha256 {wanted[:12]}…)"
            )

    def extract(self, prepared: Sequence[PreparedImage]) -> list[ImageFeatures]:
        return self.extractor.extract_prepared(prepared)


@dataclass(frozen=True)
class Shortlist:
    ids: np.ndarray  # (C,) object, image ids in global order
    scores: np.ndarray  # (C,) float32 global similarities


class QuerySearcher:
    """The version's index, loaded once."""

    def __init__(self, version: IndexVersion, options: Options = None) -> None:
        self.version = version
        self.index: OpenIndex = open_index(version.index_url, options=options)

    def search(self, vectors: np.ndarray, k: int) -> list[Shortlist]:
        """Top-``k`` of each (n, D) global descriptor."""
        positions = np.array([str(i) for i in range(len(vectors))], dtype=object)
        table = self.index.search(positions, vectors, k)
        rows = np.array(table.column("query_id").to_pylist(), dtype=int)
        ids = np.asarray(table.column("id").to_pylist(), dtype=object)
        scores = table.column("score").to_numpy()
        return [Shortlist(ids[rows == i], scores[rows == i]) for i in range(len(vectors))]


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    inliers: int | None  # None: not verified
    matches: tuple[np.ndarray, np.ndarray] | None = None  # (M, 2) query, (M, 2) candidate inlier points


class QueryVerifier:
    """Geometric verification against the version's stores (random access to the candidates' local features)."""

    def __init__(self, version: IndexVersion, options: Options = None) -> None:
        self.version = version
        self.reader = store.LocalReader(list(version.stores), options)
        # score "gate": the null sample's features, read once per version as a batch run reads them once
        self.nulls = read_null_sample(self.reader, version.rerank)

    def verify(self, query: ImageFeatures, shortlist: Shortlist, k: int) -> list[Hit]:
        """The shortlist re-ranked as the batch re-ranking does it; its first ``k`` hits."""
        config = self.version.rerank
        top = [i for i in shortlist.ids[: config.top] if i in self.reader]
        found = self.reader.read(top)
        candidates = [found.get(i) for i in shortlist.ids]
        nulls = nulls_for(self.nulls, "", shortlist.ids)  # the photo is no database image
        reranked = rerank_shortlist(query, candidates, shortlist.scores, config, nulls)
        return [
            Hit(
                str(shortlist.ids[p]),
                float(reranked.scores[p]),
                int(reranked.inliers[p]) if reranked.inliers[p] >= 0 else None,
                reranked.matches.get(p),
            )
            for p in reranked.order[:k].tolist()
        ]


def unverified(shortlist: Shortlist, k: int) -> list[Hit]:
    return [Hit(str(i), float(s), None) for i, s in zip(shortlist.ids[:k], shortlist.scores[:k], strict=True)]


def shortlist_size(version: IndexVersion, k: int, rerank: bool) -> int:
    """Candidates searched for ``k`` results: re-ranking looks at its ``top`` first ones."""
    return max(k, version.rerank.top) if rerank else k


def check_k(k: int) -> int:
    if not 1 <= k <= MAX_K:
        raise ConfigError(f"k={k}; must be between 1 and {MAX_K}")
    return k


def answer(photo: str, version: str, hits: Sequence[Hit], with_matches: bool = False) -> dict[str, Any]:
    """The JSON object of one query (``query --json`` and the service's ``POST /v1/search``)."""
    results = []
    for hit in hits:
        # 6 decimals: what a float32 similarity means (and thread counts change its last bits)
        result: dict[str, Any] = {
            "id": hit.id,
            "score": round(hit.score, SCORE_DECIMALS),
            "inliers": hit.inliers,
        }
        if with_matches and hit.matches is not None:
            result["matches"] = {"query": hit.matches[0].tolist(), "candidate": hit.matches[1].tolist()}
        results.append(result)
    return {"photo": photo, "index_version": version, "results": results}


# ------------------------------------------------------------------------------------------ in one process


class QueryEngine:
    """The three parts of one version in this process."""

    def __init__(self, version: IndexVersion, options: Options = None, device: str | None = None) -> None:
        self.version = version
        self.model = QueryModel(version, options, device)
        self.searcher = QuerySearcher(version, options)
        self.verifier = QueryVerifier(version, options)

    def query(self, photo: str, data: bytes, k: int = 10, rerank: bool = True) -> dict[str, Any]:
        """The answer for one photo's bytes (``photo`` names it in the answer)."""
        check_k(k)
        features = self.model.extract([prepare_photo(self.version, data)])[0]
        shortlist = self.searcher.search(
            features.global_descriptor[None], shortlist_size(self.version, k, rerank)
        )[0]
        hits = self.verifier.verify(features, shortlist, k) if rerank else unverified(shortlist, k)
        return answer(photo, self.version.name, hits)


def read_photo(url: str, options: Options = None) -> bytes:
    """A photo named on the command line: a local file or a URL of an allowed scheme (ImageError otherwise)."""
    return images.fetch_image_bytes(url, None, options)


def query_photos(
    photos: Sequence[str],
    root_or_index: str,
    k: int = 10,
    rerank: bool = True,
    options: Options = None,
    stores: Sequence[str] | None = None,
    weights_url: str | None = None,
) -> list[dict[str, Any]]:
    """Answers for ``photos`` (files or URLs) on the live version of ``root_or_index``; a photo that cannot be
    read or decoded gets ``{"photo", "error"}`` instead of results."""
    check_k(k)
    engine = QueryEngine(resolve_version(root_or_index, options, stores, weights_url), options)
    out = []
    for photo in photos:
        try:
            out.append(engine.query(storage.redact(photo), read_photo(photo, options), k, rerank))
        except images.ImageError as exc:
            out.append({"photo": storage.redact(photo), "error": exc.reason, "message": str(exc)})
    return out
