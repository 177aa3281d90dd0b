"""Redis faults with real processes: daemons started before Redis, outages, a port in use.

Each test runs ``clawq dispatch`` / ``clawq worker`` / ``clawq serve`` as subprocesses against a private
redis-server (the system one; never 6379) and injects the fault itself: the server is killed and restarted
on the same port (with AOF, so the data survives), or started only after the daemons.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from redis_servers import RedisServer, free_port, redis_binaries

from clawq.broker import Broker, TaskStatus
from clawq.broker.config import Config
from clawq.workers.procs import descendants

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
AGENT = str(Path(__file__).resolve().parent / "agents" / "e2e_agent.py")


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A private system redis-server with AOF (a kill and restart keeps the data)."""
    binary = redis_binaries().get("redis7")
    if binary is None:
        pytest.skip("needs the system redis-server")
    with RedisServer(binary, ["--appendonly", "yes", "--appendfsync", "always"], name="faults") as srv:
        yield srv


class Procs:
    """clawq subprocesses of one test, each logging to its own file; stopped (with their children) at the end."""

    def __init__(self, url: str, namespace: str, tmp: Path) -> None:
        self.url, self.namespace, self.tmp = url, namespace, tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._files: list[IO[bytes]] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAWQ_", "REDIS_", "RQ_"))}

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "clawq.cli", *args, "--redis-url", self.url, "--namespace",
                               self.namespace], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=60, check=False)

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        out = (self.tmp / f"{name}.log").open("wb")
        self._files.append(out)
        proc = subprocess.Popen([sys.executable, "-m", "clawq.cli", *args, "--redis-url", self.url, "--namespace",
                                 self.namespace], cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def tails(self) -> str:
        return "\n".join(f"--- {n} (rc={p.poll()})\n{self.log(n)[-3000:]}" for n, p in self.procs.items())

    def stop(self) -> None:
        family = {kid for p in self.procs.values() if p.poll() is None for kid in descendants(p.pid)}
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 8
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for fh in self._files:
            fh.close()


@pytest.fixture
def procs(server: RedisServer, namespace: str, tmp_path: Path) -> Iterator[Procs]:
    p = Procs(server.url, namespace, tmp_path)
    try:
        yield p
    finally:
        p.stop()


def fault_config(tmp: Path, namespace: str) -> Config:
    return Config.model_validate({
        "night_mode": None,
        "watchdog": {"stale_in_progress_minutes": 0.2, "heartbeat_grace_minutes": 0.05},
        "agent": {"runner": "command", "command": [sys.executable, AGENT, str(tmp / "agent.log")],
                  "timeout_minutes": 1, "queue": f"q-{namespace}"},
        "notify": {"log": True},
    })


def wait_for(check: Callable[[], Any], timeout: float, what: str, procs: Procs | None = None) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(Exception):
            found = check()
            if found:
                return found
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout}s\n{procs.tails() if procs else ''}")


def log_times(text: str, needle: str) -> list[float]:
    """When each log line containing ``needle`` was written (the logging format's local asctime)."""
    out = []
    for line in text.splitlines():
        if needle in line:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            out.append(stamp.timestamp())
    return out


def task_status(server: RedisServer, namespace: str, task_id: int) -> TaskStatus | None:
    b = Broker.from_url(server.url, namespace)
    try:
        return b.get_task(task_id).status
    finally:
        b.close()


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return int(resp.status) == 200
    except (OSError, urllib.error.URLError):
        return False


# -- item 6: daemons wait for Redis ---------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_daemons_started_before_redis_wait_then_work_and_resume_quickly_after_an_outage(
        server: RedisServer, procs: Procs, namespace: str, tmp_path: Path) -> None:
    admin = Broker.from_url(server.url, namespace)
    admin.load_config(fault_config(tmp_path, namespace))
    admin.close()
    server.kill()
    http_port = free_port()
    procs.start("dispatcher", "dispatch", "--log-level", "INFO")
    procs.start("worker", "worker", "--name", f"{namespace}-w1", "--log-level", "INFO")
    procs.start("serve", "serve", "--port", str(http_port))
    # each says so once it tried (its start-up takes seconds on a busy machine), then keeps quiet through
    # several more of redis-py's and our retries
    for name in ("dispatcher", "worker", "serve"):
        wait_for(lambda name=name: "waiting for Redis" in procs.log(name), 30.0, f"{name} says it waits", procs)
    time.sleep(2.5)
    assert all(p.poll() is None for p in procs.procs.values()), procs.tails()
    for name in ("dispatcher", "worker", "serve"):
        assert procs.log(name).count("waiting for Redis") == 1, procs.tails()
    server.restart()
    back = time.time()
    health = f"http://127.0.0.1:{http_port}/api/v1/tasks/queue_health"
    wait_for(lambda: http_ok(health), 4.0, "serve answers after Redis came back", procs)
    assert f"listening on http://127.0.0.1:{http_port}/" in procs.log("serve")
    procs.cli("add", "--board", "web", "--chain", "coding", "--prompt", json.dumps({"dur": 0.1}), "t1")
    wait_for(lambda: task_status(server, namespace, 1) is TaskStatus.IN_REVIEW, 8.0, "task 1 ran", procs)
    assert time.time() - back < 8.0

    # an outage of 8 s while everything runs: each daemon says so once, and resumes within ~2 s of the restart
    server.kill()
    time.sleep(8.0)
    server.restart()
    back = time.time()
    procs.cli("add", "--board", "web", "--chain", "coding", "--prompt", json.dumps({"dur": 0.1}), "t2")
    wait_for(lambda: task_status(server, namespace, 2) is TaskStatus.IN_REVIEW, 6.0, "task 2 ran", procs)
    b = Broker.from_url(server.url, namespace)
    try:
        task = b.get_task(2)
    finally:
        b.close()
    # claimed within ~2 s of its add (a dispatcher still backing off would take 8 s or more here), and the
    # agent started within a few seconds of the restart (CI machines are busy: a margin for process start-up)
    assert float(task.runs[0]["claimed_at"]) - task.created_at < 2.5, (task.runs, procs.tails())
    claimed = [e for e in _agent_log(tmp_path) if e["task_id"] == 2 and e["ev"] == "start"]
    assert claimed and claimed[0]["t"] - back < 5.0, (claimed, back, procs.tails())
    assert http_ok(health)
    for name in ("dispatcher", "worker"):
        text = procs.log(name)
        assert "Traceback" not in text, text
        again = log_times(text, "reachable again")
        assert again and all(t >= back - 0.05 for t in again), (name, again, back, text)
    worker = procs.log("worker")
    assert worker.count("Redis is unreachable") == 1 and worker.count("reachable again") == 1, worker
    assert procs.log("dispatcher").count("reachable again") == 1, procs.log("dispatcher")
    assert all(p.poll() is None for p in procs.procs.values()), procs.tails()


def _agent_log(tmp: Path) -> list[dict[str, Any]]:
    path = tmp / "agent.log"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


# -- item 8: serve says where it listens; a port in use is one line, exit 1 ----------------------------------
def test_serve_on_a_port_in_use_exits_1_in_one_line(server: RedisServer, procs: Procs) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = procs.cli("serve", "--port", str(port))
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert lines == [f"clawq: cannot listen on 127.0.0.1:{port}: Address already in use"], done.stderr


# -- item 1: Redis comes back empty ----------------------------------------------------------------------------
@pytest.fixture
def volatile() -> Iterator[RedisServer]:
    """A private system redis-server without persistence: a restart loses everything."""
    binary = redis_binaries().get("redis7")
    if binary is None:
        pytest.skip("needs the system redis-server")
    with RedisServer(binary, name="volatile") as srv:
        yield srv


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.mark.timeout(90)
def test_a_namespace_wiped_by_a_restart_is_noticed_restored_and_its_vanished_runs_stopped(
        volatile: RedisServer, namespace: str, tmp_path: Path) -> None:
    procs = Procs(volatile.url, namespace, tmp_path)
    try:
        _wiped_night(procs, volatile, namespace, tmp_path)
    finally:
        procs.stop()


def _wiped_night(procs: Procs, server: RedisServer, namespace: str, tmp_path: Path) -> None:
    cfg = fault_config(tmp_path, namespace)
    (tmp_path / "night.yaml").write_text(json.dumps(cfg.model_dump(mode="json")))
    assert procs.cli("config", "load", str(tmp_path / "night.yaml")).returncode == 0
    http_port = free_port()
    procs.start("dispatcher", "dispatch", "--log-level", "INFO")
    procs.start("worker", "worker", "--name", f"{namespace}-w1", "--log-level", "INFO")
    procs.start("serve", "serve", "--port", str(http_port))
    health = f"http://127.0.0.1:{http_port}/api/v1/tasks/queue_health"
    wait_for(lambda: http_ok(health), 10.0, "serve answers", procs)
    procs.cli("add", "--board", "web", "--chain", "coding", "--prompt", json.dumps({"dur": 60}), "long run")
    first = wait_for(lambda: [e for e in _agent_log(tmp_path) if e["ev"] == "start"], 10.0, "the agent starts",
                     procs)[0]

    server.restart()  # no persistence: the namespace comes back empty
    time.sleep(0.3)
    added = procs.cli("add", "--board", "web", "--chain", "coding", "--prompt", json.dumps({"dur": 0.1}),
                      "after the wipe")
    assert added.returncode == 0, added.stderr
    http_ok(health)  # serve reads the namespace: it notices too

    # the dispatcher notices, says so once, restores the config it knew (not the defaults a fresh add seeded)
    wait_for(lambda: "re-created" in procs.log("dispatcher"), 8.0, "the dispatcher notices the wipe", procs)
    shown = json.loads(procs.cli("config", "show", "--json").stdout)
    assert shown["agent"]["command"] == cfg.agent.command and shown["agent"]["queue"] == cfg.agent.queue
    # the agent whose task vanished is stopped at its next heartbeat (every 4 s here) and reports nothing
    wait_for(lambda: not _pid_alive(first["pid"]), 10.0, "the vanished run's agent is stopped", procs)
    # the task added after the wipe runs with the restored config
    wait_for(lambda: task_status(server, namespace, 1) is TaskStatus.IN_REVIEW, 15.0, "the new task ran", procs)
    b = Broker.from_url(server.url, namespace)
    try:
        runs = b.get_task(1).runs
        assert [r["run_id"] for r in runs] != [first["run_id"]] and all(r["run_id"] != first["run_id"] for r in runs)
    finally:
        b.close()
    assert not [e for e in _agent_log(tmp_path) if e["ev"] == "end" and e["run_id"] == first["run_id"]]

    # every process kept running, and each says it once
    assert all(p.poll() is None for p in procs.procs.values()), procs.tails()
    assert procs.log("dispatcher").count("NAMESPACE WIPED") == 1, procs.log("dispatcher")
    assert procs.log("serve").count("NAMESPACE WIPED") == 1, procs.log("serve")
    worker = procs.log("worker")
    assert worker.count("NAMESPACE WIPED") == 1 and "Traceback" not in worker, worker

    # health and doctor say what happened, and when
    text = procs.cli("health")
    assert text.returncode == 0 and "re-created at" in text.stdout, text.stdout + text.stderr
    doc = json.loads(procs.cli("health", "--json").stdout)
    again = doc["namespace"]["recreated"]
    assert again and again["previous_id"] and abs(again["at"] - time.time()) < 60
    doctor = procs.cli("doctor")
    assert doctor.returncode == 0 and "note: namespace re-created at" in doctor.stdout, doctor.stdout


# -- item 6: clawq top rides out a blip -------------------------------------------------------------------------
def test_top_shows_a_line_while_redis_is_gone_and_goes_on(server: RedisServer, namespace: str) -> None:
    from rich.console import Group
    from rich.text import Text

    from clawq import cli

    obj = cli.Ctx(redis_url=server.url, namespace=namespace)
    assert isinstance(cli._top_frame(obj), Group)
    server.kill()
    gone = cli._top_frame(obj)  # today: RedisUnavailable ends `clawq top`
    assert isinstance(gone, Text) and "cannot reach Redis" in gone.plain and "retrying" in gone.plain
    server.restart()
    assert isinstance(cli._top_frame(obj), Group)
