"""``clawq doctor``: every invariant checked in one atomic script; --repair rebuilds the derived state.

Each test runs a mixed workload, tampers with one derived key, and asserts that the doctor names it, that
the repair fixes it (the doctor is then clean and ``test_rules.check`` passes) and that the queue still
behaves: draining it claims every board's head in order, the tampered board included.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
from test_rules import Clock, check, config, follow, rc

from clawq import cli
from clawq.broker import Broker, ConfigMissing, NothingToClaim, Outcome, TaskStatus

DONE = Outcome(summary="finished")


def workload(broker: Broker, clock: Clock) -> None:
    """add / claim / complete / follow-up / fail / rate-limit / cancel / pause, ending with tasks everywhere."""
    broker.load_config(config())
    broker.add("web", "one", chain="coding")  # 1 -> in_review
    broker.add("web", "two", chain="coding")  # 2
    broker.add("api", "plan", chain="planning")  # 3 -> follow-up
    broker.add("api", "bulk", chain="bulk")  # 4
    broker.add("docs", "pinned", model="glm")  # 5 -> rate limited
    broker.add("ops", "x", chain="coding")  # 6 -> failed once, backoff
    broker.add("ops", "y", chain="coding")  # 7 -> cancelled
    broker.add("p", "z", chain="bulk")  # 8, board paused
    broker.pause("p")
    claims = {}
    while True:
        try:
            c = broker.claim()
        except NothingToClaim:
            break
        claims[c.task_id] = c
    assert set(claims) == {1, 3, 5, 6}
    broker.complete(1, claims[1].run_id, DONE)
    broker.complete(3, claims[3].run_id, follow("step 2", "did step 1"))
    broker.fail(6, claims[6].run_id, "boom")
    broker.rate_limited(5, claims[5].run_id, retry_after=600)
    broker.cancel(7)
    clock.advance(5)
    assert broker.claim().task_id in (2, 3)  # one run stays in progress
    check(broker)


def snapshot(r: redis.Redis) -> dict[Any, Any]:
    return {k: r.dump(k) for k in r.keys("*")}


def drain(broker: Broker) -> list[int]:
    """Claim and complete until nothing is claimable; every claim is its board's head; returns the ids."""
    c = rc(broker)
    claimed: list[int] = []
    for _ in range(50):
        check(broker)
        try:
            claim = broker.claim()
        except NothingToClaim:
            break
        queued = [int(x) for x in c.zrange(broker.keys.queue(claim.board), 0, -1)]
        assert not queued or claim.task_id < min(queued), "claimed behind the head of its board"
        claimed.append(claim.task_id)
        broker.complete(claim.task_id, claim.run_id, DONE)
    check(broker)
    return claimed


def repaired(broker: Broker, *expected: str) -> dict[str, Any]:
    """The doctor names each expected problem; the repair fixes everything; the queue checks out."""
    found = broker.doctor()
    assert not found["ok"]
    for text in expected:
        assert any(text in p for p in found["problems"]), (text, found["problems"])
    doc = broker.doctor(repair=True)
    assert doc["ok"], doc
    assert doc["problems"] and set(doc["problems"]) <= set(found["problems"])  # no cascade after a fix
    assert doc["repaired"] and doc["remaining"] == []
    assert broker.doctor() == {"ok": True, "problems": [], "repaired": [], "remaining": [], "notes": []}
    check(broker)
    return doc


# -- healthy -------------------------------------------------------------------------------------


def test_a_healthy_queue_has_no_problems_and_repair_changes_nothing(
    broker: Broker, clock: Clock, r: redis.Redis
) -> None:
    workload(broker, clock)
    assert broker.doctor() == {"ok": True, "problems": [], "repaired": [], "remaining": [], "notes": []}
    before = snapshot(r)
    assert broker.doctor(repair=True) == {"ok": True, "problems": [], "repaired": [], "remaining": [], "notes": []}
    assert snapshot(r) == before


def test_a_due_backoff_still_in_its_index_is_healthy(broker: Broker, clock: Clock, r: redis.Redis) -> None:
    workload(broker, clock)
    clock.advance(10 * 60)  # ops' backoff ended; the next claim moves it
    before = snapshot(r)
    assert broker.doctor(repair=True)["problems"] == []
    assert snapshot(r) == before


def test_an_empty_namespace_is_healthy_and_untouched(broker: Broker, r: redis.Redis) -> None:
    assert broker.doctor(repair=True)["ok"]
    assert r.keys("*") == []


# -- one tamper each -----------------------------------------------------------------------------


def test_board_deleted_from_its_ready_line(broker: Broker, clock: Clock) -> None:
    workload(broker, clock)
    solo = broker.add("solo", "head", model="opus")
    rc(broker).zrem(broker.keys.ready("m:opus"), "solo")
    assert "ready:fronts lists m:opus, whose line is empty" in broker.doctor()["problems"]
    with pytest.raises(NothingToClaim):  # lost: every other board is claimed, solo never
        while broker.claim().board != "solo":
            pass
    doc = repaired(broker, "board solo (ready) is missing from ready:m:opus")
    assert "put board solo in ready:m:opus" in doc["repaired"]
    assert solo in drain(broker)


def test_inflight_model_bumped(broker: Broker, clock: Clock) -> None:
    workload(broker, clock)
    rc(broker).hincrby(broker.keys.inflight_model, "glm", 1)
    doc = repaired(broker, "inflight:model glm is 1, expected absent")
    assert doc["repaired"] == ["set inflight:model glm to absent"]
    clock.advance(3600)  # cooldowns and backoffs over
    broker.resume("p")
    assert set(drain(broker)) >= {4, 5, 6, 8}  # 2 or 3 still runs from the workload


def test_task_removed_from_its_queue_is_put_back_as_head(broker: Broker, clock: Clock) -> None:
    workload(broker, clock)
    first = broker.add("solo", "first", chain="bulk")
    second = broker.add("solo", "second", chain="bulk")
    rc(broker).zrem(broker.keys.queue("solo"), first)
    doc = repaired(broker, f"task {first} (up_next) is missing from queue of board solo")
    assert f"put task {first} back in queue of board solo" in doc["repaired"]
    order = [t for t in drain(broker) if t in (first, second)]
    assert order == [first, second]


def test_task_in_two_places_keeps_the_place_of_its_status(broker: Broker, clock: Clock) -> None:
    workload(broker, clock)
    rc(broker).zadd(broker.keys.queue("web"), {"1": 1})  # task 1 is in_review
    repaired(broker, "task 1 (in_review) is also in queue of board web")
    assert broker.get_task(1).status == "in_review"
    clock.advance(3600)
    assert 1 not in drain(broker)


def test_wrong_refs(broker: Broker, clock: Clock) -> None:
    workload(broker, clock)
    rc(broker).hset(broker.keys.refs, mapping={"c:coding": 42, "m:opus": 1})
    doc = repaired(broker, "refs c:coding is 42, expected ", "refs m:opus is 1, expected absent")
    assert "set refs m:opus to absent" in doc["repaired"]
    clock.advance(3600)
    drain(broker)


def test_stale_board_running_slot(broker: Broker, clock: Clock) -> None:
    workload(broker, clock)
    head = broker.add("solo", "head", chain="bulk")
    rc(broker).hset(broker.keys.board("solo"), "running", "999")
    repaired(broker, "board solo running slot is 999, expected empty")
    assert head in drain(broker)


def test_ready_fronts_member_with_an_empty_line(broker: Broker, clock: Clock) -> None:
    workload(broker, clock)
    rc(broker).zadd(broker.keys.ready_fronts, {"m:opus": 1})
    doc = repaired(broker, "ready:fronts lists m:opus, whose line is empty")
    assert doc["repaired"] == ["removed m:opus from ready:fronts"]
    drain(broker)


def test_ready_fronts_with_a_wrong_place_serves_out_of_turn_until_repaired(broker: Broker, clock: Clock) -> None:
    broker.load_config(config())
    first = broker.add("early", "x", chain="coding")
    broker.add("late", "y", chain="bulk")
    c, k = rc(broker), broker.keys
    c.zadd(k.ready_fronts, {"c:coding": 10**6})  # the coding line now looks younger than the bulk one
    assert broker.claim().board == "late"
    broker.complete(2, c.hget(k.task(2), "run_id"), DONE)
    doc = repaired(broker, "ready:fronts places c:coding at 1000000, its line's front board is at 1")
    assert doc["repaired"] == ["set c:coding in ready:fronts to 1"]
    assert broker.claim().task_id == first


def test_a_stale_model_block_is_removed(broker: Broker, clock: Clock) -> None:
    workload(broker, clock)
    rc(broker).hset(broker.keys.blocked, "m:gemini3_flash", "model_quota_reached")
    doc = repaired(broker, "blocked m:gemini3_flash is model_quota_reached, expected absent")
    assert doc["repaired"] == ["set blocked m:gemini3_flash to absent"]


def test_missing_cap_and_cooldown_blocks_are_restored(broker: Broker, clock: Clock) -> None:
    broker.load_config(config(limits={"model_max_inflight": {"codex": 1}}))
    broker.add("a", "x", chain="coding")
    broker.add("b", "y", chain="coding")
    assert broker.claim().model == "codex"
    broker.set_cooldown("sonnet", 600)
    until = rc(broker).hget(broker.keys.blocked, "c:sonnet")
    rc(broker).delete(broker.keys.blocked)
    doc = repaired(broker, "blocked c:sonnet is absent", "blocked m:codex is absent")
    assert f"set blocked c:sonnet to {until}" in doc["repaired"]
    assert broker.claim().model == "gemini3", "codex is at its cap and sonnet cools: the chain's third model"


@pytest.mark.parametrize("tamper, problem", [
    ("delete", "cfg:claim is missing"),
    ("garble", "cfg:claim is unreadable"),
    ("stale", "cfg:claim disagrees with the cfg:* hashes (it says version"),
])
def test_the_compiled_config_is_checked_and_rewritten_from_the_hashes(
        broker: Broker, clock: Clock, tamper: str, problem: str) -> None:
    workload(broker, clock)
    c, k = rc(broker), broker.keys
    version = c.hget(k.cfg_settings, "version")
    if tamper == "delete":
        c.delete(k.cfg_claim)
    elif tamper == "garble":
        c.set(k.cfg_claim, "{garbled")
    else:  # a stale document: another cap, another chain (what the scripts would decide with)
        doc = json.loads(c.get(k.cfg_claim))
        doc["model_cap"]["glm"] = 99
        doc["chains"]["coding"] = "glm"
        c.set(k.cfg_claim, json.dumps(doc))
    if tamper != "stale":
        with pytest.raises(ConfigMissing, match="cfg:claim"):
            broker.claim()
    doc = repaired(broker, problem)
    assert doc["repaired"] == [f"rewrote cfg:claim from the cfg:* hashes (version {version})"]
    assert drain(broker)


def test_a_compiled_config_without_a_loaded_config_is_deleted(broker: Broker, clock: Clock) -> None:
    workload(broker, clock)
    c, k = rc(broker), broker.keys
    c.delete(k.cfg_settings, k.cfg_model_cap, k.cfg_provider_cap, k.cfg_model_provider, k.cfg_chains)
    found = broker.doctor(repair=True)
    assert "cfg:claim exists, but no config is loaded (cfg:settings is missing)" in found["problems"]
    assert "deleted cfg:claim (no config is loaded)" in found["repaired"]
    assert c.get(k.cfg_claim) is None


def test_an_ended_cooldown_still_listed_is_healthy(broker: Broker, clock: Clock, r: redis.Redis) -> None:
    workload(broker, clock)
    clock.advance(3600)  # glm's cooldown is over; its entry stays until the next cooldown
    assert rc(broker).hexists(broker.keys.blocked, "c:glm")
    assert broker.doctor()["problems"] == []


def test_task_in_no_place_is_found_and_put_back(broker: Broker, clock: Clock) -> None:
    """No index lists every task: the doctor finds the task hashes with SCAN, so a task in no place is found too."""
    workload(broker, clock)
    last = broker.add("solo", "last", chain="bulk")
    rc(broker).zrem(broker.keys.in_review, "1")
    rc(broker).zrem(broker.keys.queue("solo"), last)
    doc = repaired(broker, "task 1 (in_review) is missing from status:in_review",
                   f"task {last} (up_next) is missing from queue of board solo")
    assert {"put task 1 back in status:in_review", f"put task {last} back in queue of board solo"} <= set(
        doc["repaired"])
    assert broker.get_task(1).status == "in_review"
    assert last in drain(broker)


def test_a_place_listing_a_task_with_no_hash_is_cleaned(broker: Broker, clock: Clock) -> None:
    workload(broker, clock)
    rc(broker).zadd(broker.keys.failed, {"77": 1})
    doc = repaired(broker, "task 77 has no hash but is listed in status:failed")
    assert doc["repaired"] == ["dropped task 77 (no hash) from every index"]


def test_task_seq_below_a_task_id(broker: Broker, clock: Clock) -> None:
    workload(broker, clock)
    rc(broker).set(broker.keys.task_seq, 5)
    doc = repaired(broker, "seq:task is 5, below task 8 (the next auto id would be taken)")
    assert doc["repaired"] == ["set seq:task to 8"]
    assert broker.add("web", "next", chain="coding") == 9


def test_ids_given_far_apart_are_all_checked(broker: Broker, clock: Clock) -> None:
    """The task hashes are found with SCAN, not by walking the ids: ids given far apart cost nothing."""
    workload(broker, clock)
    near = broker.add("far", "near", chain="bulk", task_id=100)
    far = broker.add("far", "far", chain="bulk", task_id=10**13)
    assert broker.doctor()["ok"]
    rc(broker).zrem(broker.keys.queue("far"), near, far)
    doc = repaired(broker, f"task {near} (up_next) is missing from queue of board far",
                   f"task {far} (up_next) is missing from queue of board far")
    assert len(doc["repaired"]) == 2
    drained = drain(broker)
    assert {near, far} <= set(drained) and drained.index(near) < drained.index(far)


def test_list_tasks_reads_every_place(broker: Broker, clock: Clock) -> None:
    """``list_tasks`` walks the places (the board queues, running, the status ZSETs): every task, in id order."""
    workload(broker, clock)
    every = [broker.get_task(tid).model_dump(exclude={"context", "runs"}) for tid in range(1, 9)]
    assert {t["status"] for t in every} == {"up_next", "in_progress", "in_review", "cancelled"}
    assert [t.model_dump(exclude={"context", "runs"}) for t in broker.list_tasks()] == every
    for board in ("web", "api", "docs", "ops", "p", "nope"):
        for status in (None, *TaskStatus):
            got = [t.task_id for t in broker.list_tasks(board=board, status=status)]
            assert got == [t["task_id"] for t in every
                           if t["board"] == board and status in (None, t["status"])], (board, status)


# -- CLI -----------------------------------------------------------------------------------------


def clawq(capsys: pytest.CaptureFixture[str], url: str, ns: str, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        cli.main(["--redis-url", url, "--namespace", ns, *args])
    code = exc.value.code
    assert isinstance(code, int)
    return code, capsys.readouterr().out


def test_cli_json_shape_and_exit_codes(
    broker: Broker, clock: Clock, redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    workload(broker, clock)
    code, out = clawq(capsys, redis_url, namespace, "doctor", "--json")
    assert code == 0
    assert json.loads(out) == {"ok": True, "problems": [], "repaired": [], "remaining": [], "notes": []}

    rc(broker).hincrby(broker.keys.inflight_model, "glm", 1)
    rc(broker).zadd(broker.keys.ready_fronts, {"m:opus": 1})
    code, out = clawq(capsys, redis_url, namespace, "doctor", "--json")
    doc = json.loads(out)
    assert code == 1
    assert set(doc) == {"ok", "problems", "repaired", "remaining", "notes"}
    assert doc["ok"] is False and len(doc["problems"]) == 2 and doc["repaired"] == []

    code, out = clawq(capsys, redis_url, namespace, "doctor")  # text: one line per problem
    assert code == 1
    assert [line for line in out.splitlines() if line.startswith("problem: ")] == [
        f"problem: {p}" for p in doc["problems"]
    ]

    code, out = clawq(capsys, redis_url, namespace, "doctor", "--repair", "--json")
    fixed = json.loads(out)
    assert code == 0
    assert fixed["ok"] is True and fixed["problems"] == doc["problems"] and len(fixed["repaired"]) == 2

    code, out = clawq(capsys, redis_url, namespace, "doctor")
    assert (code, out.strip()) == (0, "ok")
