"""A pure-Python model of clawq's queue rules, for the stateful test (tests/test_stateful.py).

It mirrors lua/lib/core.lua and the scripts in lua/ step by step, in integer milliseconds, with no Redis:

* a board's queue is its up_next tasks by task id; only the head may run (strict head of line), one task in
  progress per board, none while the board is paused or its head is in failure backoff;
* a board sits in exactly one index (idle, paused, busy, backoff, ready); it is re-indexed only where the
  scripts re-index it (the board an operation touched, by an add only for a new head; boards whose backoff
  ended, at the start of a claim), and it gets a new place in line (a global increasing counter, ``ready_seq``)
  each time it becomes ready or its head's chain key changes -- among ready boards with a usable model the
  lowest place wins;
* a chain key is ``c:<chain>`` (fallback order) or ``m:<model>`` (a pinned model); a model is usable when it
  is not cooling down and its model cap and its provider's cap are not reached; the global cap comes first;
* failures and timeouts count attempts (failed at max_attempts), outcomes reset them; a follow-up returns the
  task to its board unless it already had max_runs runs; a rate limit cools the model (a cooldown never
  shrinks) and requeues the task without using an attempt; so does a release (without the cooldown);
* a provider's breaker (core.lua breaker_*): ``breaker_failures`` provider faults within the window open it;
  while open no model of it is usable (``provider_open``); once its end passed one claim may take it (the
  probe) and the provider is refused again until the probe ends; the probe's ok closes it, its fault
  re-opens it for twice as long (up to the max), its void (release, reap, cancel) frees the probe slot;
* a task due later (a not-before time, or night-only outside the night window) is ``scheduled``: in no queue,
  blocking nothing. A claim first moves boards whose backoff ended, then -- outside the window (``night_next``
  given) -- sends queued night-only tasks back to ``scheduled`` until ``night_next`` and forgets the finished
  ones of ``night_queued`` (it keeps the running ones), then queues the due scheduled tasks (by due time, ties by
  id as text, at most 100), holding a night-only one until ``night_next`` outside the window.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

UP_NEXT, IN_PROGRESS, IN_REVIEW = "up_next", "in_progress", "in_review"
FAILED, CANCELLED, SCHEDULED = "failed", "cancelled", "scheduled"
IDLE, PAUSED, BUSY, BACKOFF, READY = "idle", "paused", "busy", "backoff", "ready"
UNFINISHED = (SCHEDULED, UP_NEXT, IN_PROGRESS)
PROMOTE_BATCH = 100


@dataclass(frozen=True)
class Rules:
    """The settings the scripts read, in milliseconds (what Config.script_settings() and the caps give)."""

    global_cap: int
    chains: dict[str, tuple[str, ...]]
    providers: dict[str, str]  #: model -> provider
    model_caps: dict[str, int]
    provider_caps: dict[str, int]
    lease_ms: int
    heartbeat_ms: int
    backoff_ms: int
    max_attempts: int
    max_runs: int
    breaker_failures: int = 0  #: 0: failures never open a breaker
    breaker_window_ms: int = 300_000
    breaker_cooldown_ms: int = 600_000
    breaker_max_cooldown_ms: int = 3_600_000

    def models_of(self, ck: str) -> tuple[str, ...]:
        kind, name = ck[:2], ck[2:]
        return (name,) if kind == "m:" else self.chains[name]


@dataclass
class MTask:
    id: int
    board: str
    ck: str
    status: str = UP_NEXT
    run_count: int = 0
    attempts: int = 0
    backoff_until: int = 0
    run_id: str | None = None  #: the active run
    model: str | None = None  #: model of the active or last run
    provider: str | None = None
    deadline: int | None = None  #: lease deadline of the active run
    last_run_id: str | None = None  #: the run that ended last
    last_end: str | None = None  #: how it ended: complete, fail, timeout, rate_limited, release, cancel
    last_outcome: tuple[str, str] | None = None  #: (run id, digest) of the last recorded outcome
    #: (run id, what) of the last run end reported by fail, rate_limited or release (the scripts' `last_end`):
    #: a retry of that very report, whose first try was applied, is answered "repeated"
    last_report: tuple[str, object] | None = None
    night: bool = False  #: night-only
    due_at: int | None = None  #: while scheduled


@dataclass
class MBoard:
    paused: bool = False
    running: int | None = None
    state: str | None = None  #: the index it sits in (as stored: only re-indexed where the scripts do)
    ck: str | None = None  #: its ready line, when ready
    score: int = 0  #: place in its ready line, or end of its backoff


@dataclass
class MBreaker:
    """A provider's breaker that is not closed (breaker:<provider>)."""

    until: int
    cooldown_ms: int
    cause: str
    opened_at: int
    probe: str | None = None  #: the probe's run id while it runs
    probe_task: int | None = None

    def refuses(self, now: int) -> bool:
        return self.until > now or self.probe is not None


@dataclass(frozen=True)
class Claimed:
    task_id: int
    board: str
    model: str
    provider: str
    run_count: int
    attempt: int
    deadline: int


@dataclass(frozen=True)
class Refused:
    reasons: dict[str, int]


class QueueModel:
    """The whole namespace: tasks, boards, cooldowns and the two counters."""

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.tasks: dict[int, MTask] = {}
        self.boards: dict[str, MBoard] = {}
        self.cooldowns: dict[str, int] = {}  #: model -> stored cooldown end (cooling while > now)
        self.breakers: dict[str, MBreaker] = {}  #: provider -> its breaker, while not closed
        self.breaker_failures: dict[str, dict[str, int]] = {}  #: provider -> run id -> time of a fault
        self.ready_seq = 0
        self.task_seq = 0
        self.night_queued: set[int] = set()  #: night-only tasks that went to a queue (cleaned lazily)

    # -- views -------------------------------------------------------------------------------------
    def queue(self, board: str) -> list[int]:
        return sorted(t.id for t in self.tasks.values() if t.board == board and t.status == UP_NEXT)

    def running(self) -> list[MTask]:
        return sorted((t for t in self.tasks.values() if t.status == IN_PROGRESS), key=lambda t: t.id)

    def inflight_models(self) -> Counter[str]:
        return Counter(t.model for t in self.running() if t.model)

    def inflight_providers(self) -> Counter[str]:
        return Counter(t.provider for t in self.running() if t.provider)

    def refs(self) -> Counter[str]:
        return Counter(t.ck for t in self.tasks.values() if t.status in UNFINISHED)

    def ready_lines(self) -> dict[str, list[str]]:
        """Chain key -> its ready boards, front first."""
        lines: dict[str, list[str]] = {}
        for name, b in sorted(self.boards.items(), key=lambda kv: kv[1].score):
            if b.state == READY and b.ck:
                lines.setdefault(b.ck, []).append(name)
        return lines

    def cooling(self, model: str, now: int) -> bool:
        return self.cooldowns.get(model, 0) > now

    def board(self, name: str) -> MBoard:
        return self.boards.setdefault(name, MBoard())

    # -- board index (core.lua state_of / reindex_board) --------------------------------------------
    def state_of(self, name: str, now: int) -> tuple[str, str | None, int]:
        b = self.board(name)
        queue = self.queue(name)
        if not queue:
            return IDLE, None, 0
        if b.paused:
            return PAUSED, None, 0
        if b.running is not None:
            return BUSY, None, 0
        head = self.tasks[queue[0]]
        if head.backoff_until > now:
            return BACKOFF, None, head.backoff_until
        return READY, head.ck, 0

    def reindex(self, name: str, now: int) -> str:
        b = self.board(name)
        state, ck, until = self.state_of(name, now)
        if b.state == state and (state != READY or b.ck == ck) and state != BACKOFF:
            return state
        if state == READY:
            self.ready_seq += 1
            b.score = self.ready_seq
        elif state == BACKOFF:
            b.score = until
        b.state, b.ck = state, ck
        return state

    # -- operations ------------------------------------------------------------------------------------
    def scheduled_count(self) -> Counter[str]:
        return Counter(t.board for t in self.tasks.values() if t.status == SCHEDULED)

    def add(self, board: str, ck: str, now: int, task_id: int | None = None, due: int | None = None,
            night: bool = False) -> int | None:
        """The new task's id, or None when ``task_id`` is taken. ``due``: the due time the broker computed."""
        if task_id is None:
            self.task_seq += 1
            task_id = self.task_seq
        elif task_id in self.tasks:
            return None
        else:
            self.task_seq = max(self.task_seq, task_id)
        t = self.tasks[task_id] = MTask(task_id, board, ck, night=night)
        self.board(board)
        if due is not None and due > now:
            t.status, t.due_at = SCHEDULED, due
            return task_id
        if night:
            self.night_queued.add(task_id)
        # add_task re-indexes only for a new head: behind a lower id the board keeps its index, even a backoff
        # that has ended (the next claim moves it first, like every board whose backoff ended).
        if self.queue(board)[0] == task_id:
            self.reindex(board, now)
        return task_id

    def _night_sweep(self, now: int, night_next: int | None) -> None:
        if night_next is None:
            return
        for tid in sorted(self.night_queued, key=lambda i: (i, str(i))):
            t = self.tasks[tid]
            if t.status == UP_NEXT:
                t.status, t.due_at = SCHEDULED, night_next
                self.reindex(t.board, now)
            if t.status != IN_PROGRESS:
                self.night_queued.discard(tid)

    def _promote(self, now: int, night_next: int | None) -> None:
        due = sorted((t for t in self.tasks.values() if t.status == SCHEDULED and (t.due_at or 0) <= now),
                     key=lambda t: (t.due_at, str(t.id)))[:PROMOTE_BATCH]
        for t in due:
            if t.night and night_next is not None:
                t.due_at = night_next
                continue
            t.status, t.due_at = UP_NEXT, None
            if t.night:
                self.night_queued.add(t.id)
            self.reindex(t.board, now)

    def blocked(self, model: str, now: int) -> str | None:
        r = self.rules
        provider = r.providers[model]
        if self.cooling(model, now):
            return "model_rate_limited"
        if provider in self.breakers and self.breakers[provider].refuses(now):
            return "provider_open"
        if model in r.model_caps and self.inflight_models()[model] >= r.model_caps[model]:
            return "model_quota_reached"
        if provider in r.provider_caps and self.inflight_providers()[provider] >= r.provider_caps[provider]:
            return "provider_quota_reached"
        return None

    def pick(self, ck: str, now: int) -> tuple[str | None, str]:
        """The first usable model of chain key ``ck``; else None and the reason of its first model."""
        first = "model_quota_reached"
        for i, model in enumerate(self.rules.models_of(ck)):
            reason = self.blocked(model, now)
            if reason is None:
                return model, ""
            if i == 0:
                first = reason
        return None, first

    def claim(self, now: int, run_id: str, night_next: int | None = None) -> Claimed | Refused:
        # Boards whose backoff ended join their ready line first, by backoff end, ties by name.
        due = sorted((b.score, n) for n, b in self.boards.items() if b.state == BACKOFF and b.score <= now)
        for _, name in due:
            self.reindex(name, now)
        self._night_sweep(now, night_next)
        self._promote(now, night_next)
        lines = self.ready_lines()
        reasons: Counter[str] = Counter()
        if len(self.running()) >= self.rules.global_cap:
            reasons["global_cap"] += sum(len(boards) for boards in lines.values())
            return self._refuse(reasons)
        best: tuple[int, str, str] | None = None
        for ck, boards in lines.items():
            model, reason = self.pick(ck, now)
            if model is None:
                reasons[reason] += len(boards)
            elif best is None or self.boards[boards[0]].score < best[0]:
                best = (self.boards[boards[0]].score, boards[0], model)
        if best is None:
            return self._refuse(reasons)
        _, name, model = best
        return self._start(name, model, now, run_id)

    def _refuse(self, reasons: Counter[str]) -> Refused:
        for state, reason in ((BUSY, "board_busy"), (PAUSED, "board_paused"), (BACKOFF, "backoff")):
            reasons[reason] += sum(1 for b in self.boards.values() if b.state == state)
        return Refused({k: n for k, n in reasons.items() if n > 0})

    def _start(self, name: str, model: str, now: int, run_id: str) -> Claimed:
        t = self.tasks[self.queue(name)[0]]
        t.status, t.run_id, t.model = IN_PROGRESS, run_id, model
        t.provider = self.rules.providers[model]
        t.deadline = now + self.rules.lease_ms
        t.backoff_until = 0
        self.boards[name].running = t.id
        self.reindex(name, now)
        if t.provider in self.breakers:  # half-open, no probe out (else it would refuse): this run is the probe
            self.breakers[t.provider].probe, self.breakers[t.provider].probe_task = run_id, t.id
        return Claimed(t.id, name, model, t.provider, t.run_count + 1, t.attempts + 1, t.deadline)

    def active(self, task_id: int, run_id: str) -> tuple[MTask | None, str]:
        """The task when ``run_id`` is its active run, else None and "not_found" / "fenced"."""
        t = self.tasks.get(task_id)
        if t is None:
            return None, "not_found"
        if t.status != IN_PROGRESS or t.run_id != run_id:
            return None, "fenced"
        return t, ""

    def _end_run(self, t: MTask, how: str) -> None:
        self.boards[t.board].running = None
        t.last_run_id, t.last_end = t.run_id, how
        t.run_id = t.deadline = None

    def _requeue(self, t: MTask, now: int, backoff_until: int) -> None:
        t.status, t.backoff_until = UP_NEXT, backoff_until
        self.reindex(t.board, now)

    def _finish(self, t: MTask, now: int, status: str) -> None:
        t.status = status
        self.reindex(t.board, now)

    # -- the provider breaker (core.lua open_breaker, close_breaker, breaker_after) ------------------------
    def open_breaker(self, provider: str, now: int, cause: str, length_ms: int) -> int:
        self.breakers[provider] = MBreaker(now + length_ms, length_ms, cause, now)
        self.breaker_failures.pop(provider, None)
        return now + length_ms

    def close_breaker(self, provider: str) -> None:
        self.breakers.pop(provider, None)
        self.breaker_failures.pop(provider, None)

    def _breaker_after(self, provider: str | None, run_id: str | None, now: int, verdict: str, cause: str) -> None:
        if not provider:
            return
        r, b = self.rules, self.breakers.get(provider)
        if b is not None and b.probe is not None and b.probe == run_id:
            if verdict == "ok":
                self.close_breaker(provider)
            elif verdict == "fault":
                self.open_breaker(provider, now, cause, max(1, min(b.cooldown_ms * 2, r.breaker_max_cooldown_ms)))
            else:
                b.probe = b.probe_task = None
            return
        if verdict != "fault" or b is not None or r.breaker_failures < 1 or run_id is None:
            return
        window = self.breaker_failures.setdefault(provider, {})
        window[run_id] = now
        for rid in [rid for rid, at in window.items() if at <= now - r.breaker_window_ms]:
            del window[rid]
        if len(window) >= r.breaker_failures:
            self.open_breaker(provider, now, cause, r.breaker_cooldown_ms)

    def _fail_run(self, t: MTask, now: int, how: str, retry: bool, backoff: bool,
                  verdict: str = "ok", cause: str = "failed") -> str:
        run_id = t.run_id
        self._end_run(t, how)
        self._breaker_after(t.provider, run_id, now, verdict, cause)
        t.attempts += 1
        if retry and t.attempts < self.rules.max_attempts:
            self._requeue(t, now, now + self.rules.backoff_ms if backoff else 0)
        else:
            self._finish(t, now, FAILED)
        return t.status

    def heartbeat(self, task_id: int, run_id: str, now: int) -> tuple[str, int | None]:
        t, code = self.active(task_id, run_id)
        if t is None:
            return code, None
        t.deadline = now + self.rules.heartbeat_ms
        return "ok", t.deadline

    def is_repeat(self, t: MTask, run_id: str, digest: str) -> bool:
        """A repeat of the task's last recorded outcome by the run that recorded it (complete_run keeps
        ``last_digest`` = "<run id>|<digest>"): answered 8 even after later runs failed or timed out."""
        return t.last_outcome == (run_id, digest)

    def complete(
        self, task_id: int, run_id: str, follow_up: bool, digest: str, now: int
    ) -> tuple[object, ...]:
        """("ok", status, run_count, limit_reached) | ("repeated", status, run_count) | (code,)."""
        t, code = self.active(task_id, run_id)
        if t is None:
            cur = self.tasks.get(task_id)
            if cur is not None and self.is_repeat(cur, run_id, digest):
                return "repeated", cur.status, cur.run_count
            return (code,)
        run_count = t.run_count + 1
        limit = follow_up and run_count >= self.rules.max_runs
        self._end_run(t, "complete")
        self._breaker_after(t.provider, run_id, now, "ok", "")
        t.run_count, t.attempts, t.last_outcome = run_count, 0, (run_id, digest)
        if follow_up and not limit:
            self._requeue(t, now, 0)
        else:
            self._finish(t, now, IN_REVIEW)
        return "ok", t.status, run_count, limit

    def _repeat_of(self, task_id: int, run_id: str, code: str, what: object) -> MTask | None:
        """The task, when this late report is a retry of the run end that run reported last."""
        cur = self.tasks.get(task_id)
        if code == "fenced" and cur is not None and cur.last_report == (run_id, what):
            return cur
        return None

    def fail(self, task_id: int, run_id: str, retry: bool, now: int, cause: str = "failed",
             fault: bool = False, message: str = "boom") -> tuple[object, ...]:
        """("ok" | "repeated", status, attempts) | (code,). ``fault``: it counts toward the provider's breaker."""
        t, code = self.active(task_id, run_id)
        if t is None:
            cur = self._repeat_of(task_id, run_id, code, ("fail", cause, message))
            return ("repeated", cur.status, cur.attempts) if cur else (code,)
        status = self._fail_run(t, now, "fail", retry, backoff=True, verdict="fault" if fault else "ok",
                                cause=cause)
        t.last_report = (run_id, ("fail", cause, message))
        return "ok", status, t.attempts

    def cool(self, model: str, now: int, until: int, grow_only: bool) -> int:
        """core.lua cool_model: the cooldown end in force afterwards."""
        old = self.cooldowns.get(model)
        if grow_only and old is not None and old >= until:
            return old
        if until <= now:
            self.cooldowns.pop(model, None)
            return now
        self.cooldowns[model] = until
        return until

    def rate_limited(self, task_id: int, run_id: str, until: int, now: int,
                     fault: bool = False) -> tuple[object, ...]:
        """("ok" | "repeated", model, cooldown_end) | (code,). ``fault``: no reset was parsed, so it counts toward
        the breaker. A retry of the limit that ended the run answers what the first try did."""
        t, code = self.active(task_id, run_id)
        if t is None:
            cur = self.tasks.get(task_id)
            last = cur.last_report if cur is not None and code == "fenced" else None
            if last is not None and last[0] == run_id and isinstance(last[1], tuple) and last[1][0] == "limit":
                return "repeated", last[1][1], last[1][2]
            return (code,)
        assert t.model is not None
        end = self.cool(t.model, now, until, grow_only=True)
        self._end_run(t, "rate_limited")
        self._breaker_after(t.provider, run_id, now, "fault" if fault else "ok", "rate_limit")
        self._requeue(t, now, 0)
        t.last_report = (run_id, ("limit", t.model, end))
        return "ok", t.model, end

    def release(self, task_id: int, run_id: str, now: int, reason: str = "released") -> tuple[object, ...]:
        """release_run: the run is given back, no attempt used, no backoff. ("ok", "up_next") |
        ("repeated", status) | (code,)."""
        t, code = self.active(task_id, run_id)
        if t is None:
            cur = self._repeat_of(task_id, run_id, code, ("release", reason))
            return ("repeated", cur.status) if cur else (code,)
        self._end_run(t, "release")
        self._breaker_after(t.provider, run_id, now, "void", "")
        self._requeue(t, now, 0)
        t.last_report = (run_id, ("release", reason))
        return "ok", t.status

    def reap(self, now: int) -> list[int]:
        # ZRANGEBYSCORE running -inf now: by deadline, ties by member (the id as text).
        expired = sorted((t for t in self.running() if t.deadline is not None and t.deadline <= now),
                         key=lambda t: (t.deadline, str(t.id)))
        for t in expired:
            self._fail_run(t, now, "timeout", retry=True, backoff=False, verdict="void", cause="timeout")
        return [t.id for t in expired]

    def cancel(self, task_id: int, now: int) -> tuple[str, str | None]:
        """("ok", previous status) | ("not_found" | "bad_state", None)."""
        t = self.tasks.get(task_id)
        if t is None:
            return "not_found", None
        was = t.status
        if was == CANCELLED:
            return "bad_state", None
        if was == IN_PROGRESS:
            run_id = t.run_id
            self._end_run(t, "cancel")
            self._breaker_after(t.provider, run_id, now, "void", "")
        t.due_at = None
        self._finish(t, now, CANCELLED)
        return "ok", was

    def set_paused(self, board: str, paused: bool, now: int) -> str:
        self.board(board).paused = paused
        return self.reindex(board, now)
