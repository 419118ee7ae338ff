"""A local Ray started by a command ends with it (a SIGTERM or SIGINT to the command leaves no Ray process),
and its workers redact their log records as the command does."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A driver that starts its local Ray through ensure_ray (as every command does), waits for an actor (a worker
# process, a grandchild), says "ready" and then blocks inside ray.get, where a signal finds a busy command.
DRIVER = """
import time, ray
from pipeline.ray_runtime import ensure_ray
ensure_ray(num_cpus=1)

@ray.remote
class Holder:
    def ping(self):
        return True

    def hold(self):
        time.sleep(600)

holder = Holder.remote()
ray.get(holder.ping.remote())
print("ready", flush=True)
ray.get(holder.hold.remote())
"""


def _cmdline(process) -> list[str]:
    import psutil

    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def _alive(processes: list, ray_tmp: str) -> list[str]:
    """Descriptions of the session's processes still running: the given ones, and any naming its temp dir."""
    import psutil

    named = [p for p in psutil.process_iter() if any(ray_tmp in part for part in _cmdline(p))]
    alive = []
    for process in {p.pid: p for p in [*processes, *named]}.values():
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{process.pid} {' '.join(_cmdline(process))[:120]}")
        except psutil.NoSuchProcess:
            continue
    return alive


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signalled_command_leaves_no_ray_process(tmp_path, signum):
    import psutil

    ray_tmp = tempfile.mkdtemp(prefix="li-ray-")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "PYTHONPATH": str(REPO), "LANDMARK_INDEX_RAY_TMP": ray_tmp}
    log = tmp_path / "driver.log"
    with log.open("wb") as stderr:
        driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER], env=env, stdout=subprocess.PIPE, stderr=stderr
        )
    session: list = []
    try:
        assert driver.stdout is not None and driver.stdout.readline() == b"ready\n", log.read_text()[-2000:]
        session = psutil.Process(driver.pid).children(recursive=True)
        commands = " ".join(" ".join(_cmdline(p)) for p in session)
        assert "raylet" in commands and "gcs_server" in commands and "ray::Holder" in commands, commands
        driver.send_signal(signum)
        assert driver.wait(timeout=120) == -signum, log.read_text()[-2000:]  # ended by the signal
        deadline = time.monotonic() + 15  # workers notice their raylet is gone within a few seconds
        while _alive(session, ray_tmp) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _alive(session, ray_tmp) == [], f"Ray processes outlived the {signal.Signals(signum).name}"
    finally:
        for process in [psutil.Process(driver.pid), *session] if driver.poll() is None else session:
            with suppress(psutil.NoSuchProcess):
                process.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)


# A driver whose Ray task logs, in the worker, a url with credentials the worker has just used (and so
# remembers) as a warning three times, an error, a Python warning and an INFO detail. The driver records what
# Ray forwards to its stderr and waits (bounded) until the error, logged last, has arrived.
LOGGING_DRIVER = """
import logging, sys, time, warnings, ray
from pipeline import storage
from pipeline.ray_runtime import ensure_ray

class Tee:
    def __init__(self, stream):
        self.stream, self.text = stream, []
    def write(self, text):
        self.text.append(text)
        return self.stream.write(text)
    def __getattr__(self, name):
        return getattr(self.stream, name)

sys.stderr = Tee(sys.stderr)
ensure_ray(num_cpus=1)

@ray.remote
def log_a_secret():
    url = "s3://AKIDEXAMPLE:wJalrXUtnFEMI@127.0.0.1:9/bucket/x.jpg"
    storage.remember_secrets(url)
    log = logging.getLogger("pipeline.test")
    log.info("detail-for-the-ray-logs %s", url)
    for _ in range(3):
        log.warning("fetch %s failed", url)
    warnings.warn("a-python-warning")
    log.error("last-error-line")

ray.get(log_a_secret.remote())
deadline = time.monotonic() + 120
while "last-error-line" not in "".join(sys.stderr.text) and time.monotonic() < deadline:
    time.sleep(0.1)
"""


def test_ray_workers_show_warnings_once_redacted_and_keep_the_rest_in_ray_logs(tmp_path):
    """Issue 27: worker warnings were hidden (log_to_driver=False). Now warnings and errors reach the driver
    once each and redacted; INFO records stay in the worker's log file in Ray's logs folder."""
    ray_tmp = tempfile.mkdtemp(prefix="li-ray-")
    env = {**os.environ, "PYTHONPATH": str(REPO), "LANDMARK_INDEX_RAY_TMP": ray_tmp}
    try:
        done = subprocess.run(
            [sys.executable, "-c", LOGGING_DRIVER], env=env, capture_output=True, text=True, timeout=300
        )
        worker_logs = [p.read_text() for p in Path(ray_tmp).rglob("landmark-index-worker-*.log")]
        ray_files = [p.read_bytes() for p in Path(ray_tmp).rglob("*") if p.is_file()]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    warned = [line for line in done.stderr.splitlines() if "pipeline.test: fetch s3://" in line]
    assert len(warned) == 1, done.stderr[-3000:]
    assert warned[0].endswith("fetch s3://127.0.0.1:9/bucket/x.jpg failed")  # the credentials are gone
    assert sum("last-error-line" in line for line in done.stderr.splitlines()) == 1
    assert "a-python-warning" in done.stderr
    assert "detail-for-the-ray-logs" not in done.stderr + done.stdout
    assert any("detail-for-the-ray-logs" in text for text in worker_logs)
    for secret in ("wJalrXUtnFEMI", "AKIDEXAMPLE"):
        assert secret not in done.stderr + done.stdout
        assert not any(secret.encode() in data for data in ray_files)
