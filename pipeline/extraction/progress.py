"""Counts of a running extraction, sent to the ``on_progress`` callback after every chunk."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from pipeline import metrics, store


@dataclass
class Progress:
    """Counts as the run goes (sent to the ``on_progress`` callback after every chunk)."""

    total_rows: int
    skipped_rows: int  # rows of shards already committed by an earlier run
    done_rows: int = 0
    ok: int = 0
    errors: int = 0
    shards_committed: int = 0
    devices: Counter[str] = field(default_factory=Counter)  # ready extractor actors by torch device
    started: float = field(default_factory=time.monotonic)

    def add_commit(self, commit: store.ShardCommit) -> None:
        """Account one committed shard's rows."""
        self.ok += commit.ok
        self.errors += commit.errors
        self.shards_committed += 1
        for reason, n in commit.reasons.items():
            metrics.count("image_errors", n, stage="extract", reason=reason)

    @property
    def images_per_s(self) -> float:
        return self.done_rows / max(time.monotonic() - self.started, 1e-9)

    @property
    def extractors(self) -> int:
        return sum(self.devices.values())

    def describe(self) -> str:
        """One progress line, e.g. for `ray job logs`."""
        done = self.skipped_rows + self.done_rows
        devices = ", ".join(f"{d}: {n}" for d, n in sorted(self.devices.items()))
        return (
            f"extraction: {done}/{self.total_rows} rows ({done / max(self.total_rows, 1):.1%}), "
            f"{self.images_per_s:.2f} images/s, {self.errors} errors, {self.extractors} extractors"
            + (f" ({devices})" if devices else "")
        )
