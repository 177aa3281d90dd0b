"""The Broker API above the scripts: connect, schema, health, events, signal-driven reports."""

from __future__ import annotations

import pytest
import redis
from conftest import FakeClock

from clawq.broker import (
    SCHEMA_VERSION,
    Broker,
    Completion,
    InputError,
    NothingToClaim,
    Outcome,
    RunFenced,
    SchemaMismatch,
    TaskNotFound,
    TaskStatus,
    parse_config,
)


def test_first_change_writes_schema_and_seed_config(broker: Broker) -> None:
    assert broker.client.exists(broker.keys.meta, broker.keys.config) == 0  # connect only reads
    assert broker.config().queue.global_max_concurrent == 6
    broker.add("web", "t", chain="coding")
    assert broker.client.hget(broker.keys.meta, "schema_version") == str(SCHEMA_VERSION)
    assert broker.client.exists(broker.keys.config) == 1


def test_schema_mismatch_is_refused(broker: Broker, redis_url: str) -> None:
    broker.add("web", "t", chain="coding")
    broker.client.hset(broker.keys.meta, "schema_version", "99")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        with pytest.raises(SchemaMismatch, match="schema version 99"):
            Broker(client, broker.namespace).connect()
    finally:
        client.close()


def test_namespaces_are_isolated(broker: Broker, redis_url: str, clock: FakeClock) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        other = Broker(client, broker.namespace + "x", clock=clock)
        other.connect()
        broker.add("web", "mine", chain="coding")
        assert other.list_tasks() == []
        assert all(k.startswith(f"clawq:{{{broker.namespace}}}:") for k in client.keys("*")
                   if broker.namespace + "x" not in k)
    finally:
        client.close()


def test_rate_limited_message_sets_cooldown_from_parsed_reset(broker: Broker, clock: FakeClock) -> None:
    tid = broker.add("web", "t", chain="coding")
    c = broker.claim()
    model, until = broker.rate_limited(tid, c.run_id, message="Rate limit reached. Try again in 5 minutes.")
    assert model == "codex"
    assert until == pytest.approx(clock() + 300, abs=0.01)
    assert broker.cooldowns()["codex"]["reason"] == "rate_limit"
    assert broker.claim().model == "sonnet"


def test_rate_limited_without_time_uses_default_cooldown(broker: Broker, clock: FakeClock) -> None:
    tid = broker.add("web", "t", chain="coding")
    c = broker.claim()
    _, until = broker.rate_limited(tid, c.run_id, message="429 Too Many Requests")
    assert until == pytest.approx(clock() + 600, abs=0.01)


def test_usage_limit_is_quota_reached_event(broker: Broker, clock: FakeClock) -> None:
    tid = broker.add("web", "t", chain="coding")
    c = broker.claim()
    broker.rate_limited(tid, c.run_id, message='{"error": {"type": "usage_limit_reached", '
                                               f'"resets_at": {int(clock()) + 3600}}}}}')
    types = [e["type"] for e in broker.events(100)]
    assert types[-1] == "quota_reached"
    assert broker.health()["recent_errors"][0]["reason"] == "quota_reached"


def test_fail_root_cause_is_classified(broker: Broker) -> None:
    tid = broker.add("web", "t", chain="coding")
    c = broker.claim()
    broker.fail(tid, c.run_id, "agent timed out after 60 minutes")
    err = broker.health()["recent_errors"][0]
    assert (err["reason"], err["task_id"], err["board"], err["model"]) == ("timeout", tid, "web", "codex")


def test_health_document(broker: Broker, clock: FakeClock) -> None:
    broker.load_config(parse_config({"night_mode": None}))
    a = broker.add("web", "a", chain="coding")
    broker.add("web", "b", chain="coding")
    broker.add("api", "c", model="opus")
    c = broker.claim()
    assert c.task_id == a
    broker.complete(a, c.run_id, Outcome(summary="ok"))
    clock.advance(30)
    h = broker.health()
    assert h["global"] == {"max_concurrent": 6, "in_progress": 0, "night": False, "scheduled": 0}
    assert h["boards"]["web"]["queue_depth"] == 1
    assert h["boards"]["web"]["completed_last_hour"] == 1
    assert h["boards"]["api"]["oldest_waiting_s"] == pytest.approx(30, abs=0.1)
    assert h["models"]["codex"] == {"provider": "openai", "inflight": 0, "cap": 2,
                                    "cooldown_remaining_s": 0.0, "failures": 0}
    assert h["providers"]["anthropic"] | {"breaker": None} == {"inflight": 0, "cap": 3, "breaker": None}
    c2 = broker.claim()
    h = broker.health()
    assert h["global"]["in_progress"] == 1
    assert h["models"][c2.model]["inflight"] == 1
    assert h["boards"][c2.board]["in_progress"] == 1


def test_events_are_typed_and_ordered(broker: Broker) -> None:
    tid = broker.add("web", "a", chain="coding")
    c = broker.claim()
    broker.complete(tid, c.run_id, Outcome(needs_follow_up=True, next_prompt="more", summary="s"))
    c = broker.claim()
    broker.complete(tid, c.run_id, Outcome(summary="done"))
    evs = [e for e in broker.events(100) if e.get("task_id") == tid]
    assert [e["type"] for e in evs] == ["added", "claimed", "follow_up", "claimed", "completed"]
    assert evs[-1]["run_id"] == c.run_id and evs[-1]["model"] == "codex"
    after = broker.events(100, after=evs[2]["id"])
    assert [e["type"] for e in after] == ["claimed", "completed"]


def test_task_record_has_context_and_history(broker: Broker) -> None:
    tid = broker.add("web", "a", chain="coding", prompt="do it")
    c1 = broker.claim()
    broker.complete(tid, c1.run_id, Outcome(needs_follow_up=True, next_prompt="next", summary="first",
                                            achieved=["x"]))
    c2 = broker.claim()
    task = broker.get_task(tid)
    assert task.status is TaskStatus.IN_PROGRESS and task.run_id == c2.run_id
    assert task.context[0]["next_prompt"] == "next" and task.context[0]["achieved"] == ["x"]
    assert [r["run_id"] for r in task.runs] == [c1.run_id, c2.run_id]
    assert task.runs[0]["outcome"] == "follow_up" and "ended_at" in task.runs[0]
    assert "outcome" not in task.runs[1]


def test_why_waiting_uses_the_claims_rules(broker: Broker, clock: FakeClock) -> None:
    broker.load_config(parse_config({"night_mode": None, "limits": {"model_max_inflight": {"opus": 1, "codex": 2}}}))
    plan = {"a": ["codex", "codex"], "b": ["opus"], "c": ["opus"], "d": ["codex"], "e": ["codex"], "f": ["glm"]}
    for board, models in plan.items():
        for i, model in enumerate(models):
            broker.add(board, f"{board} {i + 1}", model=model)
    broker.pause("d")
    claims = []
    with pytest.raises(NothingToClaim):
        while True:
            claims.append(broker.claim())
    assert sorted(c.board for c in claims) == ["a", "b", "e", "f"]  # opus cap 1: b first; codex cap 2: a, e
    doc = broker.health()["boards"]
    why = {b: d["why_waiting"] for b, d in doc.items()}
    assert why == {"a": "board_busy", "b": "running", "c": "model_quota_reached", "d": "board_paused",
                   "e": "running", "f": "running"}
    assert doc["a"]["head"] == [{"task_id": 2, "title": "a 2"}]
    assert doc["b"]["running"]["model"] == "opus" and doc["b"]["running"]["task_id"] == 3
    by_board = {c.board: c for c in claims}
    broker.fail(by_board["f"].task_id, by_board["f"].run_id, "boom")  # f's head goes into backoff
    broker.complete(by_board["e"].task_id, by_board["e"].run_id, Outcome(summary="ok"))
    broker.add("e", "e 2", model="codex")
    broker.set_cooldown("codex", 60)
    why = {b: d["why_waiting"] for b, d in broker.health()["boards"].items()}
    assert (why["f"], why["e"]) == ("backoff", "model_rate_limited")
    broker.clear_cooldown("codex")
    assert broker.health()["boards"]["e"]["why_waiting"] == "ready"
    broker.load_config(parse_config({"night_mode": None, "queue": {"global_max_concurrent": 2}}))  # a, b run
    assert broker.health()["boards"]["e"]["why_waiting"] == "global_cap"


@pytest.mark.parametrize("limit", [0, -1, 65])
def test_a_claim_batch_out_of_range_is_refused_and_changes_nothing(broker: Broker, limit: int) -> None:
    broker.add("web", "t", chain="coding")
    before = {k: broker.client.dump(k) for k in broker.client.keys("*")}
    with pytest.raises(InputError, match=r"^bad claim batch .*: 1 to 64$"):
        broker.claim_many(limit)
    assert {k: broker.client.dump(k) for k in broker.client.keys("*")} == before


def test_complete_many_maps_each_reply_to_its_own_result(broker: Broker) -> None:
    ids = [broker.add(f"b{i}", "t", chain="coding") for i in range(4)]
    claims, _ = broker.claim_many(4)
    by_task = {c.task_id: c for c in claims}
    ok, repeated, fenced, gone = (by_task[i] for i in ids)
    done = Outcome(summary="done")
    before = broker.complete(repeated.task_id, repeated.run_id, done)
    broker.client.delete(broker.keys.task(gone.task_id))
    results = broker.complete_many([
        (ok.task_id, ok.run_id, Outcome(needs_follow_up=True, next_prompt="more", summary="s")),
        (repeated.task_id, repeated.run_id, done),
        (fenced.task_id, "00000000-0000-4000-8000-000000000000", done),
        (gone.task_id, gone.run_id, done),
        (0, ok.run_id, done),
    ])
    assert [type(r).__name__ for r in results] == ["Completion", "Completion", "RunFenced", "TaskNotFound",
                                                   "InputError"]
    first, again, fenced_err, gone_err, bad = results
    assert broker.complete_many([]) == []
    assert (first.status, first.run_count, first.repeated) == (TaskStatus.UP_NEXT, 1, False)
    assert again == before.model_copy(update={"repeated": True, "note": ""})
    assert isinstance(fenced_err, RunFenced) and isinstance(gone_err, TaskNotFound)
    assert isinstance(bad, InputError)
    assert broker.get_task(fenced.task_id).status is TaskStatus.IN_PROGRESS  # the fenced run still holds it
    assert broker.get_task(ok.task_id).status is TaskStatus.UP_NEXT


def test_complete_many_equals_complete_one_by_one(broker: Broker, r: redis.Redis) -> None:
    ids = [broker.add(f"b{i}", "t", chain="coding") for i in range(3)]
    claims, _ = broker.claim_many(3)
    r.script_flush()  # the pipeline meets NOSCRIPT: each call is made again through the wrapper
    results = broker.complete_many([(c.task_id, c.run_id, Outcome(summary="ok")) for c in claims])
    assert [(x.task_id, x.status) for x in results if not isinstance(x, Exception)] == [
        (c.task_id, TaskStatus.IN_REVIEW) for c in claims]
    assert sorted(c.task_id for c in claims) == ids
    assert [e["type"] for e in broker.events(100)].count("completed") == 3


def test_complete_many_survives_a_lost_reply_and_records_each_outcome_once(redis_url: str, r: redis.Redis,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """complete_many packs and sends its pipeline itself (hiredis): a connection lost after the batch reached the
    server is reconnected and the batch sent again with the client's Retry, as redis-py's own pipelines do; the
    outcomes it recorded the first time are answered as repeats and counted once."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    broker = Broker(redis.Redis.from_url(redis_url, retry=Retry(NoBackoff(), 1)), "lostreply")
    for i in range(4):
        broker.add(f"b{i}", "t", chain="coding")
    first, *claims = broker.claim_many(4)[0]
    broker.complete_many([(first.task_id, first.run_id, Outcome(summary="ok"))])  # its script is loaded now
    pool = broker.client.connection_pool
    conn = pool.get_connection()
    pool.release(conn)  # the connection complete_many takes next
    real, lost = conn.send_packed_command, []

    def send_then_lose(command: object, check_health: bool = True) -> None:
        real(command, check_health)
        if not lost:
            lost.append(1)
            raise redis.exceptions.ConnectionError("the reply was lost")

    monkeypatch.setattr(conn, "send_packed_command", send_then_lose)
    results = broker.complete_many([(c.task_id, c.run_id, Outcome(summary="ok")) for c in claims])
    assert lost == [1]
    assert [(type(x).__name__, getattr(x, "repeated", None)) for x in results] == [("Completion", True)] * 3
    assert [e["type"] for e in broker.events(100)].count("completed") == 4
    broker.close()


def test_complete_many_against_a_stopped_server_raises_redis_unavailable() -> None:
    from clawq.broker.errors import RedisUnavailable

    b = Broker(redis.Redis(port=1, socket_connect_timeout=0.2, retry=None), "gone")
    b.assume_ready()  # a worker's broker: it never seeds the namespace
    with pytest.raises(RedisUnavailable):
        b.complete_many([(1, "00000000-0000-4000-8000-000000000000", Outcome(summary="ok"))])


def test_complete_many_spans_several_batch_calls_in_order(broker: Broker) -> None:
    """More outcomes than one complete_runs call takes: several calls in one round trip, each item's result at
    its place; the same outcome twice in one batch is recorded once and answered as a repeat."""
    from clawq.broker.broker import COMPLETE_BATCH

    for i in range(5):
        broker.add(f"b{i}", "t", chain="coding")
    claims = broker.claim_many(5)[0]
    n = COMPLETE_BATCH * 2 + 20
    real = {0: claims[0], COMPLETE_BATCH - 1: claims[1], COMPLETE_BATCH: claims[2], n - 10: claims[3],
            n - 2: claims[4]}
    items = []
    for i in range(n):
        c = real.get(i)
        if c is not None:
            items.append((c.task_id, c.run_id, Outcome(needs_follow_up=i % 2 == 0, next_prompt="again", summary="s")))
        else:  # no such task
            items.append((1000 + i, f"00000000-0000-4000-8000-{i:012d}", Outcome(summary="s")))
    items.append(items[COMPLETE_BATCH])  # the outcome of the third claim again, in the last call
    results = broker.complete_many(items)
    assert len(results) == n + 1
    for i, ((task_id, _, outcome), result) in enumerate(zip(items, results, strict=True)):
        if i in real or i == n:
            assert isinstance(result, Completion) and result.task_id == task_id, (i, result)
            assert result.status is (TaskStatus.UP_NEXT if outcome.needs_follow_up else TaskStatus.IN_REVIEW)
            assert result.repeated is (i == n)
        else:
            assert isinstance(result, TaskNotFound), (i, result)
    events = [e["type"] for e in broker.events(1000)]
    assert events.count("completed") + events.count("follow_up") == 5
