"""Memory this process may use, as the container sees it: a pod's cgroup limit, not the host's RAM; and the
memory a command used, summed over its processes.

In a Kubernetes pod ``os.sysconf`` and ``/proc/meminfo`` describe the whole node; a budget derived from
them overshoots the pod's limit and the kernel kills the process instead of the code choosing the
disk path. The cgroup files say what this container may still allocate.
"""

from __future__ import annotations

import contextlib
import os
import threading
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


PROC = Path("/proc")


def tree_rss(root: int, proc: Path = PROC) -> int:
    """Resident bytes of process ``root`` and all its descendants, from /proc (0 where /proc is missing).

    For a command that started a local Ray that is the driver, GCS, raylet and every worker; shared pages
    (libraries, the object store) count once per process, as ``ps`` sums them."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir(proc) if proc.is_dir() else ():
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):  # exited meanwhile
                ppid = int((proc / entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    total, stack, page = 0, [root], os.sysconf("SC_PAGE_SIZE")
    while stack:
        pid = stack.pop()
        with contextlib.suppress(OSError, IndexError):
            total += int((proc / str(pid) / "statm").read_text().split()[1]) * page
        stack.extend(children.get(pid, []))
    return total


class PeakMemory:
    """Peak of :func:`tree_rss` of this process, sampled every ``interval`` seconds while inside the block.

    Processes of a remote Ray cluster are not this machine's: there it measures the driver alone."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, tree_rss(os.getpid()))
            if self._stop.wait(self.interval):
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
