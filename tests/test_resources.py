"""available_memory_bytes reads the container's cgroup (v2 and v1), not the host's RAM; fake cgroup trees.
PeakMemory sums a real child process's memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.resources import PeakMemory, available_memory_bytes, tree_rss

GIB = 2**30


@pytest.fixture
def meminfo(tmp_path: Path) -> Path:
    """A host with 20 GiB available."""
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       25000000 kB\nMemFree: 1000 kB\nMemAvailable:   {20 * GIB // 1024} kB\n")
    return path


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return root


def test_cgroup_v2_limit_minus_usage(tmp_path: Path, meminfo: Path) -> None:
    root = _tree(tmp_path / "cg", {"memory.max": str(4 * GIB), "memory.current": str(GIB + 5)})
    assert available_memory_bytes(root, meminfo) == 3 * GIB - 5


def test_cgroup_v2_max_means_the_host(tmp_path: Path, meminfo: Path) -> None:
    root = _tree(tmp_path / "cg", {"memory.max": "max", "memory.current": str(GIB)})
    assert available_memory_bytes(root, meminfo) == 20 * GIB


def test_cgroup_v1_limit_and_its_huge_number_for_no_limit(tmp_path: Path, meminfo: Path) -> None:
    limited = {"memory/memory.limit_in_bytes": str(6 * GIB), "memory/memory.usage_in_bytes": str(2 * GIB)}
    assert available_memory_bytes(_tree(tmp_path / "a", limited), meminfo) == 4 * GIB
    unlimited = {"memory/memory.limit_in_bytes": "9223372036854771712", "memory/memory.usage_in_bytes": "1"}
    assert available_memory_bytes(_tree(tmp_path / "b", unlimited), meminfo) == 20 * GIB


def test_a_limit_above_the_host_or_already_exceeded(tmp_path: Path, meminfo: Path) -> None:
    above = _tree(tmp_path / "a", {"memory.max": str(64 * GIB), "memory.current": "0"})
    assert available_memory_bytes(above, meminfo) == 20 * GIB
    full = _tree(tmp_path / "b", {"memory.max": str(GIB), "memory.current": str(2 * GIB)})
    assert available_memory_bytes(full, meminfo) == 0


def test_no_cgroup_and_no_meminfo_falls_back_to_physical_ram(tmp_path: Path) -> None:
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert available_memory_bytes(tmp_path / "none", tmp_path / "no-meminfo") == physical


def test_peak_memory_counts_the_child_processes():
    """A child holding 200 MB written pages: the tree's RSS and the sampled peak include it."""
    held = 200 * 2**20
    code = f"import sys; b = b'x' * {held}; print('ready', flush=True); sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"ready\n"
        alone = tree_rss(os.getpid()) - tree_rss(child.pid)
        assert tree_rss(child.pid) >= held
        with PeakMemory(interval=0.01) as memory:
            pass
        assert memory.peak >= alone + held
    finally:
        child.stdin.close()
        child.wait()
    assert tree_rss(child.pid) == 0  # gone: nothing to count
