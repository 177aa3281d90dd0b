"""``clawq dispatch``: reap expired leases, claim while claims succeed, hand each claim to an RQ worker.

Event-driven: the dispatcher blocks on the namespace's event stream (XREAD BLOCK), so a task added, a run
ended or a config loaded wakes it at once; the block times out at the nearest deadline (lease, backoff,
cooldown), so nothing waits for a polling tick. Several dispatchers may run against one namespace: claims
are atomic, and summaries and alerts are sent once (SET NX) whichever dispatcher sees them first.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis

from clawq.broker import Broker, Claim, Deadlines, NothingToClaim, RedisUnavailable, RunFenced, TaskNotFound
from clawq.broker.config import Config, next_local_time
from clawq.broker.errors import ConfigMissing, NamespaceWiped, RedisOutOfMemory
from clawq.broker.events import EventType
from clawq.broker.identity import process_name
from clawq.broker.schedules import Schedules

from .notify import Notifiers, notifiers_from

__all__ = ["AgentGate", "BatchEnqueue", "Dispatcher", "http_ready", "summary_line"]

log = logging.getLogger("clawq.dispatch")

Enqueue = Callable[[Claim], None]


class BatchEnqueue(Protocol):
    """An enqueue function that also takes a whole batch (:class:`workers.rq_glue.RqEnqueuer`): ``many`` sends
    the jobs of all the claims at once, and when it raises, none of them was enqueued."""

    def __call__(self, claim: Claim) -> None: ...

    def many(self, claims: Sequence[Claim]) -> None: ...


class JobWatch(Protocol):
    """What the dispatcher asks of its queue (:class:`workers.rq_glue.RqEnqueuer`): jobs it handed over that
    will never run (deleted or cancelled before they ran)."""

    @property
    def watching(self) -> int: ...

    def lost(self) -> list[tuple[int, str]]: ...
_MAX_BLOCK_S = 1.0  #: the longest single wait, so SIGTERM is seen within a second
_IDLE_WAKE_S = 60.0  #: with no deadline at all, look again after this long (a safety net, not a tick)
_GATE_CHECK_S = 3.0  #: the agent health URL is asked at most this often
_JOB_CHECK_S = 5.0  #: while enqueued jobs have not run, look this often for one deleted or cancelled in RQ
_ALERT_TTL_S = 86400
#: How often a dispatcher that lost Redis tries again. A call already waits through redis-py's own retries
#: (under a second apart), so a longer backoff here would only make the dispatcher resume late.
_RETRY_S = 0.5
CLAIM_BATCH = 16  #: claims per claim call; fewer back means nothing more may run now


def _frees_nothing(event: dict[str, Any]) -> bool:
    """Whether no claim can be possible after ``event`` that was not before: a claim (it only takes capacity,
    and its lease ends after every deadline read before it), a task added behind its board (``waits``: a
    lower id, a run in progress or a pause is ahead of it), or a completion after which no board is ready
    (``idle``). None of these makes a deadline. Woken by these alone (its own claims, a night's tasks queued
    behind their boards' first ones, the last runs of a draining queue), the dispatcher waits on instead of
    making a pass that would claim nothing."""
    kind = event.get("type")
    return (kind == EventType.CLAIMED or (kind == EventType.ADDED and event.get("waits") == "board")
            or (kind == EventType.COMPLETED and event.get("idle") == "1"))


def http_ready(url: str) -> bool:
    """True when GET ``url`` answers 2xx within 3 s."""
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return 200 <= int(resp.status) < 300
    except (OSError, urllib.error.URLError, ValueError):
        return False


@dataclass
class AgentGate:
    """Holds claims while the agent runtime is down (health URL failing, or a pairing error tripped it)."""

    broker: Broker
    notifiers: Notifiers
    probe: Callable[[str], bool] = http_ready
    _last_check: float = 0.0
    _url_ok: bool = True
    _was_ok: bool | None = None  #: what this dispatcher saw last (None: nothing yet)

    def ready(self) -> bool:
        url = self.broker.config().agent.health_url
        now = time.monotonic()
        if url and now - self._last_check >= _GATE_CHECK_S:
            self._url_ok, self._last_check = self.probe(url), now
        tripped = self.broker.agent_gate()
        ok = (self._url_ok or not url) and tripped is None
        self._transition(ok, tripped or f"{url} is not ready")
        return ok

    def _transition(self, ok: bool, why: str) -> None:
        """One notification per outage and one when it ends, whichever dispatcher sees it (the lock key).
        While the gate stays open, nothing is written: the lock is released by a dispatcher that saw the
        outage (or that just started, and cannot know)."""
        was_ok, self._was_ok = self._was_ok, ok
        if ok:
            if was_ok is not True and self.broker.outage_ends():
                self.notifiers.send("agent_ready", "clawq: agent runtime is back, claiming again")
        elif self.broker.outage_begins(why, _ALERT_TTL_S):
            self.notifiers.send("agent_not_ready", f"clawq: agent runtime not ready, claims held ({why})")


def night_start(cfg: Config, now: float) -> float:
    """When "tonight" began: the most recent start of the night window (the last 24 h without night mode)."""
    if cfg.night_mode is None:
        return now - 86400
    return next_local_time(cfg.night_mode.start, now - 86400, cfg.night_mode.timezone)


def _cost_part(cost: dict[str, float] | None) -> str:
    if not cost:
        return ""
    per_model = ", ".join(f"{m} ${c:.2f}" for m, c in sorted(cost.items(), key=lambda kv: -kv[1]))
    return f" · cost tonight: ${sum(cost.values()):.2f} ({per_model})"


def summary_line(health: dict[str, Any], skips: dict[str, int], cost: dict[str, float] | None = None) -> str:
    """One line for humans: mode, cap, in progress, queued, free slots, why waiting, models busy/cooling, and
    what the agents cost since the night window opened (``cost``: dollars per model)."""
    g = health["global"]
    queued = sum(b["queue_depth"] for b in health["boards"].values())
    free = max(0, g["max_concurrent"] - g["in_progress"])
    top = ", ".join(f"{k} {v}" for k, v in sorted(skips.items(), key=lambda kv: -kv[1])[:3]) or "-"
    busy = ", ".join(f"{m} {s['inflight']}/{s['cap'] if s['cap'] is not None else '∞'}"
                     for m, s in health["models"].items() if s["inflight"]) or "-"
    cooling = ", ".join(f"{m} {s['cooldown_remaining_s']:.0f}s"
                        for m, s in health["models"].items() if s["cooldown_remaining_s"]) or "-"
    mode = "night" if g["night"] else "day"
    return (f"clawq {mode}: cap {g['max_concurrent']}, {g['in_progress']} in progress, {queued} queued, "
            f"{free} free · waiting: {top} · models: {busy} · cooling: {cooling}{_cost_part(cost)}")


@dataclass
class Dispatcher:
    """One dispatcher loop over one namespace."""

    broker: Broker
    enqueue: Enqueue
    notifiers: Notifiers | None = None
    jobs: JobWatch | None = None  #: releases a run whose job was deleted before it ran (no attempt used)
    probe: Callable[[str], bool] = http_ready
    claims: int = 0
    last_skips: dict[str, int] = field(default_factory=dict)
    _gate: AgentGate | None = None
    _own_notifiers: bool = False
    _cursor: str = ""
    _active: bool = False
    _gate_closed: bool = False
    _due: Deadlines | None = None  #: read at the end of the last pass
    _jobs_checked: float = 0.0  #: monotonic time of the last look for lost jobs

    def __post_init__(self) -> None:
        self._own_notifiers = self.notifiers is None
        self._refresh_notifiers()

    def _refresh_notifiers(self) -> None:
        """(Re)build the notifiers from the config, unless they were given (the simulator's sink)."""
        if self._own_notifiers:
            self.notifiers = notifiers_from(self.broker.config().notify)
        assert self.notifiers is not None
        self._gate = AgentGate(self.broker, self.notifiers, self.probe)

    # -- one pass --------------------------------------------------------------------------------
    def step(self) -> int:
        """Reap, then claim and enqueue until nothing more can run; returns the number of claims."""
        if self._reap_due():
            for task_id in self.broker.reap():
                log.info("lease of task %s expired: requeued at its board head", task_id)
        if self._schedules_due():
            self._fire_schedules()
        self._release_lost_jobs()
        assert self._gate is not None
        self._gate_closed = not self._gate.ready()
        made = 0
        if self._gate_closed:
            self.broker.count_skip("agent_not_ready")
            self.last_skips = {"agent_not_ready": 1}
        else:
            made = self._claim_all()
            self.claims += made
        self._due = self.broker.deadlines()
        if not self._gate_closed:
            self._maybe_summary(self._due)
        return made

    def _release_lost_jobs(self) -> None:
        """Every :data:`_JOB_CHECK_S`: a run whose job was deleted or cancelled before it ran would hold its task
        until its lease expired; give it back instead, without using an attempt."""
        if self.jobs is None or not self.jobs.watching or time.monotonic() - self._jobs_checked < _JOB_CHECK_S:
            return
        self._jobs_checked = time.monotonic()
        for task_id, run_id in self.jobs.lost():
            try:
                self.broker.release(task_id, run_id, "released", f"its RQ job {run_id} was deleted before it ran")
            except (RunFenced, TaskNotFound):  # it ended meanwhile (or its task is gone): nothing to give back
                continue
            log.warning("task %s: its RQ job %s was deleted before it ran; the run is given back (no attempt used)",
                        task_id, run_id)

    def _reap_due(self) -> bool:
        """Whether a lease may have expired: the earliest one read after the last pass is due (a lease made
        since then ends a whole lease later, and heartbeats only push leases back)."""
        due = self._due
        return due is None or (due.lease is not None and due.lease <= self.broker.now())

    def _schedules_due(self) -> bool:
        """Whether a recurring schedule may fire: the earliest firing read after the last pass is due (one added
        since then wakes this dispatcher with its event, and the pass after that reads it)."""
        due = self._due
        return due is None or (due.schedule is not None and due.schedule <= self.broker.now())

    def _fire_schedules(self) -> None:
        """Fire every due schedule; each firing happens once whichever dispatcher gets there first."""
        for f in Schedules(self.broker).fire_due():
            if f.outcome == "fired":
                log.info("schedule %s fired: task %s", f.schedule_id, f.task_id)
            elif f.outcome in ("skipped", "missed"):
                log.warning("schedule %s %s its firing (task %s)", f.schedule_id, f.outcome, f.task_id or "-")

    def _claim_all(self) -> int:
        """Claim in batches and enqueue each batch, until a batch comes back short or an enqueue fails."""
        made = 0
        while True:
            try:
                claims, skips = self.broker.claim_many(CLAIM_BATCH)
            except NothingToClaim as refused:
                self.last_skips = refused.skip_reasons
                return made
            if len(claims) < CLAIM_BATCH:
                self.last_skips = skips
            sent, failed = self._enqueue_batch(claims)
            made += sent
            if failed is not None:
                if _out_of_memory(failed):  # the loop says it once and waits, instead of a claim per wake
                    raise RedisOutOfMemory(f"Redis is out of memory: the agent job's enqueue was refused "
                                           f"({_one_line(failed)}); its claim was given back")
                return made
            if len(claims) < CLAIM_BATCH:
                return made

    def _enqueue_batch(self, claims: list[Claim]) -> tuple[int, Exception | None]:
        """Enqueue a batch of claims: in one call when the queue takes batches (:class:`BatchEnqueue`), else one
        by one. Every claim not enqueued is given back (no leaked counters). Returns how many were enqueued,
        and the error that stopped it."""
        many = getattr(self.enqueue, "many", None)
        if many is None or len(claims) == 1:
            for i, claim in enumerate(claims):
                failed = self._enqueue(claim)
                if failed is not None:
                    for rest in claims[i + 1:]:
                        self._release(rest, "enqueue skipped: an earlier one of its batch failed")
                    return i, failed
            return len(claims), None
        try:
            many(claims)
        except Exception as err:
            if not _out_of_memory(err):
                log.error("cannot enqueue tasks %s: %s; claims released", ", ".join(str(c.task_id) for c in claims),
                          _one_line(err))
            for claim in claims:
                self._release(claim, f"enqueue failed: {_one_line(err)}")
            return 0, err
        for claim in claims:
            self._enqueued(claim)
        return len(claims), None

    def _enqueue(self, claim: Claim) -> Exception | None:
        """Enqueue one claim; on any failure give the claim back (no leaked counters) and return the error."""
        try:
            self.enqueue(claim)
        except Exception as err:
            if not _out_of_memory(err):
                log.error("cannot enqueue task %s: %s; claim released", claim.task_id, _one_line(err))
            self._release(claim, f"enqueue failed: {_one_line(err)}")
            return err
        self._enqueued(claim)
        return None

    @staticmethod
    def _enqueued(claim: Claim) -> None:
        log.info("task %s (%s) -> %s/%s run %s", claim.task_id, claim.board, claim.model, claim.provider,
                 claim.run_id)

    def _release(self, claim: Claim, why: str) -> None:
        self.broker.release(claim.task_id, claim.run_id, "released", why)

    # -- notifications ---------------------------------------------------------------------------
    def _silent(self) -> bool:
        """No notifier to send anything to (this dispatcher's own, from a config with none): an alert or a
        summary would only take its lock and read the queue for nothing."""
        return self._own_notifiers and self.notifiers is not None and not self.notifiers.targets

    def _maybe_summary(self, due: Deadlines) -> None:
        if self._silent():
            return
        if self._active and due.summary_lock_s is not None:
            return  # this interval's summary went out already: skip reading the whole queue
        health = self.broker.health()
        active = health["global"]["in_progress"] > 0 or any(b["queue_depth"] for b in health["boards"].values())
        self._active = active
        if not active:
            return
        interval_ms = int(self.broker.config().notify.summary_interval_minutes * 60_000)
        if self.broker.take_summary_turn(interval_ms / 1000):
            assert self.notifiers is not None
            cost = self.broker.cost_since(night_start(self.broker.config(), self.broker.now()))
            self.notifiers.send("summary", summary_line(health, self.last_skips, cost),
                                {"health": health, "cost_tonight": cost})
            self._due = due.model_copy(update={"summary_lock_s": interval_ms / 1000})

    def _model_alert(self, event: dict[str, Any]) -> None:
        """One alert per cooldown of a model whose agent cannot run (auth, agent_config), however many of its
        runs hit it (the lock lives as long as the cooldown)."""
        model = str(event.get("model", "-"))
        minutes = self.broker.config().watchdog.auth_cooldown_minutes
        if not self.broker.first_to_alert_model("auth", model, minutes * 60):
            return
        assert self.notifiers is not None
        what = "is not logged in or its key was refused" if event.get("type") == EventType.AUTH else "cannot be started"
        text = (f"clawq: the agent of model {model} {what}; {model} cools for {minutes:g} min and its tasks move "
                f"down their chains: {event.get('message', '')}")
        self.notifiers.send("agent_auth", text.strip(), {"model": model, "event": event})

    def _workdir_alert(self, event: dict[str, Any]) -> None:
        """The board's workdir is missing: its run was released and the board paused (once per event)."""
        if not self.broker.first_to_alert(event["id"], _ALERT_TTL_S):
            return
        assert self.notifiers is not None
        text = (f"clawq: board {event.get('board')} paused: {event.get('message', '')}; task {event.get('task_id')} "
                f"waits (no attempt used). Create the directory or fix boards.{event.get('board')}.workdir, then "
                f"clawq resume {event.get('board')}")
        self.notifiers.send("workdir_missing", text, {"board": event.get("board"), "event": event})

    def _alert(self, event: dict[str, Any]) -> None:
        if self._silent():
            return
        if event.get("type") in (EventType.AUTH, EventType.AGENT_CONFIG):
            self._model_alert(event)
            return
        if event.get("type") == EventType.RELEASED and event.get("reason") == "workdir_missing":
            self._workdir_alert(event)
            return
        kind = _alert_kind(event)
        if kind is None or not self.broker.first_to_alert(event["id"], _ALERT_TTL_S):
            return
        assert self.notifiers is not None
        if kind == "provider_open":
            until = time.strftime("%H:%M:%S", time.localtime(int(event.get("until", 0)) / 1000))
            text = (f"clawq: provider {event.get('provider')} is down ({event.get('cause')}): its breaker is open "
                    f"until {until}; tasks move to other providers, then one probe run tests it")
            self.notifiers.send(kind, text, {"provider": event.get("provider"), "event": event})
            return
        tid, board = event.get("task_id"), event.get("board")
        what = "needs review" if kind == "in_review" else "failed for good"
        text = f"clawq: task {tid} on {board} {what} ({event.get('model', '-')}): {event.get('message', '')}"
        self.notifiers.send(kind, text.strip(), {"task_id": tid, "board": board, "event": event})

    # -- the loop --------------------------------------------------------------------------------
    def _wait_s(self) -> float:
        """Until the nearest deadline, or the next summary while the queue is active (from the last pass)."""
        waits = [_GATE_CHECK_S if self._gate_closed else _IDLE_WAKE_S]
        if self.jobs is not None and self.jobs.watching:  # look for deleted jobs while some have not run
            waits.append(_JOB_CHECK_S)
        due = self._due
        if due is not None:
            if self._gate_closed:  # no claim runs: a backoff end or a due task (claim work) would wake it at once
                due = due.model_copy(update={"backoff": None, "scheduled": None})
            if (deadline := due.next) is not None:
                waits.append(max(0.0, deadline - self.broker.now()) + 0.001)
            if self._active:
                waits.append((due.summary_lock_s or 0.0) + 0.001)
        return min(waits)

    def run(self, stop: threading.Event) -> None:
        """Loop until ``stop`` is set; survives Redis outages (logged once, retried every :data:`_RETRY_S`,
        so dispatching resumes within a second or two of Redis answering again)."""
        outage = no_config = False
        self._cursor = ""
        wiped: NamespaceWiped | None = None  #: noticed, not yet restored (Redis may go again meanwhile)
        while not stop.is_set():
            try:
                if wiped is not None:
                    self.recover(wiped)
                    wiped = None
                if no_config:  # a script found the config gone: most likely a wipe its last read did not see
                    self.broker.check_identity()
                self._cycle(stop)
                if outage:
                    log.warning("Redis is reachable again: dispatching resumes")
                outage = no_config = False
            except NamespaceWiped as err:
                wiped = err if wiped is None else wiped  # a restore that failed half-way is tried again
            except ConfigMissing as err:
                if not no_config:
                    log.error("%s; checking whether the namespace was wiped, then retrying every %.1fs",
                              err, _RETRY_S)
                    no_config = True
                    continue
                stop.wait(_RETRY_S)
            except (RedisUnavailable, RedisOutOfMemory, redis.ConnectionError, redis.TimeoutError) as err:
                if not outage:
                    log.error("%s; retrying every %.1fs", err, _RETRY_S)
                outage = True
                stop.wait(_RETRY_S)

    def recover(self, wiped: NamespaceWiped) -> None:
        """The namespace was wiped under this dispatcher: say so loudly (log, and one alert across dispatchers),
        set it up again with the last config this dispatcher knew (never the defaults), and start afresh.
        Runs whose tasks vanished stop at their next heartbeat and report nothing. Raises what Redis raises
        (down again, out of memory): the loop tries the whole restore again."""
        if not wiped.logged:
            log.error("NAMESPACE WIPED: %s. Runs of vanished tasks stop at their next heartbeat and report nothing.",
                      wiped)
            wiped.logged = True
        done = self.broker.recreate(wiped.previous, _config_or_none(wiped.last_config), process_name("dispatch"))
        log.error("namespace %s re-created: %s", self.broker.namespace, done)
        if self.broker.first_to_alert_wipe(wiped.previous, _ALERT_TTL_S):
            assert self.notifiers is not None
            self.notifiers.send("namespace_wiped", f"clawq: {wiped}. The dispatcher {done}.",
                                {"previous_id": wiped.previous, "id": self.broker.identity})
        self._cursor, self._due, self._active = "", None, False
        self._refresh_notifiers()

    def _cycle(self, stop: threading.Event) -> None:
        if not self._cursor:  # events from here on wake us (and raise their alerts); none is skipped
            self._cursor = self._latest_event_id()
        self.step()
        until = time.monotonic() + self._wait_s()
        while not stop.is_set():
            left = until - time.monotonic()
            if left <= 0:
                return
            events = self.broker.wait_events(self._cursor, block_ms=max(1, int(min(left, _MAX_BLOCK_S) * 1000)))
            if events:
                self._cursor = events[-1]["id"]
                self._on_events(events)
                if not all(_frees_nothing(e) for e in events):
                    return

    def _on_events(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            self._alert(event)
            if event.get("type") == EventType.CONFIG_LOADED:
                self.broker.forget_config()
                self._refresh_notifiers()

    def _latest_event_id(self) -> str:
        return self.broker.latest_event_id()


def _out_of_memory(err: Exception) -> bool:
    """Redis refused a write for want of memory (clawq's error, redis-py's, or the server's text)."""
    return isinstance(err, (RedisOutOfMemory, redis.exceptions.OutOfMemoryError)) or (
        "OOM command not allowed" in str(err))


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _config_or_none(found: object) -> Config | None:
    return found if isinstance(found, Config) else None


def _alert_kind(event: dict[str, Any]) -> str | None:
    """in_review for a completed task; failed for any run end that failed the task for good; provider_open for
    each opening of a provider's breaker."""
    if event.get("type") == EventType.COMPLETED:
        return "in_review"
    if event.get("type") == EventType.PROVIDER_OPEN:
        return "provider_open"
    if event.get("status") == "failed":  # fail_run's events, whatever their root cause
        return "failed"
    return None
