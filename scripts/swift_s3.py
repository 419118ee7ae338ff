"""A throwaway S3-compatible server: single-node OpenStack Swift with the s3api middleware on 127.0.0.1.

Everything (configs, rings, the one storage device, logs) lives in one temporary folder that is
removed on stop; the four servers (account, container, object, proxy) run as child processes on
free ports, one process each (``workers = 0``). Used by the ``s3_server`` test fixture
(tests/servers.py) and by hand::

    python3 scripts/swift_s3.py          # prints the endpoint and credentials, Ctrl-C stops it

Needs the Debian packages swift swift-proxy swift-account swift-container swift-object
(scripts/install-test-deps.sh installs them).
"""

from __future__ import annotations

import ctypes
import getpass
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACCESS_KEY = "test:tester"  # tempauth user "tester" in account "test"
SECRET_KEY = "testing"
SERVERS = ("account", "container", "object")  # storage servers, each with its own ring
BINARIES = tuple(f"swift-{name}-server" for name in (*SERVERS, "proxy"))
INSTALL_HINT = "run scripts/install-test-deps.sh (Debian packages swift swift-proxy swift-account ...)"

# Runs in Swift's own interpreter: point Swift at our swift.conf (hash suffix, policies) instead of
# /etc/swift, then serve one WSGI app in the foreground.
_BOOT = """
import sys
from swift.common import utils
from swift.common.wsgi import run_wsgi
utils.set_swift_dir(sys.argv[1])
sys.exit(run_wsgi(sys.argv[2], sys.argv[3], verbose=True))
"""

# Three rings with one device each (part power 6, 1 replica, min_part_hours 1).
_RINGS = """
import sys
from swift.common.ring import RingBuilder
etc = sys.argv[1]
for name, port in zip(("account", "container", "object"), sys.argv[2:]):
    builder = RingBuilder(6, 1, 1)
    builder.add_dev({"region": 1, "zone": 1, "ip": "127.0.0.1", "port": int(port), "device": "d1", "weight": 100})
    builder.rebalance()
    builder.save(f"{etc}/{name}.builder")
    builder.get_ring().save(f"{etc}/{name}.ring.gz")
"""

_SWIFT_CONF = """\
[swift-hash]
swift_hash_path_suffix = landmark-index-test-{suffix}

[storage-policy:0]
name = Policy-0
default = yes
"""

_COMMON = """\
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = {port}
workers = 0
user = {user}
swift_dir = {etc}
devices = {devices}
mount_check = false
log_name = {name}
log_level = WARNING
"""

_STORAGE_APP = """
[pipeline:main]
pipeline = healthcheck {name}-server

[filter:healthcheck]
use = egg:swift#healthcheck

[app:{name}-server]
use = egg:swift#{name}
"""

# s3api before tempauth (it turns S3 signatures into auth details tempauth checks); cache is
# required by tempauth even without a memcached (lookups then miss); slo/dlo carry multipart uploads.
_PROXY_APP = """
[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats s3api tempauth copy slo dlo proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true

[filter:s3api]
use = egg:swift#s3api

[filter:tempauth]
use = egg:swift#tempauth
user_test_tester = {secret} .admin

[filter:catch_errors]
use = egg:swift#catch_errors

[filter:gatekeeper]
use = egg:swift#gatekeeper

[filter:healthcheck]
use = egg:swift#healthcheck

[filter:proxy-logging]
use = egg:swift#proxy_logging

[filter:cache]
use = egg:swift#memcache

[filter:listing_formats]
use = egg:swift#listing_formats

[filter:copy]
use = egg:swift#copy

[filter:slo]
use = egg:swift#slo

[filter:dlo]
use = egg:swift#dlo
"""


def swift_python() -> str:
    """The interpreter Swift is installed for (from the server script's shebang); fails with a hint."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        raise RuntimeError(f"OpenStack Swift is not installed (missing {', '.join(missing)}): {INSTALL_HINT}")
    shebang = Path(shutil.which(BINARIES[-1]) or "").read_text().splitlines()[0]
    return shebang.removeprefix("#!").strip().split()[0]


def _die_with_parent() -> None:
    """In the child before exec (Linux): get SIGTERM when the launching thread dies, so no server outlives it."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_ports(count: int) -> list[int]:
    """Ports the kernel hands out now (all held open at once so they are distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class SwiftS3:
    """A running single-node Swift; ``stop()`` (or leaving the ``with`` block) ends it and removes its files."""

    root: Path
    endpoint_url: str
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    key: str = ACCESS_KEY
    secret: str = SECRET_KEY
    owns_root: bool = True
    startup_s: float = 0.0  # from launch to all four servers healthy

    @property
    def options(self) -> dict[str, Any]:
        """Storage options for pipeline.storage (s3fs options plus ``content_md5``, which Swift needs)."""
        return {
            "endpoint_url": self.endpoint_url,
            "key": self.key,
            "secret": self.secret,
            # Swift's multi-object delete requires Content-MD5; botocore >= 1.36 sends only CRC32. (Puts,
            # multipart uploads and gets work with botocore's default checksum settings.)
            "content_md5": True,
        }

    @classmethod
    def start(cls, root: str | Path | None = None, timeout: float = 60.0) -> SwiftS3:
        """Configure and start Swift under ``root`` (a new temp dir by default); wait until it answers."""
        began = time.monotonic()
        python = swift_python()
        owns_root = root is None
        root = Path(tempfile.mkdtemp(prefix="swift-s3-") if root is None else root)
        ports = free_ports(len(SERVERS) + 1)
        server = cls(root, f"http://127.0.0.1:{ports[-1]}", owns_root=owns_root)
        try:
            etc = server.write_configs(ports)
            subprocess.run(
                [python, "-c", _RINGS, str(etc), *map(str, ports[:-1])], check=True, capture_output=True
            )
            for name in (*SERVERS, "proxy"):
                server.launch(python, name)
            server.wait_healthy(dict(zip((*SERVERS, "proxy"), ports, strict=True)), timeout)
        except BaseException:
            server.stop()
            raise
        server.startup_s = time.monotonic() - began
        return server

    def write_configs(self, ports: list[int]) -> Path:
        etc, devices, logs = self.root / "etc", self.root / "srv", self.root / "logs"
        for folder in (etc, devices / "d1", logs):
            folder.mkdir(parents=True, exist_ok=True)
        (etc / "swift.conf").write_text(_SWIFT_CONF.format(suffix=self.root.name))
        for name, port in zip((*SERVERS, "proxy"), ports, strict=True):
            common = _COMMON.format(port=port, user=getpass.getuser(), etc=etc, devices=devices, name=name)
            app = _PROXY_APP.format(secret=self.secret) if name == "proxy" else _STORAGE_APP.format(name=name)
            (etc / f"{name}-server.conf").write_text(common + app)
        return etc

    def launch(self, python: str, name: str) -> None:
        conf = self.root / "etc" / f"{name}-server.conf"
        with open(self.root / "logs" / f"{name}.log", "wb") as log:
            self.processes[name] = subprocess.Popen(
                [python, "-c", _BOOT, str(self.root / "etc"), str(conf), f"{name}-server"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C in a terminal reaches us, not the servers: we stop them
                preexec_fn=_die_with_parent,
            )

    def wait_healthy(self, ports: dict[str, int], timeout: float) -> None:
        """Poll each server's /healthcheck; fail early with its log when one exits."""
        deadline = time.monotonic() + timeout
        pending = dict(ports)
        while pending:
            for name, port in list(pending.items()):
                if self.processes[name].poll() is not None:
                    raise RuntimeError(f"swift {name} server exited at start:\n{self.log_tail(name)}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=2) as r:
                        if r.status == 200:
                            del pending[name]
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
            if pending and time.monotonic() > deadline:
                tails = "\n".join(self.log_tail(n) for n in pending)
                raise TimeoutError(
                    f"swift servers {sorted(pending)} not healthy after {timeout:.0f}s:\n{tails}"
                )
            if pending:
                time.sleep(0.1)

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.root / "logs" / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Terminate the servers (SIGTERM, then SIGKILL after 10 s) and remove the temp folder we made."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        if self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SwiftS3:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    # Stop cleanly (servers and temp folder) on SIGTERM too, and on Ctrl-C even when started in the background.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with SwiftS3.start() as server:
        print(f"Swift s3api up in {server.startup_s:.1f}s at {server.endpoint_url} (files in {server.root})")
        print(f"access key {server.key!r}, secret key {server.secret!r} (fixed test account); Ctrl-C stops")
        try:
            while all(p.poll() is None for p in server.processes.values()):
                time.sleep(1)
            print("a swift server exited", file=sys.stderr)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
