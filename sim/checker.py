"""An independent checker of a night's run timeline: did every rule hold?

It reads only the timeline (one record per run, from claim to the end of its lease), the tasks' final
state, the config's limits and the notifications that were sent. It never reads the broker's counters,
so a bug in the scripts cannot hide itself.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BreakerRules", "Check", "Run", "TaskFinal", "Timeline", "check_all"]

FINAL = ("in_review", "failed", "cancelled")
INF = math.inf


@dataclass(frozen=True)
class Run:
    """One claim: from ``start`` (claim) to ``end`` (its lease ended), and how it ended."""

    task_id: int
    board: str
    model: str
    provider: str
    run_id: str
    run_count: int
    start: float
    end: float | None
    outcome: str | None  #: done, follow_up, rate_limited, quota_reached, failed, timeout, released, cancelled
    detail: str = ""  #: the error its history recorded (a lease that expired says so)


@dataclass(frozen=True)
class TaskFinal:
    task_id: int
    board: str
    status: str
    run_count: int
    allowed_models: tuple[str, ...]  #: its chain, or its pinned model
    follow_up_run_ids: tuple[str, ...] = ()  #: runs whose next prompt is in the task's context


@dataclass(frozen=True)
class BreakerRules:
    """The provider breaker's settings, in milliseconds (``breaker:`` of the config)."""

    failures: int
    window_ms: int
    cooldown_ms: int
    max_cooldown_ms: int


@dataclass
class Timeline:
    tasks: list[TaskFinal]
    runs: list[Run]
    model_caps: dict[str, int]
    provider_caps: dict[str, int]
    global_cap_at: Callable[[float], int]
    notifications: list[dict[str, Any]] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0
    summary_interval_s: float = 600.0
    idle_limit_s: float = 30.0
    max_runs: int = 5
    breaker: BreakerRules | None = None  #: None: the breaker is off (provider_outage_contained has nothing to do)


@dataclass
class Check:
    ok: bool
    violations: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "violations": self.violations[:50], **self.detail}


def _check(violations: list[str], **detail: Any) -> Check:
    return Check(ok=not violations, violations=violations, detail=detail)


def _end(run: Run) -> float:
    return INF if run.end is None else run.end


# -- completed_without_jamming ----------------------------------------------------------------------------
def completed_without_jamming(tl: Timeline) -> Check:
    """Every task reached a final state, and the runner never sat idle while work remained."""
    v = [f"task {t.task_id} ({t.board}) ended {t.status}, not final" for t in tl.tasks if t.status not in FINAL]
    last_end = {t.task_id: 0.0 for t in tl.tasks}
    for r in tl.runs:
        last_end[r.task_id] = max(last_end[r.task_id], _end(r))
    cursor = tl.started
    for start, end in _busy_spans(tl.runs):
        if start - cursor > tl.idle_limit_s:
            waiting = [tid for tid, e in last_end.items() if e > cursor]
            if waiting:
                v.append(f"nothing in progress from {cursor:.3f} to {start:.3f} ({start - cursor:.1f}s) "
                         f"while tasks {waiting[:10]} were unfinished")
        cursor = max(cursor, end)
    return _check(v, tasks=len(tl.tasks), wall_s=round(tl.finished - tl.started, 3))


def _busy_spans(runs: Iterable[Run]) -> list[tuple[float, float]]:
    spans: list[tuple[float, float]] = []
    for r in sorted(runs, key=lambda r: r.start):
        if spans and r.start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], _end(r)))
        else:
            spans.append((r.start, _end(r)))
    return spans


# -- one_per_board_fifo -----------------------------------------------------------------------------------
def one_per_board_fifo(tl: Timeline) -> Check:
    """No board ran two runs at once, and a board's runs went in task_id order (follow-ups first)."""
    v: list[str] = []
    by_board: dict[str, list[Run]] = defaultdict(list)
    for r in tl.runs:
        by_board[r.board].append(r)
    for board, runs in sorted(by_board.items()):
        runs.sort(key=lambda r: (r.start, r.task_id))
        for prev, cur in itertools.pairwise(runs):
            if cur.start < _end(prev):
                v.append(f"board {board} ran task {prev.task_id} ({prev.start:.3f}-{_end(prev):.3f}) and task "
                         f"{cur.task_id} (from {cur.start:.3f}) at once")
            if cur.task_id < prev.task_id:
                v.append(f"board {board} ran task {cur.task_id} at {cur.start:.3f} after task {prev.task_id} "
                         f"(started {prev.start:.3f}): not lowest task_id first")
    return _check(v, boards=len(by_board))


# -- llm_limits_respected ---------------------------------------------------------------------------------
def _peaks(runs: Iterable[Run], key: Callable[[Run], str]) -> dict[str, tuple[int, float]]:
    """Highest concurrency per key, and when it happened (ends before starts at the same instant)."""
    points: list[tuple[float, int, str]] = []
    for r in runs:
        points += [(r.start, 1, key(r)), (_end(r), -1, key(r))]
    points.sort(key=lambda p: (p[0], p[1]))
    now: dict[str, int] = defaultdict(int)
    peak: dict[str, tuple[int, float]] = {}
    for t, delta, k in points:
        now[k] += delta
        if now[k] > peak.get(k, (0, 0.0))[0]:
            peak[k] = (now[k], t)
    return peak


def _global_violations(tl: Timeline) -> list[str]:
    v = []
    for r in tl.runs:
        inflight = sum(1 for o in tl.runs if o.start <= r.start < _end(o))
        cap = tl.global_cap_at(r.start)
        if inflight > cap:
            v.append(f"{inflight} runs in progress at {r.start:.3f} (task {r.task_id} started) > global cap {cap}")
    return v


def llm_limits_respected(tl: Timeline) -> Check:
    """Model, provider and global caps never exceeded; no run on a model outside its task's chain."""
    v: list[str] = []
    for name, caps, key in (("model", tl.model_caps, lambda r: r.model),
                            ("provider", tl.provider_caps, lambda r: r.provider)):
        for k, (n, t) in _peaks(tl.runs, key).items():
            if k in caps and n > caps[k]:
                v.append(f"{name} {k} had {n} runs in progress at {t:.3f} > cap {caps[k]}")
    v += _global_violations(tl)
    allowed = {t.task_id: t.allowed_models for t in tl.tasks}
    v += [f"task {r.task_id} ran on {r.model}, outside its chain {list(allowed.get(r.task_id, ()))}"
          for r in tl.runs if r.model not in allowed.get(r.task_id, ())]
    peaks = {m: n for m, (n, _) in _peaks(tl.runs, lambda r: r.model).items()}
    return _check(v, model_peaks=peaks)


# -- every_task_reported ----------------------------------------------------------------------------------
def every_task_reported(tl: Timeline) -> Check:
    """Every run ended with an outcome, and every task's last run says how it ended."""
    v = [f"run {r.run_id} of task {r.task_id} (from {r.start:.3f}) never ended" for r in tl.runs if r.end is None]
    v += [f"run {r.run_id} of task {r.task_id} ended without an outcome" for r in tl.runs
          if r.end is not None and not r.outcome]
    last: dict[int, Run] = {}
    for r in sorted(tl.runs, key=lambda r: r.start):
        last[r.task_id] = r
    for t in tl.tasks:
        lr = last.get(t.task_id)
        ended = lr.outcome if lr else "never"
        if t.status == "in_review" and ended not in ("done", "follow_up"):
            v.append(f"task {t.task_id} is in_review but its last run ended {ended}")
        if t.status == "failed" and ended not in _FAILURES:
            v.append(f"task {t.task_id} failed but its last run ended {ended}")
    return _check(v, runs=len(tl.runs))


#: Outcomes a run that failed its task for good may end with: its root cause.
_FAILURES = frozenset({"failed", "timeout", "overloaded", "unreachable", "billing", "auth", "bad_output"})


# -- follow_up_same_task ----------------------------------------------------------------------------------
def follow_up_same_task(tl: Timeline) -> Check:
    """A follow-up brings the same task back (next run on its board, run_count + 1, prompt in context)."""
    v: list[str] = []
    tasks = {t.task_id: t for t in tl.tasks}
    by_board: dict[str, list[Run]] = defaultdict(list)
    for r in sorted(tl.runs, key=lambda r: r.start):
        by_board[r.board].append(r)
    count = 0
    for runs in by_board.values():
        for i, r in enumerate(runs):
            if r.outcome != "follow_up":
                continue
            count += 1
            t = tasks[r.task_id]
            if r.run_id not in t.follow_up_run_ids:
                v.append(f"task {r.task_id}: follow-up of run {r.run_id} is not in its context")
            nxt = runs[i + 1] if i + 1 < len(runs) else None
            if nxt is None or nxt.task_id != r.task_id:
                if not (t.status == "in_review" and r.run_count >= tl.max_runs):
                    other = f"task {nxt.task_id} at {nxt.start:.3f}" if nxt else "nothing"
                    v.append(f"board {r.board}: after the follow-up of task {r.task_id} ({_end(r):.3f}) ran {other}")
            elif nxt.run_count != r.run_count + 1:
                v.append(f"task {r.task_id}: run_count {nxt.run_count} after a follow-up at run {r.run_count}")
    return _check(v, follow_ups=count)


# -- reports_and_alerts_sent ------------------------------------------------------------------------------
def reports_and_alerts_sent(tl: Timeline) -> Check:
    """Summaries went out while the queue was active; each in_review or failed task got its alert."""
    v: list[str] = []
    summaries = [n for n in tl.notifications if n.get("kind") == "summary"]
    active_s = max(0.0, tl.finished - tl.started)
    expected = max(1, int(active_s // tl.summary_interval_s) - 1)
    if len(summaries) < expected:
        v.append(f"{len(summaries)} summaries in {active_s:.0f}s of activity, expected at least {expected} "
                 f"(one per {tl.summary_interval_s:.0f}s)")
    alerts: dict[tuple[str, int], int] = defaultdict(int)
    for n in tl.notifications:
        if n.get("kind") in ("in_review", "failed") and n.get("task_id") is not None:
            alerts[(str(n["kind"]), int(n["task_id"]))] += 1
    for t in tl.tasks:
        if t.status in ("in_review", "failed") and alerts[(t.status, t.task_id)] != 1:
            v.append(f"task {t.task_id} reached {t.status} with {alerts[(t.status, t.task_id)]} alert(s), expected 1")
    return _check(v, summaries=len(summaries), alerts=sum(alerts.values()))


# -- provider_outage_contained ----------------------------------------------------------------------------
#: Run outcomes that tell a provider failed (counted toward its breaker), and those that tell nothing.
_FAULTS = frozenset({"overloaded", "timeout", "unreachable"})
_VOID = frozenset({"released", "cancelled", "pairing", "agent_unreachable", "lost"})
_LEASE_LOST = "no heartbeat: lease expired"  #: a reaped lease: the worker died, not the provider


def _verdict(r: Run) -> str:
    if r.outcome in _VOID or (r.outcome == "timeout" and r.detail == _LEASE_LOST):
        return "void"
    return "fault" if r.outcome in _FAULTS else "ok"


def _ms(t: float) -> int:
    return round(t * 1000)


@dataclass
class _Replay:
    """One provider's breaker, replayed from its runs alone: when it must be open, which run is the probe."""

    provider: str
    rules: BreakerRules
    faults: list[int] = field(default_factory=list)
    until: int | None = None  #: set while not closed
    length: int = 0
    probe: str | None = None
    opened_ms: int = -1
    openings: list[float] = field(default_factory=list)
    probes: int = 0
    violations: list[str] = field(default_factory=list)

    def start(self, t: int, r: Run) -> None:
        if self.until is None or t == self.opened_ms:  # opened at this very ms: the claim may have run first
            return
        if t < self.until:
            self.violations.append(f"task {r.task_id} started on {self.provider} ({r.model}) at {t / 1000:.3f} while "
                                   f"its breaker was open until {self.until / 1000:.3f}")
        elif self.probe is not None:
            self.violations.append(f"task {r.task_id} started on {self.provider} at {t / 1000:.3f} while the "
                                   f"half-open probe {self.probe} was still running")
        else:
            self.probe, self.probes = r.run_id, self.probes + 1

    def end(self, t: int, r: Run) -> None:
        verdict = _verdict(r)
        if self.until is not None and r.run_id == self.probe:
            self.probe = None
            if verdict == "ok":
                self.until, self.faults = None, []
            elif verdict == "fault":
                self._open(t, max(1, min(self.length * 2, self.rules.max_cooldown_ms)))
            return
        if self.until is not None or verdict != "fault":
            return
        self.faults = [f for f in self.faults if f > t - self.rules.window_ms] + [t]
        if len(self.faults) >= self.rules.failures:
            self._open(t, self.rules.cooldown_ms)

    def _open(self, t: int, length: int) -> None:
        self.until, self.length, self.faults, self.opened_ms = t + length, length, [], t
        self.openings.append(t / 1000)


def _replay(provider: str, runs: list[Run], rules: BreakerRules) -> _Replay:
    # at one instant, ends first (a slot freed), and a claim at the ms of an opening is let pass: where the
    # timeline cannot tell the order, the broker is given the benefit of the doubt
    points = [(_ms(r.start), 1, r) for r in runs] + [(_ms(r.end), 0, r) for r in runs if r.end is not None]
    replay = _Replay(provider, rules)
    for t, kind, r in sorted(points, key=lambda p: (p[0], p[1])):
        (replay.start if kind else replay.end)(t, r)
    return replay


def provider_outage_contained(tl: Timeline) -> Check:
    """No run started on a provider whose breaker must have been open, beyond the one half-open probe; each
    opening got its alert. The breaker is replayed per provider from the runs' outcomes and the config alone."""
    if tl.breaker is None:
        return _check([], providers={})
    by_provider: dict[str, list[Run]] = defaultdict(list)
    for r in tl.runs:
        by_provider[r.provider].append(r)
    alerts: dict[str, int] = defaultdict(int)
    for n in tl.notifications:
        if n.get("kind") == "provider_open":
            alerts[str(n.get("provider"))] += 1
    v: list[str] = []
    detail: dict[str, Any] = {}
    for provider, runs in sorted(by_provider.items()):
        rp = _replay(provider, runs, tl.breaker)
        v += rp.violations
        if tl.notifications and alerts[provider] != len(rp.openings):
            v.append(f"provider {provider}: {len(rp.openings)} opening(s) but {alerts[provider]} "
                     "provider_open alert(s)")
        wasted = sum(1 for r in runs if _verdict(r) == "fault")
        if rp.openings or wasted:
            detail[provider] = {"openings": len(rp.openings), "probes": rp.probes, "failed_runs": wasted}
    return _check(v, providers=detail)


CRITERIA: dict[str, Callable[[Timeline], Check]] = {
    "completed_without_jamming": completed_without_jamming,
    "one_per_board_fifo": one_per_board_fifo,
    "llm_limits_respected": llm_limits_respected,
    "every_task_reported": every_task_reported,
    "follow_up_same_task": follow_up_same_task,
    "reports_and_alerts_sent": reports_and_alerts_sent,
    "provider_outage_contained": provider_outage_contained,
}


def check_all(tl: Timeline) -> dict[str, Check]:
    """Every criterion, by name."""
    return {name: fn(tl) for name, fn in CRITERIA.items()}
