"""The run config of `landmark-index run`: one TOML or YAML file, validated, every key documented here.

Sections and keys (defaults in brackets; URLs may be local paths or s3://...; relative paths in the file are
relative to the config file's folder)::

    out              where every stage writes (required)
    ray_address      Ray cluster to join [""; start a local Ray]

    [data]
    index            manifest of the images to index (required)
    queries          manifest of the query images (required)
    index_image_root   image root of an id-only index manifest (GLDv2 index.csv): ROOT/a/b/c/ID.jpg [""]
    queries_image_root the same for the queries manifest (GLDv2 test.csv) [""]
    ground_truth     ground truth for evaluation [""; skip evaluation]
    protocol         revisitop | gldv2-retrieval | gldv2-recognition [gldv2-retrieval]
    landmarks        id → landmark_id table of index images (gldv2-recognition only) [""]

    [extract]
    preset           extraction preset [cpu-small]
    weights          model state dict URL [""; backbone weights or random init]
    shard_size       manifest rows per descriptor shard [1000]
    local_dtype      float16 | int8 | float32 [float16]
    batch_size       images per forward pass [8]

    [index]
    factory          faiss index factory string [""; chosen from N, dim and memory_budget]
    memory_budget    e.g. "4GB" [""; no limit]
    target_recall    100-recall@100 the chosen nprobe must reach [0.95]
    whitening        learned PCA whitening to this many dims, fitted on the index sample [unset; off]

    [search]
    k                shortlist length per query [100]
    nprobe           IVF cells visited [0; the one chosen by the quality report]

    [rerank]         unset keys take the stores' settings, chosen by the preset's local head
                     (DELG heads: the reference's, shown here; backbone-only heads: score = shortlist)
    enabled          re-rank the shortlist with local features [true]
    top              how many of the shortlist to verify [100]
    max_distance     putative match if descriptor L2 distance is below this [1.0]
    ratio            Lowe ratio test, 0 = off [0]
    mutual           keep only mutual nearest neighbours [false]
    model            affine | homography [affine]
    residual_in      query | candidate: whose pixels the threshold is in [query]
    threshold        RANSAC inlier threshold in pixels [20.0]
    score            inliers: (inliers, global) | saturate: min(inliers, k)/k + global |
                     shortlist: global + boost for inlier counts standing out of the shortlist's [inliers]
    min_inliers      fewer inliers = unverified, kept in global order below verified ones [0]
    method           verify | qe | dba | dba+qe | superglobal, or one of the four + "+verify" (refine with
                     global features, then verify the refined shortlist) [verify]
    qe_k, qe_alpha   α-QE: neighbours averaged into the query, weight exponent [10, 3.0]
    dba_k, dba_alpha DBA: neighbours averaged into each index vector (index/dba.parquet) [10, 3.0]
    sg_m, sg_k, sg_beta  SuperGlobal: shortlist entries refined, neighbours, neighbour weight [400, 9, 0.15]

    [report]
    enabled          write report.html [true]
    max_queries      queries shown in the report [20]
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from pipeline import storage

PROTOCOLS = ("revisitop", "gldv2-retrieval", "gldv2-recognition")


@dataclass(frozen=True)
class DataSection:
    index: str
    queries: str
    ground_truth: str = ""
    protocol: str = "gldv2-retrieval"
    landmarks: str = ""
    index_image_root: str = ""
    queries_image_root: str = ""

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"data.protocol={self.protocol!r}; allowed: {', '.join(PROTOCOLS)}")
        if self.protocol == "gldv2-recognition" and self.ground_truth and not self.landmarks:
            raise ValueError(
                "data.protocol gldv2-recognition needs data.landmarks (id → landmark_id of index images)"
            )


@dataclass(frozen=True)
class ExtractSection:
    preset: str = "cpu-small"
    weights: str = ""
    shard_size: int = 1000
    local_dtype: str = "float16"
    batch_size: int = 8


@dataclass(frozen=True)
class IndexSection:
    factory: str = ""
    memory_budget: str = ""
    target_recall: float = 0.95
    whitening: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"index.target_recall={self.target_recall}; must be in (0, 1]")


@dataclass(frozen=True)
class SearchSection:
    k: int = 100
    nprobe: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"search.k={self.k}; must be ≥ 1")
        if self.nprobe < 0:
            raise ValueError(f"search.nprobe={self.nprobe}; must be ≥ 0 (0: chosen by the quality report)")


# [rerank] keys of the global refinements (GlobalRerankConfig) and the method choice, not RerankConfig's.
_GLOBAL_KEYS = ("method", "qe_k", "qe_alpha", "dba_k", "dba_alpha", "sg_m", "sg_k", "sg_beta")


@dataclass(frozen=True)
class RerankSection:
    """Unset (None) keys take the descriptor stores' settings (chosen by their preset)."""

    enabled: bool = True
    top: int = 100
    max_distance: float | None = None
    ratio: float | None = None
    mutual: bool | None = None
    model: str | None = None
    residual_in: str | None = None
    threshold: float | None = None
    score: str | None = None
    min_inliers: int | None = None

    method: str = "verify"
    qe_k: int = 10
    qe_alpha: float = 3.0
    dba_k: int = 10
    dba_alpha: float = 3.0
    sg_m: int = 400
    sg_k: int = 9
    sg_beta: float = 0.15

    def global_rerank_config(self) -> Any:
        """The global refinements' config; raises ValueError on a bad method or value."""
        from pipeline.rerank.global_rerank import GlobalRerankConfig, parse_method

        parse_method(self.method)
        return GlobalRerankConfig(**{n: getattr(self, n) for n in _GLOBAL_KEYS if n != "method"})

    def overrides(self) -> dict[str, Any]:
        """The keys set in the file, as RerankConfig fields (ratio 0 = off)."""
        local = set(self.__dataclass_fields__) - {"enabled", *_GLOBAL_KEYS}
        given = {k: v for k, v in dataclasses.asdict(self).items() if k in local and v is not None}
        if given.get("ratio") == 0:
            given["ratio"] = None
        return given

    def rerank_config(self) -> Any:
        """The re-ranker's config with only the file's keys set (validated there: a bad value names the key)."""
        from pipeline.rerank import RerankConfig

        return RerankConfig(**self.overrides())


@dataclass(frozen=True)
class ReportSection:
    enabled: bool = True
    max_queries: int = 20


@dataclass(frozen=True)
class RunConfig:
    out: str
    data: DataSection
    ray_address: str = ""
    extract: ExtractSection = field(default_factory=ExtractSection)
    index: IndexSection = field(default_factory=IndexSection)
    search: SearchSection = field(default_factory=SearchSection)
    rerank: RerankSection = field(default_factory=RerankSection)
    report: ReportSection = field(default_factory=ReportSection)


_SECTIONS = {
    "data": DataSection,
    "extract": ExtractSection,
    "index": IndexSection,
    "search": SearchSection,
    "rerank": RerankSection,
    "report": ReportSection,
}
_SCALARS = {"str": str, "int": int, "float": float, "bool": bool}  # declared field types checked on load
_PATH_KEYS = {
    "out",
    "data.index",
    "data.queries",
    "data.ground_truth",
    "data.landmarks",
    "data.index_image_root",
    "data.queries_image_root",
    "extract.weights",
}


def _build(cls: type, values: Any, where: str) -> Any:
    """A section dataclass from a mapping: unknown or missing keys and wrong types fail with the key's name."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a table of keys, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; allowed: {', '.join(fields)}"
        )
    missing = [
        n
        for n, f in fields.items()
        if n not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"missing required key(s) {', '.join(f'{where}.{k}' for k in missing)}")
    for name, value in values.items():
        expected = _SCALARS.get(fields[name].type.removesuffix(" | None"))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if expected is not None and type(value) is not expected:
            raise ValueError(f"{where}.{name}={value!r} must be {expected.__name__}")
    return cls(**values)


def _resolve_paths(raw: dict[str, Any], base: str) -> None:
    """Relative local paths in the file are relative to the file's folder, not the working directory."""
    for dotted in _PATH_KEYS:
        section, _, key = dotted.rpartition(".")
        holder = raw.get(section, {}) if section else raw
        value = holder.get(key) if isinstance(holder, dict) else None
        if isinstance(value, str) and value and "://" not in value and not os.path.isabs(value):
            holder[key] = os.path.normpath(os.path.join(base, value))


def parse_run_config(raw: dict[str, Any], base_dir: str = ".") -> RunConfig:
    """Validate a parsed config mapping (paths relative to ``base_dir``)."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    _resolve_paths(raw, base_dir)
    top = {k: v for k, v in raw.items() if k not in _SECTIONS}
    sections = {k: _build(cls, raw[k], k) for k, cls in _SECTIONS.items() if k in raw}
    if "data" not in sections:
        raise ValueError("missing required section [data]")
    config = _build(RunConfig, {**top, **sections}, "config")
    try:
        config.rerank.rerank_config()
        config.rerank.global_rerank_config()
    except ValueError as exc:
        raise ValueError(f"rerank: {exc}") from None
    return config


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
