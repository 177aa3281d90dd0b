"""The broker behind Sentinel (``redis+sentinel://`` URLs): a primary fails mid-run, the replica takes over.

One primary, one replica and one Sentinel (quorum 1, down-after 1 s, failover-timeout 3 s), all from the
system redis-server. The primary is SIGKILLed while tasks are claimed; the broker must find the new primary
through the Sentinel, reload its scripts there (NOSCRIPT) and finish the run with every task final and the
namespace's invariants intact (``doctor``).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from conftest import FakeClock
from redis_servers import HOST, RedisServer, free_port, redis_binaries

from clawq.broker import SCHEMA_VERSION, Broker, NothingToClaim, Outcome, RedisUnavailable, TaskStatus, parse_config
from clawq.broker.connection import client_from_url
from clawq.broker.errors import InputError

_BINARY = redis_binaries().get("redis7")
pytestmark = pytest.mark.skipif(_BINARY is None, reason="needs the system redis-server")
SERVICE = "clawqmain"
T = TypeVar("T")


class SentinelSetup:
    """A primary, its replica and one Sentinel watching them."""

    def __init__(self) -> None:
        assert _BINARY is not None
        # No 5 s diskless-sync delay: the replica is in sync as soon as it connects.
        self.primary = RedisServer(_BINARY, ["--repl-diskless-sync-delay", "0"], name="sentinel-primary")
        self.replica: RedisServer | None = None
        self.sentinel_port = 0
        self._sentinel: subprocess.Popen[bytes] | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="clawq-sentinel-"))

    @property
    def url(self) -> str:
        return f"redis+sentinel://{HOST}:{self.sentinel_port}/{SERVICE}/0"

    def start(self) -> SentinelSetup:
        assert _BINARY is not None
        self.primary.start()
        self.replica = RedisServer(_BINARY, ["--replicaof", HOST, str(self.primary.port),
                                             "--repl-diskless-sync-delay", "0"], name="sentinel-replica")
        self.replica.start()
        replica = self.replica
        self._wait(lambda: self._info(replica, "master_link_status") == "up", "the replica to sync")
        self.sentinel_port = free_port(frozenset({self.primary.port, self.replica.port}))
        conf = self._dir / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel_port}\nbind {HOST}\ndaemonize no\ndir {self._dir}\n"
            f"sentinel monitor {SERVICE} {HOST} {self.primary.port} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 3000\n",
            encoding="utf-8",
        )
        with (self._dir / "sentinel.log").open("ab") as log:
            self._sentinel = subprocess.Popen(
                [_BINARY, str(conf), "--sentinel"], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self._dir, start_new_session=True,
            )
        self._wait(self._sentinel_sees_replica, "the sentinel to see the replica")
        return self

    def sentinel_client(self) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.sentinel_port, decode_responses=True, socket_timeout=1)

    def master_port(self) -> int:
        with self.sentinel_client() as s:
            addr = s.execute_command("SENTINEL", "get-master-addr-by-name", SERVICE)
        return int(addr[1])

    def _sentinel_sees_replica(self) -> bool:
        try:
            with self.sentinel_client() as s:
                replicas = s.execute_command("SENTINEL", "replicas", SERVICE)
        except redis.RedisError:
            return False
        return any("disconnected" not in str(r.get("flags", "")) for r in replicas if isinstance(r, dict))

    @staticmethod
    def _info(server: RedisServer, field: str) -> str:
        with server.client(decode_responses=True) as c:
            return str(c.info("replication").get(field))

    @staticmethod
    def _wait(ok: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._sentinel is not None and self._sentinel.poll() is None:
            self._sentinel.kill()
            self._sentinel.wait(timeout=10)
        self.primary.stop()
        if self.replica is not None:
            self.replica.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture
def setup() -> Iterator[SentinelSetup]:
    s = SentinelSetup()
    try:
        yield s.start()
    finally:
        s.stop()


def _retry(call: Callable[[], T], timeout: float = 20.0) -> T:
    """``call()``, again while the primary is unreachable (the failover is under way)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except RedisUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _drain(b: Broker) -> None:
    """Claim and complete until nothing is left to claim."""
    while True:
        try:
            c = _retry(b.claim)
        except NothingToClaim:
            return
        _retry(partial(b.complete, c.task_id, c.run_id, Outcome(summary="ok")))


def test_sentinel_url_reaches_the_primary(setup: SentinelSetup) -> None:
    b = Broker.from_url(setup.url, "probe")
    try:
        assert b._where == f"redis+sentinel://{HOST}:{setup.sentinel_port}/{SERVICE}/0"
        b.add("web", "t", chain="coding")
        with setup.primary.client(decode_responses=True) as raw:
            assert raw.hget(b.keys.meta, "schema_version") == str(SCHEMA_VERSION)
    finally:
        b.close()


def test_failover_mid_run_keeps_every_task_in_one_place(setup: SentinelSetup, clock: FakeClock) -> None:
    assert setup.replica is not None
    b = Broker.from_url(setup.url, "fo", clock=clock)
    try:
        b.load_config(parse_config({"night_mode": None}))
        ids = [b.add(board, f"task {i}", chain="coding") for i, board in enumerate(["a", "b", "c", "d", "e", "f"])]
        done = b.claim()
        b.complete(done.task_id, done.run_id, Outcome(summary="before"))
        keep, lose = b.claim(), b.claim()  # one will report after the failover, one is abandoned
        sha = b._scripts._scripts["claim_task"].sha
        with setup.primary.client() as raw:
            assert raw.execute_command("WAIT", 1, 2000) == 1  # the replica has every write so far
        old_port = setup.primary.port
        setup.primary.kill()
        setup.primary.stop()

        # The first call fails over inside redis-py (Sentinel names the new primary), or raises
        # RedisUnavailable until the Sentinel has promoted the replica.
        deadline = _retry(lambda: b.heartbeat(keep.task_id, keep.run_id))
        assert deadline == pytest.approx(clock() + 20 * 60, abs=0.01)
        assert setup.master_port() == setup.replica.port != old_port
        with setup.replica.client() as raw:
            assert raw.info("replication")["role"] == "master"
            raw.script_flush()  # whatever the replica had cached, the next call must reload (NOSCRIPT)
        assert _retry(lambda: b.complete(keep.task_id, keep.run_id, Outcome(summary="after"))).status \
            is TaskStatus.IN_REVIEW
        with setup.replica.client() as raw:
            assert raw.script_exists(b._scripts._scripts["complete_run"].sha) == [True]

        _drain(b)  # the remaining queued tasks run on the new primary
        with setup.replica.client() as raw:
            assert raw.script_exists(sha) == [True]
        clock.advance(24 * 60)  # the abandoned run's lease ends: reaped and re-run
        assert _retry(b.reap) == [lose.task_id]
        _drain(b)

        tasks = _retry(b.list_tasks)
        assert [t.task_id for t in tasks] == ids
        assert all(t.status is TaskStatus.IN_REVIEW for t in tasks), [(t.task_id, t.status) for t in tasks]
        report = _retry(b.doctor)
        assert report["ok"], report
        assert _retry(b.health)["global"]["in_progress"] == 0
    finally:
        b.close()


def test_bad_sentinel_urls() -> None:
    with pytest.raises(InputError, match="service"):
        client_from_url("redis+sentinel://127.0.0.1:26379/")
    with pytest.raises(InputError, match="service"):
        client_from_url("redis+sentinel://127.0.0.1:26379/svc/notadb")
    with pytest.raises(InputError, match="host:port"):
        client_from_url("redis+sentinel://127.0.0.1/svc")


def test_unreachable_sentinel_is_redis_unavailable() -> None:
    port = free_port()
    with pytest.raises(RedisUnavailable, match=f"redis\\+sentinel://127.0.0.1:{port}/svc/0: no primary"):
        Broker.from_url(f"redis+sentinel://:pw@127.0.0.1:{port}/svc", "ns")
