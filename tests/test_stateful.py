"""Stateful property test: random operation sequences against the real Lua scripts and a pure model.

A hypothesis ``RuleBasedStateMachine`` adds tasks (auto and explicit ids), claims, heart-beats, completes
(with and without follow-up), fails (retry or not), reports rate limits, reaps, cancels, pauses and resumes
boards, sets and clears cooldowns, opens and closes provider breakers, reports late for ended runs, and
moves a fake clock (small and large steps, and exactly onto / just around the next lease deadline, backoff
end, cooldown end or breaker end). Failures come with root causes that count toward the provider's breaker
(overloaded, timeout) and one that does not (failed), so breakers open, probe, close and re-open. Each step runs
on a fresh namespace of the private Redis through :class:`broker.Broker` and on
:class:`queue_model.QueueModel`; every reply must agree, and after every step the raw Redis keys must match
the model (tasks, places, board indexes, ready lines with their round-robin places, counters, cooldowns)
and satisfy the safety invariants (one place per task, caps, one run per board).

Time is whole milliseconds in multiples of 500, so ``int(seconds * 1000)`` in the broker is exact.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import redis
from helpers import task_hash_ids
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.internal.conjecture import engine as hypothesis_engine
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from queue_model import (
    BACKOFF,
    BUSY,
    CANCELLED,
    FAILED,
    IN_PROGRESS,
    IN_REVIEW,
    PAUSED,
    READY,
    SCHEDULED,
    UNFINISHED,
    UP_NEXT,
    Claimed,
    QueueModel,
    Refused,
    Rules,
)

from clawq.broker import Broker
from clawq.broker.config import Config, next_local_time
from clawq.broker.errors import DuplicateTask, InvalidState, NothingToClaim, RunFenced, TaskNotFound
from clawq.broker.keys import Keys
from clawq.broker.models import Completion, Outcome
from clawq.broker.timing import start_of

BOARDS = ("b0", "b1", "b2", "b3")
#: Where a task runs: a fallback chain or a pinned model (its chain key). A task pinned to sonnet waits
#: on the anthropic cap while opus runs (provider_quota_reached with the global cap not reached).
ROUTES = ("c:plan", "c:code", "m:glm", "m:sonnet")
CHAIN_KEYS = ROUTES
MODELS = ("opus", "sonnet", "codex", "glm")
PROVIDERS = ("anthropic", "openai", "zai")
#: Root causes of a failed run: the task's fault, and two that count toward the provider's breaker.
CAUSES = ("failed", "overloaded", "timeout")

CONFIG = Config.model_validate({
    "queue": {"global_max_concurrent": 2},
    "limits": {
        "model_max_inflight": {"opus": 1, "codex": 1, "glm": 1},  # sonnet: no model cap
        "provider_max_inflight": {"anthropic": 1},  # opus + sonnet share it; openai, zai: no cap
    },
    "watchdog": {
        "stale_in_progress_minutes": 1,
        "heartbeat_grace_minutes": 0.5,
        "rate_limit_cooldown_minutes": 1,
        "failure_cooldown_minutes": 0.5,
        "max_attempts": 2,
    },
    # A night window of half the day, with the day's cap: it matters only to night-only tasks.
    "night_mode": {"timezone": "UTC", "start": "00:00", "end": "12:00", "global_max_concurrent": 2},
    "followup": {"max_runs": 3},
    # Two faults within 2 minutes open a breaker for 30 s; a failed probe doubles it, up to 2 minutes.
    "breaker": {"failures": 2, "window_minutes": 2, "cooldown_minutes": 0.5, "max_cooldown_minutes": 2},
    "models": {"opus": "anthropic", "sonnet": "anthropic", "codex": "openai", "glm": "zai"},
    "chains": {"plan": ["opus", "codex"], "code": ["sonnet", "codex", "glm"]},
})
_S = CONFIG.script_settings()
RULES = Rules(
    global_cap=CONFIG.queue.global_max_concurrent,
    chains={name: tuple(models) for name, models in CONFIG.chains.items()},
    providers=dict(CONFIG.models),
    model_caps=dict(CONFIG.limits.model_max_inflight),
    provider_caps=dict(CONFIG.limits.provider_max_inflight),
    lease_ms=_S["lease_ms"],
    heartbeat_ms=_S["heartbeat_ms"],
    backoff_ms=_S["backoff_ms"],
    max_attempts=_S["max_attempts"],
    max_runs=_S["max_runs"],
    breaker_failures=_S["breaker_failures"],
    breaker_window_ms=_S["breaker_window_ms"],
    breaker_cooldown_ms=_S["breaker_cooldown_ms"],
    breaker_max_cooldown_ms=_S["breaker_max_cooldown_ms"],
)
DEFAULT_COOLDOWN_MS = _S["cooldown_ms"]
#: Cooldowns stay >= 30 s: Redis expires the key in real time, the model only in fake time.
RETRY_AFTERS = (None, 30, 45.5, 90, 600)
STEPS_S = (0.5, 1, 10, 29.5, 30, 30.5, 59.5, 60, 61, 89.5, 90, 91, 150, 600)
SUMMARIES = ("done", "more")
EVENTS = ("lease", "backoff", "cooldown", "breaker", "due", "night")
#: Not-before delays of an added task (seconds; None: none).
DELAYS = (None, None, 0, 30, 90.5, 600)
LATE_KINDS = ("complete", "complete", "fail", "heartbeat", "rate_limited", "release")

SETTINGS = settings(
    max_examples=int(os.environ.get("CLAWQ_STATEFUL_EXAMPLES", "60")),
    stateful_step_count=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],  # each step is a Redis round trip or two
)


class MsClock:
    """The broker's clock: whole ms in steps of 500, so seconds * 1000 round-trips exactly."""

    def __init__(self) -> None:
        self.ms = int(time.time()) * 1000

    def __call__(self) -> float:
        return self.ms / 1000


def _outcome(follow_up: bool, summary: str) -> Outcome:
    return Outcome(needs_follow_up=follow_up, next_prompt="go on" if follow_up else None, summary=summary)


def _pick(items: list[Any], i: int) -> Any:
    return items[i % len(items)]


def _route(ck: str) -> dict[str, str]:
    return {"chain": ck[2:]} if ck.startswith("c:") else {"model": ck[2:]}


# -- what Redis holds ----------------------------------------------------------------------------------
def _int_or_none(v: str | None) -> int | None:
    return int(v) if v else None  # "" or absent: none (a board's running slot after a run's end)


TASK_FIELDS = ("board", "ck", "status", "run_count", "attempts", "backoff_until", "run_id", "model", "provider",
               "lease_deadline", "last_run_id", "last_digest", "due_at", "night")


def _task_view(values: list[str | None]) -> dict[str, Any]:
    """A task hash as the model sees it; run_count, attempts and backoff_until are 0 while absent (Keys.task)."""
    f = dict(zip(TASK_FIELDS, values, strict=True))
    assert f["board"] is not None and f["ck"] is not None and f["status"] is not None
    return {
        "board": f.get("board"), "ck": f.get("ck"), "status": f.get("status"),
        "run_count": int(f["run_count"] or 0), "attempts": int(f["attempts"] or 0),
        "backoff_until": int(f["backoff_until"] or 0), "run_id": f.get("run_id"),
        "model": f.get("model"), "provider": f.get("provider"),
        "lease_deadline": _int_or_none(f.get("lease_deadline")),
        "last_run_id": f["last_run_id"], "last_digest": f["last_digest"],
        "due_at": _int_or_none(f.get("due_at")), "night": f.get("night") == "1",
    }


def _zmap(rows: list[tuple[str, float]]) -> dict[str, int]:
    return {m: int(s) for m, s in rows}


def _blocks(raw: dict[str, str], now: int) -> dict[str, str | int]:
    """The `blocked` index as it acts at ``now``: a cooldown entry counts while it lasts (by its end)."""
    out: dict[str, str | int] = {}
    for field, value in raw.items():
        if not field.startswith("c:"):
            out[field] = value
        elif (until := _cooling(value, now)) is not None:
            out[field] = until
    return out


def _cooling(raw: str | None, now: int) -> int | None:
    if raw is None:
        return None
    until = int(raw.split("|", 1)[0])
    return until if until > now else None


def _queue_breaker_reads(p: Any, k: Keys) -> None:
    for pr in PROVIDERS:
        p.hgetall(k.breaker(pr))
        p.zrange(k.breaker_failures(pr), 0, -1, withscores=True)


def _breaker_reads(it: Iterator[Any]) -> dict[str, Any]:
    """The breaker hashes and failure windows of :func:`_queue_breaker_reads`, the empty ones left out."""
    breakers, failures = {}, {}
    for pr in PROVIDERS:
        h, window = next(it), _zmap(next(it))
        if h:
            breakers[pr] = h
        if window:
            failures[pr] = window
    return {"breakers": breakers, "breaker_failures": failures}


def read_redis(client: redis.Redis, k: Keys, task_ids: list[int], now: int) -> dict[str, Any]:
    """Everything the model predicts, read from the raw keys in one round trip."""
    p = client.pipeline(transaction=False)  # nothing else writes the namespace between steps
    p.smembers(k.boards)
    p.get(k.task_seq)
    p.get(k.ready_seq)
    p.zrange(k.running, 0, -1, withscores=True)
    for place in (k.in_review, k.failed, k.cancelled):
        p.zrange(place, 0, -1)
    for h in (k.inflight_model, k.inflight_provider, k.refs, k.blocked):
        p.hgetall(h)
    p.zrange(k.ready_fronts, 0, -1, withscores=True)
    p.smembers(k.idx_busy)
    p.smembers(k.idx_paused)
    p.zrange(k.idx_backoff, 0, -1, withscores=True)
    for ck in CHAIN_KEYS:
        p.zrange(k.ready(ck), 0, -1, withscores=True)
    for m in MODELS:
        p.get(k.cooldown(m))
    _queue_breaker_reads(p, k)
    p.zrange(k.scheduled, 0, -1, withscores=True)
    p.zrange(k.night_queued, 0, -1)
    for b in BOARDS:
        p.hgetall(k.board(b))
        p.zrange(k.queue(b), 0, -1)
    for tid in task_ids:
        p.hmget(k.task(tid), TASK_FIELDS)
    it: Iterator[Any] = iter(p.execute())
    snap: dict[str, Any] = {
        "task_ids": task_hash_ids(client, k), "boards": set(next(it)),
        "task_seq": int(next(it) or 0), "ready_seq": int(next(it) or 0),
        "running": {int(m): d for m, d in _zmap(next(it)).items()},
        "in_review": {int(x) for x in next(it)}, "failed": {int(x) for x in next(it)},
        "cancelled": {int(x) for x in next(it)},
        "inflight_model": {m: int(n) for m, n in next(it).items() if n != "0"},  # 0 = absent
        "inflight_provider": {m: int(n) for m, n in next(it).items() if n != "0"},
        "refs": {m: int(n) for m, n in next(it).items()},
        "blocked": _blocks(next(it), now),
        "ready_fronts": _zmap(next(it)), "idx_busy": set(next(it)), "idx_paused": set(next(it)),
        "idx_backoff": _zmap(next(it)),
    }
    snap["ready"] = {ck: lines for ck in CHAIN_KEYS if (lines := _zmap(next(it)))}
    snap["cooling"] = {m: until for m in MODELS if (until := _cooling(next(it), now)) is not None}
    snap.update(_breaker_reads(it))
    snap["scheduled"] = {int(m): d for m, d in _zmap(next(it)).items()}
    snap["night_queued"] = {int(x) for x in next(it)}
    snap["board"], snap["queue"] = {}, {}
    for b in BOARDS:
        h, q = next(it), next(it)
        if h or q:
            snap["board"][b] = {"running": _int_or_none(h.get("running")), "paused": h.get("paused") == "1",
                                "state": h.get("state"),
                                "ck": h.get("ck") if h.get("state") == "ready" else None,  # else stale, ignored
                                "scheduled": int(h.get("scheduled", 0))}
            snap["queue"][b] = [int(x) for x in q]
    snap["task"] = {tid: _task_view(next(it)) for tid in task_ids}
    return snap


# -- what the model predicts ---------------------------------------------------------------------------
def _model_boards(m: QueueModel) -> dict[str, Any]:
    ready: dict[str, dict[str, int]] = {}
    for name, b in m.boards.items():
        if b.state == READY and b.ck:
            ready.setdefault(b.ck, {})[name] = b.score
    return {
        "boards": set(m.boards),
        "ready": ready, "ready_fronts": {ck: min(line.values()) for ck, line in ready.items()},
        "idx_busy": {n for n, b in m.boards.items() if b.state == BUSY},
        "idx_paused": {n for n, b in m.boards.items() if b.state == PAUSED},
        "idx_backoff": {n: b.score for n, b in m.boards.items() if b.state == BACKOFF},
        "board": {n: {"running": b.running, "paused": b.paused, "state": b.state, "ck": b.ck,
                      "scheduled": m.scheduled_count()[n]} for n, b in m.boards.items()},
        "queue": {n: m.queue(n) for n in m.boards},
    }


def _model_blocks(m: QueueModel, now: int) -> dict[str, str | int]:
    """What `blocked` must say: every capped model / provider at its cap, every model cooling."""
    r = m.rules
    out: dict[str, str | int] = {f"c:{name}": until for name, until in m.cooldowns.items() if until > now}
    models, providers = m.inflight_models(), m.inflight_providers()
    out |= {f"m:{x}": "model_quota_reached" for x, cap in r.model_caps.items() if models[x] >= cap}
    out |= {f"p:{x}": "provider_quota_reached" for x, cap in r.provider_caps.items() if providers[x] >= cap}
    out |= {f"o:{p}": f"{b.until}|{b.probe or ''}" for p, b in m.breakers.items()}
    return out


def _model_breakers(m: QueueModel) -> dict[str, Any]:
    """breaker:<provider> hashes (as strings) and the failure windows, as the scripts keep them."""
    hashes = {}
    for p, b in m.breakers.items():
        h = {"until": str(b.until), "cooldown_ms": str(b.cooldown_ms), "cause": b.cause,
             "opened_at": str(b.opened_at)}
        if b.probe is not None:
            h |= {"probe": b.probe, "probe_task": str(b.probe_task)}
        hashes[p] = h
    return {"breakers": hashes, "breaker_failures": {p: dict(w) for p, w in m.breaker_failures.items() if w}}


def expected_snapshot(m: QueueModel, now: int) -> dict[str, Any]:
    by_status = {s: {t.id for t in m.tasks.values() if t.status == s} for s in (IN_REVIEW, FAILED, CANCELLED)}
    snap: dict[str, Any] = {
        "task_ids": sorted(m.tasks), "task_seq": m.task_seq, "ready_seq": m.ready_seq,
        "running": {t.id: t.deadline for t in m.running()},
        "scheduled": {t.id: t.due_at for t in m.tasks.values() if t.status == SCHEDULED},
        "night_queued": set(m.night_queued),
        "in_review": by_status[IN_REVIEW], "failed": by_status[FAILED], "cancelled": by_status[CANCELLED],
        "inflight_model": dict(m.inflight_models()), "inflight_provider": dict(m.inflight_providers()),
        "refs": dict(m.refs()),
        "cooling": {name: until for name, until in m.cooldowns.items() if until > now},
        "blocked": _model_blocks(m, now),
        "task": {t.id: {"board": t.board, "ck": t.ck, "status": t.status, "run_count": t.run_count,
                        "attempts": t.attempts, "backoff_until": t.backoff_until, "run_id": t.run_id,
                        "model": t.model, "provider": t.provider, "lease_deadline": t.deadline,
                        "last_run_id": t.last_run_id,
                        "last_digest": "|".join(t.last_outcome) if t.last_outcome else None,
                        "due_at": t.due_at, "night": t.night}
                 for t in m.tasks.values()},
    }
    snap.update(_model_boards(m))
    snap.update(_model_breakers(m))
    return snap


# -- rules that must hold whatever the model says ---------------------------------------------------------
def _places(snap: dict[str, Any], tid: int) -> list[str]:
    found = [f"queue:{b}" for b, q in snap["queue"].items() if tid in q]
    found += [place for place in ("in_review", "failed", "cancelled") if tid in snap[place]]
    if tid in snap["running"]:
        found.append("running")
    if tid in snap["scheduled"]:
        found.append("scheduled")
    return found


def _place_of(task: dict[str, Any]) -> str:
    status = str(task["status"])
    return {UP_NEXT: f"queue:{task['board']}", IN_PROGRESS: "running"}.get(status, status)


def night_next(now_ms: int) -> int | None:
    """What the broker gives a claim: None while night-only tasks may start, else the window's next opening."""
    at = CONFIG.night_next(now_ms / 1000)
    return None if at is None else int(at * 1000)


def night_boundary(now_ms: int) -> int:
    """The window's next opening or closing."""
    assert CONFIG.night_mode is not None
    if night_next(now_ms) is not None:
        return int(CONFIG.night_mode.next_open(now_ms / 1000) * 1000)
    return int(next_local_time(CONFIG.night_mode.end, now_ms / 1000, "UTC") * 1000)


def check_safety(snap: dict[str, Any], rules: Rules) -> None:
    tasks: dict[int, dict[str, Any]] = snap["task"]
    for tid, task in tasks.items():
        assert _places(snap, tid) == [_place_of(task)], f"task {tid} ({task['status']}) is not in one place"
    running = [t for t in tasks.values() if t["status"] == IN_PROGRESS]
    assert len(snap["running"]) == len(running) <= rules.global_cap
    per_board = Counter(t["board"] for t in running)
    assert all(n == 1 for n in per_board.values()), per_board
    for name, board in snap["board"].items():
        holder = [tid for tid in snap["running"] if tasks[tid]["board"] == name]
        assert holder == ([] if board["running"] is None else [board["running"]])
    models = Counter(t["model"] for t in running)
    providers = Counter(t["provider"] for t in running)
    assert snap["inflight_model"] == dict(models)
    assert snap["inflight_provider"] == dict(providers)
    assert all(n <= rules.model_caps.get(m, n) for m, n in models.items()), models
    assert all(n <= rules.provider_caps.get(p, n) for p, n in providers.items()), providers
    assert snap["refs"] == dict(Counter(t["ck"] for t in tasks.values() if t["status"] in UNFINISHED))


# -- the machine ---------------------------------------------------------------------------------------------
class QueueMachine(RuleBasedStateMachine):
    """One example = one fresh namespace; ``client`` is set per test from the server fixture."""

    client: ClassVar[redis.Redis | None] = None

    def __init__(self) -> None:
        super().__init__()
        assert self.client is not None
        self.clock = MsClock()
        self.broker = Broker(self.client, "st" + uuid.uuid4().hex[:12], clock=self.clock)
        self.broker.connect()
        self.broker.load_config(CONFIG)
        self.model = QueueModel(RULES)
        self.runs: list[tuple[int, str]] = []  # every (task_id, run_id) ever claimed
        self.outcomes: dict[str, Outcome] = {}  # run id -> the outcome it recorded

    @property
    def now(self) -> int:
        return self.clock.ms

    def teardown(self) -> None:
        assert self.client is not None
        keys = list(self.client.scan_iter(match=self.broker.keys.prefix + "*", count=1000))
        if keys:
            self.client.delete(*keys)

    @initialize(tasks=st.lists(st.tuples(st.sampled_from(BOARDS), st.sampled_from(ROUTES)),
                               min_size=2, max_size=10))
    def seed(self, tasks: list[tuple[str, str]]) -> None:
        for board, ck in tasks:
            self.add(board, ck, None)

    def _running(self, i: int) -> Any:
        return _pick(self.model.running(), i)

    # -- tasks ------------------------------------------------------------------------------------------
    @rule(board=st.sampled_from(BOARDS), ck=st.sampled_from(ROUTES), task_id=st.none() | st.integers(1, 20),
          delay=st.sampled_from(DELAYS), night=st.sampled_from((False, False, True)))
    def add(self, board: str, ck: str, task_id: int | None, delay: float | None = None, night: bool = False) -> None:
        not_before = None if delay is None else self.now / 1000 + delay
        start = start_of(CONFIG, board, self.now / 1000, not_before=not_before, night_only=night)
        due = None if start.due is None else int(start.due * 1000)
        expected = self.model.add(board, ck, self.now, task_id, due, night)
        kw: dict[str, Any] = {"task_id": task_id, "not_before": not_before, "night_only": night, **_route(ck)}
        if expected is None:
            with pytest.raises(DuplicateTask):
                self.broker.add(board, "task", **kw)
        else:
            assert self.broker.add(board, "task", **kw) == expected

    @rule()
    def claim(self) -> None:
        self._claim()

    def _claim(self) -> Claimed | None:
        try:
            c = self.broker.claim()
        except NothingToClaim as err:
            assert self.model.claim(self.now, "-", night_next(self.now)) == Refused(err.skip_reasons)
            return None
        self.runs.append((c.task_id, c.run_id))
        got = Claimed(c.task_id, c.board, c.model, c.provider, c.run_count, c.attempt,
                      round(c.lease_deadline * 1000))
        assert got == self.model.claim(self.now, c.run_id, night_next(self.now))
        return got

    @rule(limit=st.integers(2, 5))
    def claim_batch(self, limit: int) -> None:
        """A dispatcher's batch: the same claims as that many single claims, stopping where one is refused."""
        try:
            claims, skips = self.broker.claim_many(limit)
        except NothingToClaim as err:
            assert self.model.claim(self.now, "-", night_next(self.now)) == Refused(err.skip_reasons)
            return
        assert 1 <= len(claims) <= limit
        for c in claims:
            self.runs.append((c.task_id, c.run_id))
            got = Claimed(c.task_id, c.board, c.model, c.provider, c.run_count, c.attempt,
                          round(c.lease_deadline * 1000))
            assert got == self.model.claim(self.now, c.run_id, night_next(self.now))
        if len(claims) < limit:
            refused = self.model.claim(self.now, "-", night_next(self.now))
            assert refused == Refused(skips), "a batch stops where a claim is refused"
        else:
            assert skips == {}

    @rule(follow_up=st.sampled_from((True, True, False)), summary=st.sampled_from(SUMMARIES))
    def work(self, follow_up: bool, summary: str) -> None:
        """A worker's cycle: claim, then record the outcome at once (reaches max_runs sooner)."""
        got = self._claim()
        if got is not None:
            self._complete(got.task_id, follow_up, summary)

    @precondition(lambda self: self.model.running())
    @rule(i=st.integers(0, 3))
    def heartbeat(self, i: int) -> None:
        t = self._running(i)
        deadline = self.broker.heartbeat(t.id, t.run_id)
        assert self.model.heartbeat(t.id, t.run_id, self.now) == ("ok", round(deadline * 1000))

    @precondition(lambda self: self.model.running())
    @rule(i=st.integers(0, 3), follow_up=st.sampled_from((True, True, False)),
          summary=st.sampled_from(SUMMARIES))
    def complete(self, i: int, follow_up: bool, summary: str) -> None:
        self._complete(self._running(i).id, follow_up, summary)

    def _complete(self, tid: int, follow_up: bool, summary: str) -> None:
        run_id = self.model.tasks[tid].run_id
        assert run_id is not None
        outcome = self.outcomes[run_id] = _outcome(follow_up, summary)
        c = self.broker.complete(tid, run_id, outcome)
        expected = self.model.complete(tid, run_id, follow_up, outcome.digest(), self.now)
        assert ("ok", c.status, c.run_count, bool(c.note)) == expected
        assert not c.repeated

    @precondition(lambda self: self.model.running())
    @rule(follow_ups=st.lists(st.sampled_from((True, True, False)), min_size=4, max_size=4),
          summary=st.sampled_from(SUMMARIES))
    def complete_many(self, follow_ups: list[bool], summary: str) -> None:
        """Every run in progress completed by one complete_many (one complete_runs call): as if completed one
        after another, in that order."""
        items = []
        for t, follow_up in zip(self.model.running(), follow_ups * 8, strict=False):
            assert t.run_id is not None
            outcome = self.outcomes[t.run_id] = _outcome(follow_up, summary)
            items.append((t.id, t.run_id, outcome))
        results = self.broker.complete_many(items)
        for (tid, run_id, outcome), c in zip(items, results, strict=True):
            assert isinstance(c, Completion), c
            expected = self.model.complete(tid, run_id, outcome.needs_follow_up, outcome.digest(), self.now)
            assert ("ok", c.status, c.run_count, bool(c.note)) == expected
            assert not c.repeated

    @precondition(lambda self: self.model.running())
    @rule(i=st.integers(0, 3), retry=st.booleans(), cause=st.sampled_from(CAUSES))
    def fail(self, i: int, retry: bool, cause: str = "failed") -> None:
        t = self._running(i)
        status, attempts = self.broker.fail(t.id, t.run_id, "boom", retry=retry, cause=cause)
        expected = self.model.fail(t.id, t.run_id, retry, self.now, cause, fault=cause != "failed")
        assert ("ok", status, attempts) == expected

    @precondition(lambda self: self.model.running())
    @rule(i=st.integers(0, 3), retry_after=st.sampled_from(RETRY_AFTERS))
    def rate_limited(self, i: int, retry_after: float | None) -> None:
        t = self._running(i)
        until = self.now + (DEFAULT_COOLDOWN_MS if retry_after is None else int(retry_after * 1000))
        model, end = self.broker.rate_limited(t.id, t.run_id, retry_after=retry_after)
        expected = self.model.rate_limited(t.id, t.run_id, until, self.now, fault=retry_after is None)
        assert ("ok", model, round(end * 1000)) == expected

    @precondition(lambda self: self.model.running())
    @rule(i=st.integers(0, 3), reason=st.sampled_from(("released", "pairing")))
    def release(self, i: int, reason: str) -> None:
        t = self._running(i)
        self.broker.release(t.id, t.run_id, reason, "gave it back")
        assert self.model.release(t.id, t.run_id, self.now, reason) == ("ok", UP_NEXT)

    @rule()
    def reap(self) -> None:
        assert self.broker.reap() == self.model.reap(self.now)

    def _cancel(self, i: int) -> None:
        tid = 999 if i == 30 else _pick(sorted(self.model.tasks), i)
        code, was = self.model.cancel(tid, self.now)
        if code == "ok":
            assert self.broker.cancel(tid) == was
        else:
            with pytest.raises(TaskNotFound if code == "not_found" else InvalidState):
                self.broker.cancel(tid)

    # -- late reports from runs that ended ---------------------------------------------------------------
    @precondition(lambda self: self.runs)
    @rule(i=st.integers(0, 30), kind=st.sampled_from(LATE_KINDS),
          same=st.booleans(), follow_up=st.booleans(), summary=st.sampled_from(SUMMARIES))
    def late_report(self, i: int, kind: str, same: bool, follow_up: bool, summary: str) -> None:
        """A report from an ended run: fenced, except a repeat of the outcome the run recorded."""
        tid, run_id = _pick(self.runs, i)
        if self.model.tasks[tid].run_id == run_id:
            return  # still the active run
        if kind == "complete":
            recorded = self.outcomes.get(run_id) if same else None
            self._late_complete(tid, run_id, recorded or _outcome(follow_up, summary))
            return
        if kind == "heartbeat":
            with pytest.raises(RunFenced):
                self.broker.heartbeat(tid, run_id)
            return
        self._late_end(tid, run_id, kind)

    def _late_end(self, tid: int, run_id: str, kind: str) -> None:
        """A late fail / release / rate limit: fenced, except a retry of the very report that ended the run."""
        if kind == "fail":
            expected = self.model.fail(tid, run_id, True, self.now)
            call: Any = lambda: self.broker.fail(tid, run_id, "boom", retry=True)  # noqa: E731
        elif kind == "release":
            expected = self.model.release(tid, run_id, self.now)
            call = lambda: self.broker.release(tid, run_id)  # noqa: E731
        else:
            until = self.now + 30_000
            expected = self.model.rate_limited(tid, run_id, until, self.now)
            call = lambda: self.broker.rate_limited(tid, run_id, retry_after=30)  # noqa: E731
        if expected[0] != "repeated":
            with pytest.raises(RunFenced):
                call()
            return
        got = call()
        if kind == "fail":
            assert ("repeated", *got) == expected
        elif kind == "rate_limited":
            assert ("repeated", got[0], round(got[1] * 1000)) == expected

    def _late_complete(self, tid: int, run_id: str, outcome: Outcome) -> None:
        expected = self.model.complete(tid, run_id, outcome.needs_follow_up, outcome.digest(), self.now)
        if expected[0] == "fenced":
            with pytest.raises(RunFenced):
                self.broker.complete(tid, run_id, outcome)
            return
        c = self.broker.complete(tid, run_id, outcome)
        assert ("repeated", c.status, c.run_count) == expected
        assert c.repeated

    # -- the operator: one rule, so these do not crowd out the runs ------------------------------------
    @rule(action=st.sampled_from(("cancel", "pause", "resume", "resume", "cooldown", "breaker")),
          i=st.integers(0, 30), board=st.sampled_from(BOARDS), model=st.sampled_from(MODELS),
          seconds=st.sampled_from((0, 30, 60, 120)))
    def operator(self, action: str, i: int, board: str, model: str, seconds: int) -> None:
        if action == "cancel":
            self._cancel(i)
        elif action == "breaker":  # open the model's provider for `seconds`, or close it (0)
            provider = RULES.providers[model]
            if seconds:
                st_ = self.broker.open_breaker(provider, seconds / 60)
                assert round(st_.until * 1000) == self.model.open_breaker(provider, self.now, "operator",
                                                                          seconds * 1000)
            else:
                self.broker.close_breaker(provider)
                self.model.close_breaker(provider)
        elif action == "cooldown":
            end = self.broker.set_cooldown(model, seconds)
            expected = self.model.cool(model, self.now, self.now + seconds * 1000, grow_only=False)
            assert round(end * 1000) == expected
        else:
            state = self.broker.pause(board) if action == "pause" else self.broker.resume(board)
            assert state == self.model.set_paused(board, action == "pause", self.now)

    # -- time (optionally followed by a reaper pass, as a worker loop would do) ---------------------------
    @rule(seconds=st.sampled_from(STEPS_S), then_reap=st.booleans())
    def advance(self, seconds: float, then_reap: bool) -> None:
        self.clock.ms += int(seconds * 1000)
        if then_reap:
            self.reap()

    def _events(self, kinds: tuple[str, ...] = EVENTS) -> list[int]:
        """Future lease deadlines, backoff ends and cooldown ends (of the kinds asked)."""
        m = self.model
        times = {
            "lease": [t.deadline for t in m.running() if t.deadline is not None],
            "backoff": [t.backoff_until for t in m.tasks.values() if t.status == UP_NEXT],
            "cooldown": list(m.cooldowns.values()),
            "breaker": [b.until for b in m.breakers.values()],
            "due": [t.due_at for t in m.tasks.values() if t.status == SCHEDULED and t.due_at is not None],
            "night": [night_boundary(self.now)],
        }
        return [x for kind in kinds for x in times[kind] if x > self.now]

    @precondition(lambda self: self._events())
    @rule(kind=st.sampled_from(EVENTS), offset_ms=st.sampled_from((-500, 0, 500)), then_reap=st.booleans())
    def advance_to_next_event(self, kind: str, offset_ms: int, then_reap: bool) -> None:
        """Just before, exactly at or just after the next event of ``kind`` (else of any kind)."""
        event = min(self._events((kind,)) or self._events())
        self.clock.ms = max(self.now + 500, event + offset_ms)
        if then_reap:
            self.reap()

    # -- after every step ------------------------------------------------------------------------------
    @invariant()
    def redis_matches_model(self) -> None:
        got = read_redis(self.broker.client, self.broker.keys, sorted(self.model.tasks), self.now)
        check_safety(got, RULES)
        assert got == expected_snapshot(self.model, self.now)
        listed = [(t.task_id, t.board, t.status.value, t.run_count, t.attempts) for t in self.broker.list_tasks()]
        model = sorted(self.model.tasks.items())
        assert listed == [(t.id, t.board, t.status, t.run_count, t.attempts) for _, t in model]


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield c
    finally:
        c.close()


def _machine(client: redis.Redis) -> type[QueueMachine]:
    return type("QueueMachineHere", (QueueMachine,), {"client": client})


#: Hypothesis shrinks a failing machine for up to 5 minutes (it rarely stops earlier here); pytest's
#: 120 s timeout would cut that short and hide the failing steps. 60 s gives a well-shrunk case in time.
SHRINK_SECONDS = 60


def test_broker_matches_model(client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hypothesis_engine, "MAX_SHRINKING_SECONDS", SHRINK_SECONDS, raising=False)
    run_state_machine_as_test(_machine(client), settings=SETTINGS)


def test_late_outcome_of_a_failed_run_is_fenced(client: redis.Redis) -> None:
    """Found by the machine (fixed in complete_run since): run 1 records "done", run 2 fails, then run 2's
    worker reports the same outcome late. It recorded nothing, so it must be fenced -- the broker used to
    answer "repeated" (it compared last_run_id and last_digest separately) and drop the outcome."""
    m = _machine(client)()
    try:
        m.add("b0", "c:plan", None)  # task 1
        m.work(follow_up=True, summary="done")  # run 1 records "done" (follow-up): task 1 back to b0
        m.claim()  # run 2
        m.fail(0, retry=True)  # run 2 fails: up_next, in backoff
        m.redis_matches_model()
        m.late_report(1, "complete", same=False, follow_up=True, summary="done")  # fenced
        m.late_report(0, "complete", same=True, follow_up=False, summary="")  # run 1 repeats: 8
        m.redis_matches_model()
    finally:
        m.teardown()
