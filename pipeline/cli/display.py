"""What the commands show: progress bars on stderr, tables on stdout."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from pipeline.cli.app import console, stdout

PROGRESS_S = 10.0  # how often a long stage prints its progress line


class StageBars:
    """One live bar per stage (``pipeline.run.StageProgress``), shown from a stage's first progress on: a
    stage validates its input before it reports progress, so an input error prints with no bar above it."""

    def __init__(self) -> None:
        self.bar = progress_bar("{task.fields[detail]}")
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> StageBars:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.tasks:  # rich ends a stopped display with a newline, even one never started
            self.bar.stop()

    def show(self, progress) -> None:
        task = self.tasks.get(progress.stage)
        if task is None:
            self.bar.start()
            task = self.tasks[progress.stage] = self.bar.add_task(progress.stage, total=None, detail="")
        if progress.finished:  # a stage that counted nothing ends as one unit done
            total = self.bar.tasks[task].total or 1
            self.bar.update(task, total=total, completed=total)
        else:
            self.bar.update(task, total=progress.total, completed=progress.done, detail=progress.detail)


def progress_bar(fields: str) -> Progress:
    """The console's progress bar: description, bar, done/total, the stage's ``fields``, elapsed, ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(fields),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )


def print_mapping(title: str, values: Mapping[str, Any]) -> None:
    table = Table(title=title, show_header=False)
    for key, value in values.items():
        table.add_row(
            str(key), json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)
        )
    stdout.print(table)


def print_explanation(explanation) -> None:
    """One query's candidates in global order: scores, inliers against the null level, positions."""
    level = explanation.level
    gated = not math.isnan(level)
    shown = "—" if not gated else ("∞ (too few null images)" if math.isinf(level) else f"{level:.1f}")
    null = sorted(explanation.null_inliers.tolist())
    title = f"rerank --explain {explanation.query_id}: score {explanation.score}, null level {shown}" + (
        f" (null: {len(null)} images, median {statistics.median(null):g} inliers)" if null else ""
    )
    columns = ("global rank", "id", "global score", "inliers", "null level", "vs level", "final rank")
    table = Table(*columns, title=title)
    for c in explanation.candidates:
        verdict = "—" if c.inliers < 0 or not gated else ("above" if c.inliers > level else "below")
        inliers = "not verified" if c.inliers < 0 else str(c.inliers)
        table.add_row(str(c.global_rank), c.id, f"{c.global_score:.4f}", inliers, shown, verdict, str(c.rank))
    stdout.print(table)
    if not explanation.query_has_features:
        console.print("the query has no local features in its store: nothing was verified")


def metrics_table(metrics, title: str) -> Table:
    """One row per setting / subset, one column per figure (fractions shown as percentages)."""
    columns = list(dict.fromkeys(name for row in metrics.values() for name in row))
    table = Table(title=title)
    table.add_column("")
    for name in columns:
        table.add_column(name, justify="right")
    for row_name, row in metrics.items():
        table.add_row(row_name, *(_percent(name, row.get(name)) for name in columns))
    return table


def _percent(name: str, value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if name == "queries" else f"{100 * value:.2f}"
