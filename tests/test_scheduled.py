"""Tasks that wait for a time or for the night: ``scheduled``, promoted by the claim, on real Redis (7 and 6.2).

The clock is the test's (``FakeClock``): the broker hands its milliseconds to the scripts, so a whole day and
night pass in a few calls.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from helpers import run_cli
from test_cli import UNREACHABLE, Run, ok
from test_doctor import repaired
from test_rules import Clock, check, config, follow, nothing, rc

from clawq.broker import Broker, InputError, NothingToClaim, Outcome, TaskStatus
from clawq.broker.timing import parse_not_before
from clawq.workers.dispatcher import Dispatcher
from clawq.workers.notify import Notifiers

DONE = Outcome(summary="finished")
NIGHT = {"timezone": "UTC", "start": "22:00", "end": "06:00", "global_max_concurrent": 8}


def noon(clock: Clock) -> float:
    """Move the clock to the next 12:00 UTC (a day time, outside the 22:00-06:00 window)."""
    now = datetime.fromtimestamp(clock(), tz=UTC)
    at = now.replace(hour=12, minute=0, second=0, microsecond=0)
    if at <= now:
        at += timedelta(days=1)
    clock.t = at.timestamp()
    return clock.t


def at_hour(clock: Clock, hour: int, minute: int = 0) -> float:
    """Move the clock forward to the next hh:mm UTC."""
    now = datetime.fromtimestamp(clock(), tz=UTC)
    at = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if at <= now:
        at += timedelta(days=1)
    clock.t = at.timestamp()
    return clock.t


def night_broker(broker: Broker, clock: Clock, **extra: Any) -> Broker:
    broker.load_config(config(night_mode=NIGHT, **extra))
    noon(clock)
    return broker


def snapshot(r: redis.Redis) -> dict[Any, Any]:
    return {k: r.dump(k) for k in r.keys("*")}


# -- not before ----------------------------------------------------------------------------------


def test_a_task_not_before_a_time_waits_blocks_nothing_and_joins_at_its_place(broker: Broker, clock: Clock) -> None:
    broker.load_config(config())
    t0 = clock()
    early = broker.add("web", "later", chain="coding", not_before=t0 + 600)
    plain = broker.add("web", "now", chain="coding")
    task = broker.get_task(early)
    assert task.status is TaskStatus.SCHEDULED
    assert (task.not_before, task.due_at) == (t0 + 600, t0 + 600)
    assert check(broker) == {early: "scheduled", plain: "up_next"}
    assert [t.task_id for t in broker.list_tasks(status=TaskStatus.SCHEDULED)] == [early]
    assert broker.deadlines().scheduled == t0 + 600 and broker.next_deadline() == t0 + 600
    # it is not the head: the later task of its board runs, and the board is idle after it
    first = broker.claim()
    assert first.task_id == plain
    broker.complete(plain, first.run_id, DONE)
    clock.advance(599)
    assert nothing(broker) == {}
    clock.advance(1)
    assert broker.claim().task_id == early


def test_a_due_task_is_the_head_by_its_id(broker: Broker, clock: Clock) -> None:
    broker.load_config(config())
    t0 = clock()
    early = broker.add("web", "first by id", chain="coding", not_before=t0 + 60)
    later = broker.add("web", "second", chain="coding")
    claim = broker.claim()
    assert claim.task_id == later
    broker.complete(later, claim.run_id, follow("more", "part one"))  # back at its place, the head again
    clock.advance(60)
    claim = broker.claim()  # the due task joined at its place, ahead of the follow-up
    assert claim.task_id == early
    assert broker.get_task(early).due_at is None
    events = [e["type"] for e in broker.events(count=1000) if e.get("task_id") == early]
    assert events == ["added", "due", "claimed"]
    assert check(broker) == {early: "in_progress", later: "up_next"}
    assert broker.deadlines().scheduled is None


def test_not_before_in_the_past_queues_at_once(broker: Broker, clock: Clock) -> None:
    broker.load_config(config())
    tid = broker.add("web", "t", chain="coding", not_before=clock() - 3600)
    task = broker.get_task(tid)
    assert task.status is TaskStatus.UP_NEXT and task.not_before == clock() - 3600 and task.due_at is None
    assert broker.claim().task_id == tid


def test_a_scheduled_task_is_cancelled_and_counted_out(broker: Broker, clock: Clock) -> None:
    broker.load_config(config())
    tid = broker.add("web", "t", chain="coding", not_before=clock() + 60)
    assert rc(broker).hget(broker.keys.board("web"), "scheduled") == "1"
    assert broker.cancel(tid) is TaskStatus.SCHEDULED
    assert check(broker) == {tid: "cancelled"}
    assert rc(broker).hget(broker.keys.board("web"), "scheduled") is None
    assert rc(broker).hgetall(broker.keys.refs) == {}
    clock.advance(120)
    assert nothing(broker) == {}


def test_a_not_before_more_than_a_year_ahead_is_refused_and_nothing_is_written(
    broker: Broker, clock: Clock, r: redis.Redis
) -> None:
    broker.load_config(config())
    before = snapshot(r)
    with pytest.raises(InputError, match="a year"):
        broker.add("web", "t", chain="coding", not_before=clock() + 367 * 86400)
    with pytest.raises(InputError, match="a year"):
        broker.add("web", "t", chain="coding", not_before=float("nan"))
    with pytest.raises(InputError, match="night_mode"):
        broker.add("web", "t", chain="coding", night_only=True)  # config() has no night window
    assert snapshot(r) == before


# -- the night -----------------------------------------------------------------------------------


def test_night_only_tasks_wait_through_the_day_and_start_when_the_night_opens(
    broker: Broker, clock: Clock
) -> None:
    night_broker(broker, clock)
    t12 = clock()
    a = broker.add("web", "nightly", chain="coding", night_only=True)
    b = broker.add("web", "daytime", chain="coding")
    c = broker.add("api", "nightly too", chain="bulk", night_only=True)
    assert broker.get_task(a).due_at == t12 + 10 * 3600  # 22:00 UTC
    assert check(broker) == {a: "scheduled", b: "up_next", c: "scheduled"}
    day = broker.claim()  # a night-only task blocks nothing
    assert day.task_id == b
    broker.complete(b, day.run_id, DONE)
    for hour in (13, 18, 21):
        at_hour(clock, hour, 59)
        assert nothing(broker) == {}
    assert check(broker) == {a: "scheduled", b: "in_review", c: "scheduled"}
    at_hour(clock, 22)
    assert broker.deadlines().scheduled == clock()
    assert {x.task_id for x in broker.claim_many(5)[0]} == {a, c}
    runs = broker.get_task(a).runs
    assert runs[-1]["night"] is True


def test_a_night_only_run_is_not_stopped_at_dawn_but_no_new_one_starts(broker: Broker, clock: Clock) -> None:
    night_broker(broker, clock, watchdog={"stale_in_progress_minutes": 1200})
    at_hour(clock, 23)
    a = broker.add("web", "long", chain="coding", night_only=True)
    b = broker.add("api", "queued at dawn", chain="coding", night_only=True)
    c = broker.add("api", "behind it", chain="coding")
    first = broker.claim()
    assert first.task_id == a
    assert rc(broker).zrange(broker.keys.night_queued, 0, -1) == [str(a), str(b)]
    # b waits behind a global cap of one until the window closes
    long_lease = {"stale_in_progress_minutes": 1200}
    broker.load_config(config(night_mode={**NIGHT, "global_max_concurrent": 1}, watchdog=long_lease))
    assert nothing(broker) == {"global_cap": 1}
    dawn = at_hour(clock, 6)
    broker.load_config(config(night_mode={**NIGHT, "global_max_concurrent": 1}, queue={"global_max_concurrent": 5},
                              watchdog=long_lease))
    claim = broker.claim()  # b goes back to scheduled; c (not night-only) is now api's head
    assert claim.task_id == c
    assert broker.get_task(b).status is TaskStatus.SCHEDULED
    assert broker.get_task(b).due_at == dawn + 16 * 3600
    assert broker.get_task(a).status is TaskStatus.IN_PROGRESS  # the night run goes on
    broker.heartbeat(a, first.run_id)
    # its follow-up outside the window does not start: a goes back to wait for the night
    broker.complete(a, first.run_id, follow("next step", "first half"))
    assert nothing(broker) == {}
    assert broker.get_task(a).status is TaskStatus.SCHEDULED
    assert check(broker) == {a: "scheduled", b: "scheduled", c: "in_progress"}
    assert rc(broker).zrange(broker.keys.night_queued, 0, -1) == []
    at_hour(clock, 22)
    broker.load_config(config(night_mode=NIGHT, watchdog=long_lease))
    assert {x.task_id for x in broker.claim_many(5)[0]} == {a}  # api is busy with c
    assert check(broker) == {a: "in_progress", b: "up_next", c: "in_progress"}


def test_a_night_only_board_holds_every_task_for_the_night(broker: Broker, clock: Clock) -> None:
    night_broker(broker, clock, boards={"infra": {"night_only": True}})
    a = broker.add("infra", "upgrade", chain="coding")
    b = broker.add("web", "fix", chain="coding")
    assert broker.get_task(a).night_only and broker.get_task(a).status is TaskStatus.SCHEDULED
    assert not broker.get_task(b).night_only
    assert broker.claim().task_id == b


def test_a_night_only_task_added_at_night_runs_now(broker: Broker, clock: Clock) -> None:
    night_broker(broker, clock)
    at_hour(clock, 2)
    tid = broker.add("web", "t", chain="coding", night_only=True)
    assert broker.get_task(tid).status is TaskStatus.UP_NEXT
    assert broker.claim().task_id == tid


def test_not_before_and_night_only_together_wait_for_both(broker: Broker, clock: Clock) -> None:
    night_broker(broker, clock)
    t12 = clock()
    late = broker.add("web", "after 3am", chain="coding", night_only=True, not_before=t12 + 15 * 3600)
    early = broker.add("api", "after 6 in the morning", chain="coding", night_only=True, not_before=t12 + 19 * 3600)
    assert broker.get_task(late).due_at == t12 + 15 * 3600  # 03:00, inside the window
    assert broker.get_task(early).due_at == t12 + 34 * 3600  # 07:00 is day: the next night, 22:00
    check(broker)


def test_a_night_only_task_due_outside_the_window_is_held_again(broker: Broker, clock: Clock) -> None:
    """A due time computed under one config, promoted under another: the claim's rule decides."""
    night_broker(broker, clock)
    tid = broker.add("web", "t", chain="coding", not_before=clock() + 60)
    rc(broker).hset(broker.keys.task(tid), "night", "1")  # as if the board turned night-only
    clock.advance(60)
    assert nothing(broker) == {}
    assert broker.get_task(tid).due_at == clock() - 60 + 10 * 3600
    check(broker)


# -- time parsing ----------------------------------------------------------------------------------


def test_hh_mm_is_the_next_such_time_in_the_night_zone_or_utc() -> None:
    base = datetime(2026, 12, 5, 15, 30, tzinfo=UTC).timestamp()
    utc = config()
    assert parse_not_before("23:00", utc, base) == datetime(2026, 12, 5, 23, 0, tzinfo=UTC).timestamp()
    assert parse_not_before("09:15", utc, base) == datetime(2026, 12, 6, 9, 15, tzinfo=UTC).timestamp()
    ba = config(night_mode={**NIGHT, "timezone": "America/Argentina/Buenos_Aires"})  # UTC-3
    assert parse_not_before("23:00", ba, base) == datetime(2026, 12, 6, 2, 0, tzinfo=UTC).timestamp()
    assert parse_not_before("2026-12-24T20:00:00+01:00", ba, base) == datetime(
        2026, 12, 24, 19, 0, tzinfo=UTC).timestamp()
    assert parse_not_before("2026-12-24T20:00", ba, base) == datetime(2026, 12, 24, 23, 0, tzinfo=UTC).timestamp()
    for bad in ("25:00", "tomorrow", "2026-13-01", "", "12:60"):
        with pytest.raises(InputError, match="bad time"):
            parse_not_before(bad, utc, base)


# -- doctor --------------------------------------------------------------------------------------


def test_doctor_knows_the_scheduled_place(broker: Broker, clock: Clock) -> None:
    night_broker(broker, clock)
    a = broker.add("web", "t", chain="coding", not_before=clock() + 60)
    b = broker.add("web", "n", chain="coding", night_only=True)
    assert broker.doctor()["ok"]
    rc(broker).zrem(broker.keys.scheduled, a)
    rc(broker).hset(broker.keys.board("web"), "scheduled", "5")
    repaired(broker, f"task {a} (scheduled) is missing from scheduled", "board web counts 5 scheduled tasks")
    assert rc(broker).zscore(broker.keys.scheduled, a) == (clock() + 60) * 1000
    at_hour(clock, 22, 30)
    assert broker.claim().task_id == a
    assert broker.get_task(b).status is TaskStatus.UP_NEXT
    rc(broker).zrem(broker.keys.night_queued, b)
    repaired(broker, f"night-only task {b} is queued but missing from night_queued")


def test_a_scheduled_task_in_a_queue_too_is_taken_out_of_the_queue(broker: Broker, clock: Clock) -> None:
    broker.load_config(config())
    tid = broker.add("web", "t", chain="coding", not_before=clock() + 60)
    rc(broker).zadd(broker.keys.queue("web"), {str(tid): tid})
    repaired(broker, f"task {tid} (scheduled) is also in queue of board web")
    with pytest.raises(NothingToClaim):
        broker.claim()


# -- the CLI -------------------------------------------------------------------------------------


@pytest.fixture
def cli_run(redis_url: str, r: redis.Redis, namespace: str, capsys: pytest.CaptureFixture[str],
            monkeypatch: pytest.MonkeyPatch) -> Run:
    """``clawq --redis-url <private> --namespace <ns> args`` in-process: (exit code, stdout, stderr)."""
    monkeypatch.setenv("CLAWQ_REDIS_URL", UNREACHABLE)
    return lambda *args, **_: run_cli(["--redis-url", redis_url, "--namespace", namespace, *args], capsys)


def test_cli_add_not_before_ls_and_show_say_when_a_task_is_due(cli_run: Run, r: redis.Redis) -> None:
    soon = datetime.now(UTC) + timedelta(hours=2)
    doc = ok(cli_run, "add", "--board", "web", "--chain", "coding", "--not-before", soon.isoformat(), "later")
    assert doc["status"] == "scheduled" and abs(doc["due_at"] - soon.timestamp()) < 0.01
    assert ok(cli_run, "add", "--board", "web", "--chain", "coding", "now")["status"] == "up_next"
    listed = ok(cli_run, "ls", "--status", "scheduled")
    assert [(t["task_id"], t["status"]) for t in listed] == [(1, "scheduled")]
    assert abs(listed[0]["due_at"] - soon.timestamp()) < 0.01
    code, out, _ = cli_run("ls", "--status", "scheduled")
    assert code == 0 and "scheduled" in out and "(due " in out
    code, out, _ = cli_run("show", "1")
    assert code == 0 and "due " in out and "not before " in out
    health = ok(cli_run, "health")
    assert health["boards"]["web"]["scheduled"] == 1 and health["global"]["scheduled"] == 1
    assert ok(cli_run, "doctor")["ok"]


def test_cli_add_hh_mm_is_scheduled_in_utc_without_night_mode(cli_run: Run, tmp_path: Any) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("night_mode: null\n")
    ok(cli_run, "config", "load", str(cfg))
    at = (datetime.now(UTC) + timedelta(hours=3)).strftime("%H:%M")
    doc = ok(cli_run, "add", "--board", "web", "--chain", "coding", "--not-before", at, "t")
    due = datetime.fromtimestamp(doc["due_at"], tz=UTC)
    assert doc["status"] == "scheduled" and due.strftime("%H:%M") == at and due.second == 0


@pytest.mark.parametrize("args", [
    ["--not-before", "tomorrow"],
    ["--not-before", "25:00"],
    ["--not-before", "2026-02-30T10:00"],
    ["--not-before", (datetime.now(UTC) + timedelta(days=400)).isoformat()],
])
def test_cli_bad_not_before_is_one_line_exit_2_and_nothing_written(
    cli_run: Run, r: redis.Redis, args: list[str]
) -> None:
    code, out, err = cli_run("add", "--board", "web", "--chain", "coding", *args, "t")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert r.keys("*") == [] or not any(b":task:" in k for k in r.keys("*"))


def test_cli_night_only_without_night_mode_is_refused(cli_run: Run, r: redis.Redis, tmp_path: Any) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("night_mode: null\n")
    ok(cli_run, "config", "load", str(cfg))
    code, _, err = cli_run("add", "--board", "web", "--chain", "coding", "--night-only", "t")
    assert code == 2 and "night_mode" in err and len(err.strip().splitlines()) == 1
    assert not any(b":task:" in k for k in r.keys("*"))
    cfg.write_text("night_mode: null\nboards: {infra: {night_only: true}}\n")
    code, _, err = cli_run("config", "load", str(cfg))
    assert code == 2 and "boards.infra.night_only needs night_mode" in err


def test_a_dispatcher_starts_night_only_tasks_when_the_night_opens(broker: Broker, clock: Clock) -> None:
    """The dispatcher loop with a test clock: a day passes, its deadline is the window's opening, and the
    night-only tasks start at that step and not before."""
    night_broker(broker, clock)
    a = broker.add("web", "night 1", chain="coding", night_only=True)
    b = broker.add("api", "night 2", chain="bulk", night_only=True)
    c = broker.add("ops", "day", chain="coding")
    claims: list[Any] = []
    d = Dispatcher(broker, claims.append, notifiers=Notifiers())
    assert d.step() == 1 and claims[0].task_id == c
    broker.complete(c, claims[0].run_id, DONE)
    d.step()
    assert d._due is not None and d._due.next == at_hour(Clock(clock()), 22)  # it sleeps until 22:00
    for hour in (15, 21):
        at_hour(clock, hour, 59)
        assert d.step() == 0
    at_hour(clock, 22)
    assert d.step() == 2
    assert {x.task_id for x in claims[1:]} == {a, b}
    check(broker)


def test_doctor_sets_a_scheduled_score_back_to_the_due_time(broker: Broker, clock: Clock) -> None:
    broker.load_config(config())
    tid = broker.add("web", "t", chain="coding", not_before=clock() + 600)
    rc(broker).zadd(broker.keys.scheduled, {str(tid): 1})  # due long ago: the next claim would queue it
    repaired(broker, f"task {tid} is in scheduled until 1, its due_at says {int((clock() + 600) * 1000)}")
    assert nothing(broker) == {}
    assert broker.get_task(tid).status is TaskStatus.SCHEDULED


def test_a_closed_agent_gate_does_not_make_a_due_task_spin_the_dispatcher(broker: Broker, clock: Clock) -> None:
    """Only a claim queues a due task, and no claim runs while the agent gate is closed: the dispatcher waits
    for the gate's next check instead of waking at once, again and again."""
    broker.load_config(config())
    broker.add("web", "t", chain="coding", not_before=clock() + 60)
    d = Dispatcher(broker, lambda claim: None, notifiers=Notifiers())
    broker.trip_agent_gate(600, "agent down")
    clock.advance(120)
    assert d.step() == 0
    assert d._due is not None and d._due.scheduled is not None and d._due.scheduled < clock()
    assert d._wait_s() > 1
