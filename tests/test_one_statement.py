"""One statement per rule: a long-lived Broker never acts on a stale config, the scripts carry no defaults of
their own, a release holds the agent gate in the same call, and a rate-limit text is parsed once."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from clawq.broker import (
    DEFAULT_CONFIG,
    Broker,
    ConfigMissing,
    Outcome,
    TaskStatus,
    UnknownChain,
    parse_config,
)
from clawq.broker import signals as signals_mod
from clawq.workers.agent_output import Failed, RateLimited
from clawq.workers.report import RELEASE_CAUSES, report


def _config(**changes: Any) -> Any:
    doc = DEFAULT_CONFIG.model_dump(mode="json")
    doc["night_mode"] = None
    for path, value in changes.items():
        section, _, field = path.partition("__")
        if field:
            doc[section][field] = value
        else:
            doc[section] = value
    return parse_config(doc)


@pytest.fixture
def other(redis_url: str, broker: Broker) -> Iterator[Broker]:
    """A second Broker on the same namespace: another process (``clawq config load``)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    b = Broker(client, broker.namespace, clock=broker.clock)
    try:
        yield b
    finally:
        client.close()


@pytest.fixture
def served(broker: Broker) -> Broker:
    """The long-lived Broker (as behind ``clawq serve``): it has read and cached the config."""
    broker.load_config(_config())
    broker.add("warm", "t", chain="coding")
    assert "fresh" not in broker.config().chains
    return broker


def _new_model_config(global_cap: int = 6) -> Any:
    models = {**DEFAULT_CONFIG.models, "newm": "newp"}
    chains = {**DEFAULT_CONFIG.chains, "fresh": ["newm"]}
    return _config(models=models, chains=chains, queue__global_max_concurrent=global_cap,
                   limits__model_max_inflight={**DEFAULT_CONFIG.limits.model_max_inflight, "codex": 1, "newm": 2})


def test_a_long_lived_broker_adds_to_a_chain_loaded_elsewhere(served: Broker, other: Broker) -> None:
    other.load_config(_new_model_config())
    tid = served.add("web", "new", chain="fresh")
    assert served.get_task(tid).chain == "fresh"
    served.set_cooldown("newm", 60)
    assert "newm" in served.cooldowns()


def test_a_long_lived_broker_refuses_a_chain_removed_elsewhere_and_writes_nothing(served: Broker,
                                                                                  other: Broker) -> None:
    chains = {k: v for k, v in DEFAULT_CONFIG.chains.items() if k != "planning"}
    other.load_config(_config(chains=chains))
    before = served.list_tasks()
    with pytest.raises(UnknownChain, match="unknown chain 'planning'"):
        served.add("web", "t", chain="planning")
    assert served.list_tasks() == before


def test_health_and_why_waiting_follow_a_config_loaded_elsewhere(served: Broker, other: Broker) -> None:
    served.add("api", "two", chain="coding")
    served.claim()  # "warm" runs: one in progress
    assert served.health()["boards"]["api"]["why_waiting"] == "ready"
    other.load_config(_new_model_config(global_cap=1))
    h = served.health()
    assert h["global"]["max_concurrent"] == 1
    assert h["models"]["codex"]["cap"] == 1
    assert h["models"]["newm"]["provider"] == "newp"
    assert h["boards"]["api"]["why_waiting"] == "global_cap"  # what a claim would say now
    assert served.explain_boards(["api"]) == ["global_cap"]


def test_a_stale_version_is_refused_by_the_scripts_that_compute_from_the_config(served: Broker,
                                                                                  other: Broker) -> None:
    """add_task and explain_boards check the version their arguments came from, as claim_task does."""
    other.load_config(_new_model_config(global_cap=1))
    old = served.config_version
    assert old != "" and other.config() and other.config_version != old
    reply = served._scripts.call("explain_boards", [served.keys.prefix, "", 6, old, "warm"])
    assert reply == [7]


@pytest.mark.parametrize("name", ["backoff_ms", "max_attempts", "breaker_failures", "max_runs"])
def test_a_missing_setting_fails_loudly_and_changes_nothing(broker: Broker, name: str) -> None:
    broker.load_config(_config())
    tid = broker.add("web", "t", chain="coding")
    claim = broker.claim()
    broker.client.hdel(broker.keys.cfg_settings, name)
    before = broker.get_task(tid)
    with pytest.raises(ConfigMissing, match=name):
        broker.fail(tid, claim.run_id, "boom")
    assert broker.get_task(tid) == before


def test_a_missing_lease_setting_fails_the_claim_loudly(broker: Broker) -> None:
    broker.load_config(_config())
    broker.add("web", "t", chain="coding")
    broker.config()
    doc = json.loads(broker.client.get(broker.keys.cfg_claim))  # what a claim reads of the config
    del doc["lease_ms"]
    broker.client.set(broker.keys.cfg_claim, json.dumps(doc))
    with pytest.raises(ConfigMissing, match="lease_ms"):
        broker.claim()
    assert broker.get_task(1).status is TaskStatus.UP_NEXT


@pytest.mark.parametrize("damage", ["missing", "unreadable", "not a config"])
def test_a_lost_claim_config_fails_claims_loudly_and_changes_nothing(broker: Broker, damage: str) -> None:
    """cfg:claim missing, unreadable or not a claim's config: a claim fails with the reason, before any write;
    a run's end reads the cfg:* hashes and goes on; loading a config writes cfg:claim again."""
    broker.load_config(_config())
    broker.add("web", "t", chain="coding")
    tid = broker.add("api", "t", chain="coding")
    claim = broker.claim()
    if damage == "missing":
        broker.client.delete(broker.keys.cfg_claim)
    else:
        broker.client.set(broker.keys.cfg_claim, "{not json" if damage == "unreadable" else '{"version": 3}')
    before = [broker.get_task(1), broker.get_task(tid)]
    word = "missing" if damage == "missing" else "unreadable"
    with pytest.raises(ConfigMissing, match=f"cfg:claim is {word}: load a config"):
        broker.claim()
    assert [broker.get_task(1), broker.get_task(tid)] == before
    broker.complete(claim.task_id, claim.run_id, Outcome(needs_follow_up=False, summary="s"))
    with pytest.raises(ConfigMissing, match=f"cfg:claim is {word}"):
        broker.claim()
    assert broker.get_task(tid).status is TaskStatus.UP_NEXT
    broker.load_config(_config())  # loading a config writes it again
    assert broker.claim().task_id == tid


def test_the_claim_is_fenced_by_the_version_inside_its_config(served: Broker) -> None:
    """The claim compares the caller's version with cfg:claim's, the one its rules come from."""
    version = served.config_version
    args = [served.keys.prefix, "", "r1", 6, 0, version, ""]
    doc = json.loads(served.client.get(served.keys.cfg_claim))
    doc["version"] = int(version) + 1
    served.client.set(served.keys.cfg_claim, json.dumps(doc))
    assert served._scripts.call("claim_task", args) == [7]
    doc["version"] = int(version)
    served.client.set(served.keys.cfg_claim, json.dumps(doc))
    assert served._scripts.call("claim_task", args)[:2] == [0, 1]


def test_the_claim_blocks_with_the_caps_of_its_config(served: Broker) -> None:
    """A claim takes a model's cap from cfg:claim (the hash is not read): a first run at cap 1 there blocks
    the model, where the hash's cap 2 would not, and the next claim falls back along the chain."""
    doc = json.loads(served.client.get(served.keys.cfg_claim))
    first, second = served.config().chains["coding"][:2]
    assert served.client.hget(served.keys.cfg_model_cap, first) == "2"
    doc["model_cap"][first] = 1
    served.client.set(served.keys.cfg_claim, json.dumps(doc))
    served.add("api", "t", chain="coding")
    assert served.claim().model == first
    assert served.client.hget(served.keys.blocked, f"m:{first}") == "model_quota_reached"
    assert served.claim().model == second


@pytest.mark.parametrize("cause", sorted(RELEASE_CAUSES))
def test_a_runtime_failure_releases_and_holds_claims_in_one_call(broker: Broker, cause: str) -> None:
    broker.load_config(_config())
    tid = broker.add("web", "t", chain="coding")
    claim = broker.claim()
    assert report(broker, tid, claim.run_id, Failed(error="not paired", cause=cause)) == "released"
    assert broker.get_task(tid).attempts == 0
    assert broker.agent_gate() == f"{cause}: not paired"
    ttl_ms = broker.client.pttl(broker.keys.agent_gate)
    assert 0 < ttl_ms <= RELEASE_CAUSES[cause] * 1000


def test_a_plain_release_holds_nothing(broker: Broker) -> None:
    tid = broker.add("web", "t", chain="coding")
    broker.release(tid, broker.claim().run_id)
    assert broker.agent_gate() is None


def test_a_classified_rate_limit_is_not_parsed_again(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    tid = broker.add("web", "t", chain="coding")
    claim = broker.claim()
    calls: list[str] = []
    real = signals_mod.parse_signal

    def counting(text: str, now: float, *args: Any) -> Any:
        calls.append(text)
        return real(text, now, *args)

    monkeypatch.setattr("clawq.broker.broker.parse_signal", counting)
    until = broker.now() + 120
    report(broker, tid, claim.run_id, RateLimited(message="429: try again in 2 minutes", reset_at=until))
    assert calls == []
    assert broker.cooldowns()[claim.model]["until"] == pytest.approx(until, abs=0.01)


def test_an_unclassified_rate_limit_text_is_parsed_by_the_broker(broker: Broker) -> None:
    tid = broker.add("web", "t", chain="coding")
    claim = broker.claim()
    broker.rate_limited(tid, claim.run_id, message="Rate limit reached. Please try again in 90s.")
    assert broker.cooldowns()[claim.model]["remaining_s"] == pytest.approx(90, abs=1)


def test_with_no_reset_the_cooldown_is_the_current_configs(served: Broker, other: Broker) -> None:
    """The fallback cooldown is read by the script from the config in Redis, not from the cached one."""
    other.load_config(_config(watchdog__rate_limit_cooldown_minutes=7))
    served.add("api", "t", chain="coding")
    claim = served.claim()
    served.rate_limited(claim.task_id, claim.run_id, message="slow down", quota=False)
    assert served.cooldowns()[claim.model]["remaining_s"] == pytest.approx(7 * 60, abs=1)


def test_connecting_to_a_namespace_loaded_before_the_claim_config_writes_it(broker: Broker,
                                                                            redis_url: str) -> None:
    """A namespace whose config was loaded by a clawq without cfg:claim gets it on connect, from its
    hashes (not from the defaults), so its claims go on; a namespace with no config gets none."""
    broker.load_config(_config(watchdog__stale_in_progress_minutes=7, watchdog__heartbeat_grace_minutes=1))
    broker.add("web", "t", chain="coding")
    doc = broker.client.get(broker.keys.cfg_claim)
    broker.client.delete(broker.keys.cfg_claim)
    fresh = Broker.from_url(redis_url, broker.namespace, clock=broker.clock)
    try:
        assert json.loads(fresh.client.get(fresh.keys.cfg_claim)) == json.loads(doc)
        assert json.loads(doc)["lease_ms"] == 8 * 60_000
        assert fresh.claim().task_id == 1
        empty = Broker.from_url(redis_url, "never-loaded", clock=broker.clock)
        assert not empty.client.exists(empty.keys.cfg_claim, empty.keys.cfg_settings)
        empty.close()
    finally:
        fresh.close()
