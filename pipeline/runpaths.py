"""A run's folder: where each output of ``landmark-index run`` lies, and its stages' completion markers.

Below both the run (which writes these) and the report (which reads them), so neither imports the other to
find a file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline import storage

if TYPE_CHECKING:
    from pipeline.runconfig import RunConfig

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


def stage_seconds(config: RunConfig, options: storage.Options = None) -> dict[str, float]:
    """Seconds of each finished stage of ``config``'s run, in run order, from the stage markers."""
    paths = RunPaths(config.out)
    out = {}
    for stage in active_stages(config):
        marker = paths.marker(stage)
        if storage.exists(marker, options):
            out[stage] = json.loads(storage.read_text(marker, options))["seconds"]
    return out


def active_stages(config: RunConfig) -> list[str]:
    """The stages ``config`` runs, in order."""
    skipped = {
        "rerank": not config.rerank.enabled,
        "evaluate": not config.data.ground_truth,
        "report": not config.report.enabled,
    }
    return [stage for stage in STAGES if not skipped.get(stage, False)]
