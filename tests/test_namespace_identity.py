"""A namespace's identity: written once, checked on reads a process makes anyway, so a wipe is noticed.

Fast, in-process: FLUSHALL stands in for a restart without persistence (the process tests in
test_redis_faults.py restart a real server).
"""

from __future__ import annotations

import pytest
import redis

from clawq.broker import DEFAULT_CONFIG, Broker
from clawq.broker.config import Config
from clawq.broker.errors import NamespaceWiped


def _cfg() -> Config:
    return Config.model_validate({"night_mode": None, "agent": {"runner": "command", "command": ["my-agent"]}})


def _fresh(redis_url: str, namespace: str) -> Broker:
    return Broker(redis.Redis.from_url(redis_url, decode_responses=True), namespace)


def test_the_identity_is_written_once_and_shared(broker: Broker, redis_url: str, namespace: str) -> None:
    broker.load_config(_cfg())
    ident = broker.identity
    assert ident and len(ident) == 16
    other = _fresh(redis_url, namespace)
    other.connect()
    assert other.identity == ident
    info = other.namespace_info()
    assert info.id == ident and info.created_at and info.recreated_at is None
    other.close()


def test_a_namespace_written_before_identities_gets_one_on_connect(r: redis.Redis, redis_url: str,
                                                                    namespace: str) -> None:
    b = _fresh(redis_url, namespace)
    b.load_config(_cfg())
    r.hdel(b.keys.meta, "id", "created_at")
    late = _fresh(redis_url, namespace)
    late.connect()
    assert late.identity and r.hget(b.keys.meta, "id") == late.identity.encode()
    b.close()
    late.close()


def test_a_wipe_is_noticed_on_the_dispatchers_read_once_and_restored_without_defaults(
        broker: Broker, r: redis.Redis, redis_url: str, namespace: str) -> None:
    broker.load_config(_cfg())
    broker.add("web", "t", chain="coding")
    broker.deadlines()  # the dispatcher's read per wake: nothing happened
    before = broker.identity
    seen: list[NamespaceWiped] = []
    broker.on_wipe = seen.append
    r.flushall()
    with pytest.raises(NamespaceWiped) as info:
        broker.deadlines()
    assert info.value.previous == before and info.value.current is None
    assert info.value.last_config == _cfg()
    assert len(seen) == 1
    # a fresh command seeds the defaults meanwhile (it cannot know): the restore replaces them
    cli = _fresh(redis_url, namespace)
    cli.add("web", "after", chain="coding")
    assert cli.config() == DEFAULT_CONFIG
    done = broker.recreate(info.value.previous, info.value.last_config, "dispatch@test:1")
    assert "restored" in done
    assert broker.identity == cli.identity  # the id the command wrote first is kept
    broker.deadlines()  # no second notice
    assert len(seen) == 1
    cli.forget_config()
    assert cli.config() == _cfg()
    meta = broker.namespace_info()
    assert meta.recreated_at and meta.previous_id == before and meta.noticed_by == "dispatch@test:1"
    assert broker.health()["namespace"]["recreated"]["previous_id"] == before
    report = broker.doctor()
    assert report["ok"] and report["notes"] and "re-created" in report["notes"][0]
    cli.close()


def test_a_config_reload_notices_a_wipe_and_a_claim_does_not_run_on_defaults(
        broker: Broker, r: redis.Redis) -> None:
    broker.load_config(_cfg())
    broker.add("web", "t", chain="coding")
    r.flushall()
    with pytest.raises(NamespaceWiped):
        broker.claim()
    assert not r.keys("*task*")


def test_a_restore_keeps_a_config_loaded_since_the_wipe(broker: Broker, r: redis.Redis, redis_url: str,
                                                          namespace: str) -> None:
    broker.load_config(_cfg())
    r.flushall()
    with pytest.raises(NamespaceWiped) as info:
        broker.deadlines()
    newer = Config.model_validate({"night_mode": None, "agent": {"runner": "command", "command": ["newer"]}})
    _fresh(redis_url, namespace).load_config(newer)
    assert "kept" in broker.recreate(info.value.previous, info.value.last_config, "t")
    broker.forget_config()
    assert broker.config() == newer


def test_a_dispatcher_whose_restore_fails_half_way_tries_it_again(
        broker: Broker, r: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import threading
    import time

    from clawq.broker.errors import RedisUnavailable
    from clawq.workers.dispatcher import Dispatcher
    from clawq.workers.notify import Notifiers

    broker.load_config(_cfg())
    broker.add("web", "t", chain="coding")
    d = Dispatcher(broker, lambda claim: None, notifiers=Notifiers([]))
    real, calls = broker.recreate, []

    def flaky(*args: object) -> str:
        calls.append(args)
        if len(calls) == 1:
            raise RedisUnavailable("cannot reach Redis: gone again during the restore")
        return real(*args)  # type: ignore[arg-type]

    broker.recreate = flaky  # type: ignore[method-assign]
    d.step()
    r.flushall()
    stop = threading.Event()
    thread = threading.Thread(target=d.run, args=(stop,), daemon=True)
    with caplog.at_level(logging.ERROR, logger="clawq.dispatch"):
        thread.start()
        end = time.monotonic() + 10
        while len(calls) < 2 and time.monotonic() < end:
            time.sleep(0.05)
        time.sleep(0.3)
        stop.set()
        thread.join(5)
    assert len(calls) == 2
    broker.forget_config()
    assert broker.config() == _cfg() and broker.namespace_info().recreated_at
    assert [m for m in caplog.messages if m.startswith("NAMESPACE WIPED")].__len__() == 1


def test_a_restore_refused_by_tasks_added_since_says_so_and_keeps_running(
        broker: Broker, r: redis.Redis, redis_url: str, namespace: str) -> None:
    narrow = Config.model_validate({"night_mode": None, "chains": {"only": ["codex"]},
                                    "agent": {"runner": "command", "command": ["my-agent"]}})
    broker.load_config(narrow)
    r.flushall()
    with pytest.raises(NamespaceWiped) as info:
        broker.deadlines()
    _fresh(redis_url, namespace).add("web", "uses a default chain", chain="coding")  # seeds the defaults
    done = broker.recreate(info.value.previous, info.value.last_config, "t")
    assert done.startswith("could NOT restore") and "clawq config load" in done
    assert broker.namespace_info().recreated_at


def test_a_dispatcher_whose_script_finds_the_config_gone_checks_for_a_wipe_and_keeps_running(
        broker: Broker, r: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    """A wipe that lands between the dispatcher's read and its claim: the claim script finds no setting
    (ConfigMissing). The dispatcher must not exit: it checks the namespace's identity, and restores the
    config once it sees the wipe."""
    import logging
    import threading
    import time

    from clawq.workers.dispatcher import Dispatcher
    from clawq.workers.notify import Notifiers

    broker.load_config(_cfg())
    d = Dispatcher(broker, lambda claim: None, notifiers=Notifiers([]))
    d.step()
    broker.add("web", "t", chain="coding")
    r.delete(broker.keys.config, *r.scan_iter(match=broker.keys.prefix + "cfg:*"))  # the config is gone, the
    # identity not yet: a script sees it first (as when a wipe lands between the dispatcher's read and its claim)
    stop = threading.Event()
    thread = threading.Thread(target=d.run, args=(stop,), daemon=True)
    with caplog.at_level(logging.ERROR, logger="clawq.dispatch"):
        thread.start()
        end = time.monotonic() + 10
        while not any("no config" in m for m in caplog.messages) and time.monotonic() < end:
            time.sleep(0.05)
        assert thread.is_alive(), "the dispatcher exited on a missing config"
        r.hset(broker.keys.meta, "id", "another-namespace-id")  # now the wipe shows
        while not r.exists(broker.keys.cfg_settings) and time.monotonic() < end:
            time.sleep(0.05)
        alive = thread.is_alive()
        stop.set()
        thread.join(5)
    assert alive and r.exists(broker.keys.cfg_settings), caplog.messages
    assert any(m.startswith("NAMESPACE WIPED") for m in caplog.messages)


def test_an_evicted_meta_hash_is_not_a_wipe(broker: Broker, r: redis.Redis, namespace: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """Under an allkeys-* policy Redis may evict ``meta`` alone (CI saw `clawq health` call a partly evicted
    namespace "wiped, every task gone"). The config is still there, so the namespace is: the id goes back."""
    broker.load_config(_cfg())
    broker.add("web", "t", chain="coding")
    broker.deadlines()
    before = broker.identity
    seen: list[NamespaceWiped] = []
    broker.on_wipe = seen.append
    r.delete(broker.keys.meta)
    broker.deadlines()  # no NamespaceWiped
    assert seen == [] and broker.identity == before
    assert r.hget(broker.keys.meta, "id") == before.encode()  # type: ignore[union-attr]
    assert "lost its meta hash" in caplog.text
    assert broker.health()["namespace"]["recreated"] is None
    assert [t.title for t in broker.list_tasks(board="web")] == ["t"]
    # the config gone as well: that is a wipe
    r.delete(broker.keys.meta, broker.keys.config, broker.keys.cfg_settings, broker.keys.cfg_claim,
             broker.keys.cfg_chains, broker.keys.cfg_model_provider)
    with pytest.raises(NamespaceWiped):
        broker.deadlines()
    assert len(seen) == 1
