"""The re-index lease: exactly one holder under races, immediate takeover of a provably dead holder, never of a
live one; on local disk and on the real S3 server fixture."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline import storage
from pipeline.lease import LOCK, Lease, LockHeldError, process_started, takeover_claim_url

CONTENDERS = 6


@dataclass(frozen=True)
class Root:
    url: str
    options: dict[str, Any] | None

    @property
    def lock(self) -> str:
        return storage.join(self.url, LOCK)

    def held(self) -> dict[str, Any]:
        return json.loads(storage.read_text(self.lock, self.options))

    def put(self, **record: Any) -> None:
        storage.write_text(self.lock, json.dumps(record), self.options)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> Root:
    if request.param == "local":
        return Root(str(tmp_path / "root"), None)
    bucket = request.getfixturevalue("s3_bucket")
    return Root(f"{bucket.url}/root", bucket.options)


def _race(root: Root) -> tuple[list[Lease], list[LockHeldError]]:
    """CONTENDERS threads acquire the same lease at the same instant: (winners, refusals)."""
    leases = [Lease(root.url, 60, root.options) for _ in range(CONTENDERS)]
    start = threading.Barrier(CONTENDERS)
    won: list[Lease] = []
    refused: list[LockHeldError] = []

    def contend(lease: Lease) -> None:
        start.wait()
        try:
            lease.acquire()
            won.append(lease)
        except LockHeldError as exc:
            refused.append(exc)

    threads = [threading.Thread(target=contend, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won, refused


def _assert_one_winner(root: Root, won: list[Lease], refused: list[LockHeldError]) -> None:
    assert len(won) == 1, f"{len(won)} winners: {[lease.owner for lease in won]}"
    assert len(refused) == CONTENDERS - 1
    assert root.held()["owner"] == won[0].owner
    won[0].release()
    assert not storage.exists(root.lock, root.options)


def test_write_if_absent_creates_once_and_never_overwrites(root):
    url = storage.join(root.url, "x.json")
    assert storage.write_if_absent(url, b"first", root.options)
    assert not storage.write_if_absent(url, b"second", root.options)
    assert storage.read_bytes(url, root.options) == b"first"
    assert storage.list_files(root.url, root.options) == [url], "no temporary file left behind"


def test_a_race_for_a_free_lease_has_one_winner(root):
    _assert_one_winner(root, *_race(root))


def test_a_race_to_take_over_a_dead_lease_has_one_winner(root):
    root.put(owner="other-host:1:dead", host="other-host", pid=1, expires_at=time.time() - 1)
    _assert_one_winner(root, *_race(root))
    takeover_claims = [u for u in storage.list_files(root.url, root.options) if ".takeover-" in u]
    assert takeover_claims == [], "the winner removes its takeover claim on release"


def test_a_takeover_in_progress_is_respected_unless_its_taker_is_gone(tmp_path):
    root = Root(str(tmp_path / "root"), None)
    root.put(owner="dead", expires_at=time.time() - 1)
    claim = takeover_claim_url(root.lock, "dead")
    me = dict(host=socket.gethostname(), pid=os.getpid(), pid_started=process_started(os.getpid()))
    taker = dict(
        owner="taker", expires_at=time.time() + 600, heartbeat_at=time.time(), heartbeat_s=30.0, **me
    )
    storage.write_text(claim, json.dumps(taker))
    with pytest.raises(LockHeldError, match="taker is taking over"):
        Lease(root.url, 60).acquire()
    assert root.held()["owner"] == "dead", "the live taker's takeover is left to it"
    taker["pid_started"] -= 1  # the taker's process is gone (its pid now another process's)
    storage.write_text(claim, json.dumps(taker))
    lease = Lease(root.url, 60)
    lease.acquire()
    assert root.held()["owner"] == lease.owner
    lease.release()
    assert not storage.exists(claim)


def _holder(root: Path) -> tuple[subprocess.Popen, str]:
    """A separate process that takes the lease on ``root`` and then waits to be killed, and its owner id."""
    script = (
        "import sys, time; from pipeline.lease import Lease; "
        "lease = Lease(sys.argv[1], 3600); lease.acquire(); print(lease.owner, flush=True); time.sleep(600)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(root)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert holder.stdout is not None
    owner = holder.stdout.readline().strip()
    assert owner, "the holder process did not take the lease"
    return holder, owner


def test_a_killed_holder_on_this_host_is_taken_over_at_once(tmp_path):
    root = Root(str(tmp_path / "root"), None)
    holder, owner = _holder(tmp_path / "root")
    try:
        with pytest.raises(LockHeldError, match=f"held by {owner}"):
            Lease(root.url, 60).acquire()
        assert root.held()["pid"] == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert root.held()["expires_at"] > time.time() + 3000, "the dead holder's lease is hours from expiry"
    lease = Lease(root.url, 60)
    lease.acquire()  # at once: no waiting for expiry or a stale heartbeat
    assert root.held()["owner"] == lease.owner
    lease.release()


def test_a_reused_pid_does_not_keep_a_dead_holder_alive(tmp_path):
    root = Root(str(tmp_path / "root"), None)
    me = os.getpid()
    fresh = dict(host=socket.gethostname(), pid=me, heartbeat_at=time.time(), heartbeat_s=30.0)
    root.put(owner="live", expires_at=time.time() + 600, pid_started=process_started(me), **fresh)
    with pytest.raises(LockHeldError, match="held by live"):
        Lease(root.url, 60).acquire()
    assert process_started(me) is not None, "Linux /proc gives start times"
    root.put(owner="reused", expires_at=time.time() + 600, pid_started=process_started(me) - 1, **fresh)
    lease = Lease(root.url, 60)
    lease.acquire()
    assert root.held()["owner"] == lease.owner
    lease.release()


def test_a_stale_heartbeat_is_taken_over_and_a_fresh_one_is_not(root):
    beat = dict(host="other-host", pid=7, heartbeat_s=10.0, expires_at=time.time() + 3600)
    root.put(owner="fresh", heartbeat_at=time.time() - 35, **beat)  # 3.5 periods: may still be alive
    with pytest.raises(LockHeldError, match="held by fresh"):
        Lease(root.url, 60, root.options).acquire()
    assert root.held()["owner"] == "fresh", "a refused run does not touch the lock"
    root.put(owner="stale", heartbeat_at=time.time() - 45, **beat)  # 4.5 periods
    lease = Lease(root.url, 60, root.options)
    lease.acquire()
    assert root.held()["owner"] == lease.owner
    lease.release()


def test_the_holder_renews_its_heartbeat_until_released(tmp_path):
    root = Root(str(tmp_path / "root"), None)
    lease = Lease(root.url, 60, heartbeat_s=0.05)
    lease.acquire()
    first = root.held()
    time.sleep(0.5)
    renewed = root.held()
    assert renewed["heartbeat_at"] > first["heartbeat_at"]
    assert renewed["expires_at"] == first["expires_at"], "a heartbeat does not extend the lease"
    lease.release()
    time.sleep(0.2)
    assert not Path(root.lock).exists(), "no heartbeat after release re-creates the lock"


def test_a_lost_lock_stops_the_heartbeat_and_fails_the_run(tmp_path):
    root = Root(str(tmp_path / "root"), None)
    lease = Lease(root.url, 60, heartbeat_s=0.05)
    lease.acquire()
    root.put(owner="thief", expires_at=time.time() + 600)
    time.sleep(0.3)
    assert root.held() == {"owner": "thief", "expires_at": pytest.approx(time.time() + 600, abs=5)}
    with pytest.raises(LockHeldError, match="to thief"):
        lease.renew_if_due()
    lease.release()
    assert root.held()["owner"] == "thief"


def test_a_taker_that_loses_the_lock_after_claiming_leaves_no_claim(tmp_path, monkeypatch):
    """The interleaving behind a leftover claim: A claims the dead lock and removes it, B finds no lock and
    creates its own before A's create; A loses, and must not leave its takeover claim behind."""
    root = Root(str(tmp_path / "root"), None)
    root.put(owner="dead", expires_at=time.time() - 1)
    taker, other = Lease(root.url, 60), Lease(root.url, 60)
    remove = storage.remove

    def remove_then_other_acquires(url, options=None):
        remove(url, options)
        if url == root.lock and other.renewed == 0.0:
            other.acquire()

    monkeypatch.setattr(storage, "remove", remove_then_other_acquires)
    with pytest.raises(LockHeldError, match="lost"):
        taker.acquire()
    assert root.held()["owner"] == other.owner
    other.release()
    assert storage.list_files(root.url) == [], "neither the lock nor a takeover claim is left behind"


def test_a_claim_dropped_between_our_create_and_our_read_is_created_again(tmp_path, monkeypatch):
    """The other interleaving of a takeover race: B holds the claim when A's create fails, and drops it (B lost,
    or B finished) before A reads it. A must create the claim again, not fail on the missing file."""
    root = Root(str(tmp_path / "root"), None)
    root.put(owner="dead", expires_at=time.time() - 1)
    claim = takeover_claim_url(root.lock, "dead")
    storage.write_text(claim, json.dumps({"owner": "B"}))
    read_text = storage.read_text

    def b_drops_its_claim_first(url, options=None):
        if url == claim and storage.exists(claim):
            storage.remove(claim)
        return read_text(url, options)

    monkeypatch.setattr(storage, "read_text", b_drops_its_claim_first)
    lease = Lease(root.url, 60)
    lease.acquire()
    assert root.held()["owner"] == lease.owner
    lease.release()
    assert storage.list_files(root.url) == [], "neither the lock nor a takeover claim is left behind"
