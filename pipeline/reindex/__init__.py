"""The re-index stage: bring a versioned index (layout: pipeline.versions) up to date with the current manifest.

A run diffs the manifest against the live version's state, extracts only new + changed rows into
``ROOT/descriptors/<run-name>/`` (with the rows' ``_manifest.parquet``), then builds the next version: a copy of
the live index with changed and deleted ids removed and the new shards added, or, when the new vectors pass
``retrain_threshold`` of the live count (or nothing is live yet), a fresh build on the compacted global
descriptors. The version is written completely before LATEST moves, so readers of
:func:`pipeline.versions.resolve_latest` never see a half-built index.

Crash safety: the run's name derives from (live version, manifest, rows to extract, model), so a re-run
resumes the same extraction (committed shards are kept) and rebuilds the same version number. Two runs are
kept apart by the lease of pipeline.lease.

Rooms: :mod:`~pipeline.reindex.plan` (the live version, the manifest's changes, retrain or update),
:mod:`~pipeline.reindex.build` (the next version's index: updated in place or built afresh) and
:mod:`~pipeline.reindex.stage` (:func:`reindex`: its settings, report, lock, extraction and publishing).
"""

from __future__ import annotations

from pipeline.reindex.build import compact_globals
from pipeline.reindex.stage import ReindexConfig, ReindexReport, reindex

__all__ = ["ReindexConfig", "ReindexReport", "compact_globals", "reindex"]
