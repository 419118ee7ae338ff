"""Memory this process may use, as the container sees it: a pod's cgroup limit, not the host's RAM.

In a Kubernetes pod ``os.sysconf`` and ``/proc/meminfo`` describe the whole node; a budget derived from
them overshoots the pod's limit and the kernel kills the process instead of the code choosing the
disk path. The cgroup files say what this container may still allocate.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
MEMINFO = Path("/proc/meminfo")
# cgroup v1 reports "no limit" as the largest page-aligned 64-bit value (0x7FFFFFFFFFFFF000); anything
# this large is no limit
_V1_UNLIMITED = 2**60


def available_memory_bytes(cgroup_root: Path | str = CGROUP_ROOT, meminfo: Path | str = MEMINFO) -> int:
    """Bytes this process can still allocate: the cgroup's limit minus its usage (v2 ``memory.max`` −
    ``memory.current``; v1 ``memory/memory.limit_in_bytes`` − ``memory/memory.usage_in_bytes``), and never
    more than the host's available memory (``MemAvailable`` of ``meminfo``; physical RAM if unreadable)."""
    host = _host_available(Path(meminfo))
    root = Path(cgroup_root)
    for limit_file, usage_file in (
        (root / "memory.max", root / "memory.current"),
        (root / "memory" / "memory.limit_in_bytes", root / "memory" / "memory.usage_in_bytes"),
    ):
        limit = _read_bytes(limit_file)
        if limit is not None and limit < _V1_UNLIMITED:
            return max(0, min(host, limit - (_read_bytes(usage_file) or 0)))
    return host


def _read_bytes(path: Path) -> int | None:
    """The number in a cgroup file; None when the file is absent or says "max" (v2: no limit)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _host_available(meminfo: Path) -> int:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # in kB
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
