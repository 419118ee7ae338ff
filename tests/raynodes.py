"""Real multi-process Ray clusters for tests: `ray start --block` nodes of our own on 127.0.0.1.

Every node gets free ports and the cluster's own temp dir; stopping signals the nodes we started and, as a
fallback, kills the processes whose command line names that temp dir. Not `ray stop`: it stops every Ray
process on the machine, other people's included.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.servers import load_launcher

free_ports = load_launcher().free_ports  # one port picker for every server the tests start

# Ports every node opens: all chosen free, so clusters of concurrent test sessions never collide.
NODE_PORT_FLAGS = (
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
    "--node-manager-port",
    "--object-manager-port",
)
START_TRIES = 3
HEAD_PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", *NODE_PORT_FLAGS)


class RayNodes:
    """A head node, then worker nodes joining it; ``stop()`` ends them all and removes the temp dir."""

    def __init__(self) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="lir-")  # short: Ray's socket paths have a length limit
        self.nodes: list[subprocess.Popen] = []
        self.ports: dict[str, int] = {}
        # No drain on SIGTERM: a `ray start --block` node of Ray 2.60 first drains for up to 30 s (time for
        # Serve proxies to stop taking traffic); a test cluster ends at once.
        test_node = {"RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | test_node

    @property
    def address(self) -> str:
        """The GCS address drivers and nodes join."""
        return f"127.0.0.1:{self.ports['--port']}"

    def start_head(self, *args: str) -> str:
        self._start("head", ["--head", *args], HEAD_PORT_FLAGS)
        return self.address

    def add_node(self, *args: str) -> subprocess.Popen:
        """A worker node joining the head (e.g. ``--num-gpus=1``); returns once `ray start` has joined it."""
        # One log monitor (the head's) is enough: a lighter node starts faster on a busy machine.
        joining = [f"--address={self.address}", "--include-log-monitor=false", *args]
        return self._start(f"node{len(self.nodes)}", joining, NODE_PORT_FLAGS)

    def _start(self, name: str, args: list[str], port_flags: tuple[str, ...]) -> subprocess.Popen:
        """`ray start` gives a node 30 s to register with the GCS, too little on a busy machine: up to
        ``START_TRIES`` tries, each on fresh ports."""
        for attempt in range(1, START_TRIES):
            try:
                return self._start_once(f"{name}-{attempt}", args, port_flags)
            except RuntimeError:
                pass
        return self._start_once(f"{name}-{START_TRIES}", args, port_flags)

    def _start_once(self, name: str, args: list[str], port_flags: tuple[str, ...]) -> subprocess.Popen:
        ports = dict(zip(port_flags, free_ports(len(port_flags)), strict=True))
        if "--port" in ports:
            self.ports = ports
        command = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
            *args,
            *(f"{flag}={port}" for flag, port in ports.items()),
        ]
        log = Path(self.temp_dir) / f"{name}.log"
        with open(log, "wb") as out:
            node = subprocess.Popen(
                command, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.nodes.append(node)  # stopped by stop() even if it never started
        _wait_for(log, "Ray runtime started", node)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            node.send_signal(signal.SIGTERM)  # `ray start --block` shuts its node down on exit
        for node in self.nodes:
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        for process in _own_processes(self.temp_dir):
            process.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _wait_for(log: Path, text: str, node: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if node.poll() is not None or time.monotonic() > deadline:
            node.send_signal(signal.SIGTERM)
            raise RuntimeError(f"ray start did not start ({node.poll()=}):\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def own_ray_workers(name: str) -> list:
    """Ray worker processes titled ``name`` (e.g. an actor class) of this process's own local Ray: its raylet
    is our child, so never another test session's workers."""
    import psutil

    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if name in " ".join(process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:  # ended while we looked
            pass
    return found


def _own_processes(temp_dir: str) -> list:
    """Processes of our cluster: their command lines name its temp dir (session files live there)."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if any(temp_dir in part for part in process.info["cmdline"] or ()):
            found.append(process)
    return found
