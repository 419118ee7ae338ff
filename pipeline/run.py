"""`landmark-index run`: the whole pipeline as one resumable job.

extract index images → extract query images → build index → search → re-rank → evaluate → report.

Outputs under the config's ``out``::

    index-descriptors/  query-descriptors/   descriptor stores (resumable themselves)
    index/                                   the FAISS index (pipeline.index layout)
    search.parquet  reranked.parquet         shortlists, global and re-ranked
    metrics.json                             {"global": {...}, "reranked": {...}} when ground truth is given
    report.html                              the visual report
    _stages/<stage>.json                     completion marker: key, seconds, summary (written last)

A stage runs only when its marker is missing or its key changed. The key hashes the stage's parameters and
its inputs' keys, so editing one section re-runs that stage and those after it, and re-running a finished
run does nothing. A run killed halfway resumes: extraction from its shard commits, other stages from scratch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline import manifest, storage
from pipeline.runconfig import RunConfig

log = logging.getLogger(__name__)

STAGES = ("extract-index", "extract-queries", "build-index", "search", "rerank", "evaluate", "report")


@dataclass(frozen=True)
class RunPaths:
    out: str

    @property
    def index_store(self) -> str:
        return storage.join(self.out, "index-descriptors")

    @property
    def query_store(self) -> str:
        return storage.join(self.out, "query-descriptors")

    @property
    def index(self) -> str:
        return storage.join(self.out, "index")

    @property
    def search(self) -> str:
        return storage.join(self.out, "search.parquet")

    @property
    def reranked(self) -> str:
        return storage.join(self.out, "reranked.parquet")

    @property
    def metrics(self) -> str:
        return storage.join(self.out, "metrics.json")

    @property
    def report(self) -> str:
        return storage.join(self.out, "report.html")

    def marker(self, stage: str) -> str:
        return storage.join(self.out, "_stages", f"{stage}.json")


@dataclass(frozen=True)
class StageResult:
    stage: str
    key: str
    seconds: float
    summary: dict[str, Any]
    reused: bool


def _key(stage: str, params: Any, upstream: list[str]) -> str:
    text = json.dumps({"stage": stage, "params": params, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _Runner:
    """Runs stages in order, skipping those whose marker holds the same key."""

    def __init__(self, paths: RunPaths, options: storage.Options, say: Callable[[str], None]) -> None:
        self.paths = paths
        self.options = options
        self.say = say
        self.results: dict[str, StageResult] = {}

    def stage(
        self, name: str, params: Any, upstream: list[str], work: Callable[[], Mapping[str, Any]]
    ) -> None:
        key = _key(name, params, [self.results[u].key for u in upstream])
        marker = self.paths.marker(name)
        if storage.exists(marker, self.options):
            done = json.loads(storage.read_text(marker, self.options))
            if done["key"] == key:
                self.results[name] = StageResult(name, key, done["seconds"], done["summary"], reused=True)
                self.say(f"{name}: done earlier, reused")
                return
        self.say(f"{name}: running")
        start = time.monotonic()
        summary = dict(work())
        result = StageResult(name, key, time.monotonic() - start, summary, reused=False)
        record = {"key": key, "seconds": result.seconds, "summary": summary}
        storage.write_text(marker, json.dumps(record, indent=2, default=str), self.options)
        self.results[name] = result
        self.say(f"{name}: done in {result.seconds:.1f} s")


def run_pipeline(
    config: RunConfig, options: storage.Options = None, say: Callable[[str], None] = log.info
) -> dict[str, StageResult]:
    """Run (or resume) every stage of ``config``; returns each stage's result."""
    from pipeline.config import RuntimeOptions, get_preset
    from pipeline.distributed import ClusterOptions, ExtractionJob, run_extraction
    from pipeline.index import BuildConfig, QualityConfig, build_index, search
    from pipeline.rerank import config_from_stores, rerank
    from pipeline.store import StoreSettings

    paths = RunPaths(config.out)
    runner = _Runner(paths, options, say)
    address = config.ray_address or None
    preset = get_preset(config.extract.preset)
    cluster = ClusterOptions(address=address, runtime=RuntimeOptions(batch_size=config.extract.batch_size))
    store_settings = StoreSettings(local_dtype=config.extract.local_dtype)

    def extraction(manifest_url: str, out_url: str) -> Callable[[], Mapping[str, Any]]:
        job = ExtractionJob(
            manifest_url,
            out_url,
            preset,
            config.extract.weights or None,
            store_settings,
            config.extract.shard_size,
        )
        return lambda: asdict(run_extraction(job, cluster, options))

    extract_params = asdict(config.extract)
    runner.stage(
        "extract-index",
        [extract_params, config.data.index],
        [],
        extraction(config.data.index, paths.index_store),
    )
    runner.stage(
        "extract-queries",
        [extract_params, config.data.queries],
        [],
        extraction(config.data.queries, paths.query_store),
    )

    def build() -> Mapping[str, Any]:
        return build_index(
            paths.index_store,
            paths.index,
            factory=config.index.factory or None,
            memory_budget=config.index.memory_budget or None,
            options=options,
            ray_address=address,
            config=BuildConfig(quality=QualityConfig(target=config.index.target_recall)),
        )

    runner.stage("build-index", asdict(config.index), ["extract-index"], build)
    runner.stage(
        "search",
        asdict(config.search),
        ["build-index", "extract-queries"],
        lambda: search(
            paths.index,
            paths.query_store,
            paths.search,
            config.search.k,
            config.search.nprobe or None,
            options,
        ),
    )
    rerank_config = (
        config_from_stores(paths.query_store, paths.index_store, config.rerank.overrides(), options)
        if config.rerank.enabled
        else None
    )
    if config.rerank.enabled:
        runner.stage(
            "rerank",
            asdict(rerank_config),
            ["search"],
            lambda: asdict(
                rerank(
                    paths.search,
                    paths.query_store,
                    paths.index_store,
                    paths.reranked,
                    rerank_config,
                    options=options,
                )
            ),
        )
    if config.data.ground_truth:
        runner.stage(
            "evaluate",
            asdict(config.data),
            [s for s in ("search", "rerank") if s in runner.results],
            lambda: _evaluate(config, paths, options),
        )
    if config.report.enabled:
        runner.stage(
            "report",
            asdict(config.report),
            [s for s in ("search", "rerank", "evaluate") if s in runner.results],
            lambda: _report(config, paths, runner.results, rerank_config, options),
        )
    return runner.results


# ---------------------------------------------------------------- evaluation


def _evaluate(config: RunConfig, paths: RunPaths, options: storage.Options) -> dict[str, Any]:
    from pipeline.evaluate import evaluate

    results = {"global": paths.search}
    if config.rerank.enabled:
        results["reranked"] = paths.reranked
    metrics = {
        name: evaluate(
            url,
            config.data.ground_truth,
            config.data.protocol,
            options,
            landmarks_url=config.data.landmarks or None,
        )
        for name, url in results.items()
    }
    storage.write_text(paths.metrics, json.dumps(metrics, indent=2), options)
    return metrics


# ---------------------------------------------------------------- report


def _labeler(config: RunConfig, options: storage.Options) -> Callable[[str, str], str | None]:
    """(query id, result id) → positive | negative | junk, from the ground truth (None without it)."""
    from pipeline.evaluate import read_gldv2_solution, read_landmarks, read_revisitop_gnd

    data = config.data
    if not data.ground_truth:
        return lambda query, hit: None
    if data.protocol == "revisitop":
        gt = read_revisitop_gnd(data.ground_truth, options)
        position = {name: i for i, name in enumerate(gt.qimlist)}

        def revisitop(query: str, hit: str) -> str | None:
            if query not in position:
                return None
            entry = gt.gnd[position[query]]
            names = {kind: {gt.imlist[i] for i in entry.get(kind, [])} for kind in ("easy", "hard", "junk")}
            if hit in names["junk"]:
                return "junk"
            return "positive" if hit in names["easy"] | names["hard"] else "negative"

        return revisitop
    if data.protocol == "gldv2-retrieval":
        solution = read_gldv2_solution(data.ground_truth, "images", options)
        relevant = {q: set(ids) for q, ids in solution.truth.items()}
        return lambda query, hit: (
            None if query not in relevant else ("positive" if hit in relevant[query] else "negative")
        )
    solution = read_gldv2_solution(data.ground_truth, "landmarks", options)
    landmarks = read_landmarks(data.landmarks, options)
    truth = {q: set(ids) for q, ids in solution.truth.items()}
    return lambda query, hit: (
        None if query not in truth else ("positive" if landmarks.get(hit) in truth[query] else "negative")
    )


def _image_sources(manifest_url: str, options: storage.Options) -> dict[str, Any]:
    """id → URL or inline bytes of a manifest's images."""
    table = manifest.read_manifest(manifest_url, options)
    urls, inline = table.column("url").to_pylist(), table.column("image").to_pylist()
    return {
        i: (b if b is not None else u)
        for i, u, b in zip(table.column("id").to_pylist(), urls, inline, strict=True)
    }


def _rankings(url: str, options: storage.Options, limit: int) -> dict[str, list[dict[str, Any]]]:
    table = storage.read_parquet(url, options).sort_by([("query_id", "ascending"), ("rank", "ascending")])
    out: dict[str, list[dict[str, Any]]] = {}
    for row in table.to_pylist():
        hits = out.setdefault(row["query_id"], [])
        if len(hits) < limit:
            hits.append(row)
    return out


def _report(
    config: RunConfig,
    paths: RunPaths,
    results: Mapping[str, StageResult],
    rerank_config: Any,
    options: storage.Options,
) -> dict[str, Any]:
    from pipeline.report import Hit, QueryView, ReportSettings, write_report
    from pipeline.rerank import verify_candidates
    from pipeline.store import LocalReader

    settings = ReportSettings(max_queries=config.report.max_queries)
    label = _labeler(config, options)
    images = {**_image_sources(config.data.index, options), **_image_sources(config.data.queries, options)}
    global_hits = _rankings(paths.search, options, settings.max_hits)
    reranked_hits = _rankings(paths.reranked, options, settings.max_hits) if config.rerank.enabled else {}
    queries = sorted(global_hits)[: settings.max_queries]
    query_features = LocalReader(paths.query_store, options)
    index_features = LocalReader(paths.index_store, options)

    def hits(rows: list[dict[str, Any]], query: str) -> list[Hit]:
        return [
            Hit(
                r["id"],
                float(r["score"]),
                images.get(r["id"]),
                r.get("inliers"),
                label(query, r["id"]),
                r.get("global_score"),
            )
            for r in rows
        ]

    def matches(query: str, rows: list[dict[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Inlier correspondences of the top verified pairs, recomputed with the same settings."""
        top = [r["id"] for r in rows if (r.get("inliers") or 0) > 0 and r["id"] in index_features]
        top = top[: settings.max_match_pairs]
        if not top or query not in query_features:
            return {}
        q = query_features.read([query])[query]
        cands = index_features.read(top)
        found, verification = verify_candidates(q, [cands[i] for i in top], rerank_config)
        out = {}
        for b, image_id in enumerate(top):
            keep = (verification.inlier_mask[b] & found.valid[b]).cpu().numpy()
            q_idx = found.query_idx[b].cpu().numpy()[keep]
            c_idx = found.cand_idx[b].cpu().numpy()[keep]
            out[image_id] = (q.keypoints[q_idx], cands[image_id].keypoints[c_idx])
        return out

    views = [
        QueryView(
            query_id=query,
            query_image=images.get(query),
            global_ranking=hits(global_hits[query], query),
            reranked=hits(reranked_hits.get(query, []), query),
            matches=matches(query, reranked_hits.get(query, [])),
        )
        for query in queries
    ]
    metrics = results["evaluate"].summary if "evaluate" in results else {}
    summary: dict[str, Any] = {_setting_name(k, s): v for k, m in metrics.items() for s, v in m.items()}
    summary["queries"] = len(global_hits)
    timings = {name: r.seconds for name, r in results.items()}
    write_report(paths.report, summary, timings, views, settings, options)
    return {"queries_shown": len(views), "report": storage.redact(paths.report)}


def _setting_name(result: str, setting: str) -> str:
    return f"{result} · {setting}"
