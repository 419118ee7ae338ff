"""Search and re-ranking results files: their schemas, writers and readers (the one owner of the format).

Search results (``search.parquet``), one row per (query, hit)::

    query_id string, rank int32 (1 = best), id string, score float32 (global similarity)

Re-ranked results (``reranked.parquet``): the same columns re-ranked (rank and score are the new ones) plus

    inliers int32            −1 = not verified (beyond ``top`` or without local features)
    global_score float32     the search score
    matches list<float32>    inlier correspondences of the first ``keep_matches`` verified hits of the
                             re-ranked order, flattened (x_q, y_q, x_c, y_c) per pair in original-image
                             pixels; null for the other hits

The re-ranking settings are kept in the Parquet schema metadata: ``rerank_config`` (verification),
``rerank_method`` (what ran: verify, a global refinement, or both) and ``global_rerank_config``.

Either form is one Parquet file or a parts folder, which the resumable stages (``search``, ``rerank``) write
batch by batch through :class:`PartsOutput`, with the descriptor store's commit discipline::

    OUT/_run.json                what the parts are of (settings, input digest): a rerun of the same resumes
    OUT/part-00000.parquet       one batch's rows (written atomically, first)
    OUT/_commits/part-00000.json {"rows", "queries", "first", "last"} (written last): a part without it does
                                 not exist

Readers take a parts folder exactly as the single file: the committed parts' rows, every query in one part.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import InputError
from pipeline.storage import Options

RESULTS_SCHEMA = pa.schema(
    [("query_id", pa.string()), ("rank", pa.int32()), ("id", pa.string()), ("score", pa.float32())]
)
RERANKED_SCHEMA = pa.schema(
    [
        *RESULTS_SCHEMA,
        ("inliers", pa.int32()),
        ("global_score", pa.float32()),
        ("matches", pa.list_(pa.float32())),
    ]
)


@dataclass(frozen=True)
class Ranking:
    """One query's results, best first."""

    ids: list[str]
    scores: np.ndarray  # (n,) float64


@dataclass(frozen=True)
class Hit:
    """One row of a results file, as the report shows it."""

    id: str
    score: float
    inliers: int | None  # None: search results (no verification)
    matches: tuple[np.ndarray, np.ndarray] | None  # (M, 2) query and (M, 2) candidate points, or None
    global_score: float | None = None  # re-ranked results: the search score before re-ranking


class ResultsFormatError(InputError):
    """A results file that is not the search/re-ranked results format above (not Parquet, wrong columns)."""


# What each results column may be stored as: any writer's integer/float/string widths are accepted.
_COLUMN_KINDS = {
    "query_id": ("string", pa.types.is_string, pa.types.is_large_string),
    "id": ("string", pa.types.is_string, pa.types.is_large_string),
    "rank": ("integer", pa.types.is_integer),
    "score": ("floating point", pa.types.is_floating),
}


def _check_columns(results_url: str, schema: pa.Schema, columns: list[str]) -> None:
    where = f"results {storage.redact(results_url)}"
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise ResultsFormatError(
            f"{where} lack columns {missing}; required: {columns}, found: {schema.names}"
        )
    for name in [c for c in columns if c in _COLUMN_KINDS]:
        kind, *accepts = _COLUMN_KINDS[name]
        if not any(accept(schema.field(name).type) for accept in accepts):
            raise ResultsFormatError(f"{where}: column {name!r} is {schema.field(name).type}; must be {kind}")


def read_columns(
    results_url: str, columns: list[str], options: Options = None, optional: tuple[str, ...] = ()
) -> pa.Table:
    """The named columns (and those of ``optional`` present) of a results file or parts folder, sorted by
    (query, rank) as far as they are read; ResultsFormatError naming the file for anything but Parquet with
    those columns."""
    files = committed_parts(results_url, options) if is_parts(results_url, options) else [results_url]
    tables = [_read_file_columns(url, columns, options, optional) for url in files]
    if not tables:  # a run without queries: no part, as a single file would have no rows
        names = [*columns, *(c for c in optional if c in RERANKED_SCHEMA.names)]
        return pa.schema([RERANKED_SCHEMA.field(n) for n in names]).empty_table()
    table = pa.concat_tables(tables, promote_options="permissive")
    if len(files) > 1:  # a query in two parts would be a resume bug: never report it twice
        per_part = [set(t.column("query_id").to_pylist()) for t in tables]
        if sum(map(len, per_part)) != len(set().union(*per_part)):
            raise ResultsFormatError(f"results {storage.redact(results_url)}: a query appears in two parts")
    return table.sort_by([(c, "ascending") for c in ("query_id", "rank") if c in table.column_names])


def _read_file_columns(url: str, columns: list[str], options: Options, optional: tuple[str, ...]) -> pa.Table:
    with storage.open_input(url, options) as f:
        try:
            schema = pq.read_schema(f)
        except pa.ArrowException as exc:
            raise ResultsFormatError(
                f"results {storage.redact(url)} is not a readable Parquet file: {exc}"
            ) from None
        _check_columns(url, schema, columns)
        return pq.read_table(f, columns=[*columns, *(c for c in optional if c in schema.names)])


def read_metadata(results_url: str, options: Options = None) -> dict[str, str]:
    """The results' Parquet schema metadata (re-ranked: rerank_config, rerank_method, global_rerank_config);
    of a parts folder, its first committed part's (every part has the same)."""
    files = committed_parts(results_url, options) if is_parts(results_url, options) else [results_url]
    if not files:
        return {}
    with storage.open_input(files[0], options) as f:
        metadata = pq.read_schema(f).metadata or {}
    return {k.decode(): v.decode() for k, v in metadata.items()}


PARTS_COMMITS = "_commits"
PARTS_RUN = "_run.json"


def is_parts(results_url: str, options: Options = None) -> bool:
    """Whether ``results_url`` is a parts folder (else a single results file)."""
    return storage.exists(storage.join(results_url, PARTS_RUN), options)


def _part_url(results_url: str, part: int, folder: str = "", suffix: str = ".parquet") -> str:
    name = f"part-{part:05d}{suffix}"
    return storage.join(results_url, folder, name) if folder else storage.join(results_url, name)


def read_part_commits(results_url: str, options: Options = None) -> dict[int, dict[str, Any]]:
    """Part number → its commit marker, for the committed parts of a parts folder."""
    out = {}
    for url in storage.list_files(storage.join(results_url, PARTS_COMMITS), options, suffix=".json"):
        out[int(url.rsplit("/", 1)[-1][len("part-") : -len(".json")])] = json.loads(
            storage.read_text(url, options)
        )
    return out


def committed_parts(results_url: str, options: Options = None) -> list[str]:
    """The data files of the committed parts, in part order."""
    return [_part_url(results_url, p) for p in sorted(read_part_commits(results_url, options))]


def open_parts(
    results_url: str, run: Mapping[str, Any], options: Options = None
) -> dict[int, dict[str, Any]]:
    """Make ``results_url`` the parts folder of ``run`` (JSON-serialisable: settings and an input digest) and
    return its committed parts (number → marker) to skip. Parts of another run there are removed: a rerun
    with other settings or inputs starts over, as rewriting a single file would. A single results file
    there is replaced."""
    run_url = storage.join(results_url, PARTS_RUN)
    text = json.dumps(dict(run), sort_keys=True)
    if is_parts(results_url, options) and storage.read_text(run_url, options) == text:
        return read_part_commits(results_url, options)
    if storage.exists(results_url, options):
        storage.remove(results_url, options, recursive=True)
    storage.write_text(run_url, text, options)
    return {}


def write_part(
    results_url: str, part: int, table: pa.Table, marker: Mapping[str, Any], options: Options = None
) -> None:
    """Commit one part: its rows atomically, then its marker (``rows`` added), which makes it visible."""
    storage.write_parquet(_part_url(results_url, part), table, options, compression="zstd")
    text = json.dumps({**marker, "rows": table.num_rows})
    storage.write_text(_part_url(results_url, part, PARTS_COMMITS, ".json"), text, options)


PartT = TypeVar("PartT")


class PartsOutput:
    """The parts folder a resumable stage writes: opened for one run (its settings and an input digest, which
    a rerun must repeat to resume), then committed part by part as the executor's results come in."""

    def __init__(self, url: str, run: Mapping[str, Any], options: Options = None) -> None:
        self.url, self.options = url, options
        self.resumed = open_parts(url, run, options)  # part → marker, committed by an earlier run

    @property
    def resumed_queries(self) -> int:
        return sum(marker["queries"] for marker in self.resumed.values())

    def todo(self, parts: Sequence[tuple[int, PartT]]) -> list[tuple[int, PartT]]:
        """The (part number, batch) of ``parts`` not committed yet."""
        return [(number, part) for number, part in parts if number not in self.resumed]

    def commit(self, part: int, table: pa.Table, marker: Mapping[str, Any]) -> None:
        write_part(self.url, part, table, marker, self.options)

    def markers(self) -> dict[int, dict[str, Any]]:
        """Every committed part's marker (the resumed ones and this run's)."""
        return read_part_commits(self.url, self.options)


def _query_spans(query_ids: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each query's rows in rows sorted by query."""
    starts = np.flatnonzero(query_ids[1:] != query_ids[:-1]) + 1
    bounds = np.concatenate([[0], starts, [len(query_ids)]]).tolist()
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def read_rankings(results_url: str, options: Options = None) -> dict[str, Ranking]:
    """Per query, its results ordered by ``rank`` (1 first). Raises ValueError on a bad schema."""
    table = read_columns(results_url, RESULTS_SCHEMA.names, options)
    query_ids = table["query_id"].to_numpy(zero_copy_only=False)  # (R,) object
    ids = table["id"].to_pylist()
    scores = np.asarray(table["score"].to_numpy(zero_copy_only=False), dtype=np.float64)
    return {query_ids[a]: Ranking(ids[a:b], scores[a:b]) for a, b in _query_spans(query_ids)}


def _points(flat: list[float] | None) -> tuple[np.ndarray, np.ndarray] | None:
    if flat is None:
        return None
    pairs = np.asarray(flat, dtype=np.float32).reshape(-1, 4)  # (M, 4)
    return pairs[:, :2], pairs[:, 2:]


def read_hits(results_url: str, limit: int, options: Options = None) -> dict[str, list[Hit]]:
    """Per query, its first ``limit`` hits; search results and re-ranked results alike."""
    optional = ("inliers", "matches", "global_score")
    table = read_columns(results_url, RESULTS_SCHEMA.names, options, optional=optional)
    out: dict[str, list[Hit]] = {}
    for row in table.to_pylist():
        hits = out.setdefault(row["query_id"], [])
        if len(hits) < limit:
            points = _points(row.get("matches"))
            hits.append(
                Hit(row["id"], float(row["score"]), row.get("inliers"), points, row.get("global_score"))
            )
    return out


def search_table(
    query_ids: np.ndarray, scores: np.ndarray, ids: np.ndarray, id_keys: np.ndarray, image_ids: np.ndarray
) -> pa.Table:
    """Rows (query, rank) for the valid hits of (q, k) ``scores``/``ids``; -1 hits (k > N) are dropped.

    ``id_keys`` (sorted int64) and ``image_ids`` are the index's id map.
    """
    valid = ids >= 0  # (q, k)
    ranks = np.cumsum(valid, axis=1)  # rank among valid hits, 1 = best
    rows, cols = np.nonzero(valid)
    positions = np.searchsorted(id_keys, ids[rows, cols])
    assert np.array_equal(id_keys[positions], ids[rows, cols]), "index holds an id missing from its id map"
    return pa.table(
        {
            "query_id": pa.array(list(query_ids[rows]), pa.string()),
            "rank": pa.array(ranks[rows, cols].astype(np.int32)),
            "id": pa.array(list(image_ids[positions]), pa.string()),
            "score": pa.array(scores[rows, cols].astype(np.float32)),
        },
        schema=RESULTS_SCHEMA,
    )


def flatten_matches(query_points: np.ndarray, cand_points: np.ndarray) -> np.ndarray:
    """(M, 2) and (M, 2) points → the (4M,) float32 value of the ``matches`` column."""
    return np.concatenate([query_points, cand_points], axis=1).astype(np.float32).reshape(-1)


def reranked_table(
    parts: list[Mapping[str, Any]],
    config: Mapping[str, Any],
    *,
    method: str = "verify",
    global_config: Mapping[str, Any] | None = None,
) -> pa.Table:
    """Re-ranked rows (per query: a mapping of the schema's column names to per-hit sequences) as a table, with
    the verification settings, the method that ran and the global refinement's settings as metadata."""

    def listed(name: str) -> list[Any]:
        return [value for part in parts for value in part[name]]

    def numbers(name: str, dtype: type) -> np.ndarray:
        return (
            np.concatenate([np.asarray(part[name], dtype) for part in parts]) if parts else np.zeros(0, dtype)
        )

    matches = [None if m is None else np.asarray(m, np.float32) for m in listed("matches")]
    return pa.table(
        {
            "query_id": pa.array(listed("query_id"), type=pa.string()),
            "rank": pa.array(numbers("rank", np.int32), type=pa.int32()),
            "id": pa.array(listed("id"), type=pa.string()),
            "score": pa.array(numbers("score", np.float32), type=pa.float32()),
            "inliers": pa.array(numbers("inliers", np.int32), type=pa.int32()),
            "global_score": pa.array(numbers("global_score", np.float32), type=pa.float32()),
            "matches": pa.array(matches, type=pa.list_(pa.float32())),
        },
        schema=RERANKED_SCHEMA,
    ).replace_schema_metadata(
        {
            "rerank_config": json.dumps(dict(config)),
            "rerank_method": method,
            "global_rerank_config": json.dumps(dict(global_config or {})),
        }
    )
