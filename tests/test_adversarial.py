"""Adversarial tests: stolen leases, tampered state, repeated and late reports, bad inputs.

"Unchanged" is checked with a snapshot of every key of the (flushed, private) server with its
type-aware value, so a refused call that writes anything at all is caught.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis
from conftest import FakeClock as Clock
from helpers import counts, rc

from clawq.broker import (
    Broker,
    Claim,
    InputError,
    NothingToClaim,
    Outcome,
    RunFenced,
    TaskNotFound,
    TaskStatus,
    UnknownChain,
)
from clawq.broker.models import MAX_TEXT_BYTES

LEASE_S = 23 * 60
DONE = Outcome(summary="done")
FOLLOW = Outcome(needs_follow_up=True, next_prompt="continue", summary="wip")


def read_key(r: redis.Redis, key: bytes) -> Any:
    kind: bytes = r.type(key)  # type: ignore[assignment]
    readers: dict[bytes, Callable[[], Any]] = {
        b"string": lambda: r.get(key),
        b"hash": lambda: r.hgetall(key),
        b"list": lambda: r.lrange(key, 0, -1),
        b"set": lambda: sorted(r.smembers(key)),
        b"zset": lambda: r.zrange(key, 0, -1, withscores=True),
        b"stream": lambda: r.xrange(key),
    }
    return kind, readers[kind]()


def snapshot(r: redis.Redis) -> dict[bytes, Any]:
    """Every key of the server (flushed for this test) with its type and value."""
    return {key: read_key(r, key) for key in sorted(r.scan_iter(count=1000))}


def counters(broker: Broker) -> tuple[int, dict[str, str], dict[str, str]]:
    c, k = rc(broker), broker.keys
    return c.zcard(k.running), counts(c, k.inflight_model), counts(c, k.inflight_provider)


def one_running(broker: Broker, chain: str = "coding") -> Claim:
    broker.add("web", "one", chain=chain)
    broker.add("web", "two", chain=chain)
    return broker.claim()


def other_uuid() -> str:
    return str(uuid.uuid4())


RUN_OPS: dict[str, Callable[[Broker, int, str], object]] = {
    "heartbeat": lambda b, tid, run: b.heartbeat(tid, run),
    "complete": lambda b, tid, run: b.complete(tid, run, DONE),
    "fail": lambda b, tid, run: b.fail(tid, run, "boom"),
    "rate_limited": lambda b, tid, run: b.rate_limited(tid, run, retry_after=600),
    "release": lambda b, tid, run: b.release(tid, run),
}


# -- stolen leases ---------------------------------------------------------------------------------


@pytest.mark.parametrize("op", sorted(RUN_OPS))
def test_stolen_lease_is_fenced_and_changes_nothing(broker: Broker, r: redis.Redis, op: str) -> None:
    claim = one_running(broker)
    before = snapshot(r)
    with pytest.raises(RunFenced, match="another run holds the lease") as err:
        RUN_OPS[op](broker, 1, other_uuid())
    assert err.value.task_id == 1
    assert snapshot(r) == before
    assert broker.cooldowns() == {}
    assert broker.complete(1, claim.run_id, DONE).status is TaskStatus.IN_REVIEW  # the owner still can


def test_other_tasks_run_id_is_fenced(broker: Broker, r: redis.Redis) -> None:
    broker.add("a", "t", chain="coding")
    broker.add("b", "t", chain="coding")
    first, second = broker.claim(), broker.claim()
    before = snapshot(r)
    with pytest.raises(RunFenced):
        broker.complete(first.task_id, second.run_id, DONE)
    with pytest.raises(RunFenced):
        broker.heartbeat(second.task_id, first.run_id)
    assert snapshot(r) == before


# -- tampered state: the task hash deleted while in progress --------------------------------------


@pytest.mark.parametrize("op", sorted(RUN_OPS))
def test_report_on_a_deleted_task_is_not_found_and_changes_nothing(
    broker: Broker, r: redis.Redis, op: str
) -> None:
    claim = one_running(broker)
    rc(broker).delete(broker.keys.task(1))
    before = snapshot(r)
    with pytest.raises(TaskNotFound):
        RUN_OPS[op](broker, 1, claim.run_id)
    with pytest.raises(TaskNotFound):
        broker.cancel(1)
    with pytest.raises(TaskNotFound):
        broker.get_task(1)
    assert snapshot(r) == before


def test_reap_skips_a_deleted_task_cleanly(broker: Broker, clock: Clock) -> None:
    one_running(broker)
    rc(broker).delete(broker.keys.task(1))
    clock.advance(LEASE_S)
    assert broker.reap() == []  # no crash, nothing requeued
    assert rc(broker).zcard(broker.keys.running) == 0
    assert broker.reap() == []
    assert [t.task_id for t in broker.list_tasks()] == [2]


def test_reap_of_a_deleted_task_releases_its_counters_and_board(broker: Broker, clock: Clock) -> None:
    """A re-run's history names its board, which names the run: the reaper frees both in O(1). (A first run
    leaves no such trace: tests/test_history.py shows doctor --repair freeing it.)"""
    claim = one_running(broker)
    broker.complete(1, claim.run_id, Outcome(needs_follow_up=True, next_prompt="more", summary="s"))
    assert broker.claim().task_id == 1
    rc(broker).delete(broker.keys.task(1))
    clock.advance(LEASE_S)
    broker.reap()
    assert counters(broker) == (0, {}, {})
    assert rc(broker).hget(broker.keys.board("web"), "running") is None
    assert broker.claim().task_id == 2


def test_garbage_cooldown_value_does_not_break_claims(broker: Broker, clock: Clock) -> None:
    broker.add("web", "one", chain="coding")
    rc(broker).set(broker.keys.cooldown("codex"), "not-a-cooldown")
    claim = broker.claim()
    assert claim.model == "codex"
    assert broker.rate_limited(1, claim.run_id, retry_after=60) == ("codex", clock() + 60)
    assert broker.cooldowns()["codex"]["until"] == clock() + 60


# -- repeated and late reports ----------------------------------------------------------------------


@pytest.mark.parametrize(("outcome", "status"), [(DONE, TaskStatus.IN_REVIEW), (FOLLOW, TaskStatus.UP_NEXT)])
def test_complete_twice_with_the_same_outcome_is_repeated_and_changes_nothing(
    broker: Broker, r: redis.Redis, clock: Clock, outcome: Outcome, status: TaskStatus
) -> None:
    claim = one_running(broker)
    first = broker.complete(1, claim.run_id, outcome)
    assert (first.status, first.repeated) == (status, False)
    before = snapshot(r)
    clock.advance(5)
    again = broker.complete(1, claim.run_id, outcome)
    assert (again.task_id, again.status, again.run_count, again.repeated) == (1, status, 1, True)
    assert snapshot(r) == before


def test_repeat_of_a_follow_up_after_the_next_claim_changes_nothing(broker: Broker, r: redis.Redis) -> None:
    claim = one_running(broker)
    broker.complete(1, claim.run_id, FOLLOW)
    nxt = broker.claim()
    assert (nxt.task_id, nxt.run_count) == (1, 2)
    before = snapshot(r)
    again = broker.complete(1, claim.run_id, FOLLOW)
    assert (again.repeated, again.status, again.run_count) == (True, TaskStatus.IN_PROGRESS, 1)
    assert snapshot(r) == before
    assert broker.complete(1, nxt.run_id, DONE).status is TaskStatus.IN_REVIEW


def test_complete_twice_with_a_different_outcome_is_fenced(broker: Broker, r: redis.Redis) -> None:
    claim = one_running(broker)
    broker.complete(1, claim.run_id, DONE)
    before = snapshot(r)
    with pytest.raises(RunFenced, match="the run already ended"):
        broker.complete(1, claim.run_id, Outcome(summary="a different story"))
    with pytest.raises(RunFenced, match="the run already ended"):
        broker.complete(1, claim.run_id, FOLLOW)
    assert snapshot(r) == before


@pytest.mark.parametrize("op", sorted(RUN_OPS))
def test_reports_from_a_reaped_run_are_fenced(broker: Broker, r: redis.Redis, clock: Clock, op: str) -> None:
    claim = one_running(broker)
    clock.advance(LEASE_S)
    assert broker.reap() == [1]
    before = snapshot(r)
    with pytest.raises(RunFenced, match="the run already ended"):
        RUN_OPS[op](broker, 1, claim.run_id)
    assert snapshot(r) == before
    again = broker.claim()
    before = snapshot(r)
    with pytest.raises(RunFenced):
        RUN_OPS[op](broker, 1, claim.run_id)
    assert snapshot(r) == before
    assert broker.heartbeat(1, again.run_id) == clock() + 20 * 60


@pytest.mark.parametrize("op", sorted(RUN_OPS))
def test_reports_after_complete_are_fenced(broker: Broker, r: redis.Redis, op: str) -> None:
    claim = one_running(broker)
    broker.complete(1, claim.run_id, DONE)
    before = snapshot(r)
    if op == "complete":
        assert broker.complete(1, claim.run_id, DONE).repeated is True
    else:
        with pytest.raises(RunFenced, match="the run already ended"):
            RUN_OPS[op](broker, 1, claim.run_id)
    assert snapshot(r) == before


def end_run(broker: Broker, clock: Clock, claim: Claim, how: str) -> None:
    if how == "fail":
        broker.fail(claim.task_id, claim.run_id, "boom")
    elif how == "reap":
        clock.advance(LEASE_S)
        assert broker.reap() == [claim.task_id]
    elif how == "rate_limited":
        broker.rate_limited(claim.task_id, claim.run_id, retry_after=60)
    elif how == "release":
        broker.release(claim.task_id, claim.run_id)
    else:
        broker.cancel(claim.task_id)


@pytest.mark.parametrize("how", ["fail", "reap", "rate_limited", "release", "cancel"])
def test_ended_run_repeating_the_previous_runs_outcome_is_fenced(
    broker: Broker, r: redis.Redis, clock: Clock, how: str
) -> None:
    first = one_running(broker)
    broker.complete(1, first.run_id, FOLLOW)
    second = broker.claim()
    assert (second.task_id, second.run_count) == (1, 2)
    end_run(broker, clock, second, how)
    before = snapshot(r)
    with pytest.raises(RunFenced):
        broker.complete(1, second.run_id, FOLLOW)  # this run never recorded an outcome
    assert snapshot(r) == before
    again = broker.complete(1, first.run_id, FOLLOW)  # the run that did record it: still a repeat
    assert (again.repeated, again.run_count) == (True, 1)
    assert snapshot(r) == before


def test_ended_run_with_a_new_outcome_is_fenced(broker: Broker, r: redis.Redis) -> None:
    first = one_running(broker)
    broker.complete(1, first.run_id, FOLLOW)
    second = broker.claim()
    broker.fail(1, second.run_id, "boom")
    before = snapshot(r)
    with pytest.raises(RunFenced, match="the run already ended"):
        broker.complete(1, second.run_id, DONE)
    assert snapshot(r) == before


# -- bad inputs --------------------------------------------------------------------------------------

BAD_BOARDS = ["a{b}", "{x", "a}", "a:b", "a b", " a", "a*", "a?", "", "x" * 65, "é", "a\tb", "a/b", "a\n"]
SOME_UUID = str(uuid.UUID("0a1b2c3d-4e5f-4a7b-8c9d-0e1f2a3b4c5d"))
NOT_UUIDS = [
    "", "nope", "1234", SOME_UUID.upper(), SOME_UUID.replace("-", ""), "{" + SOME_UUID + "}",
    SOME_UUID + " ", "urn:uuid:" + SOME_UUID, SOME_UUID[:-1],
]


def _add(**kw: Any) -> Callable[[Broker], object]:
    args: dict[str, Any] = {"board": "web", "title": "t", "chain": "coding", **kw}
    return lambda b: b.add(**args)


BAD_CALLS: dict[str, Callable[[Broker], object]] = {
    **{f"add-board-{name!r}": _add(board=name) for name in BAD_BOARDS},
    **{f"pause-board-{name!r}": (lambda n: lambda b: b.pause(n))(name) for name in BAD_BOARDS[:6]},
    **{f"resume-board-{name!r}": (lambda n: lambda b: b.resume(n))(name) for name in BAD_BOARDS[:6]},
    "list-board": lambda b: b.list_tasks(board="a:b"),
    "empty-title": _add(title=""),
    "blank-title": _add(title=" \t\n"),
    "long-title": _add(title="t" * 1025),
    "huge-prompt": _add(prompt="p" * (MAX_TEXT_BYTES + 1)),
    "huge-prompt-multibyte": _add(prompt="é" * (MAX_TEXT_BYTES // 2 + 1)),
    "nul-prompt": _add(prompt="a\x00b"),
    "nul-title": _add(title="a\x00b"),
    "chain-and-model": _add(model="opus"),
    "neither-chain-nor-model": _add(chain=None),
    "unknown-chain": _add(chain="nope"),
    "unknown-model": _add(chain=None, model="gpt9"),
    "task-id-0": _add(task_id=0),
    "task-id-negative": _add(task_id=-3),
    "task-id-true": _add(task_id=True),
    "task-id-false": _add(task_id=False),
    "task-id-10**14": _add(task_id=10**14),
    "task-id-2**53": _add(task_id=2**53),
    "set-cooldown-negative": lambda b: b.set_cooldown("opus", -1),
    "set-cooldown-nan": lambda b: b.set_cooldown("opus", math.nan),
    "set-cooldown-inf": lambda b: b.set_cooldown("opus", math.inf),
    "set-cooldown-unknown": lambda b: b.set_cooldown("gpt9", 10),
    "cancel-0": lambda b: b.cancel(0),
    "cancel-negative": lambda b: b.cancel(-1),
    "cancel-missing": lambda b: b.cancel(999),
}

BAD_RUN_CALLS: dict[str, Callable[[Broker, Claim], object]] = {
    **{f"{op}-run-id-{bad!r}": (lambda o, x: lambda b, c: RUN_OPS[o](b, c.task_id, x))(op, bad)
       for op in RUN_OPS for bad in NOT_UUIDS},
    **{f"{op}-task-{tid}": (lambda o, t: lambda b, c: RUN_OPS[o](b, t, c.run_id))(op, tid)
       for op in RUN_OPS for tid in (0, -1, 999)},
    "fail-empty-reason": lambda b, c: b.fail(c.task_id, c.run_id, "  "),
    "fail-huge-reason": lambda b, c: b.fail(c.task_id, c.run_id, "x" * (MAX_TEXT_BYTES + 1)),
    "rate-limited-zero": lambda b, c: b.rate_limited(c.task_id, c.run_id, retry_after=0),
    "rate-limited-negative": lambda b, c: b.rate_limited(c.task_id, c.run_id, retry_after=-5),
    "rate-limited-nan": lambda b, c: b.rate_limited(c.task_id, c.run_id, retry_after=math.nan),
    "rate-limited-inf": lambda b, c: b.rate_limited(c.task_id, c.run_id, retry_after=math.inf),
    "rate-limited-huge": lambda b, c: b.rate_limited(c.task_id, c.run_id, retry_after=1e12),
    "rate-limited-huge-message": lambda b, c: b.rate_limited(
        c.task_id, c.run_id, message="m" * (MAX_TEXT_BYTES + 1)
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_is_refused_and_changes_nothing(broker: Broker, r: redis.Redis, case: str) -> None:
    one_running(broker)
    before = snapshot(r)
    with pytest.raises(InputError):
        BAD_CALLS[case](broker)
    assert snapshot(r) == before


@pytest.mark.parametrize("case", sorted(BAD_RUN_CALLS))
def test_bad_run_input_is_refused_and_changes_nothing(broker: Broker, r: redis.Redis, case: str) -> None:
    claim = one_running(broker)
    before = snapshot(r)
    with pytest.raises(InputError):
        BAD_RUN_CALLS[case](broker, claim)
    assert snapshot(r) == before
    assert broker.get_task(1).run_id == claim.run_id


def test_unknown_names_raise_unknown_chain(broker: Broker) -> None:
    with pytest.raises(UnknownChain):
        broker.add("web", "t", chain="nope")
    with pytest.raises(UnknownChain):
        broker.set_cooldown("nope", 5)
    with pytest.raises(NothingToClaim):
        broker.claim()


@pytest.mark.parametrize("name", ["web\n", "web\r\n", "\nweb", "ns\n"])
def test_names_with_a_newline_are_refused(broker: Broker, r: redis.Redis, name: str) -> None:
    """'$' in a regex also matches before a final newline: names must be checked to the very end."""
    one_running(broker)
    before = snapshot(r)
    with pytest.raises(InputError):
        broker.add(name, "t", chain="coding")
    with pytest.raises(InputError):
        broker.pause(name)
    with pytest.raises(InputError):
        Broker(broker.client, name)
    assert snapshot(r) == before


@pytest.mark.parametrize("op", [*sorted(RUN_OPS), "cancel"])
def test_bool_task_id_in_run_calls_is_an_input_error(broker: Broker, r: redis.Redis, op: str) -> None:
    claim = one_running(broker)
    before = snapshot(r)
    with pytest.raises(InputError):
        if op == "cancel":
            broker.cancel(True)
        else:
            RUN_OPS[op](broker, True, claim.run_id)
    assert snapshot(r) == before


def test_float_task_id_is_refused(broker: Broker, r: redis.Redis) -> None:
    broker.add("web", "original", chain="coding", task_id=1)
    before = snapshot(r)
    with pytest.raises(InputError):
        broker.add("web", "float", chain="coding", task_id=1.5)  # type: ignore[arg-type]
    assert snapshot(r) == before
    assert broker.get_task(1).title == "original"
