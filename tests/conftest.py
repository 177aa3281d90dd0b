"""Shared pytest fixtures: private Redis servers, clients and namespaces.

Fixtures (all generic; broker-specific ones go in the section at the end):

* ``redis_server`` (session): a private :class:`RedisServer`, parametrized over the
  available binaries, ids ``redis7`` / ``redis62``. One server per binary per session,
  stopped when the session ends. Never the shared 127.0.0.1:6379.
* ``redis_url`` (function): that server's URL, ``redis://127.0.0.1:<port>/0``.
* ``r`` (function): ``redis.Redis`` (bytes replies) on that server, ``FLUSHALL``-ed
  before the test, closed after it.
* ``namespace`` (function): a unique key namespace per test, e.g. ``t1a2b3c4d5e6f``.

``CLAWQ_TEST_REDIS_BINARIES=redis7`` (comma-separated) restricts the binaries.
Tests that SIGKILL or restart a server should start their own ``RedisServer`` rather
than touch the shared session one.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from redis_servers import RedisServer, redis_binaries

from clawq.broker import Broker

REDIS_BINARIES: dict[str, str] = redis_binaries()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a long-running test; deselect with -m 'not slow'")


@pytest.fixture(scope="session")
def _redis_server_pool() -> Iterator[dict[str, RedisServer]]:
    """Started servers by binary name, so each binary gets exactly one per session."""
    pool: dict[str, RedisServer] = {}
    try:
        yield pool
    finally:
        for server in pool.values():
            server.stop()


@pytest.fixture(scope="session", params=list(REDIS_BINARIES), ids=list(REDIS_BINARIES))
def redis_server(request: pytest.FixtureRequest, _redis_server_pool: dict[str, RedisServer]) -> RedisServer:
    """A private redis-server for this session, one per binary (ids ``redis7``, ``redis62``)."""
    name: str = request.param
    server = _redis_server_pool.get(name)
    if server is None:
        server = RedisServer(REDIS_BINARIES[name], name=name)
        _redis_server_pool[name] = server
        server.start()
    return server


def _ensure_running(server: RedisServer) -> None:
    # A test that killed the session server by mistake must not cascade into every later test.
    if not server.running:
        server.restart()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the parametrized private server."""
    _ensure_running(redis_server)
    return redis_server.url


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A client (``decode_responses=False``) on an empty private server; closed after the test."""
    client = redis.Redis.from_url(redis_url, decode_responses=False)
    try:
        client.flushall()
        yield client
    finally:
        client.close()


@pytest.fixture
def namespace() -> str:
    """A key namespace unique to this test."""
    return "t" + uuid.uuid4().hex[:12]


# --- broker fixtures ---
# Fixtures built on ``r`` / ``redis_url`` / ``namespace`` (e.g. ``broker``) go below.


class FakeClock:
    """A clock the test moves by hand; starts at the real time (cooldown TTLs stay sane)."""

    def __init__(self, start: float | None = None) -> None:
        # Whole seconds: every ms value the broker derives from the clock is exact.
        self.t = float(int(time.time())) if start is None else start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def broker(redis_url: str, r: redis.Redis, namespace: str, clock: FakeClock) -> Iterator[Broker]:
    """A connected :class:`broker.Broker` on the private server (flushed), driven by ``clock``."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    b = Broker(client, namespace, clock=clock)
    b.connect()
    try:
        yield b
    finally:
        client.close()
