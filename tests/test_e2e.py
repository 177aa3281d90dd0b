"""End to end with real processes: ``clawq dispatch`` and ``clawq worker`` (RQ) running a command agent.

The agent (tests/agents/e2e_agent.py) appends its start and end to a log; every rule is checked from that
log alone (interval overlap per board, task_id order per board, caps by a sweep line), not from the broker's
own counters. Each takes a few seconds per Redis binary.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis_servers import RedisServer

from clawq.broker import Broker, TaskStatus
from clawq.broker.config import Config
from clawq.sim.fleet import Fleet, alive

pytestmark = pytest.mark.slow

AGENT = str(Path(__file__).resolve().parent / "agents" / "e2e_agent.py")
WAIT_FINAL_S = 60.0


@pytest.fixture
def e2e_url(redis_url: str, r: redis.Redis) -> str:
    """The private server, flushed (RQ's queues included)."""
    return redis_url


# -- processes -------------------------------------------------------------------------------------
class E2EFleet(Fleet):
    """The shared fleet (INFO logs, in the test's tmp dir), plus the agent log and its agents."""

    def __init__(self, url: str, namespace: str, tmp: Path) -> None:
        super().__init__(url, namespace, tmp, extra_env={"OPENAI_API_KEY": "sk-test-kept"}, log_level="INFO")
        self.agent_log = tmp / "agent.log"

    def workers(self, n: int, *extra: str) -> None:
        for _ in range(n):
            self.worker(None, *extra)

    def log_tails(self, lines: int = 15) -> str:
        parts = []
        for name, proc in self.procs.items():
            text = self.log_tail(name, 1 << 20).splitlines()[-lines:]
            parts.append(f"--- {name} (rc={proc.poll()})\n" + "\n".join(text))
        return "\n".join(parts)

    def stop_all(self) -> None:
        """Stop every process, then every agent the log names that still runs (a killed worker's agent)."""
        self.stop(grace_s=8)
        for e in read_log(self.agent_log):
            if e["ev"] == "start" and _is_agent(e["pid"]) and alive(e["pid"]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(e["pid"], signal.SIGKILL)


def _is_agent(pid: int) -> bool:
    try:
        return AGENT in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


@pytest.fixture
def fleet(e2e_url: str, namespace: str, tmp_path: Path) -> Iterator[E2EFleet]:
    f = E2EFleet(e2e_url, namespace, tmp_path)
    try:
        yield f
    finally:
        f.stop_all()


@pytest.fixture
def admin(e2e_url: str, namespace: str) -> Iterator[Broker]:
    b = Broker.from_url(e2e_url, namespace)
    try:
        yield b
    finally:
        b.close()


# -- the agent log ---------------------------------------------------------------------------------
def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    entries = []
    for ln in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line being written right now
            entries.append(json.loads(ln))
    return entries


def runs_of(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per agent run: the start entry with ``end`` (time) and ``result`` from its end entry."""
    ends = {e["run_id"]: e for e in entries if e["ev"] == "end"}
    runs = []
    for e in entries:
        if e["ev"] == "start":
            end = ends.get(e["run_id"])
            runs.append({**e, "start": e["t"], "end": end["t"] if end else None,
                         "result": end["result"] if end else None})
    return sorted(runs, key=lambda r: r["start"])


def peak(runs: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], str]) -> dict[str, int]:
    """Highest number of runs at once per key (sweep line; an end and a start at the same instant don't overlap)."""
    points = sorted([(r["start"], 1, key(r)) for r in runs] + [(r["end"], -1, key(r)) for r in runs],
                    key=lambda p: (p[0], p[1]))
    now: dict[str, int] = defaultdict(int)
    top: dict[str, int] = defaultdict(int)
    for _, delta, k in points:
        now[k] += delta
        top[k] = max(top[k], now[k])
    return dict(top)


def check_boards(runs: list[dict[str, Any]]) -> None:
    """No board ran two at once; a board's runs went in task_id order (follow-ups before later tasks)."""
    by_board: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        by_board[r["board"]].append(r)
    for board, rs in by_board.items():
        for prev, cur in itertools.pairwise(rs):
            assert cur["start"] >= prev["end"], f"board {board} ran {prev['task_id']} and {cur['task_id']} at once"
            assert cur["task_id"] >= prev["task_id"], f"board {board} ran {cur['task_id']} after {prev['task_id']}"


def check_caps(runs: list[dict[str, Any]], cfg: Config) -> dict[str, dict[str, int]]:
    peaks = {"model": peak(runs, lambda r: r["model"]), "provider": peak(runs, lambda r: r["provider"]),
             "global": peak(runs, lambda r: "all")}
    for model, n in peaks["model"].items():
        assert n <= cfg.limits.model_max_inflight.get(model, n), f"model {model} had {n} at once"
    for provider, n in peaks["provider"].items():
        assert n <= cfg.limits.provider_max_inflight.get(provider, n), f"provider {provider} had {n} at once"
    assert peaks["global"]["all"] <= cfg.queue.global_max_concurrent
    return peaks


def wait_final(admin: Broker, fleet: E2EFleet, n: int, timeout: float = WAIT_FINAL_S) -> list[Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        tasks = admin.list_tasks()
        if len(tasks) == n and all(t.status.final for t in tasks):
            return tasks
        time.sleep(0.2)
    states = {t.task_id: t.status.value for t in admin.list_tasks()}
    raise AssertionError(f"not every task is final after {timeout}s: {states}\n{fleet.log_tails()}")


# -- configs and tasks -----------------------------------------------------------------------------
def e2e_config(fleet: E2EFleet, **watchdog: float) -> Config:
    return Config.model_validate({
        "night_mode": None,
        "queue": {"global_max_concurrent": 3},
        "models": {"opus": "anthropic", "sonnet": "anthropic", "codex": "openai", "gemini3": "google", "glm": "zai"},
        "limits": {"model_max_inflight": {"opus": 1, "sonnet": 1, "codex": 1, "gemini3": 2, "glm": 1},
                   "provider_max_inflight": {"anthropic": 1, "openai": 1, "google": 2, "zai": 1}},
        "chains": {"coding": ["codex", "sonnet", "gemini3"], "planning": ["opus", "codex", "gemini3"],
                   "bulk": ["glm", "gemini3"]},
        "watchdog": {"stale_in_progress_minutes": 0.1, "heartbeat_grace_minutes": 0.05,
                     "rate_limit_cooldown_minutes": 0.05, "failure_cooldown_minutes": 0.01, "max_attempts": 3,
                     **watchdog},
        "agent": {"runner": "command", "command": [sys.executable, AGENT, str(fleet.agent_log)],
                  "timeout_minutes": 1, "queue": f"q-{fleet.namespace}"},
        "notify": {"log": True, "summary_interval_minutes": 0.05},
    })


BOARDS = (("web", "coding"), ("api", "planning"), ("docs", "bulk"), ("ops", "coding"))


def add_tasks(admin: Broker, n: int, plans: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """``n`` tasks round-robin over the four boards; returns each task's plan (prompt) by id."""
    made = {}
    for i in range(n):
        board, chain = BOARDS[i % len(BOARDS)]
        plan = {"dur": 0.4 + 0.2 * (i % 3), **plans.get(i + 1, {})}
        tid = admin.add(board, f"task {i + 1}", chain=chain, prompt=json.dumps(plan), task_id=i + 1)
        made[tid] = plan
    return made


def check_outcomes(admin: Broker, runs: list[dict[str, Any]], plans: dict[int, dict[str, Any]],
                   killed: frozenset[str] = frozenset()) -> None:
    """Every task is in_review after 1 + follow-ups runs, and each of its agent runs is in its history."""
    for tid, plan in plans.items():
        task = admin.get_task(tid)
        assert task.status is TaskStatus.IN_REVIEW, (tid, task.status, task.last_error)
        assert task.run_count == 1 + plan.get("follow", 0), (tid, task.run_count)
        mine = [r for r in runs if r["task_id"] == tid]
        assert mine[-1]["result"] == "done", (tid, mine[-1])
        assert [r["run_id"] for r in task.runs] == [r["run_id"] for r in mine], tid
    assert all(r["end"] is not None for r in runs if r["run_id"] not in killed), "a run never ended"
    assert all(not r["leaked"] and r["env_ok"] for r in runs), "the agent saw clawq's Redis settings"


# -- the scenarios ---------------------------------------------------------------------------------
def test_three_workers_run_every_task_within_every_rule(fleet: E2EFleet, admin: Broker) -> None:
    cfg = e2e_config(fleet)
    admin.load_config(cfg)
    plans = add_tasks(admin, 15, {1: {"rl": "codex"}, 2: {"follow": 1}, 5: {"follow": 2}, 7: {"follow": 1},
                                  12: {"follow": 1}})
    fleet.dispatcher("dispatcher")
    fleet.workers(3)
    wait_final(admin, fleet, 15)
    runs = runs_of(read_log(fleet.agent_log))
    check_boards(runs)
    peaks = check_caps(runs, cfg)
    assert peaks["global"]["all"] >= 2, "nothing ever ran in parallel"
    check_outcomes(admin, runs, plans)

    rl = [r for r in runs if r["result"] == "rate_limited"]
    assert [(r["task_id"], r["model"]) for r in rl] == [(1, "codex")]
    chain = cfg.chains["coding"]
    after = [r for r in runs if r["task_id"] == 1 and r["start"] > rl[0]["end"]]
    assert after and chain.index(after[0]["model"]) > chain.index("codex"), "the 429 did not move task 1 down"
    assert after[0]["run_count"] == 1, "a rate limit does not count as a run"
    early = [r for r in runs if r["model"] == "codex" and rl[0]["end"] < r["start"] < rl[0]["end"] + 9.9]
    assert early == [], "codex ran again before the reset the 429 named"
    assert admin.get_task(1).runs[0]["outcome"] == "rate_limit"

    listed = json.loads(fleet.run_cli("ls", "--json").stdout)
    assert sorted((t["task_id"], t["status"]) for t in listed) == [(i, "in_review") for i in range(1, 16)]


def wait_start(fleet: E2EFleet, task_id: int, timeout: float = 30.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = next((e for e in read_log(fleet.agent_log) if e["ev"] == "start" and e["task_id"] == task_id), None)
        if found is not None:
            return found
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} never started\n{fleet.log_tails()}")


@pytest.mark.parametrize("mode", ["simple", "fork"])
def test_a_killed_worker_loses_its_lease_and_another_worker_finishes(fleet: E2EFleet, admin: Broker, mode: str) -> None:
    admin.load_config(e2e_config(fleet, stale_in_progress_minutes=0.05, heartbeat_grace_minutes=0.02))
    plans = add_tasks(admin, 4, {1: {"hang": 60}})
    fleet.dispatcher("dispatcher")
    fleet.workers(2, *(["--simple"] if mode == "simple" else []))
    worker_pids = {p.pid for name, p in fleet.procs.items() if name.startswith("worker")}
    owner = "ppid" if mode == "simple" else "gppid"  # the agent's parent is the worker, or its work-horse

    first = wait_start(fleet, 1)
    assert first[owner] in worker_pids, first
    doomed = {first[owner], first["ppid"], first["pid"]}  # the worker, its horse, and the agent (own session)
    for pid in doomed:
        os.kill(pid, signal.SIGKILL)
    killed_at = time.time()

    wait_final(admin, fleet, 4)
    runs = runs_of(read_log(fleet.agent_log))
    check_outcomes(admin, runs, plans, killed=frozenset([first["run_id"]]))
    again = [r for r in runs if r["task_id"] == 1 and r["run_id"] != first["run_id"]]
    assert len(again) == 1 and again[0][owner] in worker_pids - {first[owner]}, "another worker ran it"
    assert again[0]["start"] - killed_at < 10, "the reaper took too long"
    history = admin.get_task(1).runs
    assert history[0]["run_id"] == first["run_id"] and history[0]["outcome"] == "timeout"
    check_boards([r for r in runs if r["run_id"] != first["run_id"]])

    late = fleet.run_cli("complete", "1", first["run_id"], "--summary", "late report from the dead run")
    assert late.returncode == 4, (late.returncode, late.stderr)
    assert fleet.run_cli("heartbeat", "1", first["run_id"]).returncode == 4
    assert admin.get_task(1).status is TaskStatus.IN_REVIEW and admin.get_task(1).run_count == 1


def test_the_agent_of_a_killed_worker_does_not_outlive_it(fleet: E2EFleet, admin: Broker,
                                                          redis_server: RedisServer) -> None:
    if redis_server.name != "redis7":
        pytest.skip("one Redis binary is enough for this one")
    admin.load_config(e2e_config(fleet, stale_in_progress_minutes=0.05, heartbeat_grace_minutes=0.02))
    add_tasks(admin, 1, {1: {"hang": 8}})
    fleet.dispatcher("dispatcher")
    fleet.workers(2)
    first = wait_start(fleet, 1)
    for pid in (first["gppid"], first["ppid"]):  # the worker and its work-horse, as a crash would
        os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + 20
    while time.monotonic() < end:
        if any(e["ev"] == "start" and e["task_id"] == 1 and e["run_id"] != first["run_id"]
               for e in read_log(fleet.agent_log)):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("task 1 was never run again")
    assert not alive(first["pid"]), "the first agent still runs beside the new run of the same task"


def test_three_dispatchers_share_one_namespace(fleet: E2EFleet, admin: Broker) -> None:
    cfg = e2e_config(fleet)
    admin.load_config(cfg)
    plans = add_tasks(admin, 12, {3: {"follow": 1}, 6: {"follow": 1}, 9: {"follow": 1}})
    for _ in range(3):
        fleet.dispatcher()
    fleet.workers(3)
    wait_final(admin, fleet, 12)
    runs = runs_of(read_log(fleet.agent_log))
    ids = [r["run_id"] for r in runs]
    assert len(ids) == len(set(ids)) == 12 + 3, "a run was started twice (or a claim was lost)"
    check_boards(runs)
    check_caps(runs, cfg)
    check_outcomes(admin, runs, plans)
    claimed = [e for e in admin.events(10_000) if e["type"] == "claimed"]
    assert sorted(e["run_id"] for e in claimed) == sorted(ids)
