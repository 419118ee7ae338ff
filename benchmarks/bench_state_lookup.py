"""The query page's thumbnail lookup: a replica's memory and a response's cost, whole id → url map vs StateUrls.

A versioned root's state.parquet of ``--rows`` GLDv2-like rows (16-hex-digit ids, GLDv2-style urls) is written
once by pipeline.versions; then, each in a fresh process (so the memory figures are that way's alone):

- ``map``: what the page did before: the whole state read into a dict id → url (its RSS growth, seconds);
- ``lookup``: versions.StateUrls: the footer once, then ``--lookups`` responses of ``--k`` random ids each
  (RSS growth, ms per response, rows read per response).

The same ids are looked up both ways; ``found`` must be ``lookups × k`` in each.

    python benchmarks/bench_state_lookup.py --rows 762000 --k 10 --lookups 50
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa

from pipeline import versions


def write_state(folder: Path, rows: int) -> list[str]:
    """A version folder with a GLDv2-sized state.parquet; its ids."""
    rng = np.random.default_rng(0)
    ids = [f"{v:016x}" for v in rng.integers(0, 2**63, rows)]
    urls = [f"s3://gldv2/train/{i[0]}/{i[1]}/{i[2]}/{i}.jpg" for i in ids]
    table = pa.table({"id": ids, "url": urls, "image": pa.nulls(rows, pa.binary())})
    versions.write_version_files(str(folder), table, [], {})
    return ids


def measure(mode: str, folder: str, wanted: list[list[str]]) -> dict:
    """One way's figures, in this (fresh) process: ``wanted`` holds each response's ids."""
    process = psutil.Process()
    before = process.memory_info().rss
    start = time.perf_counter()
    if mode == "map":
        table = versions.read_state(folder)
        urls = dict(zip(table.column("id").to_pylist(), table.column("url").to_pylist(), strict=True))
        del table
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        found = sum(sum(urls.get(i) is not None for i in row) for row in wanted)
        rows_read: float = len(urls)
    else:
        state = versions.StateUrls(folder)
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        found = sum(len(state.urls(row)) for row in wanted)
        rows_read = state.rows_read / len(wanted)
    per_response_ms = 1000 * (time.perf_counter() - start) / len(wanted)
    return {
        "mode": mode,
        "rss_growth_MB": round((process.memory_info().rss - before) / 1e6, 1),
        "load_s": round(load_s, 3),
        "ms_per_response": round(per_response_ms, 2),
        "rows_read_per_response": rows_read,
        "found": found,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=762_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--lookups", type=int, default=50)
    parser.add_argument("--measure", choices=["map", "lookup"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        wanted = json.loads((Path(args.folder) / "wanted.json").read_text())
        print(json.dumps(measure(args.measure, args.folder, wanted)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "v000001"
        ids = write_state(folder, args.rows)
        wanted = np.random.default_rng(1).choice(ids, (args.lookups, args.k)).tolist()
        (folder / "wanted.json").write_text(json.dumps(wanted))
        size = (folder / versions.STATE).stat().st_size
        print(json.dumps({"rows": args.rows, "state_MB": round(size / 1e6, 1), "k": args.k}))
        for mode in ("map", "lookup"):
            command = [sys.executable, __file__, "--measure", mode, "--folder", str(folder)]
            print(subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip())


if __name__ == "__main__":
    main()
