"""The re-ranking stage: search results + two descriptor stores → re-ranked results (formats: pipeline.results).

Re-ranked results keep, besides each hit's inlier count, the inlier points of the top verified hits, so the
report draws them without re-running verification. The method that ran (verify, a global refinement, or a
refinement followed by verification of the refined shortlist) is recorded with the results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import storage, store
from pipeline.errors import ConfigError
from pipeline.execution import Progress, Workers, executor_for
from pipeline.rerank.config import RerankConfig
from pipeline.rerank.global_rerank import GlobalRerankConfig, GlobalVectors, parse_method, refine_shortlists
from pipeline.rerank.shortlist import (
    Features,
    RerankedShortlist,
    nulls_for,
    read_null_sample,
    rerank_shortlist,
    resolve_device,
)
from pipeline.results import PartsOutput, flatten_matches, read_rankings, reranked_table
from pipeline.storage import Options

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RerankSummary:
    queries: int
    pairs_verified: int
    queries_without_features: int
    candidates_without_features: int
    seconds: float
    method: str = "verify"  # what ran: see pipeline.rerank.global_rerank.parse_method
    # this run's reading of local features (store.ReadStats): bytes_read ÷ bytes_wanted is the overhead
    bytes_read: int = 0
    requests: int = 0
    bytes_wanted: int = 0
    cache_bytes: int = 0
    seconds_per_step: dict[str, float] = field(default_factory=dict)  # summed over workers
    parts_resumed: int = 0  # parts an earlier, killed run had committed


@dataclass(frozen=True)
class RerankRun:
    """How a re-ranking runs: nothing here changes its output."""

    workers: Workers = field(default_factory=Workers)  # in this process unless it asks for Ray (Workers)
    cache_dir: str | None = None  # node-local folder caching the index side's local features (repeat passes)
    queries_per_part: int = 256  # queries per committed part: what a killed run redoes at most

    def __post_init__(self) -> None:
        if self.queries_per_part < 1:
            raise ConfigError(f"queries_per_part={self.queries_per_part}; must be ≥ 1")


def _read_shortlists(url: str, options: Options) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Per query (by id): (query_id, candidate ids (C,), global scores (C,)) in rank order."""
    return [
        (query_id, np.asarray(r.ids, dtype=object), r.scores.astype(np.float32))
        for query_id, r in read_rankings(url, options).items()
    ]


Shortlist = tuple[str, np.ndarray, np.ndarray]  # query id, candidate ids (C,), scores (C,) in rank order


def _output_rows(query_id: str, ids: np.ndarray, input_scores: np.ndarray, r: RerankedShortlist) -> dict:
    """The results-file columns of one re-ranked query (see pipeline.results); ``input_scores`` are the
    search scores of ``ids``."""
    matches = [flatten_matches(*r.matches[p]) if p in r.matches else None for p in r.order.tolist()]
    return {
        "query_id": [query_id] * len(ids),
        "rank": np.arange(1, len(ids) + 1),
        "id": ids[r.order].tolist(),
        "score": r.scores[r.order],
        "inliers": r.inliers[r.order],
        "global_score": input_scores[r.order],
        "matches": matches,
    }


@dataclass
class _Counts:
    pairs: int = 0
    no_query: int = 0
    no_cand: int = 0


@dataclass(frozen=True)
class _Plan:
    """What runs on each batch: an optional global refinement, then optional verification."""

    config: RerankConfig
    method: str  # as given; refinement and verifying are its parts
    refinement: str | None
    verifying: bool
    global_config: GlobalRerankConfig
    vectors: tuple[GlobalVectors, GlobalVectors] | None  # (queries, shortlisted images) for the refinement


def _refine(batch: list[Shortlist], plan: _Plan) -> list[Shortlist]:
    """The batch's shortlists in refined order, with refined scores (they replace the global ones)."""
    if not plan.refinement:
        return batch
    assert plan.vectors is not None
    refined = refine_shortlists(
        plan.refinement, *plan.vectors, batch, plan.global_config, resolve_device(plan.config)
    )
    return [(q, ids[o], s) for (q, ids, _), (o, s) in zip(batch, refined, strict=True)]


def _unverified(scores: np.ndarray) -> RerankedShortlist:
    return RerankedShortlist(np.arange(len(scores)), np.full(len(scores), -1, np.int64), scores, {})


Readers = tuple[store.LocalReader, store.LocalReader]  # (queries, index images)
BatchFeatures = tuple[dict[str, store.LocalFeatures], dict[str, store.LocalFeatures]]  # (queries, index)


def _read_features(refined: list[Shortlist], readers: Readers, plan: _Plan) -> BatchFeatures:
    """The local features verification of ``refined`` uses: its queries' and their top candidates'."""
    if not plan.verifying:
        return {}, {}
    query_reader, index_reader = readers
    queries = query_reader.read([q for q, _, _ in refined if q in query_reader])
    top = plan.config.top
    cands = index_reader.read(sorted({i for _, ids, _ in refined for i in ids[:top] if i in index_reader}))
    return queries, cands


def _rerank_batch(
    batch: list[Shortlist],
    refined: list[Shortlist],
    features: BatchFeatures,
    plan: _Plan,
    counts: _Counts,
    null_sample: Mapping[str, Features],
) -> list[dict]:
    """Re-rank a batch of queries (``refined``: after the global refinement) with their local features;
    ``null_sample``: score "gate"'s database images surely not matching (read_null_sample)."""
    config, (queries, cands) = plan.config, features
    input_scores = {q: dict(zip(ids, scores, strict=True)) for q, ids, scores in batch}
    parts = []
    for query_id, ids, scores in refined:
        if plan.verifying:
            candidates = [cands.get(i) for i in ids]
            nulls = nulls_for(null_sample, query_id, ids)
            reranked = rerank_shortlist(queries.get(query_id), candidates, scores, config, nulls)
            counts.no_query += query_id not in queries
            counts.no_cand += sum(c is None for c in candidates[: min(len(ids), config.top)])
            counts.pairs += int((reranked.inliers >= 0).sum())
        else:
            reranked = _unverified(scores)
        searched = np.array([input_scores[query_id][i] for i in ids], dtype=np.float32)
        parts.append(_output_rows(query_id, ids, searched, reranked))
    return parts


@dataclass(frozen=True)
class PartResult:
    """One part's re-ranked rows and what producing them cost."""

    table: pa.Table
    queries: int
    counts: dict[str, int]  # pairs, no_query, no_cand
    reads: dict[str, int]  # store.ReadStats of this part
    seconds: dict[str, float]  # step → seconds: refine, read (waiting for features), verify


class RerankWork:
    """The executor's work: one part (a list of shortlists) → its re-ranked rows. Within a part, batches of
    ``config.queries_per_batch`` queries; the next batch's features are read while this one is verified."""

    def __init__(self, stores: tuple[str, str], plan: _Plan, options: Options, cache_dir: str | None) -> None:
        self.stores, self.plan, self.options, self.cache_dir = stores, plan, options, cache_dir
        self.readers: Readers | None = None

    def setup(self) -> None:
        query_store, index_store = self.stores
        self.readers = (
            store.LocalReader(query_store, self.options),
            store.LocalReader(index_store, self.options, cache_dir=self.cache_dir),  # re-read by every pass
        )
        self.nulls = read_null_sample(self.readers[1], self.plan.config) if self.plan.verifying else {}
        self.reading = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rerank-read")

    def __getstate__(self) -> dict[str, Any]:  # travels before setup(): no readers, no thread
        return {k: v for k, v in self.__dict__.items() if k not in ("readers", "reading", "nulls")}

    def __call__(self, part: list[Shortlist]) -> PartResult:
        assert self.readers is not None, "setup() first"
        step = self.plan.config.queries_per_batch
        counts, seconds, before = _Counts(), Counter[str](), [r.stats.as_dict() for r in self.readers]
        tick = time.perf_counter()
        batches = [
            (b, _refine(b, self.plan)) for b in (part[i : i + step] for i in range(0, len(part), step))
        ]
        seconds["refine"] += time.perf_counter() - tick
        ahead = self.reading.submit(_read_features, batches[0][1], self.readers, self.plan)
        rows: list[dict] = []
        for number, (batch, refined) in enumerate(batches):
            tick = time.perf_counter()
            features = ahead.result()
            seconds["read"] += time.perf_counter() - tick
            if number + 1 < len(batches):  # read the next batch while this one is verified
                ahead = self.reading.submit(_read_features, batches[number + 1][1], self.readers, self.plan)
            tock = time.perf_counter()
            rows += _rerank_batch(batch, refined, features, self.plan, counts, self.nulls)
            seconds["verify"] += time.perf_counter() - tock
        return self._result(rows, len(part), counts, before, seconds)

    def _result(
        self, rows: list[dict], queries: int, counts: _Counts, before: list[dict[str, int]], seconds: Counter
    ) -> PartResult:
        reads = Counter[str]()
        for reader, was in zip(self.readers or (), before, strict=True):
            reads.update({k: v - was[k] for k, v in reader.stats.as_dict().items()})
        plan = self.plan
        table = reranked_table(
            rows, asdict(plan.config), method=plan.method, global_config=asdict(plan.global_config)
        )
        return PartResult(table, queries, asdict(counts), dict(reads), dict(seconds))


def _global_vectors(
    refinement: str,
    shortlists: list[Shortlist],
    stores: tuple[str, str],
    index_url: str | None,
    options: Options,
) -> tuple[GlobalVectors, GlobalVectors]:
    """(queries, shortlisted images) global vectors from the (query, index) stores, in the space of the index
    at ``index_url`` when given (its whitening); DBA: the refined ones, from the index."""
    # here, not at the top: pipeline.index imports this package (update → dba)
    from pipeline.index import io, whitening
    from pipeline.index.dba import read_dba

    dba = refinement.startswith("dba")
    if dba and index_url is None:
        raise ConfigError(
            f"method {refinement!r} needs the index URL whose dba.parquet holds the DBA vectors"
        )
    table = read_dba(index_url, options) if dba else None
    space = whitening.space(index_url, io.read_params(index_url, options), options) if index_url else None
    queries = GlobalVectors.read(stores[0], {q for q, _, _ in shortlists}, options).mapped(space)
    if table is not None:
        return queries, GlobalVectors.of(table.ids, table.refined)
    wanted = {i for _, ids, _ in shortlists for i in ids}
    return queries, GlobalVectors.read(stores[1], wanted, options).mapped(space)


def rerank(
    search_results: str,
    query_store: str,
    index_store: str,
    out: str,
    config: RerankConfig = RerankConfig(),
    *,
    options: Options = None,
    method: str = "verify",
    global_config: GlobalRerankConfig = GlobalRerankConfig(),
    index_url: str | None = None,
    run: RerankRun = RerankRun(),
    on_progress: Callable[[Progress], None] | None = None,
) -> RerankSummary:
    """Re-rank every query's shortlist and write the results to ``out``, a parts folder (pipeline.results).

    ``method``: "verify" (geometric verification), a global refinement ("qe", "dba", "dba+qe",
    "superglobal"; DBA vectors from ``index_url``'s dba.parquet), or a refinement followed by verification
    of the refined shortlist ("superglobal+verify", ...). Local features are read for exactly the queries and
    top-``config.top`` candidates being verified, ``config.queries_per_batch`` queries at a time. Images
    absent from a store are left unverified (and unrefined).

    Queries go in parts of ``run.queries_per_part``, each committed as it is done: a rerun of a killed run
    with the same inputs and settings redoes only the parts not committed. ``run.workers`` may put the parts
    on Ray (see RerankRun; the output is identical). ``on_progress`` is called after each committed part.
    """
    start = time.perf_counter()
    step = run.queries_per_part
    refinement, verifying = parse_method(method)
    shortlists = _read_shortlists(search_results, options)
    vectors = (
        _global_vectors(refinement, shortlists, (query_store, index_store), index_url, options)
        if refinement
        else None
    )
    plan = _Plan(config, method, refinement, verifying, global_config, vectors)
    parts = [shortlists[i : i + step] for i in range(0, len(shortlists), step)]
    stores = [storage.redact(query_store), storage.redact(index_store)]
    inputs = {"input": _digest(shortlists), "stores": stores, "queries_per_part": step, **_settings(plan)}
    output = PartsOutput(out, inputs, options)
    resumed = output.resumed_queries
    progress = RerankProgress(len(shortlists), resumed, start, len(output.resumed), resumed)

    def commit(key: int, result: PartResult) -> None:
        queries = [q for q, _, _ in parts[key]]
        marker = {"queries": result.queries, "first": queries[0], "last": queries[-1], **result.counts}
        output.commit(key, result.table, marker)
        progress.add(result)
        log.info("%s", progress.line())
        if on_progress is not None:
            on_progress(progress)

    work = RerankWork((query_store, index_store), plan, options, run.cache_dir)
    executor_for(run.workers).run(work, output.todo(list(enumerate(parts))), commit)
    return _summary(method, len(shortlists), output.markers(), progress, start)


def _settings(plan: _Plan) -> dict[str, Any]:
    return {
        "rerank_config": asdict(plan.config),
        "method": plan.method,
        "global_rerank_config": asdict(plan.global_config),
    }


def _digest(shortlists: list[Shortlist]) -> str:
    """A fingerprint of the shortlists: a resumed run must re-rank the same ones."""
    digest = hashlib.sha256()
    for query_id, ids, scores in shortlists:
        digest.update(json.dumps([query_id, ids.tolist()]).encode())
        digest.update(np.ascontiguousarray(scores, np.float32).tobytes())
    return digest.hexdigest()


@dataclass
class RerankProgress(Progress):
    """A re-ranking's progress: pairs verified, bytes read and seconds per step of this run besides the counts."""

    verb = "re-ranked"

    pairs: int = 0  # verified by this run
    reads: Counter[str] = field(default_factory=Counter)  # store.ReadStats, this run
    seconds: Counter[str] = field(default_factory=Counter)  # step → seconds, summed over workers

    def add(self, result: PartResult) -> None:
        self.add_queries(result.queries)
        self.pairs += result.counts["pairs"]
        self.reads.update(result.reads)
        self.seconds.update(result.seconds)

    def line(self) -> str:
        rate = self.pairs / self.elapsed()
        return f"{super().line()}, {rate:.1f} pairs/s, {self.reads['bytes_read'] / 1e6:.1f} MB read"


def _summary(
    method: str, queries: int, markers: dict[int, dict[str, Any]], progress: RerankProgress, start: float
) -> RerankSummary:
    """Counts over every committed part (a resumed run's too); bytes and seconds of this run."""
    total = Counter[str]()
    for marker in markers.values():
        total.update({k: marker.get(k, 0) for k in ("pairs", "no_query", "no_cand", "queries")})
    return RerankSummary(
        queries=queries,
        pairs_verified=total["pairs"],
        queries_without_features=total["no_query"],
        candidates_without_features=total["no_cand"],
        seconds=time.perf_counter() - start,
        method=method,
        bytes_read=progress.reads["bytes_read"],
        requests=progress.reads["requests"],
        bytes_wanted=progress.reads["bytes_wanted"],
        cache_bytes=progress.reads["cache_bytes"],
        seconds_per_step={k: round(v, 3) for k, v in sorted(progress.seconds.items())},
        parts_resumed=progress.resumed_parts,
    )
