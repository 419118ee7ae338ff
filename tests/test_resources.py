"""available_memory_bytes reads the container's cgroup (v2 and v1), not the host's RAM; fake cgroup trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.resources import available_memory_bytes

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
