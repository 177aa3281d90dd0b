"""The queue rules, each asserted precisely, on real Redis (7 and 6.2).

``check(broker)`` reads the raw keys after the steps of most tests and asserts the invariants: every task
in exactly one place that matches its status, in-flight counters and ``running`` equal to what the leases
say, chain-key refs equal to the unfinished tasks, and every board in exactly the index its state implies.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from conftest import FakeClock as Clock
from helpers import counts, ms, rc, task_hash_ids

from clawq.broker import (
    Broker,
    Claim,
    Config,
    ConfigInUse,
    DuplicateTask,
    InputError,
    InvalidState,
    NothingToClaim,
    Outcome,
    RunFenced,
    TaskStatus,
)
from clawq.broker.config import DEFAULT_CONFIG

LEASE_S = 23 * 60
HEARTBEAT_S = 20 * 60
BACKOFF_S = 5 * 60
DONE = Outcome(summary="finished")
PLACE_KEYS = ("scheduled", "running", "in_review", "failed", "cancelled")
PLACE_STATUS = {
    "scheduled": "scheduled", "running": "in_progress", "in_review": "in_review", "failed": "failed",
    "cancelled": "cancelled",
}
MAP_FIELDS = ("models", "chains")


def config(**changes: Any) -> Config:
    """The default config without night mode, with sections merged (maps inside them replaced)."""
    data: dict[str, Any] = DEFAULT_CONFIG.model_dump(mode="json")
    data["night_mode"] = None
    for section, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(section), dict) and section not in MAP_FIELDS:
            data[section] = {**data[section], **value}
        else:
            data[section] = value
    return Config.model_validate(data)


def follow(prompt: str, summary: str) -> Outcome:
    return Outcome(needs_follow_up=True, next_prompt=prompt, summary=summary)


def nothing(broker: Broker) -> dict[str, int]:
    with pytest.raises(NothingToClaim) as err:
        broker.claim()
    return err.value.skip_reasons


# -- invariants read from the raw keys -----------------------------------------------------------


def places(broker: Broker) -> dict[int, str]:
    """Each task id -> its one place; asserts exactly one place per task, matching the task's status."""
    c, k = rc(broker), broker.keys
    all_ids = set(task_hash_ids(c, k))
    found: dict[int, list[str]] = {tid: [] for tid in all_ids}
    for board in c.smembers(k.boards):
        for tid in c.zrange(k.queue(board), 0, -1):
            assert c.hget(k.task(tid), "board") == board, f"task {tid} queued on {board}, not its board"
            found.setdefault(int(tid), []).append("up_next")
    for name in PLACE_KEYS:
        for tid in c.zrange(getattr(k, name), 0, -1):
            found.setdefault(int(tid), []).append(PLACE_STATUS[name])
    assert set(found) == all_ids, f"placed without a hash: {set(found) - all_ids}, in no place: {all_ids - set(found)}"
    out: dict[int, str] = {}
    for tid, where in found.items():
        assert len(where) == 1, f"task {tid} is in {where}"
        assert c.hget(k.task(tid), "status") == where[0], f"task {tid} status != place {where[0]}"
        out[tid] = where[0]
    return out


def check_running(broker: Broker) -> dict[str, str]:
    """Counters and ``running`` equal what the leases say; returns board -> running task id."""
    c, k = rc(broker), broker.keys
    models: Counter[str] = Counter()
    providers: Counter[str] = Counter()
    by_board: dict[str, str] = {}
    for tid, score in c.zrange(k.running, 0, -1, withscores=True):
        t = c.hgetall(k.task(tid))
        assert t["status"] == "in_progress"
        assert int(t["lease_deadline"]) == score
        assert c.get(k.lease(tid)) == t["run_id"]
        assert t["board"] not in by_board, f"two tasks of board {t['board']} in progress"
        by_board[t["board"]] = tid
        models[t["model"]] += 1
        providers[t["provider"]] += 1
    assert {m: int(n) for m, n in counts(c, k.inflight_model).items()} == dict(models)
    assert {p: int(n) for p, n in counts(c, k.inflight_provider).items()} == dict(providers)
    for board in c.smembers(k.boards):
        running = c.hget(k.board(board), "running") or None  # a run's end leaves "": none
        assert running == by_board.get(board), f"board {board} running slot"
    return by_board


def check_blocks(broker: Broker) -> None:
    """The `blocked` index says what the caps, counters and live cooldowns say (ended cooldowns may linger)."""
    c, k = rc(broker), broker.keys
    now_ms = int(broker.now() * 1000)
    expected: dict[str, str] = {}
    for kind, caps, counter, reason in (
        ("m", k.cfg_model_cap, k.inflight_model, "model_quota_reached"),
        ("p", k.cfg_provider_cap, k.inflight_provider, "provider_quota_reached"),
    ):
        for name, cap in c.hgetall(caps).items():
            if int(c.hget(counter, name) or 0) >= int(cap):
                expected[f"{kind}:{name}"] = reason
    for model in c.hkeys(k.cfg_model_provider):
        value = c.get(k.cooldown(model))
        if value and int(value.split("|")[0]) > now_ms:
            expected[f"c:{model}"] = value
    actual = c.hgetall(k.blocked)
    ended = {f for f, v in actual.items() if f.startswith("c:") and int(v.split("|")[0]) <= now_ms}
    assert {f: v for f, v in actual.items() if f not in ended} == expected


def check_claim_config(broker: Broker) -> None:
    """cfg:claim, what a claim reads of the config, says what the cfg:* hashes say."""
    c, k = rc(broker), broker.keys
    settings = c.hgetall(k.cfg_settings)
    raw = c.get(k.cfg_claim)
    if not settings:
        assert raw is None, "cfg:claim without a loaded config"
        return
    assert raw is not None, "cfg:claim is missing"
    assert json.loads(raw) == {
        "version": int(settings["version"]),
        "lease_ms": int(settings["lease_ms"]),
        "provider": c.hgetall(k.cfg_model_provider),
        "chains": c.hgetall(k.cfg_chains),
        "model_cap": {m: int(v) for m, v in c.hgetall(k.cfg_model_cap).items()},
        "provider_cap": {p: int(v) for p, v in c.hgetall(k.cfg_provider_cap).items()},
    }


def check_refs(broker: Broker) -> None:
    c, k = rc(broker), broker.keys
    expected: Counter[str] = Counter()
    for tid in task_hash_ids(c, k):
        ck, status = c.hmget(k.task(tid), "ck", "status")
        if status in ("scheduled", "up_next", "in_progress"):
            expected[str(ck)] += 1
    assert {ck: int(n) for ck, n in c.hgetall(k.refs).items()} == dict(expected)


def ready_lines(broker: Broker) -> dict[str, str]:
    """board -> chain key of the ready line it sits in (asserts at most one line per board)."""
    c, k = rc(broker), broker.keys
    fronts = dict(c.zrange(k.ready_fronts, 0, -1, withscores=True))
    out: dict[str, str] = {}
    lines: dict[str, float] = {}
    for key in c.scan_iter(match=k.prefix + "ready:[cm]:*"):
        ck = key[len(k.prefix) + len("ready:"):]
        boards = c.zrange(key, 0, -1, withscores=True)
        if boards:
            lines[ck] = boards[0][1]
        for board, _ in boards:
            assert board not in out, f"board {board} in two ready lines"
            out[board] = ck
    assert fronts == lines, "ready:fronts is not the front place of every non-empty ready line"
    return out


def actual_index(broker: Broker, board: str, lines: dict[str, str]) -> str:
    c, k = rc(broker), broker.keys
    found = [name for name, hit in (
        ("busy", c.sismember(k.idx_busy, board)),
        ("paused", c.sismember(k.idx_paused, board)),
        ("backoff", c.zscore(k.idx_backoff, board) is not None),
    ) if hit]
    if board in lines:
        found.append("ready:" + lines[board])
    assert len(found) <= 1, f"board {board} in several indexes: {found}"
    return found[0] if found else "idle"


def expected_index(broker: Broker, board: str) -> str:
    c, k = rc(broker), broker.keys
    head = c.zrange(k.queue(board), 0, 0)
    if not head:
        return "idle"
    paused, running = c.hmget(k.board(board), "paused", "running")
    if paused == "1":
        return "paused"
    if running:
        return "busy"
    ck, until = c.hmget(k.task(head[0]), "ck", "backoff_until")
    until_ms = int(until or 0)
    if until_ms > ms(broker.now()):
        return "backoff"
    if until_ms and c.zscore(k.idx_backoff, board) == until_ms:
        return "backoff"  # due: the next claim moves it to its ready line
    return f"ready:{ck}"


def check_indexes(broker: Broker) -> None:
    lines = ready_lines(broker)
    for board in rc(broker).smembers(broker.keys.boards):
        actual = actual_index(broker, board, lines)
        assert actual == expected_index(broker, board), f"board {board}"
        state, ck = rc(broker).hmget(broker.keys.board(board), "state", "ck")
        assert (state or "idle") == actual.split(":", 1)[0]
        if actual.startswith("ready:"):
            assert ck == actual.split(":", 1)[1]


def check_scheduled(broker: Broker) -> None:
    """`scheduled` scores are the tasks' due times, boards count their scheduled tasks, and every queued
    night-only task is in night_queued."""
    c, k = rc(broker), broker.keys
    counts: Counter[str] = Counter()
    for tid, due in c.zrange(k.scheduled, 0, -1, withscores=True):
        t = c.hgetall(k.task(tid))
        assert t["status"] == "scheduled" and int(t["due_at"]) == due, f"task {tid}"
        counts[t["board"]] += 1
    night = set(c.zrange(k.night_queued, 0, -1))
    for board in c.smembers(k.boards):
        assert int(c.hget(k.board(board), "scheduled") or 0) == counts[board], f"board {board} scheduled count"
        for tid in c.zrange(k.queue(board), 0, -1):
            if c.hget(k.task(tid), "night") == "1":
                assert tid in night, f"queued night-only task {tid} is not in night_queued"


def check(broker: Broker) -> dict[int, str]:
    """Every invariant; returns the places of all tasks."""
    where = places(broker)
    check_scheduled(broker)
    check_running(broker)
    check_blocks(broker)
    check_claim_config(broker)
    check_refs(broker)
    check_indexes(broker)
    assert [(t.task_id, t.status.value) for t in broker.list_tasks()] == sorted(where.items())
    return where


def claimed(claim: Claim) -> tuple[int, str, str]:
    return claim.task_id, claim.board, claim.model


# -- strict head of line -------------------------------------------------------------------------


def test_head_of_line_by_lowest_task_id(broker: Broker) -> None:
    for title in ("one", "two", "three"):
        broker.add("web", title, chain="coding")
    claim = broker.claim()
    assert claimed(claim) == (1, "web", "codex")
    assert check(broker) == {1: "in_progress", 2: "up_next", 3: "up_next"}
    assert nothing(broker) == {"board_busy": 1}
    broker.complete(1, claim.run_id, DONE)
    assert check(broker) == {1: "in_review", 2: "up_next", 3: "up_next"}
    claim = broker.claim()
    assert claim.task_id == 2
    broker.complete(2, claim.run_id, DONE)
    assert broker.claim().task_id == 3
    assert check(broker) == {1: "in_review", 2: "in_review", 3: "in_progress"}


def test_head_in_backoff_keeps_its_board_waiting(broker: Broker, clock: Clock) -> None:
    broker.add("web", "one", chain="coding")
    broker.add("web", "two", chain="coding")
    claim = broker.claim()
    assert broker.fail(1, claim.run_id, "boom") == (TaskStatus.UP_NEXT, 1)
    assert check(broker) == {1: "up_next", 2: "up_next"}
    assert nothing(broker) == {"backoff": 1}  # task 2 could run, but 1 is the head
    clock.advance(BACKOFF_S - 1)
    assert nothing(broker) == {"backoff": 1}
    check(broker)
    clock.advance(1)
    claim = broker.claim()
    assert (claim.task_id, claim.attempt, claim.run_count) == (1, 2, 1)
    assert check(broker) == {1: "in_progress", 2: "up_next"}


def test_pinned_head_whose_model_is_capped_blocks_its_board(broker: Broker) -> None:
    broker.load_config(config(limits={"model_max_inflight": {"opus": 1}}))
    broker.add("other", "opus job", model="opus")
    broker.add("web", "pinned head", model="opus")
    broker.add("web", "could run on bulk", chain="bulk")
    assert claimed(broker.claim()) == (1, "other", "opus")
    assert nothing(broker) == {"model_quota_reached": 1}
    assert check(broker) == {1: "in_progress", 2: "up_next", 3: "up_next"}


def test_given_lower_id_becomes_the_head(broker: Broker) -> None:
    assert broker.add("web", "hundred", chain="coding", task_id=100) == 100
    assert broker.add("web", "auto", chain="coding") == 101
    assert broker.add("web", "fifty", chain="coding", task_id=50) == 50
    assert rc(broker).zrange(broker.keys.queue("web"), 0, 0) == ["50"]
    claim = broker.claim()
    assert claim.task_id == 50
    broker.complete(50, claim.run_id, DONE)
    claim = broker.claim()
    assert claim.task_id == 100
    assert broker.add("web", "sixty", chain="bulk", task_id=60) == 60  # lower than the queued 101
    check(broker)
    broker.complete(100, claim.run_id, DONE)
    assert claimed(broker.claim()) == (60, "web", "gemini3_flash")
    assert broker.add("web", "next auto", chain="coding") == 102
    assert check(broker) == {
        50: "in_review", 60: "in_progress", 100: "in_review", 101: "up_next", 102: "up_next"
    }


def test_auto_ids_never_collide_with_given_ids(broker: Broker) -> None:
    assert broker.add("a", "t", chain="bulk") == 1
    assert broker.add("a", "t", chain="bulk", task_id=5) == 5
    assert broker.add("a", "t", chain="bulk") == 6
    assert broker.add("a", "t", chain="bulk", task_id=3) == 3
    assert broker.add("a", "t", chain="bulk") == 7
    with pytest.raises(DuplicateTask):
        broker.add("a", "t", chain="bulk", task_id=6)
    assert rc(broker).get(broker.keys.task_seq) == "7"
    assert check(broker) == {1: "up_next", 3: "up_next", 5: "up_next", 6: "up_next", 7: "up_next"}


def test_auto_ids_stop_below_the_task_id_bound(broker: Broker, r: redis.Redis) -> None:
    top = 10**14 - 1  # ids stay below 10**14: exact in Lua text and in cjson
    assert broker.add("a", "given", chain="bulk", task_id=top) == top
    before = {k: r.dump(k) for k in r.keys("*")}
    with pytest.raises(InputError, match="exhausted"):
        broker.add("b", "auto", chain="bulk")
    assert {k: r.dump(k) for k in r.keys("*")} == before
    assert broker.add("b", "given below", chain="bulk", task_id=7) == 7
    for claim in (broker.claim(), broker.claim()):
        broker.fail(claim.task_id, claim.run_id, "boom", retry=False)
    recorded = [json.loads(e)["task_id"] for e in rc(broker).lrange(broker.keys.errors, 0, -1)]
    assert [(type(x), x) for x in recorded] == [(int, 7), (int, top)]
    assert check(broker) == {7: "failed", top: "failed"}


# -- outcomes ------------------------------------------------------------------------------------


def test_follow_up_returns_the_same_task_as_head_with_context(broker: Broker, clock: Clock) -> None:
    for title in ("one", "two"):
        broker.add("web", title, chain="coding", prompt="start")
    claim = broker.claim()
    first_run = claim.run_id
    done = broker.complete(1, claim.run_id, follow("step 2", "did step 1"))
    assert (done.status, done.run_count, done.note) == (TaskStatus.UP_NEXT, 1, "")
    assert check(broker) == {1: "up_next", 2: "up_next"}
    clock.advance(10)
    claim = broker.claim()
    assert (claim.task_id, claim.run_count, claim.attempt) == (1, 2, 1)
    broker.complete(1, claim.run_id, Outcome(summary="all done", achieved=["x"]))
    task = broker.get_task(1)
    assert (task.status, task.run_count, task.attempts) == (TaskStatus.IN_REVIEW, 2, 0)
    assert task.context == [
        {"run_id": first_run, "run_count": 1, "model": "codex", "summary": "did step 1",
         "next_prompt": "step 2", "at": clock() - 10},
        {"run_id": claim.run_id, "run_count": 2, "model": "codex", "summary": "all done",
         "achieved": ["x"], "at": clock()},
    ]
    assert [r["outcome"] for r in task.runs] == ["follow_up", "done"]
    assert broker.claim().task_id == 2
    assert check(broker) == {1: "in_review", 2: "in_progress"}


def test_follow_up_resets_attempts(broker: Broker, clock: Clock) -> None:
    broker.add("web", "one", chain="coding")
    claim = broker.claim()
    broker.fail(1, claim.run_id, "flaky")
    clock.advance(BACKOFF_S)
    claim = broker.claim()
    assert claim.attempt == 2
    broker.complete(1, claim.run_id, follow("more", "some"))
    assert broker.get_task(1).attempts == 0
    claim = broker.claim()
    assert (claim.attempt, claim.run_count) == (1, 2)


def test_outcome_no_goes_to_in_review(broker: Broker, clock: Clock) -> None:
    broker.add("web", "one", chain="coding")
    claim = broker.claim()
    done = broker.complete(1, claim.run_id, DONE)
    assert (done.status, done.run_count, done.repeated, done.note) == (TaskStatus.IN_REVIEW, 1, False, "")
    assert rc(broker).zscore(broker.keys.in_review, "1") == ms(clock())
    assert check(broker) == {1: "in_review"}
    assert nothing(broker) == {}


def test_follow_up_after_max_runs_goes_to_in_review_with_a_note(broker: Broker) -> None:
    broker.load_config(config(followup={"max_runs": 3}))
    broker.add("web", "one", chain="coding")
    broker.add("web", "two", chain="coding")
    for run in (1, 2):
        claim = broker.claim()
        assert (claim.task_id, claim.run_count) == (1, run)
        assert broker.complete(1, claim.run_id, follow(f"go {run}", "wip")).status is TaskStatus.UP_NEXT
        check(broker)
    claim = broker.claim()
    done = broker.complete(1, claim.run_id, follow("go 3", "wip"))
    note = "follow-up limit reached (3 runs): sent to in_review"
    assert (done.status, done.run_count, done.note) == (TaskStatus.IN_REVIEW, 3, note)
    task = broker.get_task(1)
    assert task.runs[-1]["outcome"] == "follow_up"
    assert task.runs[-1]["error"] == note
    assert broker.events()[-1]["message"] == note
    assert broker.claim().task_id == 2
    assert check(broker) == {1: "in_review", 2: "in_progress"}


# -- failures ------------------------------------------------------------------------------------


def test_fail_at_max_attempts_fails_and_the_board_moves_on(broker: Broker, clock: Clock) -> None:
    broker.add("web", "one", chain="coding")
    broker.add("web", "two", chain="coding")
    for attempt in (1, 2):
        claim = broker.claim()
        assert (claim.task_id, claim.attempt) == (1, attempt)
        assert broker.fail(1, claim.run_id, "boom") == (TaskStatus.UP_NEXT, attempt)
        assert check(broker) == {1: "up_next", 2: "up_next"}
        clock.advance(BACKOFF_S)
    claim = broker.claim()
    assert broker.fail(1, claim.run_id, "boom") == (TaskStatus.FAILED, 3)
    assert check(broker) == {1: "failed", 2: "up_next"}
    assert rc(broker).zscore(broker.keys.failed, "1") == ms(clock())
    assert broker.claim().task_id == 2  # no backoff left on the board
    assert rc(broker).hgetall(broker.keys.stats_failures) == {"codex|failed": "3"}


def test_fail_without_retry_fails_at_once(broker: Broker) -> None:
    broker.add("web", "one", chain="coding")
    broker.add("web", "two", chain="coding")
    claim = broker.claim()
    assert broker.fail(1, claim.run_id, "not fixable", retry=False) == (TaskStatus.FAILED, 1)
    assert check(broker) == {1: "failed", 2: "up_next"}
    assert broker.claim().task_id == 2


def test_fail_root_cause_is_recorded(broker: Broker) -> None:
    broker.add("web", "one", chain="coding")
    claim = broker.claim()
    broker.fail(1, claim.run_id, "the request timed out", retry=False)
    task = broker.get_task(1)
    assert (task.last_error_reason, task.last_error) == ("timeout", "the request timed out")
    assert task.runs[-1]["outcome"] == "timeout"


def test_release_gives_the_run_back_without_an_attempt(broker: Broker, clock: Clock) -> None:
    broker.add("a", "one", chain="coding")
    broker.add("a", "two", chain="coding")
    claim = broker.claim()
    broker.fail(1, claim.run_id, "boom")
    clock.advance(BACKOFF_S)
    claim = broker.claim()
    assert (claim.task_id, claim.attempt) == (1, 2)
    broker.add("b", "three", chain="coding")
    broker.release(1, claim.run_id, "agent_unreachable", "connection refused")
    task = broker.get_task(1)
    assert (task.status, task.attempts, task.backoff_until) == (TaskStatus.UP_NEXT, 1, None)
    assert check(broker) == {1: "up_next", 2: "up_next", 3: "up_next"}
    assert broker.cooldowns() == {}
    order = [claimed(broker.claim()) for _ in range(2)]  # a rejoined its line behind b
    assert order == [(3, "b", "codex"), (1, "a", "codex")]
    assert broker.get_task(1).runs[-1]["attempt"] == 2
    check(broker)


# -- rate limits and cooldowns -------------------------------------------------------------------


def test_rate_limited_cools_the_model_and_the_next_claim_takes_the_next_model(
    broker: Broker, clock: Clock
) -> None:
    broker.add("web", "one", chain="coding")
    broker.add("web", "two", chain="coding")
    claim = broker.claim()
    assert broker.rate_limited(1, claim.run_id, retry_after=600) == ("codex", clock() + 600)
    task = broker.get_task(1)
    assert (task.status, task.attempts, task.backoff_until) == (TaskStatus.UP_NEXT, 0, None)
    assert check(broker) == {1: "up_next", 2: "up_next"}
    claim = broker.claim()
    assert (claim.task_id, claim.model, claim.attempt, claim.run_count) == (1, "sonnet", 1, 1)
    broker.rate_limited(1, claim.run_id, retry_after=600)
    claim = broker.claim()
    assert (claim.task_id, claim.model, claim.provider) == (1, "gemini3", "google")
    assert broker.get_task(1).attempts == 0
    assert check(broker) == {1: "in_progress", 2: "up_next"}


def test_rate_limit_cooldown_only_grows_and_set_cooldown_is_exact(broker: Broker, clock: Clock) -> None:
    broker.add("a", "t", chain="coding")
    broker.add("b", "t", chain="coding")
    first, second = broker.claim(), broker.claim()
    assert (first.model, second.model) == ("codex", "codex")
    assert broker.rate_limited(first.task_id, first.run_id, retry_after=600) == ("codex", clock() + 600)
    assert broker.rate_limited(second.task_id, second.run_id, retry_after=60) == ("codex", clock() + 600)
    assert broker.cooldowns()["codex"]["until"] == clock() + 600
    third = broker.claim()
    assert third.model == "sonnet"
    broker.rate_limited(third.task_id, third.run_id, retry_after=900)
    assert broker.cooldowns()["sonnet"]["until"] == clock() + 900
    assert broker.set_cooldown("codex", 30) == clock() + 30
    assert broker.cooldowns()["codex"] == {"until": clock() + 30, "remaining_s": 30.0, "reason": "manual"}
    assert broker.set_cooldown("sonnet", 1200) == clock() + 1200
    check(broker)


def test_cooldown_end_puts_the_model_back_in_use(broker: Broker, clock: Clock) -> None:
    broker.add("web", "one", chain="coding")
    claim = broker.claim()
    broker.rate_limited(1, claim.run_id, retry_after=120)
    claim = broker.claim()
    assert claim.model == "sonnet"
    broker.complete(1, claim.run_id, follow("again", "s"))
    clock.advance(119)
    assert broker.claim().model == "sonnet"
    broker.add("other", "t", chain="coding")
    clock.advance(1)
    assert broker.cooldowns() == {}
    assert claimed(broker.claim()) == (2, "other", "codex")


def test_a_task_never_runs_on_a_model_outside_its_chain(broker: Broker, clock: Clock) -> None:
    broker.add("bulk", "one", chain="bulk")
    claim = broker.claim()
    assert claim.model == "gemini3_flash"
    broker.rate_limited(1, claim.run_id, retry_after=300)
    claim = broker.claim()
    assert claim.model == "glm"
    broker.rate_limited(1, claim.run_id, retry_after=300)
    assert nothing(broker) == {"model_rate_limited": 1}  # codex, opus, ... are free, but not its chain
    broker.add("code", "t", chain="coding")
    assert claimed(broker.claim()) == (2, "code", "codex")
    assert nothing(broker) == {"model_rate_limited": 1}
    assert check(broker) == {1: "up_next", 2: "in_progress"}
    clock.advance(300)
    assert claimed(broker.claim()) == (1, "bulk", "gemini3_flash")


def test_pinned_task_waits_for_its_model(broker: Broker, clock: Clock) -> None:
    broker.add("web", "pinned", model="sonnet")
    broker.set_cooldown("sonnet", 60)
    assert nothing(broker) == {"model_rate_limited": 1}
    clock.advance(60)
    assert claimed(broker.claim()) == (1, "web", "sonnet")


# -- caps ----------------------------------------------------------------------------------------


def test_model_and_provider_caps(broker: Broker) -> None:
    for board, model in (("o1", "opus"), ("o2", "opus"), ("o3", "opus"), ("s1", "sonnet"), ("s2", "sonnet")):
        broker.add(board, "t", model=model)
    claims = [broker.claim() for _ in range(3)]
    assert [(c.board, c.model) for c in claims] == [("o1", "opus"), ("o2", "opus"), ("s1", "sonnet")]
    assert nothing(broker) == {"model_quota_reached": 1, "provider_quota_reached": 1}
    broker.add("plan", "t", chain="planning")  # opus capped -> codex
    assert claimed(broker.claim()) == (6, "plan", "codex")
    check(broker)
    broker.complete(claims[0].task_id, claims[0].run_id, DONE)
    assert claimed(broker.claim()) == (3, "o3", "opus")
    assert nothing(broker) == {"provider_quota_reached": 1}  # sonnet 1/2 but anthropic 3/3
    assert counts(rc(broker), broker.keys.inflight_provider) == {"anthropic": "3", "openai": "1"}
    check(broker)


def test_provider_cap_sends_a_chain_to_another_provider(broker: Broker) -> None:
    broker.load_config(config(limits={"provider_max_inflight": {"openai": 1}}))
    broker.add("a", "t", chain="coding")
    broker.add("b", "t", chain="coding")
    assert claimed(broker.claim()) == (1, "a", "codex")
    assert claimed(broker.claim()) == (2, "b", "sonnet")  # codex 1/2 but openai 1/1


@pytest.mark.parametrize(
    ("hour", "cap", "night"), [(12, 2, False), (23, 3, True), (3, 3, True), (6, 2, False)]
)
def test_global_cap_day_and_night(broker: Broker, clock: Clock, hour: int, cap: int, night: bool) -> None:
    window = {"timezone": "UTC", "start": "22:00", "end": "06:00", "global_max_concurrent": 3}
    broker.load_config(config(queue={"global_max_concurrent": 2}, night_mode=window))
    clock.t = datetime(2026, 3, 10, hour, 0, tzinfo=UTC).timestamp()
    for board in "abcde":
        broker.add(board, "t", chain="bulk")
    claims = [broker.claim() for _ in range(cap)]
    assert [c.board for c in claims] == list("abcde"[:cap])
    assert nothing(broker) == {"global_cap": 5 - cap}
    assert broker.get_task(1).runs[0]["night"] is night
    check(broker)


def test_global_cap_follows_the_clock_across_the_window(broker: Broker, clock: Clock) -> None:
    window = {"timezone": "UTC", "start": "22:00", "end": "06:00", "global_max_concurrent": 3}
    broker.load_config(config(queue={"global_max_concurrent": 2}, night_mode=window))
    clock.t = datetime(2026, 3, 10, 21, 59, tzinfo=UTC).timestamp()
    for board in "abcd":
        broker.add(board, "t", chain="bulk")
    broker.claim()
    broker.claim()
    assert nothing(broker) == {"global_cap": 2}
    clock.advance(60)  # 22:00: night
    assert broker.claim().board == "c"
    assert nothing(broker) == {"global_cap": 1}
    clock.t = datetime(2026, 3, 11, 6, 0, tzinfo=UTC).timestamp()  # day again: 3 run, none preempted
    assert nothing(broker) == {"global_cap": 1}
    assert rc(broker).zcard(broker.keys.running) == 3


def test_config_load_changes_caps_live(broker: Broker) -> None:
    for board in "abcd":
        broker.add(board, "t", model="opus")
    broker.claim()
    broker.claim()
    assert nothing(broker) == {"model_quota_reached": 2}
    broker.load_config(config(limits={"model_max_inflight": {"opus": 4}}))
    assert broker.claim().board == "c"
    assert nothing(broker) == {"provider_quota_reached": 1}  # opus 3/4, anthropic 3/3
    broker.load_config(config(limits={"model_max_inflight": {"opus": 1}, "provider_max_inflight": {}}))
    assert nothing(broker) == {"model_quota_reached": 1}
    assert counts(rc(broker), broker.keys.inflight_model) == {"opus": "3"}  # nothing preempted
    check(broker)


def test_config_dropping_a_chain_in_use_is_refused_and_changes_nothing(
    broker: Broker, r: redis.Redis
) -> None:
    broker.add("a", "queued", chain="bulk")
    broker.add("b", "running", chain="bulk")
    broker.add("c", "other", chain="coding")
    broker.pause("a")
    claim = broker.claim()
    assert claim.task_id == 2
    without_bulk = config(chains={"coding": ["codex", "sonnet"], "planning": ["opus"]})
    before = {k: r.dump(k) for k in r.keys("*")}
    with pytest.raises(ConfigInUse, match="chain 'bulk' is still used by 2 unfinished task"):
        broker.load_config(without_bulk)
    assert {k: r.dump(k) for k in r.keys("*")} == before
    assert broker.config() == DEFAULT_CONFIG
    broker.cancel(1)
    with pytest.raises(ConfigInUse, match="by 1 unfinished"):
        broker.load_config(without_bulk)
    broker.complete(2, claim.run_id, DONE)
    assert broker.load_config(without_bulk) == 2
    assert broker.config().chains == {"coding": ["codex", "sonnet"], "planning": ["opus"]}
    check(broker)


# -- fairness ------------------------------------------------------------------------------------


def test_round_robin_serves_the_least_recently_served_board_first(broker: Broker) -> None:
    for board in "abc":
        broker.add(board, "first", chain="bulk")
        broker.add(board, "second", chain="bulk")
    runs = {c.board: c for c in (broker.claim(), broker.claim(), broker.claim())}
    assert [(b, c.task_id) for b, c in runs.items()] == [("a", 1), ("b", 3), ("c", 5)]
    assert nothing(broker) == {"board_busy": 3}
    for board in "cab":
        broker.complete(runs[board].task_id, runs[board].run_id, DONE)
        check(broker)
    assert [broker.claim().task_id for _ in range(3)] == [6, 2, 4]
    check(broker)


def test_round_robin_across_chains_follows_arrival(broker: Broker) -> None:
    broker.add("y", "t", chain="coding")
    broker.add("z", "t", model="glm")
    broker.add("x", "t", chain="planning")
    order = [claimed(broker.claim()) for _ in range(3)]
    assert order == [(1, "y", "codex"), (2, "z", "glm"), (3, "x", "opus")]


def test_a_board_that_becomes_ready_joins_the_back(broker: Broker) -> None:
    broker.add("a", "t", chain="bulk")
    broker.add("b", "t", chain="bulk")
    assert broker.pause("a") == "paused"
    broker.add("c", "t", chain="coding")
    assert broker.resume("a") == "ready"
    broker.add("d", "t", chain="bulk")
    assert [broker.claim().board for _ in range(4)] == ["b", "c", "a", "d"]


def test_rate_limited_board_keeps_its_head_but_rejoins_the_line(broker: Broker) -> None:
    broker.add("a", "t", chain="coding")
    broker.add("b", "t", chain="coding")
    claim = broker.claim()
    broker.rate_limited(claim.task_id, claim.run_id, retry_after=60)
    assert [claimed(broker.claim()) for _ in range(2)] == [(2, "b", "sonnet"), (1, "a", "sonnet")]


# -- pause and cancel ----------------------------------------------------------------------------


def test_pause_and_resume(broker: Broker) -> None:
    broker.add("a", "one", chain="coding")
    broker.add("a", "two", chain="coding")
    broker.add("b", "three", chain="coding")
    broker.pause("a")
    assert broker.claim().task_id == 3
    assert nothing(broker) == {"board_paused": 1}
    broker.resume("a")
    claim = broker.claim()
    assert claim.task_id == 1
    broker.pause("a")  # the running task may still finish
    broker.heartbeat(1, claim.run_id)
    assert broker.complete(1, claim.run_id, DONE).status is TaskStatus.IN_REVIEW
    assert nothing(broker) == {"board_paused": 1}
    check(broker)
    broker.resume("a")
    assert broker.claim().task_id == 2
    check(broker)


def bring_first_task_to(broker: Broker, clock: Clock, state: str) -> Claim | None:
    broker.add("web", "one", chain="coding")
    broker.add("web", "two", chain="coding")
    if state == "up_next":
        return None
    claim = broker.claim()
    if state == "in_review":
        broker.complete(1, claim.run_id, DONE)
    elif state == "failed":
        broker.fail(1, claim.run_id, "x", retry=False)
    elif state == "backoff":
        broker.fail(1, claim.run_id, "x")
    return claim


@pytest.mark.parametrize(
    ("state", "previous"),
    [("up_next", "up_next"), ("backoff", "up_next"), ("in_progress", "in_progress"),
     ("in_review", "in_review"), ("failed", "failed")],
)
def test_cancel_from_every_status(broker: Broker, clock: Clock, state: str, previous: str) -> None:
    bring_first_task_to(broker, clock, state)
    check(broker)
    assert broker.cancel(1) is TaskStatus(previous)
    assert check(broker) == {1: "cancelled", 2: "up_next"}
    assert rc(broker).zscore(broker.keys.cancelled, "1") == ms(clock())
    assert broker.claim().task_id == 2  # the board moved on
    with pytest.raises(InvalidState):
        broker.cancel(1)
    assert check(broker) == {1: "cancelled", 2: "in_progress"}


def test_cancel_a_queued_task_behind_the_head(broker: Broker) -> None:
    for title in ("one", "two", "three"):
        broker.add("web", title, chain="coding")
    assert broker.cancel(2) is TaskStatus.UP_NEXT
    assert check(broker) == {1: "up_next", 2: "cancelled", 3: "up_next"}
    claim = broker.claim()
    broker.complete(1, claim.run_id, DONE)
    assert broker.claim().task_id == 3


def test_cancelled_running_run_is_fenced_and_its_counters_released(broker: Broker, clock: Clock) -> None:
    claim = bring_first_task_to(broker, clock, "in_progress")
    assert claim is not None
    broker.cancel(1)
    c, k = rc(broker), broker.keys
    assert (c.zcard(k.running), counts(c, k.inflight_model), counts(c, k.inflight_provider)) == (0, {}, {})
    assert c.exists(k.lease(1)) == 0
    with pytest.raises(RunFenced, match="the run already ended"):
        broker.heartbeat(1, claim.run_id)
    with pytest.raises(RunFenced):
        broker.complete(1, claim.run_id, DONE)
    with pytest.raises(RunFenced):
        broker.fail(1, claim.run_id, "x")
    with pytest.raises(RunFenced):
        broker.rate_limited(1, claim.run_id, retry_after=60)
    assert broker.cooldowns() == {}
    assert broker.get_task(1).runs[-1]["outcome"] == "cancelled"
    assert check(broker) == {1: "cancelled", 2: "up_next"}


# -- the reaper ----------------------------------------------------------------------------------


def test_reap_requeues_an_expired_lease_at_the_head(broker: Broker, clock: Clock) -> None:
    broker.add("web", "one", chain="coding")
    broker.add("web", "two", chain="coding")
    claim = broker.claim()
    clock.advance(LEASE_S - 1)
    assert broker.reap() == []
    clock.advance(1)
    assert broker.reap() == [1]
    task = broker.get_task(1)
    assert (task.status, task.attempts, task.backoff_until) == (TaskStatus.UP_NEXT, 1, None)
    assert (task.last_error_reason, task.runs[-1]["outcome"]) == ("timeout", "timeout")
    assert check(broker) == {1: "up_next", 2: "up_next"}
    with pytest.raises(RunFenced, match="the run already ended"):
        broker.complete(1, claim.run_id, Outcome(summary="late"))
    with pytest.raises(RunFenced):
        broker.heartbeat(1, claim.run_id)
    again = broker.claim()  # no backoff: at once, the same head
    assert (again.task_id, again.attempt, again.run_count) == (1, 2, 1)
    with pytest.raises(RunFenced, match="the run already ended"):
        broker.complete(1, claim.run_id, Outcome(summary="late"))
    with pytest.raises(RunFenced, match="another run holds the lease"):
        broker.heartbeat(1, "00000000-0000-4000-8000-000000000000")
    assert broker.get_task(1).run_id == again.run_id
    assert check(broker) == {1: "in_progress", 2: "up_next"}


def test_late_heartbeat_before_the_reap_is_accepted(broker: Broker, clock: Clock) -> None:
    broker.add("web", "one", chain="coding")
    claim = broker.claim()
    clock.advance(LEASE_S + 300)  # past the deadline, the reaper has not run
    assert broker.heartbeat(1, claim.run_id) == clock() + HEARTBEAT_S
    assert broker.reap() == []
    clock.advance(HEARTBEAT_S - 1)
    assert broker.reap() == []
    check(broker)
    clock.advance(1)
    assert broker.reap() == [1]
    assert check(broker) == {1: "up_next"}


def test_reaps_count_as_attempts_up_to_failed(broker: Broker, clock: Clock) -> None:
    broker.add("web", "one", chain="coding")
    broker.add("web", "two", chain="coding")
    for attempt in (1, 2, 3):
        claim = broker.claim()
        assert (claim.task_id, claim.attempt) == (1, attempt)
        clock.advance(LEASE_S)
        assert broker.reap() == [1]
        check(broker)
    assert broker.get_task(1).status is TaskStatus.FAILED
    assert broker.claim().task_id == 2


# -- every step of a mixed run -------------------------------------------------------------------


def test_counters_and_places_through_a_mixed_scenario(broker: Broker, clock: Clock) -> None:
    for board, chain in (("a", "coding"), ("a", "coding"), ("b", "planning"), ("c", "bulk"), ("c", "bulk")):
        broker.add(board, "t", chain=chain)
        check(broker)
    claims = {}
    for _ in range(3):
        claim = broker.claim()
        claims[claim.task_id] = claim
        check(broker)
    assert sorted(claims) == [1, 3, 4]
    broker.rate_limited(1, claims[1].run_id, retry_after=100)
    check(broker)
    broker.fail(3, claims[3].run_id, "bad")
    check(broker)
    broker.complete(4, claims[4].run_id, follow("more", "half"))
    check(broker)
    more = [broker.claim(), broker.claim()]
    assert sorted(claimed(c) for c in more) == [(1, "a", "sonnet"), (4, "c", "gemini3_flash")]
    check(broker)
    broker.cancel(1)
    check(broker)
    clock.advance(LEASE_S)
    assert broker.reap() == [4]
    assert check(broker) == {1: "cancelled", 2: "up_next", 3: "up_next", 4: "up_next", 5: "up_next"}
    assert sorted(claimed(broker.claim()) for _ in range(3)) == [
        (2, "a", "codex"), (3, "b", "opus"), (4, "c", "gemini3_flash")
    ]
    check(broker)


def _keyspace(broker: Broker, runs: list[str]) -> dict[str, Any]:
    """Every key of the broker's namespace by type (but its identity), run ids written as their claim's place in
    ``runs`` and the events without their stream ids: two namespaces driven the same way compare equal."""
    client, prefix = rc(broker), broker.keys.prefix

    def same(v: Any) -> Any:
        if isinstance(v, str):
            for i, run in enumerate(runs):
                v = v.replace(run, f"run{i}")
            return v
        if isinstance(v, (list, tuple)):
            return [same(x) for x in v]
        if isinstance(v, dict):
            return {same(k): same(x) for k, x in v.items()}
        return v

    read = {"hash": client.hgetall, "set": lambda k: sorted(client.smembers(k)), "string": client.get,
            "list": lambda k: client.lrange(k, 0, -1), "zset": lambda k: client.zrange(k, 0, -1, withscores=True),
            "stream": lambda k: [fields for _, fields in client.xrange(k)]}
    return {same(k[len(prefix):]): same(read[client.type(k)](k)) for k in client.scan_iter(f"{prefix}*")
            if k != broker.keys.meta}  # the namespace's own identity


def test_a_batch_claims_and_completes_as_one_by_one_does(redis_url: str, clock: Clock) -> None:
    """claim_many and complete_many write what they share once, at their end (lib/core.lua later, claim_task's
    flush): the whole keyspace after them is what single claims and completes leave, with a model cap crossed
    in the batch (codex blocks, the rest fall back to sonnet) and boards that go busy, ready and idle."""
    sides = []
    for namespace in ("single", "batch"):
        b = Broker(redis.Redis.from_url(redis_url, decode_responses=True), namespace, clock=clock)
        b.connect()
        rc(b).delete(*rc(b).keys(f"{b.keys.prefix}*") or ["-"])
        b.load_config(config(limits={"model_max_inflight": {"codex": 2}}))
        for i in range(9):
            b.add(f"b{i % 4}", f"t{i}", chain="coding")
        sides.append(b)
    single, batch = sides
    one = [single.claim() for _ in range(4)]
    many, _ = batch.claim_many(4)
    assert [c.model for c in many] == [c.model for c in one] == ["codex", "codex", "sonnet", "sonnet"]
    runs = ([c.run_id for c in one], [c.run_id for c in many])
    assert _keyspace(single, runs[0]) == _keyspace(batch, runs[1])
    for c in one:
        single.complete(c.task_id, c.run_id, DONE)
    batch.complete_many([(c.task_id, c.run_id, DONE) for c in many])
    assert _keyspace(single, runs[0]) == _keyspace(batch, runs[1])
    assert rc(batch).hgetall(batch.keys.blocked) == {}  # codex fell below its cap: unblocked
    for b in sides:
        b.client.close()


def test_outcomes_per_board_are_counted_in_the_board_and_added_to_the_old_hash(broker: Broker) -> None:
    """A complete counts its board's outcomes in board:<b> `completed` (O(1) at any number of boards); what
    stats:completed counted before that stays and is added, so no counter goes back after an upgrade."""
    c, k = rc(broker), broker.keys
    c.hset(k.stats_completed, mapping={"web": 5, "gone": 2})  # counted by an earlier version
    for board in ("web", "ops"):
        broker.add(board, "t", chain="coding")
    for claim in broker.claim_many(2)[0]:
        broker.complete(claim.task_id, claim.run_id, DONE)
    assert (c.hget(k.board("web"), "completed"), c.hget(k.board("ops"), "completed")) == ("1", "1")
    assert c.hgetall(k.stats_completed) == {"web": "5", "gone": "2"}  # never written
    assert broker.counters().completed == {"web": 6.0, "ops": 1.0, "gone": 2.0}


def test_a_completed_task_with_short_fields_keeps_its_compact_hash(broker: Broker) -> None:
    """last_digest ("<run id>|<digest>") fits Redis's 64-byte listpack value limit: a complete does not turn a
    small task hash into a hash table (several times its memory, and a conversion on the complete's path)."""
    broker.add("web", "t", chain="coding")
    claim = broker.claim()
    broker.complete(claim.task_id, claim.run_id, DONE)
    c, key = rc(broker), broker.keys.task(claim.task_id)
    assert len(c.hget(key, "last_digest")) <= 64
    assert c.object("encoding", key) in ("listpack", "ziplist")  # Redis 7 / 6.2
