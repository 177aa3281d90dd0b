"""One test per documented return code of every Lua script (lua/*.lua headers, "Returns").

Each script is driven through the Broker API and, where the reply shape matters, through the raw script
wrapper (``broker._scripts.call``) so the exact reply list is asserted too. Real Redis (7 and 6.2).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import redis
from conftest import FakeClock as Clock
from helpers import counts, daytime_config, ms, rc

from clawq.broker import (
    Broker,
    Config,
    ConfigInUse,
    DuplicateTask,
    InputError,
    InvalidState,
    NothingToClaim,
    Outcome,
    RunFenced,
    TaskNotFound,
    TaskStatus,
    UnknownChain,
)
from clawq.broker.config import DEFAULT_CONFIG
from clawq.broker.errors import Status

LEASE_MS = 23 * 60_000  # stale_in_progress 20 min + grace 3 min
HEARTBEAT_MS = 20 * 60_000
BACKOFF_MS = 5 * 60_000
DONE = Outcome(summary="all done")
FOLLOW = Outcome(needs_follow_up=True, next_prompt="do the rest", summary="half done")


# -- helpers ---------------------------------------------------------------------------------------


def raw(
    broker: Broker, name: str, *args: Any, task_id: int | None = None, model: str | None = None
) -> list[Any]:
    """The raw reply of script ``name`` called with the namespace prefix and ``args``."""
    return broker._scripts.call(name, [broker.keys.prefix, *args], task_id=task_id, model=model)


def config(**changes: Any) -> Config:
    """The default config without night mode, with sections merged (maps inside them replaced)."""
    data: dict[str, Any] = DEFAULT_CONFIG.model_dump(mode="json")
    data["night_mode"] = None
    for section, value in changes.items():
        if isinstance(value, dict) and section not in ("models", "chains"):
            data[section] = {**data[section], **value}
        else:
            data[section] = value
    return Config.model_validate(data)


def read_key(c: redis.Redis, key: str) -> Any:
    kind = c.type(key)
    if kind == "string":
        return c.get(key)
    if kind == "hash":
        return c.hgetall(key)
    if kind == "list":
        return c.lrange(key, 0, -1)
    if kind == "set":
        return sorted(c.smembers(key))
    if kind == "zset":
        return c.zrange(key, 0, -1, withscores=True)
    if kind == "stream":
        return c.xrange(key)
    raise AssertionError(f"unexpected type {kind!r} of {key!r}")


def snapshot(broker: Broker) -> dict[str, Any]:
    """Every key of the namespace with its type-aware value."""
    c = rc(broker)
    keys = sorted(c.scan_iter(match=broker.keys.prefix + "*", count=1000))
    return {k: (c.type(k), read_key(c, k)) for k in keys}


def task_field(broker: Broker, task_id: int, field: str) -> str | None:
    value: str | None = rc(broker).hget(broker.keys.task(task_id), field)
    return value


def digest(outcome: Outcome) -> str:
    return outcome.digest()


def complete_args(run_id: str, now: float, task_id: int, outcome: Outcome) -> list[Any]:
    return [ms(now), task_id, run_id, int(outcome.needs_follow_up), outcome.next_prompt or "",
            outcome.summary, "{}", outcome.digest()]


# -- add_task ----------------------------------------------------------------------------------------


def test_add_task_ok(broker: Broker, clock: Clock) -> None:
    assert broker.add("web", "first", chain="coding", prompt="p1") == 1
    reply = raw(broker, "add_task", ms(clock()), "", "web", "second", "p2", "", "glm")
    assert reply == [Status.OK, 2, "up_next"]
    c, k = rc(broker), broker.keys
    assert c.zrange(k.queue("web"), 0, -1) == ["1", "2"]
    assert c.smembers(k.boards) == {"web"}
    # only what is not known otherwise (Keys.task): no id, no chain / model_pin, no zero counters, one time
    now = str(ms(clock()))
    assert c.hgetall(k.task(1)) == {"board": "web", "title": "first", "prompt": "p1", "ck": "c:coding",
                                    "status": "up_next", "at": now}
    assert c.hgetall(k.task(2)) == {"board": "web", "title": "second", "prompt": "p2", "ck": "m:glm",
                                    "status": "up_next", "at": now}
    assert c.hgetall(k.refs) == {"c:coding": "1", "m:glm": "1"}
    assert c.get(k.task_seq) == "2"
    first, second = broker.get_task(1), broker.get_task(2)
    assert (first.chain, first.model, first.status) == ("coding", None, TaskStatus.UP_NEXT)
    assert first.prompt == "p1"
    assert (second.chain, second.model, second.title) == (None, "glm", "second")
    assert (first.run_count, first.attempts, first.created_at) == (0, 0, clock())
    assert [e["type"] for e in broker.events()][-2:] == ["added", "added"]


def test_the_fields_add_task_leaves_out_read_as_before(broker: Broker, clock: Clock) -> None:
    """A task's document is the same from the few fields add_task writes as from the full hash it used to write."""
    tid = broker.add("web", "t", model="glm")
    c, k, at = rc(broker), broker.keys, ms(clock())
    assert c.hgetall(k.task(tid)) == {"board": "web", "title": "t", "ck": "m:glm", "status": "up_next", "at": str(at)}
    expected = {
        "task_id": tid, "board": "web", "title": "t", "prompt": "", "chain": None, "model": "glm",
        "status": "up_next", "run_count": 0, "attempts": 0, "run_id": None, "running_model": None,
        "running_provider": None, "lease_deadline": None, "backoff_until": None, "last_error": None,
        "last_error_reason": None, "created_at": at / 1000, "updated_at": at / 1000, "context": [], "runs": [],
        "not_before": None, "night_only": False, "due_at": None, "schedule": None,
    }
    assert broker.get_task(tid).model_dump(mode="json") == expected
    assert [t.model_dump(mode="json") for t in broker.list_tasks()] == [expected]
    c.hdel(k.task(tid), "at")  # the layout before: every field, the time as created_at
    c.hset(k.task(tid), mapping={"id": tid, "prompt": "", "chain": "", "model_pin": "glm", "run_count": 0,
                                 "attempts": 0, "backoff_until": 0, "created_at": at, "updated_at": at,
                                 "queued_at": at})
    assert broker.get_task(tid).model_dump(mode="json") == expected
    assert [t.model_dump(mode="json") for t in broker.list_tasks()] == [expected]


@pytest.mark.parametrize("task_id", [1, 2**40, 10**14 - 1])
def test_add_task_duplicate(broker: Broker, clock: Clock, task_id: int) -> None:
    assert broker.add("web", "original", chain="coding", task_id=task_id) == task_id
    before = snapshot(broker)
    with pytest.raises(DuplicateTask) as err:
        broker.add("other", "copy", chain="bulk", task_id=task_id)
    assert err.value.task_id == task_id
    assert raw(broker, "add_task", ms(clock()), task_id, "web", "copy", "", "coding", "") == [
        Status.DUPLICATE, task_id
    ]
    assert snapshot(broker) == before
    assert broker.get_task(task_id).title == "original"


@pytest.mark.parametrize("task_id", [10**14, 2**53 - 1])
def test_add_task_duplicate_raw_past_the_api_bound(broker: Broker, clock: Clock, task_id: int) -> None:
    """The script itself recognises large ids (no %.14g key text) even where the API refuses them."""
    broker.add("web", "seed", chain="coding")
    assert raw(broker, "add_task", ms(clock()), task_id, "web", "original", "", "coding", "") == [
        Status.OK, task_id, "up_next"
    ]
    before = snapshot(broker)
    assert raw(broker, "add_task", ms(clock()), task_id, "web", "copy", "", "coding", "") == [
        Status.DUPLICATE, task_id
    ]
    assert snapshot(broker) == before


def test_add_task_bad_state_when_no_auto_id_is_left(broker: Broker, clock: Clock) -> None:
    assert broker.add("web", "top", chain="coding", task_id=10**14 - 1) == 10**14 - 1
    before = snapshot(broker)
    reply = raw(broker, "add_task", ms(clock()), "", "web", "auto", "", "coding", "")
    assert reply == [Status.BAD_STATE, "task ids are exhausted (they stay below 10**14)"]
    with pytest.raises(InputError, match="exhausted"):
        broker.add("web", "auto", chain="coding")
    assert snapshot(broker) == before


def test_add_task_unknown_chain(broker: Broker, clock: Clock) -> None:
    before = snapshot(broker)
    with pytest.raises(UnknownChain, match="unknown chain 'nope'"):
        broker.add("web", "t", chain="nope")
    reply = raw(broker, "add_task", ms(clock()), "", "web", "t", "", "nope", "")
    assert reply == [Status.UNKNOWN_CHAIN, "unknown chain 'nope'"]
    assert snapshot(broker) == before


def test_add_task_unknown_model(broker: Broker, clock: Clock) -> None:
    before = snapshot(broker)
    with pytest.raises(UnknownChain, match="unknown model 'gpt9'"):
        broker.add("web", "t", model="gpt9")
    reply = raw(broker, "add_task", ms(clock()), 7, "web", "t", "", "", "gpt9")
    assert reply == [Status.UNKNOWN_CHAIN, "unknown model 'gpt9'"]
    assert snapshot(broker) == before


# -- claim_task --------------------------------------------------------------------------------------


def test_claim_task_ok(broker: Broker, clock: Clock) -> None:
    broker.load_config(daytime_config(clock()))  # a day run (night False), whatever the hour
    broker.add("web", "t", chain="coding")
    claim = broker.claim()
    assert (claim.task_id, claim.board, claim.model, claim.provider) == (1, "web", "codex", "openai")
    assert (claim.run_count, claim.attempt) == (1, 1)
    assert claim.lease_deadline == (ms(clock()) + LEASE_MS) / 1000
    assert str(uuid.UUID(claim.run_id)) == claim.run_id
    c, k = rc(broker), broker.keys
    assert c.zrange(k.running, 0, -1, withscores=True) == [("1", ms(clock()) + LEASE_MS)]
    assert c.get(k.lease(1)) == claim.run_id
    assert HEARTBEAT_MS < c.pttl(k.lease(1)) <= LEASE_MS
    assert counts(c, k.inflight_model) == {"codex": "1"}
    assert counts(c, k.inflight_provider) == {"openai": "1"}
    assert c.hget(k.board("web"), "running") == "1"
    assert c.zcard(k.queue("web")) == 0
    task = broker.get_task(1)
    assert (task.status, task.run_id, task.running_model) == (TaskStatus.IN_PROGRESS, claim.run_id, "codex")
    assert task.runs == [{"run_id": claim.run_id, "board": "web", "model": "codex", "provider": "openai",
                          "run_count": 1, "attempt": 1, "claimed_at": clock(), "night": False}]
    assert c.get(k.stats_claims) == "1"


def test_claim_task_ok_raw_reply(broker: Broker, clock: Clock) -> None:
    broker.add("web", "t", model="glm")
    run_id = str(uuid.uuid4())
    version = rc(broker).hget(broker.keys.cfg_settings, "version")
    reply = raw(broker, "claim_task", ms(clock()), run_id, 6, 1, version)
    assert reply == [Status.OK, 1, 1, "web", "glm", "zai", run_id, 1, 1, ms(clock()) + LEASE_MS]
    assert broker.get_task(1).runs[0]["night"] is True


def test_claim_task_ok_batch_raw_reply(broker: Broker, clock: Clock) -> None:
    """One run id per claim; the batch stops where the rules do, with the skip reasons of who is left."""
    broker.add("web", "t", model="glm")
    broker.add("web", "u", model="glm")
    broker.add("api", "v", model="codex")
    ids = [str(uuid.uuid4()) for _ in range(3)]
    version = rc(broker).hget(broker.keys.cfg_settings, "version")
    reply = raw(broker, "claim_task", ms(clock()), ids[0], 6, 0, version, "", *ids[1:])
    deadline = ms(clock()) + LEASE_MS
    assert reply == [Status.OK, 2, 1, "web", "glm", "zai", ids[0], 1, 1, deadline,
                     3, "api", "codex", "openai", ids[1], 1, 1, deadline, "board_busy", 1]
    assert {int(x) for x in rc(broker).zrange(broker.keys.running, 0, -1)} == {1, 3}
    assert rc(broker).hget(broker.keys.stats_skips, "board_busy") == "1"


def test_claim_task_nothing_when_empty(broker: Broker, clock: Clock) -> None:
    with pytest.raises(NothingToClaim) as err:
        broker.claim()
    assert err.value.skip_reasons == {}
    version = rc(broker).hget(broker.keys.cfg_settings, "version")
    assert raw(broker, "claim_task", ms(clock()), str(uuid.uuid4()), 6, 0, version) == [Status.NOTHING]


def nothing(broker: Broker) -> dict[str, int]:
    with pytest.raises(NothingToClaim) as err:
        broker.claim()
    return err.value.skip_reasons


def test_claim_task_nothing_global_cap(broker: Broker, clock: Clock) -> None:
    broker.load_config(config(queue={"global_max_concurrent": 1}))
    for board in ("a", "b", "c"):
        broker.add(board, "t", chain="bulk")
    assert broker.claim().board == "a"
    assert nothing(broker) == {"global_cap": 2}
    # The cap is the caller's argument: a raw claim with cap 0 refuses even the first task.
    version = rc(broker).hget(broker.keys.cfg_settings, "version")
    assert raw(broker, "claim_task", ms(clock()), str(uuid.uuid4()), 0, 0, version) == [
        Status.NOTHING, "global_cap", 2
    ]
    assert rc(broker).hgetall(broker.keys.stats_skips) == {"global_cap": "4"}


def test_claim_task_nothing_board_busy(broker: Broker) -> None:
    broker.add("web", "one", chain="coding")
    broker.add("web", "two", chain="coding")
    assert broker.claim().task_id == 1
    assert nothing(broker) == {"board_busy": 1}
    assert rc(broker).hgetall(broker.keys.stats_skips) == {"board_busy": "1"}


def test_claim_task_nothing_board_paused(broker: Broker) -> None:
    broker.add("web", "one", chain="coding")
    broker.pause("web")
    assert nothing(broker) == {"board_paused": 1}


def test_claim_task_nothing_backoff(broker: Broker) -> None:
    broker.add("web", "one", chain="coding")
    claim = broker.claim()
    broker.fail(1, claim.run_id, "it broke")
    assert nothing(broker) == {"backoff": 1}


def test_claim_task_nothing_model_rate_limited(broker: Broker) -> None:
    broker.add("web", "one", model="opus")
    broker.set_cooldown("opus", 60)
    assert nothing(broker) == {"model_rate_limited": 1}


def test_claim_task_nothing_model_quota_reached(broker: Broker) -> None:
    for board in ("a", "b", "c"):
        broker.add(board, "t", model="opus")
    assert [broker.claim().board for _ in range(2)] == ["a", "b"]  # opus cap 2
    assert nothing(broker) == {"model_quota_reached": 1}


def test_claim_task_nothing_provider_quota_reached(broker: Broker) -> None:
    for board, model in (("o1", "opus"), ("o2", "opus"), ("s1", "sonnet"), ("s2", "sonnet")):
        broker.add(board, "t", model=model)
    assert [(c.board, c.model) for c in (broker.claim(), broker.claim(), broker.claim())] == [
        ("o1", "opus"), ("o2", "opus"), ("s1", "sonnet")
    ]
    # sonnet has 1 of 2 in flight, but anthropic has 3 of 3.
    assert nothing(broker) == {"provider_quota_reached": 1}


def test_claim_task_config_stale_raw(broker: Broker, clock: Clock) -> None:
    broker.add("web", "t", chain="coding")
    before = snapshot(broker)
    assert raw(broker, "claim_task", ms(clock()), str(uuid.uuid4()), 6, 0, "999") == [Status.CONFIG_STALE]
    assert raw(broker, "claim_task", ms(clock()), str(uuid.uuid4()), 6, 0, "") == [Status.CONFIG_STALE]
    assert snapshot(broker) == before


def test_claim_task_config_stale_is_retried_with_the_new_config(
    broker: Broker, redis_url: str, namespace: str, clock: Clock
) -> None:
    for board in ("a", "b"):
        broker.add(board, "t", chain="bulk")
    assert broker.config().queue.global_max_concurrent == 6  # cached now
    other = Broker(redis.Redis.from_url(redis_url, decode_responses=True), namespace, clock=clock)
    try:
        other.load_config(config(queue={"global_max_concurrent": 1}))
    finally:
        other.close()
    assert broker.claim().board == "a"  # version changed: reloaded, then claimed
    assert broker.config().queue.global_max_concurrent == 1
    assert nothing(broker) == {"global_cap": 1}


# -- heartbeat ---------------------------------------------------------------------------------------


def test_heartbeat_ok(broker: Broker, clock: Clock) -> None:
    broker.add("web", "t", chain="coding")
    claim = broker.claim()
    clock.advance(60)
    assert broker.heartbeat(1, claim.run_id) == clock() + HEARTBEAT_MS / 1000
    c, k = rc(broker), broker.keys
    assert c.zscore(k.running, "1") == ms(clock()) + HEARTBEAT_MS
    assert task_field(broker, 1, "lease_deadline") == str(ms(clock()) + HEARTBEAT_MS)
    assert task_field(broker, 1, "last_heartbeat") == str(ms(clock()))
    clock.advance(30)
    reply = raw(broker, "heartbeat", ms(clock()), 1, claim.run_id, task_id=1)
    assert reply == [Status.OK, ms(clock()) + HEARTBEAT_MS]
    assert c.get(k.lease(1)) == claim.run_id


def test_heartbeat_not_found(broker: Broker, clock: Clock) -> None:
    broker.add("web", "t", chain="coding")
    broker.claim()
    before = snapshot(broker)
    run_id = str(uuid.uuid4())
    with pytest.raises(TaskNotFound) as err:
        broker.heartbeat(42, run_id)
    assert err.value.task_id == 42
    reply = raw(broker, "heartbeat", ms(clock()), 42, run_id, task_id=42)
    assert reply == [Status.NOT_FOUND, "task not found"]
    assert snapshot(broker) == before


def test_heartbeat_fenced(broker: Broker, clock: Clock) -> None:
    broker.add("web", "t", chain="coding")
    broker.claim()
    before = snapshot(broker)
    thief = str(uuid.uuid4())
    with pytest.raises(RunFenced, match="another run holds the lease"):
        broker.heartbeat(1, thief)
    assert raw(broker, "heartbeat", ms(clock()), 1, thief, task_id=1) == [
        Status.FENCED, "another run holds the lease"
    ]
    assert snapshot(broker) == before


# -- complete_run ------------------------------------------------------------------------------------


def test_complete_run_ok_follow_up(broker: Broker, clock: Clock) -> None:
    broker.add("web", "t", chain="coding")
    claim = broker.claim()
    done = broker.complete(1, claim.run_id, FOLLOW)
    assert (done.status, done.run_count, done.repeated, done.note) == (TaskStatus.UP_NEXT, 1, False, "")
    assert rc(broker).zrange(broker.keys.queue("web"), 0, -1) == ["1"]
    claim = broker.claim()
    assert (claim.task_id, claim.run_count) == (1, 2)
    reply = raw(broker, "complete_run", *complete_args(claim.run_id, clock(), 1, DONE), task_id=1)
    assert reply == [Status.OK, "in_review", 2, ""]
    assert broker.get_task(1).status is TaskStatus.IN_REVIEW


def test_complete_run_ok_done(broker: Broker, clock: Clock) -> None:
    broker.add("web", "t", chain="coding")
    claim = broker.claim()
    done = broker.complete(1, claim.run_id, DONE)
    assert (done.status, done.run_count, done.repeated) == (TaskStatus.IN_REVIEW, 1, False)
    c, k = rc(broker), broker.keys
    assert c.zrange(k.in_review, 0, -1, withscores=True) == [("1", ms(clock()))]
    assert c.zcard(k.running) == 0
    assert counts(c, k.inflight_model) == {}
    assert c.hgetall(k.refs) == {}
    assert c.hget(k.board("web"), "completed") == "1"
    assert not c.exists(k.stats_completed)  # counted per board now, never written
    assert c.zrange(k.done("web"), 0, -1) == [claim.run_id]


def test_complete_run_repeated(broker: Broker, clock: Clock) -> None:
    broker.add("web", "t", chain="coding")
    claim = broker.claim()
    broker.complete(1, claim.run_id, DONE)
    before = snapshot(broker)
    again = broker.complete(1, claim.run_id, DONE)
    assert (again.status, again.run_count, again.repeated, again.note) == (TaskStatus.IN_REVIEW, 1, True, "")
    reply = raw(broker, "complete_run", *complete_args(claim.run_id, clock(), 1, DONE), task_id=1)
    assert reply == [Status.REPEATED, "in_review", 1]
    assert snapshot(broker) == before


def test_complete_run_not_found(broker: Broker, clock: Clock) -> None:
    run_id = str(uuid.uuid4())
    with pytest.raises(TaskNotFound):
        broker.complete(5, run_id, DONE)
    reply = raw(broker, "complete_run", *complete_args(run_id, clock(), 5, DONE), task_id=5)
    assert reply == [Status.NOT_FOUND, "task not found"]


def test_complete_run_fenced(broker: Broker, clock: Clock) -> None:
    broker.add("web", "t", chain="coding")
    claim = broker.claim()
    thief = str(uuid.uuid4())
    before = snapshot(broker)
    with pytest.raises(RunFenced, match="another run holds the lease"):
        broker.complete(1, thief, DONE)
    assert snapshot(broker) == before
    broker.complete(1, claim.run_id, DONE)
    before = snapshot(broker)
    with pytest.raises(RunFenced, match="the run already ended"):
        broker.complete(1, claim.run_id, Outcome(summary="something else"))
    reply = raw(broker, "complete_run", *complete_args(thief, clock(), 1, DONE), task_id=1)
    assert reply == [Status.FENCED, "the task is in_review"]
    assert snapshot(broker) == before


# -- fail_run ----------------------------------------------------------------------------------------


def test_fail_run_ok_retry(broker: Broker, clock: Clock) -> None:
    broker.add("web", "t", chain="coding")
    claim = broker.claim()
    assert broker.fail(1, claim.run_id, "compiler crashed") == (TaskStatus.UP_NEXT, 1)
    task = broker.get_task(1)
    assert (task.attempts, task.last_error, task.last_error_reason) == (1, "compiler crashed", "failed")
    assert task.backoff_until == clock() + BACKOFF_MS / 1000
    assert rc(broker).zrange(broker.keys.idx_backoff, 0, -1, withscores=True) == [
        ("web", ms(clock()) + BACKOFF_MS)
    ]
    assert task.runs[-1]["outcome"] == "failed"
    assert json.loads(rc(broker).lindex(broker.keys.errors, 0))["task_id"] == 1


def test_fail_run_ok_failed_for_good(broker: Broker, clock: Clock) -> None:
    broker.add("web", "t", chain="coding")
    claim = broker.claim()
    reply = raw(broker, "fail_run", ms(clock()), 1, claim.run_id, "failed", "nope", 0, task_id=1)
    assert reply == [Status.OK, "failed", 1]
    assert rc(broker).zrange(broker.keys.failed, 0, -1) == ["1"]
    assert rc(broker).hgetall(broker.keys.refs) == {}


def test_fail_run_not_found(broker: Broker, clock: Clock) -> None:
    run_id = str(uuid.uuid4())
    with pytest.raises(TaskNotFound):
        broker.fail(3, run_id, "x")
    assert raw(broker, "fail_run", ms(clock()), 3, run_id, "failed", "x", 1, task_id=3) == [
        Status.NOT_FOUND, "task not found"
    ]


def test_fail_run_fenced(broker: Broker, clock: Clock) -> None:
    broker.add("web", "t", chain="coding")
    claim = broker.claim()
    broker.fail(1, claim.run_id, "x")
    before = snapshot(broker)
    with pytest.raises(RunFenced, match="the run already ended"):  # another root cause: not a repeat
        broker.fail(1, claim.run_id, "x", cause="timeout")
    assert raw(broker, "fail_run", ms(clock()), 1, str(uuid.uuid4()), "failed", "x", 1, task_id=1) == [
        Status.FENCED, "the task is up_next"
    ]
    assert snapshot(broker) == before


def test_fail_run_repeated(broker: Broker, clock: Clock) -> None:
    """The same failure again (its first call timed out after it was applied): 8, nothing changes."""
    broker.add("web", "t", chain="coding")
    claim = broker.claim()
    assert broker.fail(1, claim.run_id, "x", cause="failed") == (TaskStatus.UP_NEXT, 1)
    before = snapshot(broker)
    assert raw(broker, "fail_run", ms(clock()), 1, claim.run_id, "failed", "x", 1, task_id=1) == [
        Status.REPEATED, "up_next", 1
    ]
    assert broker.fail(1, claim.run_id, "x", cause="failed") == (TaskStatus.UP_NEXT, 1)
    assert snapshot(broker) == before


# -- rate_limited_run --------------------------------------------------------------------------------


def test_rate_limited_run_ok(broker: Broker, clock: Clock) -> None:
    broker.add("web", "t", chain="coding")
    claim = broker.claim()
    assert broker.rate_limited(1, claim.run_id, retry_after=600) == ("codex", clock() + 600)
    assert broker.cooldowns() == {
        "codex": {"until": clock() + 600, "remaining_s": 600.0, "reason": "rate_limit"}
    }
    task = broker.get_task(1)
    assert (task.status, task.attempts, task.last_error_reason) == (TaskStatus.UP_NEXT, 0, "rate_limit")
    claim = broker.claim()
    until = ms(clock()) + 120_000
    reply = raw(
        broker, "rate_limited_run", ms(clock()), 1, claim.run_id, until, "quota_reached", "usage", task_id=1
    )
    assert reply == [Status.OK, "sonnet", until]
    assert rc(broker).get(broker.keys.cooldown("sonnet")) == f"{until}|quota_reached"


def test_rate_limited_run_not_found(broker: Broker, clock: Clock) -> None:
    run_id = str(uuid.uuid4())
    with pytest.raises(TaskNotFound):
        broker.rate_limited(9, run_id, retry_after=10)
    assert raw(broker, "rate_limited_run", ms(clock()), 9, run_id, ms(clock()) + 1000, "rate_limit", "m",
               task_id=9) == [Status.NOT_FOUND, "task not found"]


def test_rate_limited_run_fenced(broker: Broker, clock: Clock) -> None:
    broker.add("web", "t", chain="coding")
    broker.claim()
    before = snapshot(broker)
    with pytest.raises(RunFenced):
        broker.rate_limited(1, str(uuid.uuid4()), retry_after=600)
    assert snapshot(broker) == before
    assert broker.cooldowns() == {}


def test_rate_limited_run_repeated(broker: Broker, clock: Clock) -> None:
    """The same limit again (its first call timed out after it was applied): 8 with the model and its cooldown
    end, nothing changes; a limit of another class for the ended run is fenced."""
    broker.add("web", "t", chain="coding")
    claim = broker.claim()
    model, until = broker.rate_limited(1, claim.run_id, retry_after=600, message="429")
    before = snapshot(broker)
    reply = raw(broker, "rate_limited_run", ms(clock()), 1, claim.run_id, ms(clock()) + 900_000, "rate_limit", "429",
                task_id=1)
    assert reply == [Status.REPEATED, model, round(until * 1000)]
    assert broker.rate_limited(1, claim.run_id, retry_after=600, message="429") == (model, until)
    with pytest.raises(RunFenced):
        broker.rate_limited(1, claim.run_id, retry_after=600, message="quota", quota=True)
    assert snapshot(broker) == before


# -- release_run -------------------------------------------------------------------------------------


def test_release_run_ok(broker: Broker, clock: Clock) -> None:
    broker.add("web", "one", chain="coding")
    broker.add("web", "two", chain="coding")
    claim = broker.claim()
    broker.release(1, claim.run_id)
    task = broker.get_task(1)
    assert (task.status, task.attempts, task.backoff_until, task.last_error) == (TaskStatus.UP_NEXT, 0, None, None)
    assert task.runs[-1]["outcome"] == "released"
    assert rc(broker).llen(broker.keys.errors) == 0
    assert broker.cooldowns() == {}
    assert broker.events()[-1]["type"] == "released"
    claim = broker.claim()
    assert (claim.task_id, claim.attempt, claim.run_count, claim.model) == (1, 1, 1, "codex")
    reply = raw(broker, "release_run", ms(clock()), 1, claim.run_id, "pairing", "not paired", task_id=1)
    assert reply == [Status.OK, "up_next"]
    task = broker.get_task(1)
    assert (task.attempts, task.last_error_reason, task.last_error) == (0, "pairing", "not paired")
    assert rc(broker).hgetall(broker.keys.stats_failures) == {"codex|pairing": "1"}
    assert counts(rc(broker), broker.keys.inflight_model) == {}


def test_release_run_not_found(broker: Broker, clock: Clock) -> None:
    run_id = str(uuid.uuid4())
    with pytest.raises(TaskNotFound):
        broker.release(4, run_id)
    assert raw(broker, "release_run", ms(clock()), 4, run_id, "released", "", task_id=4) == [
        Status.NOT_FOUND, "task not found"
    ]


def test_release_run_fenced(broker: Broker, clock: Clock) -> None:
    broker.add("web", "t", chain="coding")
    claim = broker.claim()
    before = snapshot(broker)
    with pytest.raises(RunFenced, match="another run holds the lease"):
        broker.release(1, str(uuid.uuid4()))
    assert snapshot(broker) == before
    broker.release(1, claim.run_id)
    before = snapshot(broker)
    assert raw(broker, "release_run", ms(clock()), 1, claim.run_id, "pairing", "", task_id=1) == [
        Status.FENCED, "the run already ended"
    ]
    assert raw(broker, "release_run", ms(clock()), 1, claim.run_id, "released", "", task_id=1) == [
        Status.REPEATED, "up_next"
    ]
    assert snapshot(broker) == before


# -- reap_leases -------------------------------------------------------------------------------------


def test_reap_leases_ok_nothing_expired(broker: Broker, clock: Clock) -> None:
    broker.add("web", "t", chain="coding")
    broker.claim()
    clock.advance(LEASE_MS / 1000 - 1)
    assert broker.reap() == []
    assert raw(broker, "reap_leases", ms(clock()), 500) == [Status.OK, 0]
    assert broker.get_task(1).status is TaskStatus.IN_PROGRESS


def test_reap_leases_ok_requeued_and_failed(broker: Broker, clock: Clock) -> None:
    broker.load_config(config(watchdog={"max_attempts": 2}))
    broker.add("a", "t", chain="coding")
    broker.add("b", "t", chain="bulk")
    broker.claim()
    broker.claim()
    clock.advance(LEASE_MS / 1000)
    assert raw(broker, "reap_leases", ms(clock()), 500) == [Status.OK, 2, 1, "up_next", 2, "up_next"]
    broker.claim()
    broker.claim()
    clock.advance(LEASE_MS / 1000)
    assert broker.reap() == [1, 2]
    assert [broker.get_task(i).status for i in (1, 2)] == [TaskStatus.FAILED, TaskStatus.FAILED]


def test_reap_leases_respects_batch_limit(broker: Broker, clock: Clock) -> None:
    for board in ("a", "b", "c"):
        broker.add(board, "t", chain="bulk")
        broker.claim()
    clock.advance(LEASE_MS / 1000)
    assert raw(broker, "reap_leases", ms(clock()), 2) == [Status.OK, 2, 1, "up_next", 2, "up_next"]
    assert raw(broker, "reap_leases", ms(clock()), 2) == [Status.OK, 1, 3, "up_next"]


# -- cancel_task -------------------------------------------------------------------------------------


def test_cancel_task_ok(broker: Broker, clock: Clock) -> None:
    broker.add("web", "t", chain="coding")
    assert broker.cancel(1) is TaskStatus.UP_NEXT
    broker.add("web", "t2", chain="coding")
    assert raw(broker, "cancel_task", ms(clock()), 2, task_id=2) == [Status.OK, "up_next"]
    assert rc(broker).zrange(broker.keys.cancelled, 0, -1) == ["1", "2"]


def test_cancel_task_not_found(broker: Broker, clock: Clock) -> None:
    with pytest.raises(TaskNotFound):
        broker.cancel(77)
    assert raw(broker, "cancel_task", ms(clock()), 77, task_id=77) == [Status.NOT_FOUND, "task not found"]


def test_cancel_task_bad_state(broker: Broker, clock: Clock) -> None:
    broker.add("web", "t", chain="coding")
    broker.cancel(1)
    before = snapshot(broker)
    with pytest.raises(InvalidState, match="already cancelled"):
        broker.cancel(1)
    assert raw(broker, "cancel_task", ms(clock()), 1, task_id=1) == [Status.BAD_STATE, "already cancelled"]
    assert snapshot(broker) == before


# -- set_board_paused --------------------------------------------------------------------------------


def test_set_board_paused_ok_states(broker: Broker, clock: Clock) -> None:
    assert broker.pause("empty") == "idle"
    assert broker.resume("empty") == "idle"
    broker.add("web", "one", chain="coding")
    broker.add("web", "two", chain="coding")
    assert broker.pause("web") == "paused"
    assert raw(broker, "set_board_paused", ms(clock()), "web", 0) == [Status.OK, "ready"]
    claim = broker.claim()
    assert broker.pause("web") == "paused"
    assert broker.resume("web") == "busy"
    broker.complete(1, claim.run_id, DONE)
    claim = broker.claim()
    broker.fail(2, claim.run_id, "x")
    assert broker.pause("web") == "paused"
    assert broker.resume("web") == "backoff"
    assert rc(broker).smembers(broker.keys.boards) == {"empty", "web"}


# -- set_cooldown ------------------------------------------------------------------------------------


def test_set_cooldown_ok_set_and_clear(broker: Broker, clock: Clock) -> None:
    assert broker.set_cooldown("opus", 30) == clock() + 30
    assert rc(broker).get(broker.keys.cooldown("opus")) == f"{ms(clock()) + 30_000}|manual"
    assert broker.set_cooldown("opus", 5) == clock() + 5  # exact: it may shrink
    broker.clear_cooldown("opus")
    assert rc(broker).exists(broker.keys.cooldown("opus")) == 0
    reply = raw(broker, "set_cooldown", ms(clock()), "glm", ms(clock()) + 1000, model="glm")
    assert reply == [Status.OK, ms(clock()) + 1000]
    assert [e["type"] for e in broker.events()][-4:] == [
        "cooldown_set", "cooldown_set", "cooldown_cleared", "cooldown_set"
    ]


def test_set_cooldown_unknown_model(broker: Broker, clock: Clock) -> None:
    before = snapshot(broker)
    with pytest.raises(UnknownChain, match="unknown model 'gpt9'"):
        broker.set_cooldown("gpt9", 30)
    reply = raw(broker, "set_cooldown", ms(clock()), "gpt9", ms(clock()) + 1000, model="gpt9")
    assert reply == [Status.UNKNOWN_CHAIN, "unknown model 'gpt9'"]
    assert snapshot(broker) == before


# -- load_config -------------------------------------------------------------------------------------


def load_args(cfg: Config, now: float, only_if_absent: bool) -> list[Any]:
    return [ms(now), cfg.to_json(), json.dumps(cfg.script_settings()),
            json.dumps(cfg.limits.model_max_inflight), json.dumps(cfg.limits.provider_max_inflight),
            json.dumps(cfg.models), json.dumps(cfg.chains), int(only_if_absent)]


def test_load_config_ok(broker: Broker) -> None:
    c, k = rc(broker), broker.keys
    first = broker.load_config(config())
    assert c.hget(k.cfg_settings, "version") == str(first)
    new = config(limits={"model_max_inflight": {"opus": 5}}, chains={"solo": ["glm"]})
    assert broker.load_config(new) == first + 1
    assert c.hgetall(k.cfg_model_cap) == {"opus": "5"}
    assert c.hgetall(k.cfg_chains) == {"solo": "glm"}
    assert c.hget(k.cfg_settings, "version") == str(first + 1)
    assert c.hget(k.cfg_settings, "lease_ms") == str(LEASE_MS)
    assert broker.config() == new
    assert broker.events()[-1]["type"] == "config_loaded"


def test_load_config_config_in_use(broker: Broker) -> None:
    broker.add("web", "t", chain="bulk")
    broker.add("web", "t", model="opus")
    before = snapshot(broker)
    chains = {"planning": ["opus"], "coding": ["codex"]}
    with pytest.raises(ConfigInUse, match="chain 'bulk' is still used by 1 unfinished task"):
        broker.load_config(config(chains=chains))
    assert snapshot(broker) == before
    no_opus = config(
        models={"codex": "openai", "glm": "zai", "gemini3_flash": "google"},
        limits={"model_max_inflight": {}}, chains={"bulk": ["glm"]},
    )
    reply = broker._scripts.call("load_config", load_args(no_opus, broker.now(), False))
    assert reply == [Status.CONFIG_IN_USE, "model 'opus' is still used by 1 unfinished task(s)"]
    assert snapshot(broker) == before


def test_load_config_only_if_absent(broker: Broker, redis_url: str, namespace: str, clock: Clock) -> None:
    mine = config(queue={"global_max_concurrent": 2})
    version = broker.load_config(mine)
    before = snapshot(broker)
    reply = broker._scripts.call("load_config", load_args(config(), broker.now(), True))
    assert reply == [Status.OK, version]
    second = Broker(redis.Redis.from_url(redis_url, decode_responses=True), namespace, clock=clock)
    try:
        second.connect()  # seeds the default config only if none is loaded
        assert second.config() == mine
    finally:
        second.close()
    assert snapshot(broker) == before


# -- NOSCRIPT ----------------------------------------------------------------------------------------


def test_noscript_reload_after_script_flush(broker: Broker, r: redis.Redis) -> None:
    broker.add("web", "one", chain="coding")
    broker.add("web", "two", chain="coding")
    sha = broker._scripts._scripts["claim_task"].sha
    assert r.script_exists(sha) == [True]
    r.script_flush()
    assert r.script_exists(sha) == [False]
    claim = broker.claim()
    assert (claim.task_id, claim.model) == (1, "codex")
    assert r.script_exists(sha) == [True]
    r.script_flush()
    assert broker.complete(1, claim.run_id, DONE).status is TaskStatus.IN_REVIEW
    r.script_flush()
    assert raw(broker, "set_board_paused", ms(broker.now()), "web", 1) == [Status.OK, "paused"]


def test_done_set_is_trimmed_to_24_hours_every_64th_outcome(broker: Broker, clock: Clock) -> None:
    c, k = rc(broker), broker.keys
    old_ms = ms(clock() - 2 * 86400)
    c.zadd(k.done("web"), {f"old{i}": old_ms for i in range(5)})
    c.hset(k.board("web"), "completed", 62)
    for _ in range(2):
        broker.add("web", "t", chain="coding")
    first = broker.claim()
    broker.complete(first.task_id, first.run_id, Outcome(summary="ok"))  # the 63rd: no trim
    assert c.zcard(k.done("web")) == 6
    second = broker.claim()
    broker.complete(second.task_id, second.run_id, Outcome(summary="ok"))  # the 64th trims what is older than 24 h
    assert c.zrange(k.done("web"), 0, -1) == sorted([first.run_id, second.run_id])
    assert broker.health()["boards"]["web"]["completed_last_hour"] == 2
