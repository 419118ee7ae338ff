"""`landmark-index run`: the whole pipeline as one resumable job.

extract index images → extract query images → build index → search → re-rank → evaluate → report.

Outputs under the config's ``out``::

    index-descriptors/  query-descriptors/   descriptor stores (resumable themselves)
    index/                                   the FAISS index (pipeline.index layout; + dba.parquet for DBA)
    search.parquet  reranked.parquet         shortlists, global and re-ranked
    metrics.json                             {"global": {...}, "reranked": {...}} when ground truth is given
    report.html                              the visual report
    _stages/<stage>.json                     completion marker: key, seconds, summary (written last)

A stage runs only when its marker is missing or its key changed. The key hashes the stage's parameters and
its inputs' keys, so editing one section re-runs that stage and those after it, and re-running a finished
run does nothing. A run killed halfway resumes: extraction from its shard commits, search and re-ranking from their committed
parts, other stages from scratch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, is_dataclass, replace
from typing import Any

from pipeline import storage
from pipeline.evaluate import evaluate, write_metrics
from pipeline.extraction import Progress, run_extraction
from pipeline.index import build_index, search
from pipeline.index.dba import build_dba
from pipeline.report import report_run
from pipeline.rerank import config_from_stores, rerank
from pipeline.runconfig import RunConfig
from pipeline.runpaths import STAGES as STAGES  # re-exported: the run's stages, where callers import them
from pipeline.runpaths import RunPaths

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageProgress:
    """Where a running stage is, for a live display: counted units when the stage counts them (extraction:
    rows; the index build: its steps), else only that it runs, then that it finished."""

    stage: str
    done: int = 0
    total: int | None = None  # None: the stage does not count its work
    detail: str = ""  # e.g. "3.2 img/s  errors 0  extractors 1", or the index build's step
    finished: bool = False


def extraction_progress(stage: str, progress: Progress) -> StageProgress:
    """An extraction's counts as a stage's progress (the `extract` command and `run` show the same)."""
    return StageProgress(
        stage,
        progress.skipped_rows + progress.done_rows,
        progress.total_rows,
        f"{progress.images_per_s:.1f} img/s  errors {progress.errors}  extractors {progress.extractors}",
    )


ShowProgress = Callable[[StageProgress], None]


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

    def __init__(
        self, paths: RunPaths, options: storage.Options, say: Callable[[str], None], show: ShowProgress
    ) -> None:
        self.paths = paths
        self.options = options
        self.say = say
        self.show = show
        self.results: dict[str, StageResult] = {}

    def stage(self, name: str, params: Any, upstream: list[str], work: Callable[[], Any]) -> None:
        """Run ``work`` unless its marker holds the same key; its result (a stage's summary dataclass, or a
        mapping) is the marker's summary."""
        key = _key(name, params, [self.results[u].key for u in upstream])
        marker = self.paths.marker(name)
        if storage.exists(marker, self.options):
            done = json.loads(storage.read_text(marker, self.options))
            if done["key"] == key:
                self.results[name] = StageResult(name, key, done["seconds"], done["summary"], reused=True)
                self.say(f"{name}: done earlier, reused")
                return
        self.say(f"{name}: running")
        self.show(StageProgress(name))
        start = time.monotonic()
        outcome = work()
        summary = asdict(outcome) if is_dataclass(outcome) else dict(outcome)
        self.show(StageProgress(name, finished=True))
        result = StageResult(name, key, time.monotonic() - start, summary, reused=False)
        record = {"key": key, "seconds": result.seconds, "summary": summary}
        text = storage.redact_text(json.dumps(record, indent=2, default=str))  # summaries quote URLs
        storage.write_text(marker, text, self.options)
        self.results[name] = result
        self.say(f"{name}: done in {result.seconds:.1f} s")


def run_pipeline(
    config: RunConfig,
    options: storage.Options = None,
    say: Callable[[str], None] = log.info,
    show: ShowProgress = lambda _: None,
) -> dict[str, StageResult]:
    """Run (or resume) every stage of ``config``; returns each stage's result. ``show`` gets each running
    stage's progress: when it starts, as it counts its work, and when it finishes."""
    runner = _Runner(RunPaths(config.out), options, say, show)
    _extract_stages(config, runner)
    _index_stages(config, runner)
    _verify_and_report_stages(config, runner)
    return runner.results


def _extract_stages(config: RunConfig, runner: _Runner) -> None:
    cluster = config.extract.cluster(config.ray_address)

    def extraction(
        stage: str, manifest_url: str, out_url: str, image_root: str | None
    ) -> Callable[[], Mapping[str, Any]]:
        job = config.extract.job(manifest_url, out_url, image_root)

        def show(progress: Progress) -> None:
            runner.show(extraction_progress(stage, progress))

        return lambda: run_extraction(job, cluster, runner.options, show)

    params, paths, data = config.extract.output_values(), runner.paths, config.data
    runner.stage(
        "extract-index",
        [params, data.index, *filter(None, [data.index_image_root])],
        [],
        extraction("extract-index", data.index, paths.index_store, data.index_image_root),
    )
    runner.stage(
        "extract-queries",
        [params, data.queries, *filter(None, [data.queries_image_root])],
        [],
        extraction("extract-queries", data.queries, paths.query_store, data.queries_image_root),
    )


def _index_stages(config: RunConfig, runner: _Runner) -> None:
    paths, options = runner.paths, runner.options

    def build() -> Mapping[str, Any]:
        build_config = config.index.build_config()
        if build_config.quality.query_store is None:  # recall measured with the run's own queries
            quality = replace(build_config.quality, query_store=paths.query_store)
            build_config = replace(build_config, quality=quality)

        def step(name: str, done: int, total: int) -> None:
            runner.show(StageProgress("build-index", done, total, name))

        return build_index(
            paths.index_store,
            paths.index,
            **config.index.build_arguments(),
            options=options,
            ray_address=config.ray_address,
            config=build_config,
            on_step=step,
        ).to_dict()

    runner.stage("build-index", asdict(config.index), ["extract-index", "extract-queries"], build)
    global_config = config.rerank.global_rerank_config()
    workers = config.rerank.rerank_run(config.ray_address).workers  # the answer side's: DBA, search, re-rank
    if _needs_dba(config):  # DBA vectors beside the index, for re-ranking
        runner.stage(
            "dba",
            [global_config.dba_k, global_config.dba_alpha],
            ["build-index"],
            lambda: build_dba(
                paths.index,
                [paths.index_store],
                global_config.dba_k,
                global_config.dba_alpha,
                options,
                workers=workers,
            ),
        )
    runner.stage(
        "search",
        asdict(config.search),
        ["build-index", "extract-queries"],
        lambda: search(
            paths.index,
            paths.query_store,
            paths.search,
            config.search.search_config(),
            options,
            workers=workers,
            on_progress=lambda p: runner.show(StageProgress("search", p.done, p.total, p.line())),
        ),
    )


def _needs_dba(config: RunConfig) -> bool:
    return config.rerank.enabled and config.rerank.method.startswith("dba")


def _verify_and_report_stages(config: RunConfig, runner: _Runner) -> None:
    paths, options = runner.paths, runner.options
    global_config = config.rerank.global_rerank_config()
    rerank_config = (  # the stores' settings (their preset's), overridden by the [rerank] keys given
        config_from_stores(paths.query_store, paths.index_store, config.rerank.overrides(), options)
        if config.rerank.enabled
        else None
    )
    if config.rerank.enabled:
        runner.stage(
            "rerank",
            [asdict(rerank_config), config.rerank.method, asdict(global_config)],
            ["search", *(["dba"] if _needs_dba(config) else [])],
            lambda: rerank(
                paths.search,
                paths.query_store,
                paths.index_store,
                paths.reranked,
                rerank_config,
                options=options,
                method=config.rerank.method,
                global_config=global_config,
                index_url=paths.index,
                run=config.rerank.rerank_run(config.ray_address),
                on_progress=lambda p: runner.show(StageProgress("rerank", p.done, p.total, p.line())),
            ),
        )
    done = runner.results
    if config.data.ground_truth:
        upstream = [s for s in ("search", "rerank") if s in done]
        runner.stage("evaluate", asdict(config.data), upstream, lambda: _evaluate(config, paths, options))
    if config.report.enabled:
        upstream = [s for s in ("search", "rerank", "evaluate") if s in done]
        runner.stage("report", asdict(config.report), upstream, lambda: report_run(config, options))


# ---------------------------------------------------------------- evaluation


def _evaluate(config: RunConfig, paths: RunPaths, options: storage.Options) -> dict[str, Any]:
    results = {"global": paths.search}
    if config.rerank.enabled:
        results["reranked"] = paths.reranked
    metrics = {
        name: evaluate(
            url,
            config.data.ground_truth,
            config.data.protocol,
            options,
            landmarks_url=config.data.landmarks,
        ).to_dict()
        for name, url in results.items()
    }
    write_metrics(paths.metrics, metrics, options)
    return metrics
