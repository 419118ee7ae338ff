"""Reading the tables the CLI prints (rich box drawing), so tests compare cells, not substrings."""

from __future__ import annotations


def table_rows(stdout: str) -> dict[str, str]:
    """First cell → second cell of each row of a printed rich table."""
    rows = {}
    for line in stdout.splitlines():
        if "│" not in line:
            continue
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) >= 2 and cells[0]:
            rows[cells[0]] = cells[1]
    return rows


def stored_matches(reranked: dict[str, list], keep: int) -> tuple[dict, dict]:
    """(stored, expected) for a re-ranked table's `matches` column, as {query: [(rank, floats)]}: stored are
    the hits with inlier points; expected are the first `keep` hits (in rank order) with inliers > 0, each
    holding 4 floats per inlier. Equal when the rule holds, also where nothing verified."""
    rows = sorted(
        zip(reranked["query_id"], reranked["rank"], reranked["inliers"], reranked["matches"], strict=True)
    )
    stored: dict[str, list] = {}
    expected: dict[str, list] = {}
    for query, rank, inliers, matches in rows:
        if matches is not None:
            stored.setdefault(query, []).append((rank, len(matches)))
        verified = expected.setdefault(query, [])
        if inliers > 0 and len(verified) < keep:
            verified.append((rank, 4 * inliers))
    return stored, {query: hits for query, hits in expected.items() if hits}
