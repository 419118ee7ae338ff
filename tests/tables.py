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
