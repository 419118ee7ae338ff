"""The run config of `landmark-index run`: one TOML or YAML file, validated; every key is listed with its
default and help in docs/configuration.md (``python -m pipeline.settings_doc``).

Each section's keys are the fields of the library dataclasses it feeds (pipeline.settings), under the same
names and defaults; the few run-only keys (``preset``, ``enabled``, ``method``, the [data] files) are declared
below with their help. A key left out is unset; as TOML has no null, an empty string also unsets an optional
key. URLs may be local paths or s3://...; relative paths in the file are relative to the config file's folder.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from pipeline import settings, storage
from pipeline.choices import PROTOCOLS
from pipeline.config import get_preset
from pipeline.errors import ConfigError
from pipeline.execution import Workers
from pipeline.extraction import ClusterOptions, ExtractionJob
from pipeline.index import BuildConfig, SearchConfig, build_index
from pipeline.report import ReportSettings
from pipeline.rerank import RerankConfig, RerankRun
from pipeline.rerank.config import METHODS, overrides_from
from pipeline.rerank.global_rerank import GlobalRerankConfig, parse_method


def _help(text: str, default: Any = dataclasses.MISSING) -> Any:
    """A run-only key: its default and its help (docs/configuration.md)."""
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class DataSection:
    """The run's inputs (its own keys: no library dataclass holds them)."""

    index: str = _help("Manifest of the images to index.")
    queries: str = _help("Manifest of the query images.")
    ground_truth: str | None = _help("Ground truth for evaluation (unset: no evaluation).", None)
    protocol: str = _help(f"Evaluation protocol: {' | '.join(PROTOCOLS)}.", "gldv2-retrieval")
    landmarks: str | None = _help("id → landmark_id table of index images (gldv2-recognition only).", None)
    index_image_root: str | None = _help(
        "Image root of an id-only index manifest (GLDv2 index.csv): ROOT/a/b/c/ID.jpg.", None
    )
    queries_image_root: str | None = _help("The same for the queries manifest (GLDv2 test.csv).", None)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"data.protocol={self.protocol!r}; allowed: {', '.join(PROTOCOLS)}")
        if self.protocol == "gldv2-recognition" and self.ground_truth and not self.landmarks:
            raise ConfigError(
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
    """ExtractionJob, StoreSettings, ClusterOptions, Extractors, RuntimeOptions (pipeline.extraction); the
    index and query manifests are extracted with the same keys."""

    preset: str = _help("Extraction preset (see `landmark-index presets`).", "cpu-small")

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
    """build_index's factory / memory_budget, BuildConfig, QualityConfig (pipeline.index); a run's recall
    report uses its query store unless recall_queries is set."""

    def build_config(self) -> BuildConfig:
        return settings.build(BuildConfig, self.values())

    def build_arguments(self) -> dict[str, Any]:
        """build_index's keyword arguments set here (factory, memory_budget)."""
        return settings.keyword_arguments(build_index, self.values())

    def check(self) -> None:
        self.build_config()


@dataclass(frozen=True)
class _Search(_Section):
    """SearchConfig (pipeline.index.search)."""

    def search_config(self) -> SearchConfig:
        return settings.build(SearchConfig, self.values())

    def check(self) -> None:
        self.search_config()


@dataclass(frozen=True)
class _Rerank(_Section):
    """RerankConfig, GlobalRerankConfig, RerankRun (pipeline.rerank). Unset RerankConfig keys take the
    descriptor stores' settings, chosen by the preset's local head (DELG heads: the reference's, shown in
    as "reference"; backbone-only heads: score = gate); workers run on ray_address when it is set."""

    enabled: bool = _help("Re-rank the shortlist (false: the run ends with the global ranking).", True)
    method: str = _help(
        f"{' | '.join(METHODS[:5])}, or one of the four global ones + '+verify' (refine with global "
        "features, then verify the refined shortlist).",
        "verify",
    )

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
    """ReportSettings (pipeline.report)."""

    enabled: bool = _help("Write report.html.", True)

    def report_settings(self) -> ReportSettings:
        return settings.build(ReportSettings, self.values())

    def check(self) -> None:
        self.report_settings()


def _section(name: str, own: type, sources: list[Any], exclude: set[str], unset: tuple[type, ...]) -> type:
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
# Section → its own keys' class, the library sources of its other keys, the fields the run sets itself, and
# the sources whose keys are unset by default (they take a value from elsewhere).
SECTION_SOURCES: dict[str, tuple[type, list[Any], set[str], tuple[type, ...]]] = {
    "extract": (_Extract, [ExtractionJob, ClusterOptions], SET_BY_RUN | settings.GUARDS, ()),
    "index": (_Index, [build_index, BuildConfig], SET_BY_RUN, ()),
    "search": (_Search, [SearchConfig], set(), ()),
    "rerank": (_Rerank, [RerankConfig, GlobalRerankConfig, RerankRun], SET_BY_RUN, (RerankConfig,)),
    "report": (_Report, [ReportSettings], set(), ()),
}
ExtractSection = _section("ExtractSection", *SECTION_SOURCES["extract"])
IndexSection = _section("IndexSection", *SECTION_SOURCES["index"])
SearchSection = _section("SearchSection", *SECTION_SOURCES["search"])
RerankSection = _section("RerankSection", *SECTION_SOURCES["rerank"])
ReportSection = _section("ReportSection", *SECTION_SOURCES["report"])


@dataclass(frozen=True)
class RunConfig:
    """The top level: where the run writes, and the cluster it runs on."""

    out: str = _help("Where every stage writes.")
    data: DataSection
    ray_address: str | None = _help("Ray cluster to join (unset: start a local Ray).", None)
    extract: ExtractSection = field(default_factory=ExtractSection)
    index: IndexSection = field(default_factory=IndexSection)
    search: SearchSection = field(default_factory=SearchSection)
    rerank: RerankSection = field(default_factory=RerankSection)
    report: ReportSection = field(default_factory=ReportSection)


def section_settings(name: str) -> list[tuple[settings.Setting, bool]]:
    """The keys of section ``name`` ("" for the top level) as settings, each with whether it is unset by
    default: the run's own keys first (their help in their field), then the library's."""
    if name == "":
        return [(s, False) for s in settings.settings_of(RunConfig, SECTIONS)]
    if name == "data":
        return [(s, False) for s in settings.settings_of(DataSection)]
    own, sources, set_by_run, unset = SECTION_SOURCES[name]
    library = [(s, s.owner in unset) for source in sources for s in settings.settings_of(source, set_by_run)]
    return [(s, False) for s in settings.settings_of(own)] + library


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
        raise ConfigError(f"{where} must be a table of keys, got {type(values).__name__}")
    keys = {s.key: s for s in settings.settings_of(cls, SECTIONS if cls is RunConfig else ())}
    unknown = sorted(set(values) - set(keys) - (set(SECTIONS) if cls is RunConfig else set()))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; allowed: {', '.join(keys)}"
        )
    missing = [k for k, s in keys.items() if s.required and k not in values]
    if missing:
        raise ConfigError(f"missing required key(s) {', '.join(f'{where}.{k}' for k in missing)}")
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
        raise ConfigError("missing required section [data]")
    sections = {k: _build(cls, raw[k], k) for k, cls in SECTIONS.items() if k in raw}
    for name, section in sections.items():
        try:
            if isinstance(section, _Section):
                section.check()
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    return _build(RunConfig, {**raw, **sections}, "config")


def load_run_config(url: str, options: storage.Options = None) -> RunConfig:
    """Read a .toml, .yaml or .yml run config."""
    text = storage.read_text(url, options)
    if url.endswith(".toml"):
        import tomllib

        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{storage.redact(url)}: invalid TOML: {exc}") from None
    elif url.endswith((".yaml", ".yml")):
        import yaml

        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{storage.redact(url)}: invalid YAML: {exc}") from None
    else:
        raise ConfigError(f"{storage.redact(url)}: run config must end in .toml, .yaml or .yml")
    if not isinstance(raw, dict):
        raise ConfigError(f"{storage.redact(url)}: a run config is a table of keys")
    base = os.path.dirname(os.path.abspath(url)) if storage.is_local(url) else url.rsplit("/", 1)[0]
    return parse_run_config(raw, base)
