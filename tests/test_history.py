"""A run's history entry: written once, when the run ends, from what the claim kept in the task hash.

While a run is in progress its entry is not in ``task:<id>:runs``; ``get_task`` shows it as the last entry,
built from the task hash. Every way a run ends writes the same entry the claim's open entry closed used to
(the fields are asserted exactly). A run claimed before this layout (its open entry pushed by the claim, no
``night_run`` in the task hash, no ``run`` on its board) still ends with its entry closed in place, and the
reaper still releases it when its task hash is gone. Real Redis (7 and 6.2).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import FakeClock as Clock
from helpers import counts, ms, rc

from clawq.broker import Broker, Claim, Config, NothingToClaim, Outcome, TaskStatus
from clawq.broker.config import DEFAULT_CONFIG

LEASE_S = 23 * 60


@pytest.fixture(autouse=True)
def _no_night(broker: Broker) -> None:
    """No night window: the clock moves by hours here, and `night` is asserted where a test chooses it."""
    data = DEFAULT_CONFIG.model_dump(mode="json")
    data["night_mode"] = None
    broker.load_config(Config.model_validate(data))


def opened(claim: Claim, claimed_at: float, *, run_count: int = 1, attempt: int = 1,
           night: bool = False) -> dict[str, Any]:
    """The fields of a run's entry while it runs."""
    return {"run_id": claim.run_id, "board": claim.board, "model": claim.model, "provider": claim.provider,
            "run_count": run_count, "attempt": attempt, "claimed_at": claimed_at, "night": night}


def closed(entry: dict[str, Any], ended_at: float, outcome: str, error: str | None = None) -> dict[str, Any]:
    done = {**entry, "ended_at": ended_at, "outcome": outcome}
    if error:
        done["error"] = error
    return done


def stored(broker: Broker, task_id: int) -> list[dict[str, Any]]:
    return [json.loads(x) for x in rc(broker).lrange(broker.keys.runs(task_id), 0, -1)]


def claim_at(broker: Broker, clock: Clock) -> tuple[Claim, float]:
    return broker.claim(), ms(clock()) / 1000


def test_the_claim_writes_no_entry_and_the_open_run_is_read_from_the_task_hash(broker: Broker, clock: Clock) -> None:
    broker.add("web", "t", chain="coding")
    claim, at = claim_at(broker, clock)
    assert stored(broker, 1) == []
    assert broker.get_task(1).runs == [opened(claim, at)]
    k = broker.keys
    assert rc(broker).hget(k.task(1), "night_run") == "0"
    assert rc(broker).hget(k.board("web"), "run") == f"{claim.run_id}|codex|openai"
    clock.advance(5)
    broker.complete(1, claim.run_id, Outcome(summary="ok"))
    assert stored(broker, 1) == [closed(opened(claim, at), ms(clock()) / 1000, "done")]
    assert broker.get_task(1).runs == stored(broker, 1)
    assert rc(broker).hmget(k.task(1), "run_id", "night_run", "probe", "lease_deadline") == [None] * 4
    assert rc(broker).hmget(k.board("web"), "running", "run") == ["", ""]  # "": none (one write at the end)


def test_every_end_writes_the_full_entry(broker: Broker, clock: Clock) -> None:
    """Each way out: the entry the claim opened, closed with ended_at, outcome and the detail as error."""
    ends: list[tuple[str, Any, str, str | None]] = [
        ("follow_up", lambda c: broker.complete(c.task_id, c.run_id, Outcome(needs_follow_up=True, next_prompt="n",
                                                                             summary="s")), "follow_up", None),
        ("fail", lambda c: broker.fail(c.task_id, c.run_id, "boom"), "failed", "boom"),
        ("rate_limited", lambda c: broker.rate_limited(c.task_id, c.run_id, retry_after=1, message="slow down"),
         "rate_limit", "slow down"),
        ("release", lambda c: broker.release(c.task_id, c.run_id, "released", "later"), "released", "later"),
        ("reap", lambda c: (clock.advance(LEASE_S), broker.reap()), "timeout", "no heartbeat: lease expired"),
        ("cancel", lambda c: broker.cancel(c.task_id), "cancelled", "cancelled"),
    ]
    broker.add("web", "t", chain="bulk")
    want: list[dict[str, Any]] = []
    run_count, attempt = 1, 1
    for name, end, outcome, error in ends:
        clock.advance(3600)  # past any backoff or cooldown of the previous end
        claim, at = claim_at(broker, clock)
        entry = opened(claim, at, run_count=run_count, attempt=attempt)
        assert broker.get_task(1).runs == [*want, entry], name
        clock.advance(3)
        end(claim)
        want.append(closed(entry, ms(clock()) / 1000, outcome, error))
        assert stored(broker, 1) == want, name
        if name == "follow_up":
            run_count += 1
        elif name in ("fail", "reap"):
            attempt += 1
    assert broker.get_task(1).status is TaskStatus.CANCELLED


def test_a_completion_limited_by_max_runs_keeps_its_note_as_error(broker: Broker, clock: Clock) -> None:
    broker.add("web", "t", chain="coding")
    follow = Outcome(needs_follow_up=True, next_prompt="n", summary="s")
    for _ in range(4):
        claim = broker.claim()
        broker.complete(1, claim.run_id, follow)
    claim, at = claim_at(broker, clock)
    broker.complete(1, claim.run_id, follow)
    last = stored(broker, 1)[-1]
    assert last == closed(opened(claim, at, run_count=5), at, "follow_up",
                          "follow-up limit reached (5 runs): sent to in_review")


def test_a_night_claim_says_so_while_running_and_after(broker: Broker, clock: Clock) -> None:
    broker.add("web", "t", model="glm")
    version = rc(broker).hget(broker.keys.cfg_settings, "version")
    run_id = "00000000-0000-4000-8000-000000000001"
    broker._scripts.call("claim_task", [broker.keys.prefix, ms(clock()), run_id, 6, 1, version, ""])
    assert rc(broker).hget(broker.keys.task(1), "night_run") == "1"
    assert broker.get_task(1).runs[-1]["night"] is True
    broker.complete(1, run_id, Outcome(summary="ok"))
    assert stored(broker, 1)[-1]["night"] is True


# -- runs claimed by the previous layout ------------------------------------------------------------


def old_layout(broker: Broker, claim: Claim, at: float) -> str:
    """Turn a fresh claim's state into what the previous claim script left: its open entry pushed to the
    history (cjson's text of it), no night_run in the task hash, no run on the board."""
    c, k = rc(broker), broker.keys
    c.hdel(k.task(claim.task_id), "night_run")
    c.hdel(k.board(claim.board), "run")
    text = json.dumps(opened(claim, at), separators=(",", ":"))
    c.rpush(k.runs(claim.task_id), text)
    return text


def test_a_run_claimed_by_the_old_layout_ends_with_its_entry_closed_in_place(broker: Broker, clock: Clock) -> None:
    broker.add("web", "t", chain="coding")
    claim, at = claim_at(broker, clock)
    old_layout(broker, claim, at)
    assert broker.get_task(1).runs == [opened(claim, at)]  # shown once, not also from the task hash
    clock.advance(2)
    broker.fail(1, claim.run_id, "boom")
    assert stored(broker, 1) == [closed(opened(claim, at), ms(clock()) / 1000, "failed", "boom")]
    clock.advance(600)
    claim2, at2 = claim_at(broker, clock)  # the next claim uses the new layout
    broker.complete(1, claim2.run_id, Outcome(summary="ok"))
    assert stored(broker, 1)[1] == closed(opened(claim2, at2, attempt=2), at2, "done")
    assert len(stored(broker, 1)) == 2


def test_the_old_layout_entry_of_another_run_is_left_alone(broker: Broker, clock: Clock) -> None:
    """An old-layout run whose last history entry is not its own (never expected): nothing is overwritten."""
    broker.add("web", "t", chain="coding")
    claim, at = claim_at(broker, clock)
    text = old_layout(broker, claim, at).replace(claim.run_id, "someone-else")
    rc(broker).lset(broker.keys.runs(1), -1, text)
    broker.complete(1, claim.run_id, Outcome(summary="ok"))
    assert rc(broker).lrange(broker.keys.runs(1), 0, -1) == [text]


# -- a lease whose task hash is gone ------------------------------------------------------------------


def lost_events(broker: Broker) -> list[dict[str, Any]]:
    return [e for e in broker.events(1000) if e["type"] == "lost"]


@pytest.mark.parametrize("layout", ["rerun", "old"])
def test_the_reaper_releases_a_run_whose_task_hash_is_gone(broker: Broker, clock: Clock, layout: str) -> None:
    """What outlives the hash names the run: an earlier history entry its board (the board's `run` its model
    and provider), or, for a run claimed before history was written at a run's end, its open entry."""
    broker.add("api", "other", chain="bulk")  # another board with a run: its slot and counters stay
    other = broker.claim()
    broker.add("web", "one", chain="coding")
    broker.add("web", "two", chain="coding")
    if layout == "rerun":  # a follow-up: the task's second run, its first one in its history
        first = broker.claim()
        broker.complete(first.task_id, first.run_id, Outcome(needs_follow_up=True, next_prompt="more", summary="s"))
    claim, at = claim_at(broker, clock)
    if layout == "old":
        old_layout(broker, claim, at)
    c, k = rc(broker), broker.keys
    c.delete(k.task(claim.task_id))
    clock.advance(LEASE_S)
    broker.heartbeat(other.task_id, other.run_id)
    assert broker.reap() == []
    assert counts(c, k.inflight_model) == {other.model: "1"}
    assert counts(c, k.inflight_provider) == {other.provider: "1"}
    assert c.hmget(k.board("web"), "running", "run") == [None, None]
    assert c.hget(k.board("api"), "running") == str(other.task_id)
    assert c.zrange(k.running, 0, -1) == [str(other.task_id)]
    [event] = lost_events(broker)
    assert (event["task_id"], event["board"], event["model"], event["run_id"]) == (
        claim.task_id, "web", "codex", claim.run_id)
    assert broker.claim().task_id == claim.task_id + 1  # the board's slot is free: its next task runs
    # what the reaper cannot know without the hash (as before this layout): the task's chain key in refs
    assert broker.doctor()["problems"] == ["refs c:coding is 2, expected 1"]


def test_a_first_run_whose_task_hash_is_gone_is_dropped_and_doctor_frees_its_board(
        broker: Broker, clock: Clock) -> None:
    """A first run leaves no trace outside its hash that names its board, and finding the board whose
    `running` is the task would walk every board: the reaper drops the lease and says what to run."""
    broker.add("web", "one", chain="coding")
    broker.add("web", "two", chain="coding")
    claim = broker.claim()
    c, k = rc(broker), broker.keys
    c.delete(k.task(claim.task_id))
    clock.advance(LEASE_S)
    assert broker.reap() == []
    assert c.zcard(k.running) == 0 and not c.exists(k.lease(claim.task_id))
    [event] = lost_events(broker)
    assert event["task_id"] == claim.task_id and "doctor --repair" in event["message"]
    [error] = broker.health_report().recent_errors
    assert (error.reason, error.task_id) == ("lost", claim.task_id)
    assert "doctor --repair" in error.message
    assert counts(c, k.inflight_model) == {claim.model: "1"}  # held until the repair
    with pytest.raises(NothingToClaim):
        broker.claim()
    report = broker.doctor(repair=True)
    assert report["repaired"], report
    assert broker.doctor()["ok"]
    assert counts(c, k.inflight_model) == {}
    assert broker.claim().task_id == claim.task_id + 1


def test_a_lost_lease_with_no_trace_of_its_run_only_leaves_running(broker: Broker, clock: Clock) -> None:
    broker.add("web", "t", chain="coding")
    broker.add("web", "t2", chain="coding")
    first = broker.claim()
    broker.complete(first.task_id, first.run_id, Outcome(needs_follow_up=True, next_prompt="more", summary="s"))
    claim = broker.claim()
    c, k = rc(broker), broker.keys
    c.delete(k.task(1))
    c.hdel(k.board("web"), "running", "run")
    clock.advance(LEASE_S)
    assert broker.reap() == []
    assert c.zcard(k.running) == 0
    assert [e["board"] for e in lost_events(broker)] == ["web"]
    assert counts(c, k.inflight_model) == {claim.model: "1"}  # nothing says which model: doctor repairs it


# -- doctor ------------------------------------------------------------------------------------------


def test_doctor_checks_and_repairs_the_boards_run(broker: Broker, clock: Clock) -> None:
    broker.add("web", "t", chain="coding")
    claim = broker.claim()
    c, k = rc(broker), broker.keys
    assert broker.doctor()["ok"]
    c.hset(k.board("web"), "run", "stale|x|y")
    report = broker.doctor()
    assert f"board web run is stale|x|y, expected {claim.run_id}|codex|openai" in report["problems"]
    assert broker.doctor(repair=True)["ok"]
    assert c.hget(k.board("web"), "run") == f"{claim.run_id}|codex|openai"
    broker.complete(1, claim.run_id, Outcome(summary="ok"))
    c.hset(k.board("web"), "run", "left|x|y")
    assert not broker.doctor()["ok"]
    assert broker.doctor(repair=True)["ok"]
    assert c.hget(k.board("web"), "run") is None


# -- the board hash at a run's end: read once, written once -----------------------------------------


def key_calls(broker: Broker, key: str, end: Any) -> list[str]:
    """The commands on ``key`` that ``end`` made, by SLOWLOG (threshold 0: every call, scripts' too)."""
    c = rc(broker)
    old = c.config_get("slowlog-log-slower-than")["slowlog-log-slower-than"]
    c.config_set("slowlog-log-slower-than", 0)
    c.slowlog_reset()
    try:
        end()
        log = c.slowlog_get(1000)
    finally:
        c.config_set("slowlog-log-slower-than", old)
    lines = [e["command"].decode() if isinstance(e["command"], bytes) else str(e["command"]) for e in log]
    args = [line.split() for line in lines]
    if not any(a[0].upper() == "ZREM" for a in args):  # end_run's ZREM of `running`
        pytest.skip("this server's slowlog does not list a script's own calls")
    return sorted(a[0].upper() for a in args if len(a) > 1 and a[1] == key)


@pytest.mark.parametrize("how", ["complete", "follow_up", "fail", "release"])
def test_a_runs_end_reads_and_writes_its_board_once(broker: Broker, clock: Clock, how: str) -> None:
    for title in ("one", "two"):
        broker.add("web", title, chain="coding")
    claim = broker.claim()
    ends = {
        "complete": lambda: broker.complete(claim.task_id, claim.run_id, Outcome(summary="ok")),
        "follow_up": lambda: broker.complete(claim.task_id, claim.run_id,
                                             Outcome(needs_follow_up=True, next_prompt="n", summary="s")),
        "fail": lambda: broker.fail(claim.task_id, claim.run_id, "boom"),
        "release": lambda: broker.release(claim.task_id, claim.run_id),
    }
    assert key_calls(broker, broker.keys.board("web"), ends[how]) == ["HMGET", "HSET"]
    assert rc(broker).hmget(broker.keys.board("web"), "running", "run") == ["", ""]
    assert broker.doctor()["ok"]


@pytest.mark.parametrize("how", ["complete", "follow_up", "fail", "fail_for_good", "rate_limited", "release",
                                 "reason_release", "reap", "cancel"])
def test_a_runs_end_writes_its_task_hash_with_one_hdel_and_one_hset(broker: Broker, clock: Clock, how: str) -> None:
    """Whatever ends the run, the task hash is read once (the fenced HMGET) and written with one HDEL (the
    run's fields) and one HSET (the run's end, the report and the task's next place)."""
    for title in ("one", "two"):
        broker.add("web", title, chain="coding")
    claim = broker.claim()
    tid, run = claim.task_id, claim.run_id
    ends = {
        "complete": lambda: broker.complete(tid, run, Outcome(summary="ok")),
        "follow_up": lambda: broker.complete(tid, run, Outcome(needs_follow_up=True, next_prompt="n", summary="s")),
        "fail": lambda: broker.fail(tid, run, "boom"),
        "fail_for_good": lambda: broker.fail(tid, run, "boom", retry=False),
        "rate_limited": lambda: broker.rate_limited(tid, run, retry_after=60, message="slow down"),
        "release": lambda: broker.release(tid, run),
        "reason_release": lambda: broker.release(tid, run, "pairing", "not paired"),
        "reap": lambda: (clock.advance(LEASE_S), broker.reap()),
        "cancel": lambda: broker.cancel(tid),
    }
    before = rc(broker).hgetall(broker.keys.task(tid))
    assert key_calls(broker, broker.keys.task(tid), ends[how]) == ["HDEL", "HMGET", "HSET"]
    after = rc(broker).hgetall(broker.keys.task(tid))
    assert after["last_run_id"] == run and "run_id" not in after and "night_run" not in after
    assert after["updated_at"] == str(ms(clock()))
    assert before.keys() - after.keys() == {"run_id", "lease_deadline", "probe", "night_run"}
    assert broker.doctor()["ok"]
