"""Memory pressure: the eviction policy is checked and said loudly, an OOM refusal is one clear error with
nothing half-written, and a namespace that Redis partly evicted is reported, never a crash.

Private servers only (never 6379), with ``maxmemory`` and the policy set per test.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import run_cli
from redis_servers import RedisServer, free_port, redis_binaries
from rq import Queue

from clawq.broker import Broker, Outcome
from clawq.broker.config import Config
from clawq.broker.errors import RedisOutOfMemory
from clawq.workers.dispatcher import Dispatcher
from clawq.workers.notify import Notifiers
from clawq.workers.rq_glue import rq_enqueuer

REPO = Path(__file__).resolve().parent.parent
POLICIES = ("noeviction", "allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru", "volatile-lfu",
            "volatile-random", "volatile-ttl")
BINARIES = redis_binaries()


def _cfg() -> Config:
    return Config.model_validate({"night_mode": None, "notify": {"log": False}})


@pytest.fixture(params=list(BINARIES), ids=list(BINARIES))
def tight(request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A private server of each binary with a small maxmemory (policy noeviction unless the test sets one)."""
    with RedisServer(BINARIES[request.param], ["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"],
                     name=f"mem-{request.param}") as srv:
        yield srv


@contextlib.contextmanager
def policy(client: redis.Redis, name: str) -> Iterator[None]:
    client.config_set("maxmemory-policy", name)
    try:
        yield
    finally:
        client.config_set("maxmemory-policy", "noeviction")


# -- the policy is checked ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", POLICIES)
def test_doctor_and_health_report_any_policy_but_noeviction(name: str, redis_url: str, r: redis.Redis,
                                                          namespace: str, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--redis-url", redis_url, "--namespace", namespace]
    assert run_cli(["add", "--board", "web", "--chain", "coding", "t", *base], capsys)[0] == 0
    with policy(r, name):
        code, out, _ = run_cli(["doctor", *base], capsys)
        hcode, hout, _ = run_cli(["health", *base], capsys)
        import json

        doc = json.loads(run_cli(["health", "--json", *base], capsys)[1])
    assert hcode == 0 and doc["redis"]["maxmemory_policy"] == name
    if name == "noeviction":
        assert code == 0 and "maxmemory-policy" not in out + hout and not doc["redis"]["evicts"]
    else:
        assert code == 1 and f"problem: Redis maxmemory-policy is {name}" in out, out
        assert f"WARNING Redis maxmemory-policy is {name}" in hout and doc["redis"]["evicts"]


def test_dispatch_worker_and_serve_warn_loudly_at_start(tmp_path: Path, namespace: str) -> None:
    binary = BINARIES.get("redis7")
    if binary is None:
        pytest.skip("needs the system redis-server")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAWQ_", "REDIS_", "RQ_"))}
    with RedisServer(binary, ["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"], name="lru") as srv:
        procs = {}
        try:
            for name, args in (("dispatch", ["dispatch"]), ("worker", ["worker", "--name", f"{namespace}-w"]),
                               ("serve", ["serve", "--port", str(free_port())])):
                out = (tmp_path / f"{name}.log").open("wb")
                procs[name] = (subprocess.Popen([sys.executable, "-m", "clawq.cli", *args, "--redis-url", srv.url,
                                                 "--namespace", namespace], cwd=REPO, env=env, stdout=out,
                                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                start_new_session=True), out)
            end = time.monotonic() + 20
            logs: dict[str, str] = {}
            while time.monotonic() < end:
                logs = {n: (tmp_path / f"{n}.log").read_text(errors="replace") for n in procs}
                if all("maxmemory-policy is allkeys-lru" in t for t in logs.values()):
                    break
                time.sleep(0.1)
            for name, text in logs.items():
                assert text.count("maxmemory-policy is allkeys-lru") == 1, (name, text)
                assert "WARNING" in text, (name, text)
            assert all(p.poll() is None for p, _ in procs.values()), logs
        finally:
            for p, out in procs.values():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
                out.close()


# -- an OOM refusal: one clear error, nothing half-written ----------------------------------------------------
def _fill(c: redis.Redis) -> None:
    """Fill the server past its maxmemory: every write that may grow memory is refused from now on."""
    i = 0
    with contextlib.suppress(redis.exceptions.OutOfMemoryError):
        while True:
            c.set(f"junk:{i}", b"x" * 20000)
            i += 1
    used = int(c.info("memory")["used_memory"])
    c.config_set("maxmemory", str(max(1024 * 1024, used - 512 * 1024)))


def _snapshot(c: redis.Redis, prefix: str) -> dict[bytes, Any]:
    return {k: (c.dump(k), c.pttl(k) > 0) for k in sorted(c.scan_iter(match=prefix + "*", count=1000))}


def test_an_oom_refusal_is_one_error_and_writes_nothing(tight: RedisServer, namespace: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    c = tight.client()
    b = Broker.from_url(tight.url, namespace)
    b.load_config(_cfg())
    for i in range(4):
        b.add(f"b{i}", f"t{i}", chain="coding", task_id=i + 1)
    running, other = b.claim(), b.claim()
    _fill(c)
    attempts: dict[str, Callable[[], Any]] = {
        "add": lambda: b.add("b9", "new", chain="coding"),
        "claim": b.claim,
        "heartbeat": lambda: b.heartbeat(running.task_id, running.run_id),
        "complete": lambda: b.complete(running.task_id, running.run_id, Outcome(summary="ok")),
        "fail": lambda: b.fail(other.task_id, other.run_id, "boom"),
        "cancel": lambda: b.cancel(2),
        "pause": lambda: b.pause("b3"),
        "cooldown": lambda: b.set_cooldown("codex", 30),
        "config": lambda: b.load_config(_cfg()),
    }
    refused = []
    for name, attempt in attempts.items():
        before = _snapshot(c, b.keys.prefix)
        try:
            attempt()
        except RedisOutOfMemory as err:
            refused.append(name)
            assert str(err).startswith("Redis is out of memory"), err
            assert _snapshot(c, b.keys.prefix) == before, f"{name} wrote something before it was refused"
    # a script whose first write may grow memory is refused (nothing written); one whose first write frees
    # memory (claim, complete…) is let through by Redis and finishes: never half of one
    assert {"add", "heartbeat"} <= set(refused), refused
    code, _, err = run_cli(["add", "--board", "web", "--chain", "coding", "t", "--redis-url", tight.url,
                              "--namespace", namespace], capsys)
    assert code == 1 and err.startswith("clawq: Redis is out of memory") and len(err.splitlines()) == 1, err
    c.config_set("maxmemory", "0")
    assert b.doctor()["ok"], b.doctor()
    b.close()
    c.close()


def test_the_dispatcher_keeps_running_through_oom(tight: RedisServer, namespace: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    c = tight.client()
    b = Broker.from_url(tight.url, namespace)
    cfg = _cfg().model_copy(update={"agent": _cfg().agent.model_copy(update={"queue": f"q-{namespace}"})})
    b.load_config(cfg)
    for i in range(3):
        b.add(f"b{i}", f"t{i}", chain="coding")
    _fill(c)
    rq = redis.Redis.from_url(tight.url)
    d = Dispatcher(b, rq_enqueuer(b, rq), notifiers=Notifiers([]))
    stop = threading.Event()
    thread = threading.Thread(target=d.run, args=(stop,), daemon=True)
    queue = Queue(f"q-{namespace}", connection=rq)
    with caplog.at_level(logging.INFO, logger="clawq.dispatch"):
        thread.start()
        time.sleep(2.0)
        assert thread.is_alive() and queue.count == 0
        assert c.zcard(b.keys.running) == 0  # every claim given back (a plain read: MULTI is refused under OOM)
        c.config_set("maxmemory", "0")
        end = time.monotonic() + 5
        while queue.count < 3 and time.monotonic() < end:
            time.sleep(0.05)
        stop.set()
        thread.join(5)
    assert queue.count == 3
    said = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(said) == 1, said
    b.close()
    rq.close()
    c.close()


# -- a partly evicted namespace ------------------------------------------------------------------------------
def test_a_partly_evicted_namespace_is_reported_never_a_crash(tight: RedisServer, namespace: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    c = tight.client()
    c.config_set("maxmemory", "2mb")
    c.config_set("maxmemory-policy", "allkeys-lru")
    b = Broker.from_url(tight.url, namespace)
    added = 0
    for i in range(2000):
        try:
            b.add(f"b{i % 40}", f"task {i}", chain="coding", prompt="p" * 2000)
            added += 1
        except Exception:  # the namespace is being evicted under us: keep pushing
            pass
    assert len(list(c.scan_iter(match=b.keys.prefix + "task:*"))) < added  # Redis evicted some
    base = ["--redis-url", tight.url, "--namespace", namespace]
    code, out, err = run_cli(["doctor", *base], capsys)
    assert code == 1 and "problem:" in out and "internal error" not in err, (out, err)
    assert "Redis refused" not in out + err, (out, err)
    code, out, err = run_cli(["health", *base], capsys)
    assert code == 0 and "WARNING Redis maxmemory-policy is allkeys-lru" in out, (out, err)
    b.close()
    c.close()
