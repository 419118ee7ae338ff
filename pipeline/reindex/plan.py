"""The re-index plan: what the live version holds, what the manifest changed, and whether to retrain (read
only; nothing is written here)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import manifest, versions
from pipeline.index import io as index_io
from pipeline.storage import Options


def resumable_run_name(live: str | None, fingerprint: str, todo: pa.Table, extraction: dict[str, Any]) -> str:
    """Deterministic: the same live version, manifest and model always name the same run (so it resumes)."""
    digest = hashlib.sha256(fingerprint.encode())
    digest.update(manifest.manifest_fingerprint(todo).encode())
    digest.update(json.dumps(extraction, sort_keys=True).encode())
    return f"{live or versions.version_name(0)}-{digest.hexdigest()[:16]}"


@dataclass(frozen=True)
class Plan:
    """What a run does to the manifest's rows (the ids of each change)."""

    table: pa.Table  # the current manifest
    todo: pa.Table  # its rows to extract (new + changed)
    added: tuple[str, ...]
    changed: tuple[str, ...]
    deleted: tuple[str, ...]
    model_changed: bool


def plan_changes(table: pa.Table, live_state: pa.Table, model_changed: bool) -> Plan:
    current = versions.state_table(table)
    diff = manifest.diff_manifests(live_state, current)
    if model_changed:  # descriptors of another model cannot share an index: every row is extracted again
        new = set(diff.added)
        kept = tuple(i for i in current.column("id").to_pylist() if i not in new)
        return Plan(table, table, diff.added, kept, diff.deleted, True)
    todo_ids = pa.array([*diff.added, *diff.changed], pa.string())
    todo = table.filter(pc.is_in(table.column("id"), value_set=todo_ids))
    return Plan(table, todo, diff.added, diff.changed, diff.deleted, False)


def retrain_decision(
    live: str | None, live_params: dict[str, Any], plan: Plan, threshold: float
) -> tuple[bool, str]:
    """Whether to train a new index from scratch, and why (recorded in the report)."""
    if live is None:
        return True, "no live version: first build"
    if plan.model_changed:
        return True, "the extraction preset or weights changed: every image was extracted again"
    if live_params.get("on_disk"):
        return True, f"{live} has on-disk inverted lists, which cannot be updated in place"
    ntotal = int(live_params["ntotal"])
    new = len(plan.added) + len(plan.changed)
    if ntotal == 0:
        return True, f"{live} holds no vectors"
    share = new / ntotal
    if share > threshold:
        return (
            True,
            f"{new} new + changed = {share:.1%} of {ntotal} live vectors > retrain_threshold {threshold:.1%}",
        )
    return False, (
        f"{new} new + changed = {share:.1%} of {ntotal} live vectors ≤ retrain_threshold {threshold:.1%}: "
        "updated in place with the live quantizer"
    )


@dataclass(frozen=True)
class Live:
    """What a run needs to know of the live version."""

    name: str
    url: str
    state: pa.Table
    extraction: dict[str, Any]
    params: dict[str, Any]
    indexed: set[str]  # image ids in its index (failed rows are in its state but not here)


def load_live(root_url: str, options: Options) -> Live | None:
    name = versions.live_version(root_url, options)
    if name is None:
        return None
    url = versions.version_url(root_url, name)
    return Live(
        name=name,
        url=url,
        state=versions.read_state(url, options),
        extraction=versions.read_report(url, options)["extraction"],
        params=index_io.read_params(url, options),
        indexed=set(index_io.read_id_map(url, options)[1].tolist()),
    )
