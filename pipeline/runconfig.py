"""The run config of `landmark-index run`: one TOML or YAML file, validated, every key documented here.

Each section's keys are the fields of the library dataclasses it feeds (pipeline.settings), under the same
names and defaults; the few run-only keys (``preset``, ``enabled``, ``method``) are declared below. A key left
out is unset; as TOML has no null, an empty string also unsets an optional key. URLs may be local paths or
s3://...; relative paths in the file are relative to the config file's folder. Defaults in brackets::

    out              where every stage writes (required)
    ray_address      Ray cluster to join [unset: start a local Ray]

    [data]
    index            manifest of the images to index (required)
    queries          manifest of the query images (required)
    index_image_root    image root of an id-only index manifest (GLDv2 index.csv): ROOT/a/b/c/ID.jpg [unset]
    queries_image_root  the same for the queries manifest (GLDv2 test.csv) [unset]
    ground_truth     ground truth for evaluation [unset: skip evaluation]
    protocol         revisitop | gldv2-retrieval | gldv2-recognition [gldv2-retrieval]
    landmarks        id → landmark_id table of index images (gldv2-recognition only) [unset]

    [extract]        ExtractionJob, StoreSettings, ClusterOptions, RuntimeOptions (pipeline.extraction)
    preset           extraction preset [cpu-small]
    weights          model state dict URL [unset: backbone weights or random init]
    shard_size       manifest rows per descriptor shard [1000]
    global_dtype, local_dtype  float16 | int8 | float32 (local) [float16, float16]
    row_group_size   images per Parquet row group of a local shard [1]
    actor_cpus, decode_cpus  CPU share of a CPU-only extractor, of a decode task [1.0, 0.25]
    chunk_size       rows per decode task / extractor call [16]
    max_chunks_in_flight  chunks between decode and extract [0: 4 per extractor]
    batch_size       images per forward pass [8]
    max_batch_pixels  cap on images × pixels per forward pass [0: none]
    autocast         none | bf16 | fp16: CUDA mixed precision [none]
    channels_last, compile  NHWC memory format, torch.compile the forward pass [false, false]
    allow_local_files  rows may read local files outside the manifest's folder (or image root), and from a
                     remote manifest [false: such rows get local_file_refused errors]
    decode_draft     decode JPEGs at reduced scale before capping: faster, slightly different features [false]
    gpus_per_extractor  GPUs each extractor actor asks for, even before a GPU node exists [0: CPU actors]
    min_extractors   extractor actors the run waits for [1]
    max_extractors   extractor actors the pool grows to as nodes join [unset: min_extractors]
    extractor_wait_timeout  seconds to wait for min_extractors, then fail naming what the cluster offers
                     [1800; 0: no limit]

    [index]          build_index's factory / memory_budget, BuildConfig, QualityConfig (pipeline.index)
    factory          faiss index factory string [unset: chosen from N, dim and memory_budget]
    memory_budget    e.g. "4GB" [unset: no limit]
    target_recall    100-recall@100 the chosen nprobe must reach [0.98]
    target_k, target_r1  the recall's k; the 1-recall@1 it must reach too [100, 0.99]
    recall_sample    queries of the recall report, a seeded sample [1000]
    recall_queries   descriptor store of held-out queries for the recall report [unset: the run's query
                     store; build-index alone: leave-one-out stored vectors]
    max_nprobe, k_factors  nprobe values tried (1, 2, 4, ... up to this); refined shortlist sizes tried,
                     in multiples of k [1024, [1, 2, 4, 8, 16, 32]]
    refine           shortlist re-scoring: auto | none | sq8 | fp16 | store [auto]
    merge            ram | disk | auto [auto]
    tasks, task_cpus  parallel Ray add tasks, CPUs each [4, 0.5]
    step_cpus, train_gpus  CPUs of the train and merge tasks, GPUs of the train task [unset: all CPUs
                     of the largest node, 0]
    seed             sample seed [0]
    max_points_per_centroid, max_train_bytes  training sample bounds [256, 8589934592: 8 GiB]
    ram_fraction     auto merges on disk beyond this share of physical RAM [0.5]
    trained_url      reuse this trained empty index instead of training [unset]
    keep_intermediate  keep the add tasks' parts/ and trained.faiss after the build [false]
    whitening, whitening_power  learned PCA whitening to this many dims, fitted on the index sample; each axis
                     divided by eigenvalue^power (0.5 full, 0 PCA only) [unset: off, 0.5]

    [search]         SearchConfig (pipeline.index.search)
    k                shortlist length per query [100]
    nprobe           IVF cells visited [unset: the one chosen by the quality report]
    k_factor         refined shortlist size in multiples of k [unset: the stored one]
    batch_size       queries per search call [4096]

    [rerank]         RerankConfig, GlobalRerankConfig (pipeline.rerank); unset RerankConfig keys take the
                     stores' settings, chosen by the preset's local head (DELG heads: the reference's, shown
                     here; backbone-only heads: score = gate)
    enabled          re-rank the shortlist with local features [true]
    method           verify | qe | dba | dba+qe | superglobal, or one of the four + "+verify" (refine with
                     global features, then verify the refined shortlist) [verify]
    top              how many of the shortlist to verify [100]
    max_distance     putative match if descriptor L2 distance is below this [1.0]
    ratio            Lowe ratio test, 0 = off [unset: off]
    mutual           keep only mutual nearest neighbours [false]
    model            affine | homography [affine]
    residual_in      query | candidate: whose pixels the threshold is in [query]
    threshold        RANSAC inlier threshold in pixels [20.0]
    trials, seed, refit  RANSAC hypotheses per pair, their seed, least-squares refit [1000, 0, true]
    score            inliers: (inliers, global) | saturate: min(inliers, k)/k + global |
                     shortlist: global + boost for inlier counts standing out of the shortlist's |
                     gate: inliers significant against the query's null move up, in global order [inliers]
    min_inliers      fewer inliers = unverified, kept in global order below verified ones [0]
    saturate_at      k of the saturate score [20]
    z_from, z_span, boost  shortlist score: boost from z_from spreads, full at z_from + z_span [2.0, 16.0, 0.5]
    null_size, false_alarms  gate score: null images per query, expected false promotions per query [40, 0.001]
    device           cpu | cuda [unset: CUDA when available]
    max_elements, queries_per_batch  tensor chunk bound, queries read together [4194304, 16]
    keep_matches     inlier pairs stored for this many top hits per query (the report's) [3]
    qe_k, qe_alpha   α-QE: neighbours averaged into the query, weight exponent [10, 3.0]
    dba_k, dba_alpha  DBA: neighbours averaged into each index vector (index/dba.parquet) [10, 3.0]
    sg_m, sg_k, sg_beta  SuperGlobal: shortlist entries refined, neighbours, neighbour weight [400, 9, 0.15]
    gpus_per_worker, cpus_per_worker, min_workers, max_workers  Ray workers (RerankRun.workers; on ray_address
                     when set; more than one worker or a GPU share: on Ray) [0, 1.0, 1, unset: min_workers]
    cache_dir        node-local folder caching the index images' local features [unset: none]
    queries_per_part  queries per committed part of reranked.parquet/ (resume unit) [256]

    [report]         ReportSettings (pipeline.report)
    enabled          write report.html [true]
    max_queries      queries shown in the report [20]
    max_hits         hits shown per ranking [10]
    max_match_pairs, max_match_lines  re-ranked pairs drawn with their inliers, lines each [3, 80]
    map_points       descriptors sampled for the embedding map (t-SNE), 0: no map [500]
    title, thumb_px, match_px, jpeg_quality  page title, thumbnail side, match panel height, JPEG
                     quality [landmark-index report, 160, 220, 70]
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from pipeline import settings, storage
from pipeline.choices import PROTOCOLS
from pipeline.config import get_preset
from pipeline.execution import Workers
from pipeline.extraction import ClusterOptions, ExtractionJob
from pipeline.index import BuildConfig, SearchConfig, build_index
from pipeline.report import ReportSettings
from pipeline.rerank import RerankConfig, RerankRun
from pipeline.rerank.config import overrides_from
from pipeline.rerank.global_rerank import GlobalRerankConfig, parse_method


@dataclass(frozen=True)
class DataSection:
    """The run's inputs (its own keys: no library dataclass holds them)."""

    index: str
    queries: str
    ground_truth: str | None = None
    protocol: str = "gldv2-retrieval"
    landmarks: str | None = None
    index_image_root: str | None = None
    queries_image_root: str | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"data.protocol={self.protocol!r}; allowed: {', '.join(PROTOCOLS)}")
        if self.protocol == "gldv2-recognition" and self.ground_truth and not self.landmarks:
            raise ValueError(
                "data.protocol gldv2-recognition needs data.landmarks (id → landmark_id of index images)"
            )


@dataclass(frozen=True)
class _Section:
    """A section's own keys; ``_section`` adds the library dataclasses' settings as further fields."""

    def values(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Build what the run will build from this section: its validation names the bad value."""


@dataclass(frozen=True)
class _Extract(_Section):
    preset: str = "cpu-small"  # extraction preset

    def job(self, manifest_url: str, out_url: str, image_root: str | None) -> ExtractionJob:
        config = get_preset(self.preset)
        given = {"manifest_url": manifest_url, "out_url": out_url, "config": config, "image_root": image_root}
        return settings.build(ExtractionJob, self.values(), **given)

    def cluster(self, address: str | None) -> ClusterOptions:
        return settings.build(ClusterOptions, self.values(), address=address)

    def output_values(self) -> dict[str, Any]:
        """The keys that shape the descriptors (a stage key): not ClusterOptions', which only run the job."""
        running = {s.key for s in settings.settings_of(ClusterOptions, {"runtime"})}
        return {k: v for k, v in self.values().items() if k not in running}

    def check(self) -> None:
        self.job("", "", None)
        self.cluster(None)


@dataclass(frozen=True)
class _Index(_Section):
    def build_config(self) -> BuildConfig:
        return settings.build(BuildConfig, self.values())

    def build_arguments(self) -> dict[str, Any]:
        """build_index's keyword arguments set here (factory, memory_budget)."""
        return settings.keyword_arguments(build_index, self.values())

    def check(self) -> None:
        self.build_config()


@dataclass(frozen=True)
class _Search(_Section):
    def search_config(self) -> SearchConfig:
        return settings.build(SearchConfig, self.values())

    def check(self) -> None:
        self.search_config()


@dataclass(frozen=True)
class _Rerank(_Section):
    enabled: bool = True  # re-rank the shortlist (else the run ends with the global ranking)
    method: str = "verify"  # pipeline.rerank.config.METHODS

    def overrides(self) -> dict[str, Any]:
        """The RerankConfig keys set in the file (the rest: the stores' settings); ratio 0 = off."""
        return overrides_from(self.values())

    def rerank_config(self) -> RerankConfig:
        """The re-ranker's config with only the file's keys set (validated there: a bad value names the key)."""
        return RerankConfig(**self.overrides())

    def global_rerank_config(self) -> GlobalRerankConfig:
        return settings.build(GlobalRerankConfig, self.values())

    def rerank_run(self, address: str | None) -> RerankRun:
        """How the re-ranking runs: on the run's Ray (ray_address) when it has one."""
        values = self.values()
        return settings.build(RerankRun, values, workers=settings.build(Workers, values, address=address))

    def check(self) -> None:
        parse_method(self.method)
        self.rerank_config()
        self.global_rerank_config()
        self.rerank_run(None)


@dataclass(frozen=True)
class _Report(_Section):
    enabled: bool = True  # write report.html

    def report_settings(self) -> ReportSettings:
        return settings.build(ReportSettings, self.values())

    def check(self) -> None:
        self.report_settings()


def _section(name: str, own: type, sources: list[Any], exclude: set[str], unset: tuple = ()) -> type:
    """A frozen dataclass: ``own``'s fields, then every setting of ``sources`` (library default; None for
    the settings of ``unset`` classes, which then take a value from elsewhere)."""
    fields = []
    for source in sources:
        for s in settings.settings_of(source, exclude):
            annotation, default = (s.type | None, None) if s.owner in unset else (s.type, s.default)
            fields.append((s.key, annotation, field(default=default)))
    return dataclasses.make_dataclass(name, fields, bases=(own,), frozen=True)


# Library fields the run sets itself, not keys: where each value comes from.
SET_BY_RUN = {
    "manifest_url",  # data.index / data.queries
    "out_url",  # out (the run's layout, pipeline.run.RunPaths)
    "ExtractionJob.config",  # extract.preset
    "ExtractionJob.image_root",  # data.index_image_root / data.queries_image_root
    "ClusterOptions.address",  # ray_address
    "build_index.options",  # storage options come from the environment
    "build_index.ray_address",  # ray_address
    "build_index.config",  # this section's BuildConfig keys
    "build_index.in_process",  # a run builds its index on Ray (in process: small builds and tests)
    "Workers.address",  # ray_address
}
ExtractSection = _section(
    "ExtractSection", _Extract, [ExtractionJob, ClusterOptions], SET_BY_RUN | settings.GUARDS
)
IndexSection = _section("IndexSection", _Index, [build_index, BuildConfig], SET_BY_RUN)
SearchSection = _section("SearchSection", _Search, [SearchConfig], set())
RerankSection = _section(
    "RerankSection", _Rerank, [RerankConfig, GlobalRerankConfig, RerankRun], SET_BY_RUN, unset=(RerankConfig,)
)
ReportSection = _section("ReportSection", _Report, [ReportSettings], set())


@dataclass(frozen=True)
class RunConfig:
    out: str
    data: DataSection
    ray_address: str | None = None
    extract: ExtractSection = field(default_factory=ExtractSection)
    index: IndexSection = field(default_factory=IndexSection)
    search: SearchSection = field(default_factory=SearchSection)
    rerank: RerankSection = field(default_factory=RerankSection)
    report: ReportSection = field(default_factory=ReportSection)


SECTIONS: dict[str, type] = {
    "data": DataSection,
    "extract": ExtractSection,
    "index": IndexSection,
    "search": SearchSection,
    "rerank": RerankSection,
    "report": ReportSection,
}


def _build(cls: type, values: Any, where: str) -> Any:
    """A section from a mapping: unknown or missing keys and wrong types fail with the key's name."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a table of keys, got {type(values).__name__}")
    keys = {s.key: s for s in settings.settings_of(cls, SECTIONS if cls is RunConfig else ())}
    unknown = sorted(set(values) - set(keys) - (set(SECTIONS) if cls is RunConfig else set()))
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; allowed: {', '.join(keys)}"
        )
    missing = [k for k, s in keys.items() if s.required and k not in values]
    if missing:
        raise ValueError(f"missing required key(s) {', '.join(f'{where}.{k}' for k in missing)}")
    checked = {k: settings.check_value(keys[k], v, f"{where}.{k}") for k, v in values.items() if k in keys}
    return cls(**{**values, **checked})


def _path_keys() -> set[str]:
    """Keys holding URLs: out, the data section's files, and every library ``*_url`` setting."""
    keys = {"out"} | {f"data.{f.name}" for f in dataclasses.fields(DataSection) if f.name != "protocol"}
    for name, cls in SECTIONS.items():
        urls = [s.key for s in settings.settings_of(cls) if s.key == "weights" or s.key.endswith("_url")]
        keys |= {f"{name}.{key}" for key in urls}
    return keys


def _resolve_paths(raw: dict[str, Any], base: str) -> None:
    """Relative local paths in the file are relative to the file's folder, not the working directory."""
    for dotted in _path_keys():
        section, _, key = dotted.rpartition(".")
        holder = raw.get(section, {}) if section else raw
        value = holder.get(key) if isinstance(holder, dict) else None
        if isinstance(value, str) and value and "://" not in value and not os.path.isabs(value):
            holder[key] = os.path.normpath(os.path.join(base, value))


def parse_run_config(raw: dict[str, Any], base_dir: str = ".") -> RunConfig:
    """Validate a parsed config mapping (paths relative to ``base_dir``)."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    _resolve_paths(raw, base_dir)
    if "data" not in raw:
        raise ValueError("missing required section [data]")
    sections = {k: _build(cls, raw[k], k) for k, cls in SECTIONS.items() if k in raw}
    for name, section in sections.items():
        try:
            if isinstance(section, _Section):
                section.check()
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return _build(RunConfig, {**raw, **sections}, "config")


def load_run_config(url: str, options: storage.Options = None) -> RunConfig:
    """Read a .toml, .yaml or .yml run config."""
    text = storage.read_text(url, options)
    if url.endswith(".toml"):
        import tomllib

        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{storage.redact(url)}: invalid TOML: {exc}") from None
    elif url.endswith((".yaml", ".yml")):
        import yaml

        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{storage.redact(url)}: invalid YAML: {exc}") from None
    else:
        raise ValueError(f"{storage.redact(url)}: run config must end in .toml, .yaml or .yml")
    if not isinstance(raw, dict):
        raise ValueError(f"{storage.redact(url)}: a run config is a table of keys")
    base = os.path.dirname(os.path.abspath(url)) if storage.is_local(url) else url.rsplit("/", 1)[0]
    return parse_run_config(raw, base)
