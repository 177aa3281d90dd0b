"""Chaos run: real ``clawq dispatch`` / ``clawq worker`` processes on a private AOF Redis, under fire.

``python -m tests.chaos.chaos [--tasks N --boards B --dispatchers D --workers W --seconds S --outage-s O
--json FILE]``

N tasks over B boards, D dispatchers, W forking RQ workers, a command agent (tests/chaos/agent.py) that logs its
own runs. Leases expire in seconds. Along the way it SIGKILLs random busy workers (with their work-horse and agent)
and dispatchers (starting replacements), SIGKILLs Redis once and restarts it on the same port and AOF dir
(``--appendonly yes --appendfsync everysec``: up to ~1 s of writes may be lost), and freezes Redis (SIGSTOP, then
SIGCONT after ``--outage-s``). With ``--redis-wipes``, the last action restarts Redis with its data deleted: every
task is lost with it, a dispatcher must notice and restore the config it knew (nobody loads it again), and a new
batch of tasks added afterwards must end like any other. Then it checks, from the agent's log and from Redis:

- lost: every task added is final;
- duplicates: at most one accepted outcome (done / follow_up) per run, at most one ``done`` per task, accepted
  run counts 1..k without repeats, and no two accepted runs of one task overlap in time (broker history and agent
  log);
- caps and one-per-board: :mod:`sim.checker` on the broker's run timeline;
- counters: ZCARD running and the inflight hashes equal what the leases say (atomic snapshots during the run, and
  once at the end).

It prints the figures and exits 1 on any violation (2 when the run itself could not finish in ``--seconds``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from clawq.broker import Broker, ClawqError, Task
from clawq.broker.config import Config
from clawq.sim.checker import Timeline, check_all
from clawq.sim.fleet import Fleet
from clawq.sim.timeline import collect
from tests.redis_servers import RedisServer, redis_binaries

AGENT = str(Path(__file__).resolve().parent / "agent.py")
ACCEPTED = ("done", "follow_up")
#: The checker criteria that are invariants here (summaries/alerts need a webhook sink; jamming is timing).
REQUIRED = ("one_per_board_fifo", "llm_limits_respected", "every_task_reported", "follow_up_same_task")
REDIS_ERRORS = (ClawqError, redis.RedisError, OSError)


@dataclass
class Options:
    tasks: int = 60
    boards: int = 8
    dispatchers: int = 2
    workers: int = 3
    seconds: float = 170.0  #: time limit for every task to end
    worker_kills: int = 1
    dispatcher_kills: int = 1
    redis_restarts: int = 1
    redis_wipes: int = 0  #: restarts that lose every key (the AOF is deleted): the last action of the plan
    outages: int = 1
    outage_s: float = 3.0
    seed: int = 1
    binary: str | None = None
    keep_logs: bool = False
    json_path: Path | None = None


# -- processes -------------------------------------------------------------------------------------------
@dataclass
class ChaosFleet(Fleet):
    """The shared fleet, plus what chaos needs: dispatcher kills and a supervisor that notes crashes."""

    crashes: list[dict[str, Any]] = field(default_factory=list)

    def kill_worker(self, rng: random.Random) -> dict[str, Any] | None:
        """SIGKILL a random busy worker (one with a work-horse), its horse and agent; start a replacement."""
        return self.kill_busy_worker(rng.choice)

    def kill_dispatcher(self, rng: random.Random) -> dict[str, Any] | None:
        alive = self.alive("dispatcher")
        if not alive:
            return None
        kill = self.kill(rng.choice(alive))
        kill["replacement"] = self.dispatcher()
        return kill

    def supervise(self, killed: set[str]) -> None:
        """A process that exited on its own is a finding: note it and start a replacement."""
        for name, proc in list(self.procs.items()):
            if name in killed or name.endswith("-crashed") or proc.poll() is None:
                continue
            self.crashes.append({"at": time.time(), "process": name, "rc": proc.returncode,
                                 "log_tail": self.log_tail(name)})
            self.procs[f"{name}-crashed"] = self.procs.pop(name)
            if name.startswith("dispatcher"):
                self.dispatcher()
            else:
                self.worker()


# -- config and tasks -----------------------------------------------------------------------------------
def chaos_config(opts: Options, agent_log: Path, queue: str) -> Config:
    return Config.model_validate({
        "night_mode": None,
        "queue": {"global_max_concurrent": max(1, opts.workers)},  # a claim never waits long for a worker
        "models": {"opus": "anthropic", "sonnet": "anthropic", "codex": "openai", "gemini3": "google",
                   "gemini3_flash": "google", "glm": "zai"},
        "limits": {"model_max_inflight": {"opus": 1, "sonnet": 2, "codex": 2, "gemini3": 2, "gemini3_flash": 2,
                                          "glm": 2},
                   "provider_max_inflight": {"anthropic": 2, "openai": 2, "google": 3, "zai": 2}},
        "chains": {"coding": ["codex", "sonnet", "gemini3"], "planning": ["opus", "codex", "gemini3"],
                   "bulk": ["gemini3_flash", "glm"]},
        "watchdog": {"stale_in_progress_minutes": 0.05, "heartbeat_grace_minutes": 0.02,
                     "rate_limit_cooldown_minutes": 0.05, "failure_cooldown_minutes": 0.01, "max_attempts": 6},
        "followup": {"max_runs": 3},
        "agent": {"runner": "command", "command": [sys.executable, AGENT, str(agent_log)], "timeout_minutes": 1,
                  "queue": queue},
        "notify": {"log": False, "summary_interval_minutes": 1},
    })


def add_tasks(admin: Broker, opts: Options, rng: random.Random) -> dict[int, dict[str, Any]]:
    boards = [f"b{i + 1:02d}" for i in range(opts.boards)]
    plans = {}
    for i in range(opts.tasks):
        board = boards[i % len(boards)]
        chain = rng.choices(["coding", "planning", "bulk"], weights=[50, 25, 25])[0]
        plan = {"dur": round(rng.uniform(0.2, 1.2), 2), "follow": 1 if rng.random() < 0.2 else 0}
        tid = admin.add(board, f"{board} task {i + 1}", chain=chain, prompt=json.dumps(plan), task_id=i + 1)
        plans[tid] = plan
    return plans


# -- reading --------------------------------------------------------------------------------------------
def read_agent_log(path: Path) -> list[dict[str, Any]]:
    """One record per agent run: start entry plus ``end``/``result`` of its end entry (None if it died)."""
    if not path.exists():
        return []
    entries = []
    for ln in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            entries.append(json.loads(ln))
    ends = {e["run_id"]: e for e in entries if e["ev"] == "end"}
    runs = [{**e, "start": e["t"], "end": ends[e["run_id"]]["t"] if e["run_id"] in ends else None,
             "result": ends[e["run_id"]]["result"] if e["run_id"] in ends else None}
            for e in entries if e["ev"] == "start"]
    return sorted(runs, key=lambda r: r["start"])


def counters_snapshot(admin: Broker, task_ids: list[int]) -> list[str]:
    """Atomically read the leases and the counters; say where they disagree."""
    k = admin.keys
    pipe = admin.client.pipeline(transaction=True)
    pipe.zrange(k.running, 0, -1)
    pipe.hgetall(k.inflight_model)
    pipe.hgetall(k.inflight_provider)
    for tid in task_ids:
        pipe.hmget(k.task(tid), "status", "model", "provider")
    running, inflight_model, inflight_provider, *rows = pipe.execute()
    leased = {tid: row for tid, row in zip(task_ids, rows, strict=True) if row[0] == "in_progress"}
    v = []
    if {int(x) for x in running} != set(leased):
        v.append(f"ZCARD running {len(running)} {sorted(int(x) for x in running)} != in_progress tasks "
                 f"{sorted(leased)}")
    for name, counts, idx in (("model", inflight_model, 1), ("provider", inflight_provider, 2)):
        want = Counter(row[idx] for row in leased.values())
        got = {m: int(n) for m, n in counts.items() if int(n) != 0}
        if got != dict(want):
            v.append(f"inflight {name} {got} != leases {dict(want)}")
    return v


def timeline(admin: Broker, tasks: list[Task], started: float, finished: float) -> Timeline:
    return collect(admin, tasks, started, finished, idle_limit_s=30.0)


def _overlaps(spans: list[tuple[float, float, str]]) -> list[tuple[str, str]]:
    spans = sorted(spans)
    return [(a[2], b[2]) for a, b in itertools.pairwise(spans) if b[0] < a[1]]


def duplicate_violations(tasks: list[Task], agent_runs: list[dict[str, Any]]) -> list[str]:
    v = []
    agent_by_run = {r["run_id"]: r for r in agent_runs}
    for t in tasks:
        ids = [r["run_id"] for r in t.runs]
        if len(ids) != len(set(ids)):
            v.append(f"task {t.task_id}: a run id appears twice in its history {ids}")
        accepted = [r for r in t.runs if r.get("outcome") in ACCEPTED]
        dones = [r for r in accepted if r["outcome"] == "done"]
        if len(dones) > 1:
            v.append(f"task {t.task_id} completed {len(dones)} times: runs {[r['run_id'] for r in dones]}")
        counts = [int(r["run_count"]) for r in accepted]
        if counts != list(range(1, len(counts) + 1)):
            v.append(f"task {t.task_id}: accepted runs have run counts {counts}")
        spans = [(float(r["claimed_at"]), float(r.get("ended_at", float("inf"))), r["run_id"]) for r in accepted]
        v += [f"task {t.task_id}: accepted runs {a} and {b} overlap (broker history)" for a, b in _overlaps(spans)]
        mine = [agent_by_run[r["run_id"]] for r in accepted if r["run_id"] in agent_by_run]
        spans = [(m["start"], m["end"] if m["end"] is not None else float("inf"), m["run_id"]) for m in mine]
        v += [f"task {t.task_id}: accepted runs {a} and {b} overlap (agent log)" for a, b in _overlaps(spans)]
        for r in accepted:
            m = agent_by_run.get(r["run_id"])
            if m is not None and m["result"] is not None and m["result"] != r["outcome"]:
                v.append(f"task {t.task_id} run {r['run_id']}: broker says {r['outcome']}, agent said {m['result']}")
    return v


# -- the run --------------------------------------------------------------------------------------------
def chaos_plan(opts: Options, rng: random.Random) -> list[tuple[float, str]]:
    """(fraction of tasks final, action): spread between 10 % and 80 % of the way."""
    actions = (["kill_worker"] * opts.worker_kills + ["kill_dispatcher"] * opts.dispatcher_kills
               + ["restart_redis"] * opts.redis_restarts + ["outage"] * opts.outages)
    rng.shuffle(actions)
    n = len(actions)
    plan = [(0.1 + 0.7 * i / max(1, n - 1) if n > 1 else 0.3, a) for i, a in enumerate(actions)]
    # a wipe ends the night of the tasks added so far: it comes last, and a new batch follows it
    return plan + [(0.85, "wipe_redis")] * opts.redis_wipes


def _binary(opts: Options) -> str:
    if opts.binary:
        return opts.binary
    found = redis_binaries()
    if "redis7" not in found:
        raise SystemExit("no system redis-server (redis7) found; pass --binary")
    return found["redis7"]


def _connect(url: str, namespace: str) -> Broker:
    client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=3, socket_connect_timeout=2)
    b = Broker(client, namespace)
    b.connect()
    return b


def run(opts: Options) -> dict[str, Any]:
    rng = random.Random(opts.seed)
    logdir = Path(tempfile.mkdtemp(prefix="clawq-chaos-"))
    agent_log = logdir / "agent.log"
    server = RedisServer(_binary(opts), ["--appendonly", "yes", "--appendfsync", "everysec"], name="chaos")
    namespace = "chaos" + uuid.uuid4().hex[:8]
    fleet: ChaosFleet | None = None
    admin: Broker | None = None
    report: dict[str, Any] = {"logs": str(logdir)}
    try:
        server.start()
        assert server.port != 6379
        fleet = ChaosFleet(server.url, namespace, logdir, log_level="INFO")
        admin = _connect(server.url, namespace)
        admin.load_config(chaos_config(opts, agent_log, f"chaos-{namespace}"))
        plans = add_tasks(admin, opts, rng)
        time.sleep(1.2)  # the tasks are on disk (everysec) before anything can crash
        ids = sorted(plans)
        started = time.time()
        for _ in range(opts.dispatchers):
            fleet.dispatcher()
        for _ in range(opts.workers):
            fleet.worker()
        drive = _drive(admin, fleet, server, ids, rng, opts)
        finished = time.time()
        # let in-flight agents of fenced runs end before reading the log
        time.sleep(1.0)
        fleet.stop()
        report.update(_verdict(admin, ids, agent_log, started, finished, drive, fleet, opts))
        return report
    finally:
        if server.pid is not None:  # never leave a frozen server behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.pid, signal.SIGCONT)
        if fleet is not None:
            fleet.stop()
        if admin is not None:
            admin.close()
        if opts.keep_logs or not report.get("ok"):
            report["server_log"] = server.log_tail(60) if server.directory else None
        server.stop()
        if report.get("ok") and not opts.keep_logs:
            shutil.rmtree(logdir, ignore_errors=True)
            report["logs"] = None


@dataclass
class Drive:
    wiped: list[int] = field(default_factory=list)  #: ids that were in Redis when it lost everything
    added_after_wipe: list[int] = field(default_factory=list)
    recovered_s: float | None = None  #: from a wipe to the first task the restored namespace accepted
    finished_all: bool = False
    done: list[dict[str, Any]] = field(default_factory=list)
    plan_left: list[tuple[float, str]] = field(default_factory=list)
    snapshots: int = 0
    snapshot_violations: list[str] = field(default_factory=list)


def _drive(admin: Broker, fleet: ChaosFleet, server: RedisServer, ids: list[int], rng: random.Random,
           opts: Options) -> Drive:
    """Until every task is final (or the time limit): fire the chaos plan, snapshot the counters."""
    d = Drive(plan_left=chaos_plan(opts, rng))
    killed: set[str] = set()
    deadline = time.monotonic() + opts.seconds
    last_snap = 0.0
    while time.monotonic() < deadline:
        try:
            tasks = admin.list_tasks()
            final = sum(1 for t in tasks if t.status.final)
            if time.monotonic() - last_snap > 2.0:
                d.snapshot_violations += counters_snapshot(admin, ids)
                d.snapshots += 1
                last_snap = time.monotonic()
        except REDIS_ERRORS:
            time.sleep(0.3)
            continue
        expected = len(ids) - len(d.wiped)
        if final == expected and len(tasks) == expected and not (d.wiped and not d.added_after_wipe):
            d.finished_all = True
            break
        if d.plan_left and final >= d.plan_left[0][0] * (len(ids) - len(d.wiped)):
            action = d.plan_left[0][1]
            if action == "wipe_redis":
                d.wiped = [t.task_id for t in tasks]
            event = _act(action, fleet, server, rng, opts)
            if action == "wipe_redis" and event is not None:
                _after_wipe(admin, ids, d, opts, rng, event["at"])
            if event is not None:
                d.plan_left.pop(0)
                event["action"], event["final_before"] = action, final
                d.done.append(event)
                killed.add(event.get("killed", ""))
                print(f"chaos: {action} at {final}/{len(ids)} final", flush=True)
        fleet.supervise(killed)
        time.sleep(0.3)
    return d


def _act(action: str, fleet: ChaosFleet, server: RedisServer, rng: random.Random,
         opts: Options) -> dict[str, Any] | None:
    if action == "kill_worker":
        return fleet.kill_worker(rng)
    if action == "kill_dispatcher":
        return fleet.kill_dispatcher(rng)
    if action == "restart_redis":
        t0 = time.time()
        server.kill()
        time.sleep(0.5)
        server.restart()
        return {"at": t0, "down_s": round(time.time() - t0, 3)}
    if action == "wipe_redis":  # a restart that loses every key: no persistence survives it
        t0 = time.time()
        server.kill()
        assert server.directory is not None
        for item in server.directory.iterdir():
            if item.name != "redis-server.log":
                shutil.rmtree(item) if item.is_dir() else item.unlink()
        server.restart()
        return {"at": t0, "down_s": round(time.time() - t0, 3)}
    if action == "outage":
        pid = server.pid
        assert pid is not None
        t0 = time.time()
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(opts.outage_s)
        finally:
            os.kill(pid, signal.SIGCONT)
        return {"at": t0, "frozen_s": round(time.time() - t0, 3)}
    raise ValueError(action)


def _after_wipe(admin: Broker, ids: list[int], d: Drive, opts: Options, rng: random.Random, at: float) -> None:
    """A user adds a new batch after the wipe, as they would: it is accepted once a dispatcher has restored
    the config it knew (nobody loads it again), and it must end like any other."""
    batch = max(8, opts.tasks // 4)
    first = max(ids) + 1
    boards = [f"b{i + 1:02d}" for i in range(opts.boards)]
    deadline = time.monotonic() + 60
    for i in range(batch):
        plan = {"dur": round(rng.uniform(0.2, 0.8), 2), "follow": 0}
        while True:
            try:
                admin.add(boards[i % len(boards)], f"after the wipe {i + 1}", chain="coding",
                          prompt=json.dumps(plan), task_id=first + i)
                break
            except REDIS_ERRORS:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        if d.recovered_s is None:
            d.recovered_s = round(time.time() - at, 3)
        d.added_after_wipe.append(first + i)
        ids.append(first + i)
    print(f"chaos: {batch} tasks added after the wipe ({d.recovered_s}s after it)", flush=True)


def _verdict(admin: Broker, ids: list[int], agent_log: Path, started: float, finished: float, drive: Drive,
             fleet: ChaosFleet, opts: Options) -> dict[str, Any]:
    finished_all, done, snapshots = drive.finished_all, drive.done, drive.snapshots
    snapshot_violations, plan_left = drive.snapshot_violations, drive.plan_left
    present = {t.task_id for t in admin.list_tasks()}
    tasks = [admin.get_task(tid) for tid in ids if tid in present]
    missing = [tid for tid in ids if tid not in present and tid not in drive.wiped]
    not_final = [t.task_id for t in tasks if not t.status.final]
    agent_runs = read_agent_log(agent_log)
    checks = check_all(timeline(admin, tasks, started, finished))
    dup = duplicate_violations(tasks, agent_runs)
    end_counters = counters_snapshot(admin, ids)
    doctor = admin.doctor()  # every derived key (indexes, model blocks, ready fronts, refs) agrees at the end
    accepted_ids = {r["run_id"] for t in tasks for r in t.runs if r.get("outcome") in ACCEPTED}
    history_ids = {r["run_id"] for t in tasks for r in t.runs}
    # runs the agent finished with an outcome that the broker did not accept (fenced, or its record was lost)
    unaccepted = [r for r in agent_runs if r["result"] is not None and r["run_id"] not in accepted_ids]
    unknown = [r for r in agent_runs if r["run_id"] not in history_ids]
    board_overlaps = []
    by_board: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for r in agent_runs:
        by_board[r["board"]].append((r["start"], r["end"] or r["start"], r["run_id"]))
    for spans in by_board.values():
        board_overlaps += _overlaps(spans)
    outcomes = Counter(r.get("outcome", "none") for t in tasks for r in t.runs)
    events = Counter(e["type"] for e in admin.events(count=1_000_000))
    kinds = Counter(e["action"] for e in done)
    violations = {
        "lost": [f"task {tid} is missing from Redis" for tid in missing]
                + [f"task {tid} is not final" for tid in not_final],
        "duplicates": dup,
        "counters": snapshot_violations + [f"at the end: {x}" for x in end_counters],
        "doctor": [f"doctor at the end: {p}" for p in doctor["problems"]],
        **{name: checks[name].violations for name in REQUIRED},
    }
    ok = finished_all and not any(violations.values())
    figures = {
        "tasks": len(ids), "boards": opts.boards, "dispatchers": opts.dispatchers, "workers": opts.workers,
        "wall_s": round(finished - started, 1), "finished": finished_all,
        "worker_kills": kinds["kill_worker"], "dispatcher_kills": kinds["kill_dispatcher"],
        "kills": kinds["kill_worker"] + kinds["kill_dispatcher"],
        "redis_restarts": kinds["restart_redis"], "outages": kinds["outage"],
        "redis_wipes": kinds["wipe_redis"], "wiped_tasks": len(drive.wiped),
        "added_after_wipe": len(drive.added_after_wipe), "recovered_after_wipe_s": drive.recovered_s,
        "chaos_not_done": [a for _, a in plan_left],
        "requeues": outcomes["timeout"], "timeout_events": events["timeout"],
        "runs": sum(outcomes.values()), "agent_runs": len(agent_runs), "outcomes": dict(outcomes),
        "statuses": dict(Counter(t.status.value for t in tasks)),
        "lost": len(missing) + len(not_final), "duplicates": len(dup),
        "counter_mismatches": len(violations["counters"]), "counter_snapshots": snapshots + 1,
        "agent_runs_not_accepted": len(unaccepted), "agent_runs_unknown_to_broker": len(unknown),
        "agent_board_overlaps": len(board_overlaps), "unexpected_exits": len(fleet.crashes),
        "model_peaks": checks["llm_limits_respected"].detail.get("model_peaks", {}),
        "doctor_problems": len(doctor["problems"]),
    }
    return {"ok": ok, "figures": figures, "violations": {k: v[:50] for k, v in violations.items()},
            "chaos": done, "crashes": fleet.crashes,
            "notes": {"not_accepted": unaccepted[:20], "unknown_to_broker": unknown[:20],
                      "agent_board_overlaps": board_overlaps[:20],
                      "jamming": checks["completed_without_jamming"].violations[:5]}}


def parse(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m tests.chaos.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=60)
    p.add_argument("--boards", type=int, default=8)
    p.add_argument("--dispatchers", type=int, default=2)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--seconds", type=float, default=170.0, help="time limit for every task to end")
    p.add_argument("--worker-kills", type=int, default=None, help="default: 1, or 1 per 100 tasks")
    p.add_argument("--dispatcher-kills", type=int, default=None, help="default: 1, or 1 per 300 tasks")
    p.add_argument("--redis-restarts", type=int, default=1)
    p.add_argument("--outages", type=int, default=1)
    p.add_argument("--redis-wipes", type=int, default=0,
                   help="restarts that lose every key (the last action; a new batch of tasks follows)")
    p.add_argument("--outage-s", type=float, default=3.0, help="how long Redis is frozen (SIGSTOP)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--binary", default=None, help="redis-server binary (default: the system one)")
    p.add_argument("--keep-logs", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="write the full report here")
    a = p.parse_args(argv)
    return Options(tasks=a.tasks, boards=a.boards, dispatchers=a.dispatchers, workers=a.workers, seconds=a.seconds,
                   worker_kills=a.worker_kills if a.worker_kills is not None else max(1, a.tasks // 100),
                   dispatcher_kills=a.dispatcher_kills if a.dispatcher_kills is not None else max(1, a.tasks // 300),
                   redis_restarts=a.redis_restarts, redis_wipes=a.redis_wipes, outages=a.outages,
                   outage_s=a.outage_s, seed=a.seed,
                   binary=a.binary, keep_logs=a.keep_logs, json_path=a.json)


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    report = run(opts)
    if opts.json_path is not None:
        opts.json_path.write_text(json.dumps(report, indent=2, default=str))
    f = report["figures"]
    print(f"chaos: {f['tasks']} tasks / {f['boards']} boards / {f['dispatchers']} dispatchers / "
          f"{f['workers']} workers in {f['wall_s']} s")
    print(f"  kills: {f['worker_kills']} workers, {f['dispatcher_kills']} dispatchers; redis restarts "
          f"{f['redis_restarts']}; outages {f['outages']}; unexpected exits {f['unexpected_exits']}")
    if f["redis_wipes"]:
        print(f"  redis wipes {f['redis_wipes']}: {f['wiped_tasks']} tasks lost with it, {f['added_after_wipe']} "
              f"added after it (accepted {f['recovered_after_wipe_s']} s after the wipe)")
    print(f"  requeues (timeouts) {f['requeues']}; runs {f['runs']} (agent {f['agent_runs']}, not accepted "
          f"{f['agent_runs_not_accepted']}, unknown to broker {f['agent_runs_unknown_to_broker']})")
    print(f"  lost {f['lost']}; duplicates {f['duplicates']}; counter mismatches {f['counter_mismatches']} "
          f"over {f['counter_snapshots']} snapshots; doctor problems {f['doctor_problems']}; "
          f"statuses {f['statuses']}")
    for name, v in report["violations"].items():
        for line in v[:10]:
            print(f"  VIOLATION {name}: {line}")
    print("chaos: " + ("OK" if report["ok"] else f"FAILED (logs in {report['logs']})"))
    print("CHAOS_FIGURES " + json.dumps(f), flush=True)
    if not f["finished"]:
        return 2
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
