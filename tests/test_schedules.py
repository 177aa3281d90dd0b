"""Recurring schedules: each firing adds a task, exactly once, with several dispatchers and after restarts.

A test clock (``FakeClock``) drives the brokers and the scripts, so weeks of firings pass in a few calls.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from helpers import run_cli
from test_cli import UNREACHABLE, Run, ok
from test_rules import Clock, check, config

from clawq.broker import Broker, InputError, Outcome, TaskStatus, UnknownChain
from clawq.broker.schedules import Schedules
from clawq.workers.dispatcher import Dispatcher
from clawq.workers.notify import Notifiers

DONE = Outcome(summary="done")
DAY = 86400.0


def at_utc(clock: Clock, hour: int, minute: int = 0) -> float:
    """Move the clock forward to the next hh:mm UTC."""
    now = datetime.fromtimestamp(clock(), tz=UTC)
    at = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if at <= now:
        at += timedelta(days=1)
    clock.t = at.timestamp()
    return clock.t


@pytest.fixture
def brokers(broker: Broker, redis_url: str) -> Iterator[list[Broker]]:
    """Three brokers (three dispatchers' connections) on one namespace and one test clock."""
    clients = [redis.Redis.from_url(redis_url, decode_responses=True) for _ in range(2)]
    others = [Broker(c, broker.namespace, clock=broker.clock) for c in clients]
    try:
        yield [broker, *others]
    finally:
        for c in clients:
            c.close()


def finish_all(broker: Broker) -> None:
    """Run every queued task to in_review."""
    while True:
        try:
            claim = broker.claim()
        except Exception:
            return
        broker.complete(claim.task_id, claim.run_id, DONE)


def snapshot(r: redis.Redis) -> dict[Any, Any]:
    return {k: r.dump(k) for k in r.keys("*")}


# -- add, ls, rm ---------------------------------------------------------------------------------


def test_add_ls_rm(broker: Broker, clock: Clock) -> None:
    broker.load_config(config())
    at_utc(clock, 12)
    s = Schedules(broker).add("0 23 * * 1-5", "infra", "Update deps", tz="America/Argentina/Buenos_Aires",
                              chain="bulk", prompt="bump everything")
    nxt = datetime.fromtimestamp(s.next_fire, tz=UTC)
    assert (nxt.hour, nxt.minute) == (2, 0) and nxt.weekday() in (1, 2, 3, 4, 5)  # 23:00 at UTC-3, Mon-Fri
    assert (s.board, s.chain, s.model, s.title, s.prompt, s.fired) == ("infra", "bulk", None, "Update deps",
                                                                        "bump everything", 0)
    assert [x.schedule_id for x in Schedules(broker).ls()] == [s.schedule_id]
    assert broker.deadlines().schedule == s.next_fire
    Schedules(broker).remove(s.schedule_id)
    assert Schedules(broker).ls() == [] and broker.deadlines().schedule is None
    with pytest.raises(InputError, match="no schedule"):
        Schedules(broker).remove(s.schedule_id)


@pytest.mark.parametrize(("cron", "tz", "match"), [
    ("0 23 * *", "UTC", "five fields"),
    ("0 23 * * 1-5 2027", "UTC", "five fields"),
    ("61 * * * *", "UTC", "bad cron"),
    ("0 0 30 2 *", "UTC", "bad cron"),
    ("@daily", "UTC", "five fields"),
    ("0 23 * * *", "Mars/Olympus", "time zone"),
    ("0 23 * * *", "", "time zone"),
])
def test_a_bad_cron_or_zone_is_refused_and_nothing_is_written(
    broker: Broker, r: redis.Redis, cron: str, tz: str, match: str
) -> None:
    broker.load_config(config())
    before = snapshot(r)
    with pytest.raises(InputError, match=match):
        Schedules(broker).add(cron, "infra", "t", tz=tz, chain="bulk")
    assert snapshot(r) == before


def test_an_unknown_chain_is_refused(broker: Broker, r: redis.Redis) -> None:
    broker.load_config(config())
    before = snapshot(r)
    with pytest.raises(UnknownChain):
        Schedules(broker).add("0 23 * * *", "infra", "t", chain="nope")
    assert snapshot(r) == before


# -- firing exactly once -------------------------------------------------------------------------


def test_three_dispatchers_fire_each_period_exactly_once(brokers: list[Broker], clock: Clock) -> None:
    b0 = brokers[0]
    b0.load_config(config())
    at_utc(clock, 12)
    sid = Schedules(b0).add("0 23 * * *", "infra", "nightly", chain="bulk").schedule_id
    fired: list[int] = []
    for night in range(5):
        t = at_utc(clock, 23)
        outcomes: list[list[Any]] = [[] for _ in brokers]
        start = threading.Barrier(len(brokers))

        def fire(i: int, start: threading.Barrier, outcomes: list[list[Any]]) -> None:
            start.wait()
            outcomes[i] = Schedules(brokers[i]).fire_due()

        threads = [threading.Thread(target=fire, args=(i, start, outcomes)) for i in range(len(brokers))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        done = [f for o in outcomes for f in o if f.outcome == "fired"]
        assert len(done) == 1, (night, outcomes)
        assert {f.outcome for o in outcomes for f in o} <= {"fired", "repeated"}
        fired.append(done[0].task_id)
        assert done[0].fire == t
        for b in brokers:  # a second look at the same moment finds nothing due
            assert Schedules(b).fire_due() == []
        finish_all(b0)
    assert len(set(fired)) == 5
    s = Schedules(b0).get(sid)
    assert (s.fired, s.skipped, s.missed, s.last_task) == (5, 0, 0, fired[-1])
    assert all(b0.get_task(t).schedule == sid for t in fired)
    check(b0)


def test_three_dispatcher_loops_fire_once_per_period(brokers: list[Broker], clock: Clock) -> None:
    """The dispatchers themselves (step) fire schedules: each night one task, whichever dispatcher wins."""
    brokers[0].load_config(config())
    at_utc(clock, 12)
    Schedules(brokers[0]).add("30 22 * * *", "infra", "nightly", chain="bulk")
    claims: list[Any] = []
    loops = [Dispatcher(b, claims.append, notifiers=Notifiers()) for b in brokers]
    for d in loops:
        d.step()
        assert d._wait_s() <= 10.5 * 3600 + 0.01  # wakes at the firing (no polling tick)
    for _ in range(3):
        at_utc(clock, 22, 30)
        for d in loops:
            d.step()
        for claim in claims[-1:]:
            brokers[0].complete(claim.task_id, claim.run_id, DONE)
    tasks = brokers[0].list_tasks(board="infra")
    assert [t.status for t in tasks] == [TaskStatus.IN_REVIEW] * 3
    assert len(claims) == 3


def test_a_firing_is_skipped_while_the_previous_task_is_unfinished(broker: Broker, clock: Clock) -> None:
    broker.load_config(config())
    at_utc(clock, 12)
    sid = Schedules(broker).add("0 23 * * *", "infra", "nightly", chain="bulk").schedule_id
    at_utc(clock, 23)
    [first] = Schedules(broker).fire_due()
    claim = broker.claim()  # in progress through the next night
    at_utc(clock, 23)
    [second] = Schedules(broker).fire_due()
    assert (second.outcome, second.task_id) == ("skipped", first.task_id)
    events = [e for e in broker.events(count=1000) if e["type"] == "schedule_skipped"]
    assert len(events) == 1 and events[0]["task_id"] == first.task_id and events[0]["schedule"] == str(sid)
    broker.complete(claim.task_id, claim.run_id, DONE)
    at_utc(clock, 23)
    [third] = Schedules(broker).fire_due()
    assert third.outcome == "fired" and third.task_id != first.task_id
    s = Schedules(broker).get(sid)
    assert (s.fired, s.skipped) == (2, 1)
    assert [t.task_id for t in broker.list_tasks(board="infra")] == [first.task_id, third.task_id]


def test_a_firing_missed_while_down_fires_once_at_start_up_if_less_than_a_period_late(
    broker: Broker, clock: Clock
) -> None:
    broker.load_config(config())
    at_utc(clock, 12)
    sid = Schedules(broker).add("0 23 * * *", "infra", "nightly", chain="bulk").schedule_id
    t23 = at_utc(clock, 23)
    clock.advance(5 * 3600)  # everything was down from 22:00 to 04:00
    firings = Schedules(broker).fire_due()
    assert [(f.outcome, f.fire) for f in firings] == [("fired", t23)]
    assert Schedules(broker).fire_due() == []
    assert Schedules(broker).get(sid).next_fire == t23 + DAY
    # a restart later finds nothing more to do before the next firing
    assert Schedules(broker).fire_due() == []


def test_a_firing_missed_by_more_than_a_period_is_recorded_not_fired(broker: Broker, clock: Clock) -> None:
    broker.load_config(config())
    at_utc(clock, 12)
    sid = Schedules(broker).add("0 23 * * *", "infra", "nightly", chain="bulk").schedule_id
    t23 = at_utc(clock, 23)
    clock.advance(2 * DAY + 3600)  # down for two days
    assert [f.outcome for f in Schedules(broker).fire_due()] == ["missed"]
    assert broker.list_tasks() == []
    s = Schedules(broker).get(sid)
    assert (s.missed, s.next_fire) == (1, t23 + 3 * DAY)
    assert [e["type"] for e in broker.events(count=100)][-1] == "schedule_missed"


def test_a_removed_schedule_does_not_fire(broker: Broker, clock: Clock) -> None:
    broker.load_config(config())
    at_utc(clock, 12)
    sid = Schedules(broker).add("0 23 * * *", "infra", "nightly", chain="bulk").schedule_id
    Schedules(broker).remove(sid)
    at_utc(clock, 23)
    assert Schedules(broker).fire_due() == []
    assert broker.list_tasks() == []


def test_a_night_only_board_gets_scheduled_tasks_from_its_firings(broker: Broker, clock: Clock) -> None:
    night = {"timezone": "UTC", "start": "22:00", "end": "06:00", "global_max_concurrent": 8}
    broker.load_config(config(night_mode=night, boards={"infra": {"night_only": True}}))
    at_utc(clock, 12)
    Schedules(broker).add("0 20 * * *", "infra", "evening", chain="bulk")
    t20 = at_utc(clock, 20)
    [f] = Schedules(broker).fire_due()
    task = broker.get_task(f.task_id or 0)
    assert task.status is TaskStatus.SCHEDULED and task.night_only and task.due_at == t20 + 2 * 3600
    check(broker)


# -- the CLI -------------------------------------------------------------------------------------


@pytest.fixture
def cli_run(redis_url: str, r: redis.Redis, namespace: str, capsys: pytest.CaptureFixture[str],
            monkeypatch: pytest.MonkeyPatch) -> Run:
    monkeypatch.setenv("CLAWQ_REDIS_URL", UNREACHABLE)
    return lambda *args, **_: run_cli(["--redis-url", redis_url, "--namespace", namespace, *args], capsys)


def test_cli_schedule_add_ls_rm(cli_run: Run) -> None:
    doc = ok(cli_run, "schedule", "add", "--cron", "0 23 * * 1-5", "--tz", "Europe/Berlin", "--board", "infra",
             "--chain", "bulk", "--prompt", "bump", "Update deps")
    assert doc["schedule_id"] == 1 and doc["cron"] == "0 23 * * 1-5" and doc["tz"] == "Europe/Berlin"
    listed = ok(cli_run, "schedule", "ls")
    assert [s["schedule_id"] for s in listed] == [1] and listed[0]["next_fire"] == doc["next_fire"]
    code, out, _ = cli_run("schedule", "ls")
    assert code == 0 and "0 23 * * 1-5" in out and "Update deps" in out
    assert ok(cli_run, "schedule", "rm", "1") == {"schedule_id": 1, "removed": True}
    assert ok(cli_run, "schedule", "ls") == []


@pytest.mark.parametrize("args", [
    ["--cron", "0 25 * * *"],
    ["--cron", "every night"],
    ["--cron", "0 23 * * *", "--tz", "Nowhere/City"],
    ["--cron", "0 23 * * *", "--chain", "bulk", "--model", "glm"],
])
def test_cli_schedule_bad_input_is_one_line_exit_2_and_writes_nothing(
    cli_run: Run, r: redis.Redis, args: list[str]
) -> None:
    if "--chain" not in args:
        args = [*args, "--chain", "bulk"]
    before = snapshot(r)
    code, out, err = cli_run("schedule", "add", "--board", "infra", *args, "t")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert snapshot(r) == before
    code, _, err = cli_run("schedule", "rm", "7")
    assert code == 2 and "no schedule 7" in err


def test_a_schedule_listed_without_its_hash_is_dropped_not_fired_for_ever(broker: Broker, clock: Clock) -> None:
    broker.load_config(config())
    at_utc(clock, 12)
    sid = Schedules(broker).add("0 23 * * *", "infra", "nightly", chain="bulk").schedule_id
    broker.client.delete(broker.keys.schedule(sid))
    at_utc(clock, 23)
    assert [f.outcome for f in Schedules(broker).fire_due()] == ["gone"]
    assert Schedules(broker).fire_due() == [] and broker.deadlines().schedule is None


def test_a_schedule_whose_chain_left_the_config_records_its_firings_as_failed(broker: Broker, clock: Clock) -> None:
    broker.load_config(config())
    at_utc(clock, 12)
    sid = Schedules(broker).add("0 23 * * *", "infra", "nightly", chain="bulk").schedule_id
    chains = {k: v for k, v in config().chains.items() if k != "bulk"}
    broker.load_config(config(chains=chains))
    t23 = at_utc(clock, 23)
    assert [f.outcome for f in Schedules(broker).fire_due()] == ["failed"]
    assert broker.list_tasks() == [] and Schedules(broker).get(sid).next_fire == t23 + DAY
    assert [e["type"] for e in broker.events(count=100)][-1] == "schedule_failed"
