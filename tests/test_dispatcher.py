"""The dispatcher: reap, claim while claims succeed, enqueue; the agent gate; summaries; alerts; waking up."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from redis_servers import RedisServer

from clawq.broker import Broker, Claim, Outcome, TaskStatus
from clawq.broker.config import Config
from clawq.broker.models import Task
from clawq.workers import dispatcher as dispatcher_mod
from clawq.workers.dispatcher import Dispatcher
from clawq.workers.job import _run
from clawq.workers.notify import Notifiers

PROBE = str(Path(__file__).parent / "agents" / "probe_agent.py")
HEALTH_URL = "http://127.0.0.1:9/agent/health"


def config(**sections: Any) -> Config:
    """A deterministic config (no night window, notifications only to the test's sink) with overrides."""
    doc: dict[str, Any] = {"night_mode": None, "queue": {"global_max_concurrent": 6}, "notify": {"log": False}}
    for name, value in sections.items():
        doc[name] = {**(doc.get(name) or {}), **value} if isinstance(value, dict) else value
    return Config.model_validate(doc)


class Recorder:
    """An enqueue function that records each claim and when it came."""

    def __init__(self, fail: bool = False) -> None:
        self.claims: list[Claim] = []
        self.times: list[float] = []
        self.fail = fail
        self.got = threading.Event()

    def __call__(self, claim: Claim) -> None:
        if self.fail:
            raise RuntimeError("RQ is down")
        self.claims.append(claim)
        self.times.append(time.time())
        self.got.set()

    def wait(self, n: int, timeout: float = 5.0) -> bool:
        end = time.monotonic() + timeout
        while len(self.claims) < n and time.monotonic() < end:
            time.sleep(0.01)
        return len(self.claims) >= n


class Probe:
    """The agent health probe, switched by the test."""

    def __init__(self, ok: bool = True) -> None:
        self.ok = ok
        self.urls: list[str] = []

    def __call__(self, url: str) -> bool:
        self.urls.append(url)
        return self.ok


def kinds(*sinks: Notifiers) -> list[str]:
    return [n["kind"] for s in sinks for n in s.sent]


def sent(kind: str, *sinks: Notifiers) -> list[dict[str, Any]]:
    return [n for s in sinks for n in s.sent if n["kind"] == kind]


@pytest.fixture
def live(redis_url: str, r: redis.Redis, namespace: str) -> Iterator[Callable[[], Broker]]:
    """Makes brokers on the real clock (one per dispatcher or worker), all closed after the test."""
    made: list[Broker] = []

    def make() -> Broker:
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        b = Broker(client, namespace)
        b.connect()
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


@pytest.fixture
def second(broker: Broker, redis_url: str) -> Iterator[Broker]:
    """Another broker (another dispatcher's) on the same namespace and clock as ``broker``."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    other = Broker(client, broker.namespace, clock=broker.clock)
    try:
        yield other
    finally:
        client.close()


@contextmanager
def running(*dispatchers: Dispatcher) -> Iterator[threading.Event]:
    """Run each dispatcher's loop in a thread until the block ends."""
    stop = threading.Event()
    threads = [threading.Thread(target=d.run, args=(stop,), daemon=True) for d in dispatchers]
    for t in threads:
        t.start()
    try:
        yield stop
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads), "a dispatcher did not stop within 10 s"


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.01)
    return check()


def assert_released(broker: Broker, task: Task) -> None:
    """No run, no attempt used, no backoff, every inflight counter back to 0."""
    assert task.status is TaskStatus.UP_NEXT and task.run_id is None
    assert task.attempts == 0 and task.backoff_until is None
    health = broker.health()
    assert health["global"]["in_progress"] == 0
    assert all(m["inflight"] == 0 for m in health["models"].values()), health["models"]
    assert all(p["inflight"] == 0 for p in health["providers"].values()), health["providers"]


# -- step ------------------------------------------------------------------------------------------
def test_step_claims_while_claims_succeed(broker: Broker) -> None:
    broker.load_config(config())
    ids = [broker.add(b, f"t{i}", chain=c) for i, (b, c) in enumerate(
        [("web", "coding"), ("web", "coding"), ("api", "planning"), ("api", "planning"), ("docs", "bulk")])]
    rec = Recorder()
    d = Dispatcher(broker, rec, notifiers=Notifiers())
    assert d.step() == 3
    assert sorted(c.task_id for c in rec.claims) == [ids[0], ids[2], ids[4]]
    assert {c.board for c in rec.claims} == {"web", "api", "docs"}
    for c in rec.claims:
        assert broker.get_task(c.task_id).run_id == c.run_id
    assert d.step() == 0 and len(rec.claims) == 3
    assert d.last_skips.get("board_busy", 0) >= 2
    assert d.claims == 3


def test_step_stops_at_the_global_cap(broker: Broker) -> None:
    broker.load_config(config(queue={"global_max_concurrent": 2}))
    for b in ("a", "b", "c", "d"):
        broker.add(b, "t", chain="bulk")
    rec = Recorder()
    d = Dispatcher(broker, rec, notifiers=Notifiers())
    assert d.step() == 2
    assert "global_cap" in d.last_skips


def calls_to(obj: Any, name: str, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record the results of each call of ``obj.name`` (the real method still runs)."""
    seen: list[Any] = []
    real = getattr(obj, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        seen.append(result)
        return result

    monkeypatch.setattr(obj, name, spy)
    return seen


def test_a_short_batch_ends_the_claims_without_a_refused_claim(broker: Broker,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    broker.load_config(config(queue={"global_max_concurrent": 30},
                              limits={"model_max_inflight": {}, "provider_max_inflight": {}}))
    for i in range(20):
        broker.add(f"b{i:02d}", "t", chain="bulk")
    broker.add("b00", "second", chain="bulk")  # waits behind its board's head
    batches = calls_to(broker, "claim_many", monkeypatch)
    rec = Recorder()
    d = Dispatcher(broker, rec, notifiers=Notifiers())
    assert d.step() == 20
    assert [len(claims) for claims, _ in batches] == [dispatcher_mod.CLAIM_BATCH, 20 - dispatcher_mod.CLAIM_BATCH]
    assert [c.board for c in rec.claims] == [f"b{i:02d}" for i in range(20)], "boards in the order they joined"
    assert d.last_skips == {"board_busy": 1}, "the short batch says why the rest waits"


def test_an_enqueue_failure_releases_the_rest_of_its_batch(broker: Broker) -> None:
    broker.load_config(config())
    ids = [broker.add(b, "t", chain="coding") for b in ("a", "b", "c")]

    class FailSecond(Recorder):
        def __call__(self, claim: Claim) -> None:
            if len(self.claims) == 1:
                raise RuntimeError("RQ is down")
            super().__call__(claim)

    rec = FailSecond()
    assert Dispatcher(broker, rec, notifiers=Notifiers()).step() == 1
    assert [c.task_id for c in rec.claims] == ids[:1]
    for tid in ids[1:]:
        task = broker.get_task(tid)
        assert task.status is TaskStatus.UP_NEXT and task.attempts == 0 and task.run_id is None
    assert broker.health()["global"]["in_progress"] == 1


class BatchRecorder(Recorder):
    """A queue that takes a batch at once (like RqEnqueuer): records each call of ``many``."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__(fail)
        self.batches: list[list[int]] = []

    def __call__(self, claim: Claim) -> None:
        self.many([claim])

    def many(self, claims: Any) -> None:
        if self.fail:
            raise RuntimeError("RQ is down")
        self.batches.append([c.task_id for c in claims])
        for claim in claims:
            super().__call__(claim)


def test_a_batch_of_claims_is_enqueued_in_one_call(broker: Broker) -> None:
    broker.load_config(config())
    ids = [broker.add(b, "t", chain="coding") for b in ("a", "b", "c")]
    rec = BatchRecorder()
    assert Dispatcher(broker, rec, notifiers=Notifiers()).step() == 3
    assert rec.batches == [ids], "one call for the batch, in claim order"
    assert [broker.get_task(t).run_id for t in ids] == [c.run_id for c in rec.claims]


def test_a_failed_batch_enqueue_gives_back_every_claim_of_it(broker: Broker) -> None:
    broker.load_config(config())
    ids = [broker.add(b, "t", chain="coding") for b in ("a", "b", "c")]
    rec = BatchRecorder(fail=True)
    assert Dispatcher(broker, rec, notifiers=Notifiers()).step() == 0
    for tid in ids:
        assert_released(broker, broker.get_task(tid))
    released = [e["task_id"] for e in broker.events(100) if e["type"] == "released"]
    assert sorted(released) == ids


def test_reap_runs_only_when_a_lease_may_have_expired(broker: Broker, clock: Any,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    broker.load_config(config(watchdog={"stale_in_progress_minutes": 1, "heartbeat_grace_minutes": 0}))
    broker.add("web", "t", chain="coding")
    reaps = calls_to(broker, "reap", monkeypatch)
    d = Dispatcher(broker, Recorder(), notifiers=Notifiers())
    d.step()
    assert len(reaps) == 1, "a new dispatcher cannot know: it reaps"
    d.step()
    clock.advance(30)
    d.step()
    assert len(reaps) == 1, "no lease was due"
    clock.advance(31)
    d.step()
    assert reaps[1:] == [[1]], "the lease was due: reaped, and claimed again in the same step"


def test_an_open_gate_writes_nothing(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    broker.load_config(config())
    deletes = calls_to(broker.client, "delete", monkeypatch)
    d = Dispatcher(broker, Recorder(), notifiers=Notifiers())
    for _ in range(3):
        d.step()
    assert len(deletes) == 1, "only the first look releases a possible outage lock"


def test_step_reaps_expired_leases_first(broker: Broker, clock: Any) -> None:
    broker.load_config(config(watchdog={"stale_in_progress_minutes": 1, "heartbeat_grace_minutes": 0}))
    tid = broker.add("web", "t", chain="coding")
    first = broker.claim()
    clock.advance(61)
    rec = Recorder()
    assert Dispatcher(broker, rec, notifiers=Notifiers()).step() == 1
    assert rec.claims[0].task_id == tid and rec.claims[0].run_id != first.run_id
    assert rec.claims[0].attempt == 2


def test_enqueue_failure_releases_the_claim(broker: Broker) -> None:
    broker.load_config(config())
    tid = broker.add("web", "first", chain="coding")
    later = broker.add("web", "second", chain="coding")
    d = Dispatcher(broker, Recorder(fail=True), notifiers=Notifiers())
    assert d.step() == 0
    assert_released(broker, broker.get_task(tid))
    assert broker.get_task(later).status is TaskStatus.UP_NEXT
    assert any(e["type"] == "released" and e["task_id"] == tid for e in broker.events(100))
    rec = Recorder()
    assert Dispatcher(broker, rec, notifiers=Notifiers()).step() == 1
    assert rec.claims[0].task_id == tid, "the task went back to its board head"
    assert rec.claims[0].attempt == 1, "no attempt was used"


def test_enqueue_failure_of_every_claim_leaks_nothing(broker: Broker) -> None:
    broker.load_config(config())
    ids = [broker.add(b, "t", chain="coding") for b in ("a", "b", "c")]
    d = Dispatcher(broker, Recorder(fail=True), notifiers=Notifiers())
    for _ in range(3):
        d.step()
    for tid in ids:
        assert_released(broker, broker.get_task(tid))


# -- the agent gate --------------------------------------------------------------------------------
@pytest.fixture
def gate_now(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ask the health URL at every step (it is asked at most every 3 s otherwise)."""
    monkeypatch.setattr(dispatcher_mod, "_GATE_CHECK_S", 0.0)


def skips_agent_not_ready(broker: Broker) -> int:
    return int(broker.client.hget(broker.keys.stats_skips, "agent_not_ready") or 0)  # type: ignore[arg-type]


@pytest.mark.usefixtures("gate_now")
def test_agent_gate_one_notification_per_outage_across_dispatchers(broker: Broker, second: Broker) -> None:
    broker.load_config(config(agent={"health_url": HEALTH_URL}))
    ids = [broker.add(b, "t", chain="coding") for b in ("web", "api")]
    probe, rec = Probe(ok=False), Recorder()
    s1, s2 = Notifiers(), Notifiers()
    d1 = Dispatcher(broker, rec, notifiers=s1, probe=probe)
    d2 = Dispatcher(second, rec, notifiers=s2, probe=probe)
    for _ in range(3):
        assert d1.step() == 0 and d2.step() == 0
    assert rec.claims == [] and probe.urls and set(probe.urls) == {HEALTH_URL}
    assert all(broker.get_task(t).status is TaskStatus.UP_NEXT for t in ids)
    assert skips_agent_not_ready(broker) == 6
    assert d1.last_skips == {"agent_not_ready": 1}
    down = sent("agent_not_ready", s1, s2)
    assert len(down) == 1 and HEALTH_URL in down[0]["text"]
    assert sent("agent_ready", s1, s2) == []

    probe.ok = True
    assert d2.step() + d1.step() == 2
    d2.step()
    assert len(sent("agent_ready", s1, s2)) == 1
    assert len(sent("agent_not_ready", s1, s2)) == 1

    probe.ok = False  # a second outage: one more notification, then one more "back"
    for _ in range(2):
        d1.step()
        d2.step()
    probe.ok = True
    for _ in range(2):
        d1.step()
        d2.step()
    assert len(sent("agent_not_ready", s1, s2)) == 2
    assert len(sent("agent_ready", s1, s2)) == 2


@pytest.mark.usefixtures("gate_now")
def test_agent_gate_without_health_url_never_probes(broker: Broker) -> None:
    broker.load_config(config())
    broker.add("web", "t", chain="coding")
    probe = Probe(ok=False)
    assert Dispatcher(broker, Recorder(), notifiers=Notifiers(), probe=probe).step() == 1
    assert probe.urls == []


@pytest.mark.usefixtures("gate_now")
def test_a_new_outage_is_notified_after_a_dispatcher_restart(broker: Broker, second: Broker) -> None:
    broker.load_config(config(agent={"health_url": HEALTH_URL}))
    broker.add("web", "t", chain="coding")
    probe = Probe(ok=False)
    s1, s2 = Notifiers(), Notifiers()
    Dispatcher(broker, Recorder(), notifiers=s1, probe=probe).step()  # sees the outage, then goes away
    probe.ok = True
    d2 = Dispatcher(second, Recorder(), notifiers=s2, probe=probe)  # the restarted dispatcher
    d2.step()
    probe.ok = False  # a new outage
    d2.step()
    assert len(sent("agent_not_ready", s1, s2)) == 2


def test_a_tripped_gate_holds_claims_until_it_expires(broker: Broker, second: Broker) -> None:
    broker.load_config(config())
    broker.add("web", "t", chain="coding")
    broker.trip_agent_gate(0.4, "pairing: pairing required")
    s1, s2 = Notifiers(), Notifiers()
    rec = Recorder()
    d1 = Dispatcher(broker, rec, notifiers=s1)
    d2 = Dispatcher(second, rec, notifiers=s2)
    assert d1.step() == 0 and d2.step() == 0
    down = sent("agent_not_ready", s1, s2)
    assert len(down) == 1 and "pairing" in down[0]["text"]
    time.sleep(0.5)
    assert d1.step() + d2.step() == 1
    assert len(sent("agent_ready", s1, s2)) == 1



@pytest.mark.parametrize(("argv", "cause"), [
    ([sys.executable, PROBE, "{rec}", "stderr", "error: pairing required (device not paired)", "1"], "pairing"),
    (["/nonexistent/clawq-agent"], "agent_unreachable"),
], ids=["pairing", "agent_unreachable"])
def test_a_job_result_of_an_agent_runtime_cause_trips_the_gate(broker: Broker, tmp_path: Path, argv: list[str],
                                                               cause: str) -> None:
    command = [a.replace("{rec}", str(tmp_path / "rec.json")) for a in argv]
    broker.load_config(config(agent={"runner": "command", "command": command}))
    tid = broker.add("web", "t", chain="coding")
    claim = broker.claim()
    outcome = _run(broker, tid, claim.run_id)
    assert outcome["reported"] and outcome["result"] == "released"
    assert_released(broker, broker.get_task(tid))
    gate = broker.agent_gate()
    assert gate is not None and gate.startswith(cause)
    ttl = int(broker.client.pttl(broker.keys.agent_gate))  # type: ignore[arg-type]
    assert 20_000 < ttl <= 30_000
    sink = Notifiers()
    rec = Recorder()
    assert Dispatcher(broker, rec, notifiers=sink).step() == 0
    assert rec.claims == [] and skips_agent_not_ready(broker) == 1
    assert kinds(sink) == ["agent_not_ready"]


# -- summaries -------------------------------------------------------------------------------------
def test_one_summary_per_interval_across_dispatchers(broker: Broker, second: Broker) -> None:
    broker.load_config(config(queue={"global_max_concurrent": 3}, notify={"summary_interval_minutes": 0.01}))
    broker.add("web", "a", chain="coding")
    broker.add("web", "b", chain="coding")
    broker.add("api", "c", chain="planning")
    s1, s2 = Notifiers(), Notifiers()
    d1, d2 = Dispatcher(broker, Recorder(), notifiers=s1), Dispatcher(second, Recorder(), notifiers=s2)
    for _ in range(3):
        d1.step()
        d2.step()
    summaries = sent("summary", s1, s2)
    assert len(summaries) == 1
    text = summaries[0]["text"]
    assert text.startswith("clawq day:"), text
    assert "cap 3" in text and "2 in progress" in text and "1 queued" in text and "1 free" in text
    assert summaries[0]["health"]["global"]["in_progress"] == 2
    time.sleep(0.7)  # the interval (0.6 s) passed: one more, whichever dispatcher comes first
    d2.step()
    d1.step()
    assert len(sent("summary", s1, s2)) == 2


def test_summary_in_the_night_window_says_night(broker: Broker, clock: Any) -> None:
    clock.t = 1_767_236_400.0  # 2026-01-01 03:00 UTC
    broker.load_config(config(night_mode={"timezone": "UTC", "start": "23:00", "end": "08:00",
                                          "global_max_concurrent": 9}))
    broker.add("web", "a", chain="coding")
    sink = Notifiers()
    Dispatcher(broker, Recorder(), notifiers=sink).step()
    (summary,) = sent("summary", sink)
    assert summary["text"].startswith("clawq night:") and "cap 9" in summary["text"]


def test_no_summary_while_the_queue_is_idle(broker: Broker) -> None:
    broker.load_config(config())
    sink = Notifiers()
    d = Dispatcher(broker, Recorder(), notifiers=sink)
    d.step()
    assert sent("summary", sink) == []
    tid = broker.add("web", "a", chain="coding")
    claim = broker.claim()
    broker.complete(tid, claim.run_id, Outcome(summary="done"))
    d.step()
    assert sent("summary", sink) == [], "every task is final: nothing to report"


# -- alerts ----------------------------------------------------------------------------------------
def finish(broker: Broker, clock: Any, how: str) -> int:
    """Drive one task to its end ``how``; returns its id."""
    tid = broker.add("web", "the task", chain="coding")
    claim = broker.claim()
    if how == "in_review":
        broker.complete(tid, claim.run_id, Outcome(summary="all green"))
    elif how == "follow_up_limit":
        broker.complete(tid, claim.run_id, Outcome(needs_follow_up=True, next_prompt="more", summary="s"))
    elif how == "reaped":
        clock.advance(3600)
        assert broker.reap() == [tid]
    else:
        broker.fail(tid, claim.run_id, f"it broke ({how})", cause=how)
    return tid


FINAL = [
    ("in_review", "in_review"),
    ("follow_up_limit", "in_review"),
    ("failed", "failed"),
    ("timeout", "failed"),
    ("reaped", "failed"),
    pytest.param("bad_output", "failed"),
    pytest.param("overloaded", "failed"),
    pytest.param("billing", "failed"),
]


@pytest.mark.parametrize(("how", "kind"), FINAL)
def test_a_final_task_alerts_exactly_once_across_dispatchers(broker: Broker, second: Broker, clock: Any,
                                                             how: str, kind: str) -> None:
    broker.load_config(config(watchdog={"max_attempts": 1}, followup={"max_runs": 1}))
    tid = finish(broker, clock, how)
    assert broker.get_task(tid).status.final
    events = broker.events(1000)
    s1, s2 = Notifiers(), Notifiers()
    d1, d2 = Dispatcher(broker, Recorder(), notifiers=s1), Dispatcher(second, Recorder(), notifiers=s2)
    d1._on_events(events)
    d2._on_events(events)
    d1._on_events(events)
    alerts = [n for n in s1.sent + s2.sent if n["kind"] in ("in_review", "failed")]
    assert [a["kind"] for a in alerts] == [kind]
    assert alerts[0]["task_id"] == tid and alerts[0]["board"] == "web"
    assert str(tid) in alerts[0]["text"]


@pytest.mark.parametrize("how", ["follow_up", "retry"])
def test_a_task_that_is_not_final_does_not_alert(broker: Broker, how: str) -> None:
    broker.load_config(config())
    tid = broker.add("web", "t", chain="coding")
    claim = broker.claim()
    if how == "follow_up":
        broker.complete(tid, claim.run_id, Outcome(needs_follow_up=True, next_prompt="more"))
    else:
        broker.fail(tid, claim.run_id, "flaky")
    sink = Notifiers()
    Dispatcher(broker, Recorder(), notifiers=sink)._on_events(broker.events(1000))
    assert sink.sent == []


def test_a_dispatcher_with_no_notifier_takes_no_alert_lock(broker: Broker, clock: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """notify.log off and no other notifier: nothing would be sent, so no lock is taken and no summary read."""
    broker.load_config(config(watchdog={"max_attempts": 1}))
    finish(broker, clock, "in_review")
    finish(broker, clock, "failed")
    d = Dispatcher(broker, Recorder())  # its own notifiers, from the config: none
    locks = calls_to(broker, "first_to_alert", monkeypatch)
    reads = calls_to(broker, "health", monkeypatch)
    broker.add("web", "still queued", chain="coding")
    d._on_events(broker.events(1000))
    d.step()
    assert locks == [] and reads == []
    assert broker.client.keys(broker.keys.notified("*")) == []
    broker.load_config(config(watchdog={"max_attempts": 1}, notify={"log": True}))
    d._on_events(broker.events(1000))  # a config_loaded: its notifiers now log
    assert locks == [True, True], "with a notifier, each final task's alert takes its lock"


def test_alerts_from_two_running_dispatchers(live: Callable[[], Broker]) -> None:
    admin = live()
    admin.load_config(config(watchdog={"max_attempts": 1}))
    s1, s2 = Notifiers(), Notifiers()
    rec = Recorder()
    d1, d2 = Dispatcher(live(), rec, notifiers=s1), Dispatcher(live(), rec, notifiers=s2)
    with running(d1, d2):
        ok = admin.add("web", "ok", chain="coding")
        bad = admin.add("api", "bad", chain="planning")
        assert rec.wait(2)
        runs = {c.task_id: c.run_id for c in rec.claims}
        assert sorted(runs) == [ok, bad], "each task claimed once by the two dispatchers"
        admin.complete(ok, runs[ok], Outcome(summary="done"))
        admin.fail(bad, runs[bad], "the build is broken")
        assert eventually(lambda: len(sent("in_review", s1, s2)) + len(sent("failed", s1, s2)) >= 2)
        time.sleep(0.5)  # room for a duplicate to show up
    assert [a["task_id"] for a in sent("in_review", s1, s2)] == [ok]
    assert [a["task_id"] for a in sent("failed", s1, s2)] == [bad]


class SlowTarget:
    """A notifier that takes a while for its first alert (a slow Telegram answer)."""

    def __init__(self) -> None:
        self.entered = threading.Event()

    def send(self, kind: str, text: str, data: Any) -> None:
        if kind == "in_review" and not self.entered.is_set():
            self.entered.set()
            time.sleep(1.0)


def test_no_alert_is_lost_while_a_notifier_is_slow(live: Callable[[], Broker]) -> None:
    """Events that arrive while _on_events runs (a slow Telegram answer) are still read: the cursor is kept."""
    admin = live()
    admin.load_config(config())
    slow = SlowTarget()
    sink = Notifiers([slow])
    rec = Recorder()
    with running(Dispatcher(live(), rec, notifiers=sink)):
        a = admin.add("web", "a", chain="coding")
        b = admin.add("api", "b", chain="planning")
        assert rec.wait(2)
        runs = {c.task_id: c.run_id for c in rec.claims}
        admin.complete(a, runs[a], Outcome(summary="a done"))
        assert slow.entered.wait(5)
        admin.complete(b, runs[b], Outcome(summary="b done"))
        eventually(lambda: len(sent("in_review", sink)) >= 2, timeout=4)
    assert sorted(n["task_id"] for n in sent("in_review", sink)) == [a, b]


# -- waking up -------------------------------------------------------------------------------------
def test_an_added_task_is_claimed_at_once(live: Callable[[], Broker]) -> None:
    admin = live()
    admin.load_config(config())
    rec = Recorder()
    with running(Dispatcher(live(), rec, notifiers=Notifiers())):
        time.sleep(0.3)  # the dispatcher is idle, blocked on the event stream
        added = time.time()
        tid = admin.add("web", "t", chain="coding")
        assert rec.got.wait(5)
    assert rec.claims[0].task_id == tid
    assert rec.times[0] - added < 2.0, "the new task did not wake the dispatcher"


def counted_passes(live: Callable[[], Broker],
                   monkeypatch: pytest.MonkeyPatch) -> tuple[Broker, Recorder, Dispatcher, list[Any]]:
    """An admin broker (config loaded), a recorder, a dispatcher enqueueing to it, and the list of its passes."""
    admin = live()
    admin.load_config(config())
    rec = Recorder()
    d = Dispatcher(live(), rec, notifiers=Notifiers())
    return admin, rec, d, calls_to(d, "step", monkeypatch)


def test_its_own_claims_do_not_wake_the_dispatcher(live: Callable[[], Broker],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A claimed event frees nothing: the pass it would start could claim nothing, so none is made."""
    admin, rec, d, passes = counted_passes(live, monkeypatch)
    with running(d):
        time.sleep(0.3)  # idle, blocked on the event stream
        before = len(passes)
        admin.add("web", "t", chain="coding")
        assert rec.wait(1)
        time.sleep(0.5)  # room for the claimed event to wake it
        after = len(passes)
    assert after == before + 1, "one pass for the added task, none for its claimed event"
    types = [e["type"] for e in admin.events(100)]
    assert types[-2:] == ["added", "claimed"]


def test_a_task_added_behind_its_board_and_a_draining_queue_do_not_wake_the_dispatcher(
        live: Callable[[], Broker], monkeypatch: pytest.MonkeyPatch) -> None:
    """A task queued behind its board's run (``waits``) and a completion after which no board is ready
    (``idle``) make no claim possible: no pass. A completion that leaves a task ready still makes one."""
    admin, rec, d, passes = counted_passes(live, monkeypatch)
    with running(d):
        time.sleep(0.3)  # idle, blocked on the event stream
        first = admin.add("web", "t1", chain="coding")
        assert rec.wait(1)
        time.sleep(0.3)
        before = len(passes)
        second = admin.add("web", "t2", chain="coding")  # behind web's run
        time.sleep(0.5)  # room for its added event to wake it
        assert len(passes) == before, "a task queued behind a run woke a pass"
        admin.complete(first, rec.claims[0].run_id, Outcome(summary="done"))  # t2 is ready now
        assert rec.wait(2)
        assert rec.claims[1].task_id == second
        time.sleep(0.3)
        before = len(passes)
        admin.complete(second, rec.claims[1].run_id, Outcome(summary="done"))  # nothing left anywhere
        time.sleep(0.5)
        assert len(passes) == before, "the last completion of a drained queue woke a pass"
        third = admin.add("api", "t3", chain="coding")  # a ready head still wakes it at once
        assert rec.wait(3)
    assert rec.claims[2].task_id == third
    added = [e for e in admin.events(100) if e["type"] == "added"]
    assert [e.get("waits") for e in added] == [None, "board", None]
    done = [e for e in admin.events(100) if e["type"] == "completed"]
    assert [e.get("idle") for e in done] == [None, "1"]


@pytest.mark.parametrize("what", ["backoff", "cooldown", "lease"])
def test_a_deadline_wakes_the_dispatcher_without_any_event(live: Callable[[], Broker], what: str) -> None:
    admin = live()
    admin.load_config(config(watchdog={"failure_cooldown_minutes": 0.03, "stale_in_progress_minutes": 0.03,
                                       "heartbeat_grace_minutes": 0}))
    tid = admin.add("web", "t", model="codex")
    if what == "cooldown":
        due = admin.set_cooldown("codex", 1.8)
    else:
        claim = admin.claim()
        if what == "backoff":
            admin.fail(tid, claim.run_id, "flaky test")
            due = admin.get_task(tid).backoff_until or 0.0
        else:
            due = claim.lease_deadline
    last_event = admin.events(1000)[-1]["id"]
    rec = Recorder()
    with running(Dispatcher(live(), rec, notifiers=Notifiers())):
        assert rec.got.wait(6), f"the {what} end never woke the dispatcher"
    assert rec.claims[0].task_id == tid
    assert due - 0.05 <= rec.times[0] <= due + 1.5, (rec.times[0] - due)
    woke_by = [e["type"] for e in admin.events(100, after=last_event)]
    assert woke_by[-1] == "claimed" and set(woke_by) <= {"claimed", "timeout"}, woke_by


@pytest.mark.parametrize("how", ["health_url", "tripped"])
def test_claims_resume_soon_after_the_agent_is_back(live: Callable[[], Broker], how: str,
                                                    redis_server: RedisServer) -> None:
    if redis_server.name != "redis7":
        pytest.skip("the loop's timing does not depend on the Redis version")
    admin = live()
    admin.load_config(config(agent={"health_url": HEALTH_URL} if how == "health_url" else {}))
    admin.add("web", "t", chain="coding")
    probe, rec = Probe(ok=how != "health_url"), Recorder()
    if how == "tripped":
        admin.trip_agent_gate(1.0, "pairing: pairing required")
    with running(Dispatcher(live(), rec, notifiers=Notifiers(), probe=probe)):
        time.sleep(0.5)
        assert rec.claims == []
        back = time.time()
        probe.ok = True
        got = rec.got.wait(5)
    assert got, "no claim within 5 s of the agent being back"
    assert rec.times[0] - back < 5.0


@pytest.mark.usefixtures("gate_now")
def test_a_new_config_without_health_url_reopens_the_gate(broker: Broker, second: Broker) -> None:
    broker.load_config(config(agent={"health_url": HEALTH_URL}))
    broker.add("web", "t", chain="coding")
    rec = Recorder()
    d = Dispatcher(second, rec, notifiers=Notifiers(), probe=Probe(ok=False))
    assert d.step() == 0
    broker.load_config(config())  # the operator removes the health URL
    d._on_events(broker.events(1000))  # the loop sees config_loaded
    assert d.step() == 1
