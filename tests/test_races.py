"""Races with real concurrency: threads and processes, each with its own Broker and Redis client.

Every claim a worker gets is recorded; afterwards the event stream (one entry per script call, in the
order Redis executed them) is replayed to check that at no moment the global, model or provider caps were
exceeded or two tasks of one board ran, and the replay is cross-checked against the recorded claims.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeVar

import pytest
import redis
from helpers import counts

from clawq.broker import Broker, Claim, Config, NothingToClaim, Outcome, RunFenced, TaskStatus
from clawq.broker.config import DEFAULT_CONFIG

T = TypeVar("T")
LEASE_S = 23 * 60
DONE = Outcome(summary="done")
FOLLOW = Outcome(needs_follow_up=True, next_prompt="more", summary="wip")
END_TYPES = frozenset({"follow_up", "completed", "failed", "timeout", "overloaded", "billing", "pairing",
                       "rate_limit", "quota_reached", "cancelled", "released"})
MODEL_CAPS = {"opus": 1, "codex": 2, "sonnet": 1, "gemini3": 2, "gemini3_flash": 2, "glm": 1}
PROVIDER_CAPS = {"anthropic": 2, "openai": 2, "google": 3, "zai": 1}
#: Boards cycle through these: every chain, and every model pinned.
KINDS: list[dict[str, Any]] = [
    {"chain": "planning"}, {"chain": "coding"}, {"chain": "bulk"}, {"model": "opus"}, {"model": "codex"},
    {"model": "sonnet"}, {"model": "gemini3"}, {"model": "gemini3_flash"}, {"model": "glm"},
]


class Clock(Protocol):
    t: float

    def __call__(self) -> float: ...


def rc(broker: Broker) -> Any:
    """The broker's client, untyped: redis-py's reply types are unions of bytes and str."""
    return broker.client


def tight_config(global_cap: int) -> Config:
    data: dict[str, Any] = DEFAULT_CONFIG.model_dump(mode="json")
    data["night_mode"] = None
    data["queue"]["global_max_concurrent"] = global_cap
    data["limits"] = {"model_max_inflight": MODEL_CAPS, "provider_max_inflight": PROVIDER_CAPS}
    data["watchdog"]["failure_cooldown_minutes"] = 0
    return Config.model_validate(data)


def fill(broker: Broker, boards: int, per_board: int) -> int:
    """Queue ``per_board`` tasks on each of ``boards`` boards (kinds cycling); returns the task count."""
    for i in range(boards):
        for j in range(per_board):
            broker.add(f"b{i:02d}", f"task {j}", **KINDS[i % len(KINDS)])
    return boards * per_board


def brokers_for(redis_url: str, namespace: str, clock: Clock, n: int) -> list[Broker]:
    out = []
    for _ in range(n):
        b = Broker(redis.Redis.from_url(redis_url, decode_responses=True), namespace, clock=clock)
        b.client.ping()
        out.append(b)
    return out


def run_threads(workers: list[Callable[[], T]], timeout: float = 20) -> list[T]:
    """Run each worker in its own thread, released together by a barrier; re-raise the first error."""
    barrier = threading.Barrier(len(workers))
    results: dict[int, T] = {}
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            results[i] = workers[i]()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    if errors:
        raise errors[0]
    return [results[i] for i in range(len(workers))]


# -- replay of the event stream ---------------------------------------------------------------------


@dataclass
class Replay:
    claimed: dict[str, tuple[int, str, str, str]] = field(default_factory=dict)  # run -> task, board, ...
    ended: set[str] = field(default_factory=set)
    board_order: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    peak: int = 0


def check_caps(active: Iterable[tuple[int, str, str, str]], global_cap: int) -> None:
    rows = list(active)
    assert len(rows) <= global_cap, f"{len(rows)} in progress > global cap {global_cap}"
    boards = Counter(row[1] for row in rows)
    assert max(boards.values(), default=0) <= 1, f"two tasks of one board: {boards.most_common(1)}"
    for model, n in Counter(row[2] for row in rows).items():
        assert n <= MODEL_CAPS[model], f"{model}: {n} > {MODEL_CAPS[model]}"
    for provider, n in Counter(row[3] for row in rows).items():
        assert n <= PROVIDER_CAPS[provider], f"{provider}: {n} > {PROVIDER_CAPS[provider]}"


def replay(broker: Broker, global_cap: int) -> Replay:
    events = broker.events(count=1_000_000)
    assert len(events) < 10_000, "the stream is capped near 10k: keep the test smaller"
    out = Replay()
    active: dict[str, tuple[int, str, str, str]] = {}
    for e in events:
        run = str(e.get("run_id", ""))
        if e["type"] == "claimed":
            assert run not in out.claimed, f"run id {run} claimed twice"
            row = (e["task_id"], e["board"], e["model"], e["provider"])
            out.claimed[run] = active[run] = row
            out.board_order[e["board"]].append(e["task_id"])
            check_caps(active.values(), global_cap)
            out.peak = max(out.peak, len(active))
        elif e["type"] in END_TYPES and run in active:
            out.ended.add(run)
            del active[run]
    return out


def check_against_log(rep: Replay, claims: list[tuple[int, str, str, str, str]], ended: list[str]) -> None:
    assert {c[4]: c[:4] for c in claims} == rep.claimed
    assert len(claims) == len(rep.claimed)
    assert sorted(ended) == sorted(rep.ended)
    for board, order in rep.board_order.items():
        assert order == sorted(order), f"board {board} ran a later task before an earlier one: {order}"


def check_idle(broker: Broker) -> None:
    c, k = rc(broker), broker.keys
    assert c.zcard(k.running) == 0
    assert counts(c, k.inflight_model) == {}
    assert counts(c, k.inflight_provider) == {}
    assert c.hgetall(k.refs) == {}


def row(claim: Claim) -> tuple[int, str, str, str, str]:
    return claim.task_id, claim.board, claim.model, claim.provider, claim.run_id


# -- burst of claims ---------------------------------------------------------------------------------


def claim_until_nothing(broker: Broker) -> list[Claim]:
    got = []
    while True:
        try:
            got.append(broker.claim())
        except NothingToClaim:
            return got


@pytest.mark.parametrize(("global_cap", "expected"), [(5, 5), (20, 8)])
def test_concurrent_claims_never_exceed_caps(
    broker: Broker, redis_url: str, namespace: str, clock: Clock, global_cap: int, expected: int
) -> None:
    """16 threads claim at once on 27 boards; 8 = the provider caps' sum (anthropic 2, openai 2, ...)."""
    broker.load_config(tight_config(global_cap))
    fill(broker, 27, 3)
    workers = brokers_for(redis_url, namespace, clock, 16)
    try:
        results = run_threads([partial(claim_until_nothing, b) for b in workers])
    finally:
        for b in workers:
            b.close()
    claims = [c for got in results for c in got]
    assert len(claims) == expected
    check_caps([(c.task_id, c.board, c.model, c.provider) for c in claims], global_cap)
    heads = {b: min(t.task_id for t in broker.list_tasks(board=b)) for b in {c.board for c in claims}}
    assert all(c.task_id == heads[c.board] for c in claims), "a claim skipped its board's head"
    c, k = rc(broker), broker.keys
    assert c.zcard(k.running) == expected
    assert Counter({m: int(n) for m, n in counts(c, k.inflight_model).items()}) == Counter(x.model for x in claims)
    assert Counter({p: int(n) for p, n in counts(c, k.inflight_provider).items()}) == Counter(
        x.provider for x in claims
    )
    check_against_log(replay(broker, global_cap), [row(x) for x in claims], [])


def test_one_task_many_claimers_exactly_one_winner(
    broker: Broker, redis_url: str, namespace: str, clock: Clock
) -> None:
    broker.add("web", "only", chain="coding")
    for title in ("two", "three"):
        broker.add("web", title, chain="coding")
    workers = brokers_for(redis_url, namespace, clock, 16)

    def once(b: Broker) -> Claim | dict[str, int]:
        try:
            return b.claim()
        except NothingToClaim as err:
            return err.skip_reasons

    try:
        results = run_threads([partial(once, b) for b in workers])
    finally:
        for b in workers:
            b.close()
    winners = [x for x in results if isinstance(x, Claim)]
    assert [w.task_id for w in winners] == [1]
    assert [x for x in results if not isinstance(x, Claim)] == [{"board_busy": 1}] * 15
    assert rc(broker).get(broker.keys.stats_claims) == "1"


# -- many claim / outcome cycles ---------------------------------------------------------------------


@dataclass
class Log:
    claims: list[tuple[int, str, str, str, str]] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)


def all_final(broker: Broker, total: int) -> bool:
    c, k = rc(broker), broker.keys
    return int(c.zcard(k.in_review)) + int(c.zcard(k.failed)) == total


def finish(broker: Broker, claim: Claim, rng: random.Random) -> None:
    roll = rng.random()
    if roll < 0.15:
        broker.heartbeat(claim.task_id, claim.run_id)
    if roll < 0.6:
        broker.complete(claim.task_id, claim.run_id, DONE)
    elif roll < 0.85:
        broker.complete(claim.task_id, claim.run_id, FOLLOW)
    else:
        broker.fail(claim.task_id, claim.run_id, "boom")


def cycle(broker: Broker, seed: int, total: int, hold: int, seconds: float) -> Log:
    """Claim up to ``hold`` tasks, then report an outcome for each; until every task is final."""
    rng, log = random.Random(seed), Log()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        held = []
        for _ in range(hold):
            try:
                held.append(broker.claim())
            except NothingToClaim:
                break
        for claim in held:
            log.claims.append(row(claim))
            finish(broker, claim, rng)
            log.ended.append(claim.run_id)
        if not held:
            if all_final(broker, total):
                return log
            time.sleep(0.0005)
    raise AssertionError("the cycle did not finish in time")


def check_cycles(broker: Broker, logs: list[Log], total: int, global_cap: int) -> None:
    claims = [c for log in logs for c in log.claims]
    ended = [r for log in logs for r in log.ended]
    rep = replay(broker, global_cap)
    check_against_log(rep, claims, ended)
    assert rep.peak == global_cap, "the caps were never contended: the test proves nothing"
    assert all_final(broker, total)
    check_idle(broker)
    statuses = Counter(t.status for t in broker.list_tasks())
    assert set(statuses) <= {TaskStatus.IN_REVIEW, TaskStatus.FAILED}
    assert rc(broker).get(broker.keys.stats_claims) == str(len(claims))


def test_concurrent_claim_complete_cycles_respect_caps(
    broker: Broker, redis_url: str, namespace: str, clock: Clock
) -> None:
    broker.load_config(tight_config(5))
    total = fill(broker, 36, 5)
    workers = brokers_for(redis_url, namespace, clock, 10)
    try:
        logs = run_threads([partial(cycle, b, i, total, 2, 8.0) for i, b in enumerate(workers)])
    finally:
        for b in workers:
            b.close()
    check_cycles(broker, logs, total, 5)


def _process_worker(
    url: str, namespace: str, now: float, seed: int, total: int, start: Any, out: Any
) -> None:
    """One process: its own Broker and client, released with the others by ``start`` (a Barrier)."""
    broker = Broker.from_url(url, namespace, clock=lambda: now)
    try:
        start.wait(30)
        log = cycle(broker, seed, total, 3, 8.0)
        out.put((seed, log.claims, log.ended))
    except BaseException as err:
        out.put((seed, repr(err), []))
        raise
    finally:
        broker.close()


def test_processes_claiming_at_once_respect_caps(
    broker: Broker, redis_url: str, namespace: str, clock: Clock
) -> None:
    broker.load_config(tight_config(5))
    total = fill(broker, 27, 4)
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(4), ctx.Queue()
    procs = [
        ctx.Process(target=_process_worker, args=(redis_url, namespace, clock(), seed, total, start, out))
        for seed in range(4)
    ]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=30) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
    out.close()
    assert [p.exitcode for p in procs] == [0, 0, 0, 0], results
    logs = [Log([tuple(c) for c in claims], ended) for _, claims, ended in sorted(results)]
    assert all(log.claims for log in logs), "a process never claimed: no real contention"
    check_cycles(broker, logs, total, 5)


# -- racing reports on one run -----------------------------------------------------------------------


def racing_reports(
    broker: Broker, redis_url: str, namespace: str, clock: Clock, report: Callable[[Broker, int], object]
) -> list[object]:
    workers = brokers_for(redis_url, namespace, clock, 12)

    def attempt(b: Broker, i: int) -> object:
        try:
            return report(b, i)
        except RunFenced as err:
            return err

    try:
        return run_threads([partial(attempt, b, i) for i, b in enumerate(workers)])
    finally:
        for b in workers:
            b.close()


def test_same_outcome_raced_is_recorded_once(broker: Broker, redis_url: str, namespace: str, clock: Clock) -> None:
    broker.add("web", "t", chain="coding")
    claim = broker.claim()
    results = racing_reports(broker, redis_url, namespace, clock,
                             lambda b, _i: b.complete(claim.task_id, claim.run_id, DONE))
    assert sorted(bool(getattr(x, "repeated", None)) for x in results) == [False] + [True] * 11
    assert not any(isinstance(x, RunFenced) for x in results)
    task = broker.get_task(1)
    assert (task.status, task.run_count, len(task.context)) == (TaskStatus.IN_REVIEW, 1, 1)
    assert rc(broker).hget(broker.keys.board("web"), "completed") == "1"


def test_different_outcomes_raced_one_wins_the_rest_fenced(
    broker: Broker, redis_url: str, namespace: str, clock: Clock
) -> None:
    broker.add("web", "t", chain="coding")
    claim = broker.claim()
    results = racing_reports(broker, redis_url, namespace, clock,
                             lambda b, i: b.complete(claim.task_id, claim.run_id, Outcome(summary=f"v{i}")))
    fenced = [x for x in results if isinstance(x, RunFenced)]
    won = [x for x in results if not isinstance(x, RunFenced)]
    assert (len(won), len(fenced)) == (1, 11)
    task = broker.get_task(1)
    assert len(task.context) == 1
    assert task.run_count == 1
    check_idle(broker)


def test_reap_racing_completions_each_run_ends_exactly_once(
    broker: Broker, redis_url: str, namespace: str, clock: Clock
) -> None:
    data = DEFAULT_CONFIG.model_dump(mode="json")
    data["night_mode"] = None
    data["queue"]["global_max_concurrent"] = 30
    data["limits"] = {"model_max_inflight": {}, "provider_max_inflight": {}}
    broker.load_config(Config.model_validate(data))
    for i in range(24):
        broker.add(f"b{i:02d}", "t", chain="bulk" if i % 2 else "coding")
    claims = claim_until_nothing(broker)
    assert len(claims) == 24
    clock.t += LEASE_S
    workers = brokers_for(redis_url, namespace, clock, 9)

    def complete_share(b: Broker, share: list[Claim]) -> list[int]:
        done = []
        for c in share:
            try:
                b.complete(c.task_id, c.run_id, DONE)
                done.append(c.task_id)
            except RunFenced:
                pass
        return done

    jobs: list[Callable[[], list[int]]] = [workers[0].reap]
    jobs += [partial(complete_share, b, claims[i::8]) for i, b in enumerate(workers[1:])]
    try:
        reaped, *completed = run_threads(jobs)
    finally:
        for b in workers:
            b.close()
    done = {tid for part in completed for tid in part}
    assert not done & set(reaped)
    assert done | set(reaped) == {c.task_id for c in claims}
    for c in claims:
        task = broker.get_task(c.task_id)
        expected = (TaskStatus.IN_REVIEW, 0) if c.task_id in done else (TaskStatus.UP_NEXT, 1)
        assert (task.status, task.attempts) == expected
    assert rc(broker).zcard(broker.keys.running) == 0
    assert counts(rc(broker), broker.keys.inflight_model) == {}
