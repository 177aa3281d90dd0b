"""The private Redis servers the suite runs on: versions, Lua, isolation, crash/restart."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import pytest
import redis
import redis_servers
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis_servers import SHARED_REDIS_PORT, RedisServer, RedisServerError, redis_binaries, shared_redis_up

EXPECTED_VERSION_PREFIX = {"redis7": "7.", "redis62": "6.2."}

_seen_namespaces: set[str] = set()


@pytest.fixture
def private_server(redis_server: RedisServer) -> Iterator[RedisServer]:
    """A second, test-owned server of the same binary, free to be killed."""
    server = RedisServer(redis_server.binary, name=redis_server.name)
    try:
        yield server.start()
    finally:
        server.stop()


def test_server_answers_ping(redis_server: RedisServer, r: redis.Redis) -> None:
    assert r.ping() is True
    assert redis_server.ping()
    assert redis_server.port != SHARED_REDIS_PORT
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"


def test_server_reports_expected_version(redis_server: RedisServer, r: redis.Redis) -> None:
    prefix = EXPECTED_VERSION_PREFIX[redis_server.name]
    assert redis_server.version.startswith(prefix), redis_server.version
    assert str(r.info("server")["redis_version"]) == redis_server.version


def test_server_runs_without_persistence(r: redis.Redis) -> None:
    assert r.config_get("save") == {"save": ""}
    assert r.config_get("appendonly") == {"appendonly": "no"}
    assert r.config_get("bind")["bind"] == "127.0.0.1"


def test_server_supports_eval(r: redis.Redis, namespace: str) -> None:
    key = f"{namespace}:k"
    script = "redis.call('SET', KEYS[1], ARGV[1]); return {redis.call('GET', KEYS[1]), #KEYS}"
    assert r.eval(script, 1, key, "v1") == [b"v1", 1]
    sha = r.script_load("return tonumber(ARGV[1]) * 2")
    assert r.evalsha(sha, 0, "21") == 42
    with pytest.raises(redis.ResponseError):
        r.eval("return redis.call('NOSUCHCOMMAND')", 0)


@pytest.mark.parametrize("run", ["first", "second"])
def test_each_test_starts_on_an_empty_server(r: redis.Redis, run: str) -> None:
    assert r.dbsize() == 0
    r.set(b"left-behind", run)


def test_namespace_is_unique_per_test(namespace: str) -> None:
    assert re.fullmatch(r"t[0-9a-f]{12}", namespace)
    assert namespace not in _seen_namespaces
    _seen_namespaces.add(namespace)


def test_namespace_is_unique_per_test_again(namespace: str) -> None:
    test_namespace_is_unique_per_test(namespace)


def test_kill_and_restart_keep_port_and_spare_the_shared_server(private_server: RedisServer) -> None:
    shared_was_up = shared_redis_up()
    port, directory = private_server.port, private_server.directory
    # No retries, so the PING against the killed server fails at once.
    with private_server.client(retry=Retry(NoBackoff(), 0)) as c:
        c.set("k", "v")
        private_server.kill()
        assert not private_server.running
        with pytest.raises(redis.ConnectionError):
            c.ping()
        assert not private_server.ping()

        private_server.restart()
        assert private_server.running
        assert (private_server.port, private_server.directory) == (port, directory)
        assert c.ping() is True  # the client reconnects to the same address
        assert c.get("k") is None  # nothing persisted across the crash

        c.set("k", "v2")
        private_server.restart()  # graceful restart of a running server
        assert c.get("k") is None
    assert private_server.version.startswith(EXPECTED_VERSION_PREFIX[private_server.name])

    if shared_was_up:
        assert shared_redis_up(), "the shared server on 127.0.0.1:6379 stopped answering"


def test_stop_removes_the_directory_and_start_again_works(redis_server: RedisServer) -> None:
    server = RedisServer(redis_server.binary, ["--maxmemory", "12mb"], name=redis_server.name)
    with server:
        directory = server.directory
        assert directory is not None and directory.is_dir()
        assert server.port not in (redis_server.port, SHARED_REDIS_PORT)
        with server.client(decode_responses=True) as c:
            assert c.config_get("maxmemory") == {"maxmemory": str(12 * 1024 * 1024)}
            assert c.config_get("dir")["dir"] == str(directory.resolve())
    assert not server.running
    assert not directory.exists()
    with pytest.raises(RedisServerError):
        _ = server.port
    with pytest.raises(RedisServerError):
        server.restart()
    try:
        assert server.start().ping()
    finally:
        server.stop()


def test_failed_start_reports_the_log_tail(redis_server: RedisServer) -> None:
    server = RedisServer(redis_server.binary, ["--no-such-directive", "1"], name=redis_server.name)
    with pytest.raises(RedisServerError) as excinfo:
        server.start()
    message = str(excinfo.value)
    assert "exited with code" in message
    assert "no-such-directive" in message  # from the server's own log
    assert not server.running
    assert server.directory is None


def test_start_retries_on_another_port_when_bind_fails(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = int(squatter.getsockname()[1])
        real_free_port = redis_servers.free_port
        handed_out: list[int] = []

        def first_the_taken_port(exclude: frozenset[int] = frozenset()) -> int:
            port = taken if not handed_out else real_free_port(exclude)
            handed_out.append(port)
            return port

        monkeypatch.setattr(redis_servers, "free_port", first_the_taken_port)
        with RedisServer(redis_server.binary, name=redis_server.name) as server:
            assert handed_out[0] == taken
            assert server.port != taken
            assert server.ping()


def test_redis_binaries_env_restricts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(redis_servers.BINARIES_ENV_VAR, raising=False)
    everything = redis_binaries()
    monkeypatch.setenv(redis_servers.BINARIES_ENV_VAR, " redis62 ")
    assert redis_binaries() == {k: v for k, v in everything.items() if k == "redis62"}
    monkeypatch.setenv(redis_servers.BINARIES_ENV_VAR, "redis7,redis62")
    assert redis_binaries() == everything
    monkeypatch.setenv(redis_servers.BINARIES_ENV_VAR, "redis5")
    with pytest.raises(ValueError, match="redis5"):
        redis_binaries()
