"""The agent job's fast path: one broker per worker process, one round trip to start a run, no seeding.

Round trips are counted on the private server (INFO commandstats), not timed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.client import PubSubWorkerThread
from redis.connection import AbstractConnection
from rq import Queue
from rq.job import Job

from clawq.broker import Broker, Outcome, RedisUnavailable, RunFenced, TaskStatus
from clawq.broker.config import AgentConfig, Config
from clawq.broker.connection import client_from_url, rq_connection
from clawq.broker.scripts import load_specs
from clawq.broker.stats import bucket_field
from clawq.workers import job as job_mod
from clawq.workers import rq_glue
from clawq.workers.agent_output import Done
from clawq.workers.job import job_broker, prepare, run_task
from clawq.workers.rq_glue import ClawqSimpleWorker, rq_enqueuer
from clawq.workers.runners import RunContext, preload_agent, run_agent

ROOT = Path(__file__).resolve().parent.parent


def config(callable_: str = "agents.py_agent:done", **agent: Any) -> Config:
    return Config.model_validate({"night_mode": None, "notify": {"log": False},
                                  "agent": {"runner": "python", "callable": callable_, **agent}})


@pytest.fixture
def jobs(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[tuple[str, object], Broker]]:
    """Jobs find Redis through CLAWQ_REDIS_URL and keep their brokers, and the runs started early, in caches
    private to the test."""
    cache: dict[tuple[str, object], Broker] = {}
    monkeypatch.setenv("CLAWQ_REDIS_URL", redis_url)
    monkeypatch.setattr(job_mod, "_BROKERS", cache)
    monkeypatch.setattr(job_mod, "_STARTED", {})
    try:
        yield cache
    finally:
        for b in cache.values():
            b.close()


def counted(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[Any]:
    """Record the first argument (``self`` of a method) of every call of ``owner.name`` (still calling it)."""
    calls: list[Any] = []
    real: Callable[..., Any] = getattr(owner, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0] if args else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls


def commands(r: redis.Redis) -> dict[str, int]:
    """Calls per command since the last CONFIG RESETSTAT (commands run by scripts included)."""
    stats: dict[str, Any] = r.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def reset_stats(r: redis.Redis) -> None:
    """Load every script (none is answered NOSCRIPT and sent again), then zero the command counts."""
    for spec in load_specs().values():
        r.script_load(spec.source)
    r.config_resetstat()


def claimed(broker: Broker, board: str = "web") -> tuple[int, str]:
    tid = broker.add(board, "t", chain="coding")
    claim = broker.claim()
    assert claim.task_id == tid
    return tid, claim.run_id


def test_a_job_never_seeds_the_namespace(broker: Broker, r: redis.Redis, jobs: Any,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    broker.load_config(config())
    tid, run_id = claimed(broker)
    stored = counted(monkeypatch, Broker, "_store_config")
    reset_stats(r)
    out = run_task(broker.namespace, tid, run_id)
    assert out["reported"] and out["result"] == "completed"
    sent = commands(r)
    assert stored == [] and "hsetnx" not in sent
    assert sent["evalsha"] == 2  # start_run's heartbeat and complete_run: no load_config


def test_later_jobs_of_a_process_reuse_its_broker_and_make_two_round_trips(
        broker: Broker, r: redis.Redis, jobs: dict[tuple[str, object], Broker],
        monkeypatch: pytest.MonkeyPatch) -> None:
    broker.load_config(config())
    made = counted(monkeypatch, Broker, "from_url")
    first, second = claimed(broker, "a"), claimed(broker, "b")
    assert run_task(broker.namespace, *first)["reported"]
    reset_stats(r)
    assert run_task(broker.namespace, *second)["reported"]
    sent = commands(r)
    assert len(made) == 1 and len(jobs) == 1
    assert sent["exec"] == 1 and sent["evalsha"] == 2  # start_run (a MULTI with the heartbeat); complete_run
    assert not {"hello", "get", "hsetnx"} & set(sent)  # no handshake, no config read, no seeding
    assert broker.get_task(second[0]).status is TaskStatus.IN_REVIEW


def test_the_config_is_read_again_only_when_its_version_changes(broker: Broker, jobs: Any,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    broker.load_config(config())
    calls = counted(monkeypatch, Broker, "_reload_config")

    def reads() -> int:  # by the job's broker, not the test's
        return sum(1 for b in calls if b is not broker)

    assert run_task(broker.namespace, *claimed(broker, "a"))["result"] == "completed"
    assert run_task(broker.namespace, *claimed(broker, "b"))["result"] == "completed"
    assert reads() == 1
    broker.load_config(config("agents.py_agent:follow_up"))
    assert run_task(broker.namespace, *claimed(broker, "c"))["result"] == "follow_up"
    assert reads() == 2


def _steal(broker: Broker, clock: Any, tid: int) -> str:
    """Let the run's lease expire, reap it and claim the task again: returns the new run id."""
    wd = broker.config().watchdog
    clock.advance((wd.stale_in_progress_minutes + wd.heartbeat_grace_minutes) * 60 + 1)
    assert broker.reap() == [tid]
    return broker.claim().run_id


def test_a_job_of_a_replaced_run_does_nothing(broker: Broker, clock: Any, jobs: Any) -> None:
    broker.load_config(config())
    tid, old = claimed(broker)
    new = _steal(broker, clock, tid)
    assert run_task(broker.namespace, tid, old) == {
        "task_id": tid, "run_id": old, "reported": False, "why": "not the active run"}
    task = broker.get_task(tid)
    assert task.status is TaskStatus.IN_PROGRESS and task.run_id == new


def test_a_run_fenced_before_its_start_does_not_run(broker: Broker, clock: Any, jobs: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The task is read in the heartbeat's MULTI: a run that lost its lease before its job starts never runs."""
    broker.load_config(config())
    tid, run_id = claimed(broker)
    new = _steal(broker, clock, tid)
    ran = counted(monkeypatch, job_mod, "run_model")
    assert run_task(broker.namespace, tid, run_id)["why"] == "not the active run"
    assert ran == []
    assert broker.get_task(tid).run_id == new


def test_a_job_records_how_long_it_waited_since_its_enqueue(broker: Broker, r: redis.Redis, jobs: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import datetime

    import rq

    broker.load_config(config())
    tid, run_id = claimed(broker)

    class Job:
        enqueued_at = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=3)

    monkeypatch.setattr(rq, "get_current_job", lambda: Job())
    assert run_task(broker.namespace, tid, run_id)["reported"]
    stats = {str(k, "utf-8"): str(v, "utf-8") for k, v in r.hgetall(broker.keys.stats_claim_to_start).items()}
    assert stats["count"] == "1" and stats[bucket_field(5.0)] == "1" and 3.0 <= float(stats["sum"]) < 5.0


def test_a_run_that_lost_its_lease_while_running_cannot_report(broker: Broker, clock: Any, jobs: Any,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    broker.load_config(config())
    tid, run_id = claimed(broker)
    new: list[str] = []

    def agent_outlives_its_lease(agent: Any, ctx: Any) -> Done:
        new.append(_steal(broker, clock, tid))
        return Done(Outcome(needs_follow_up=False, summary="too late"))

    monkeypatch.setattr(job_mod, "run_model", agent_outlives_its_lease)
    assert run_task(broker.namespace, tid, run_id) == {
        "task_id": tid, "run_id": run_id, "reported": False, "why": "fenced"}
    task = broker.get_task(tid)
    assert task.status is TaskStatus.IN_PROGRESS and task.run_id == new[0] and task.run_count == 0


def test_the_heartbeat_fences_a_running_agent_and_nothing_is_reported(broker: Broker, clock: Any, jobs: Any) -> None:
    from agents import py_agent

    broker.load_config(Config.model_validate({
        "night_mode": None, "notify": {"log": False}, "watchdog": {"stale_in_progress_minutes": 0.003},
        "agent": {"runner": "python", "callable": "agents.py_agent:blocks"}}))
    tid, run_id = claimed(broker)
    out: list[dict[str, Any]] = []
    py_agent.RELEASE.clear()
    job = threading.Thread(target=lambda: out.append(run_task(broker.namespace, tid, run_id)), daemon=True)
    try:
        job.start()
        assert eventually(lambda: any(t.name == f"clawq-heartbeat-{tid}" for t in threading.enumerate()))
        new = _steal(broker, clock, tid)  # the agent is running (its heartbeats start after it)
        job.join(timeout=20)
    finally:
        py_agent.RELEASE.set()
    assert out == [{"task_id": tid, "run_id": run_id, "reported": False, "why": "fenced"}]
    task = broker.get_task(tid)
    assert task.status is TaskStatus.IN_PROGRESS and task.run_id == new and task.run_count == 0


@pytest.mark.parametrize(("runner", "slow", "calls"), [
    ("python", False, []), ("python", True, [1]), ("command", True, [1]),
    ("simulated", False, [1]),
])
def test_a_runner_says_when_its_agent_outlives_its_first_poll(runner: str, slow: bool, calls: list[int]) -> None:
    """Heartbeats start once the agent has run for a poll: an agent that ends at once needs no heartbeat thread."""
    code = 'import time; time.sleep(0.3 if SLOW else 0); print(\'{"status": "done", "summary": "ok"}\')'
    agent = AgentConfig.model_validate({
        "runner": runner, "callable": "agents.py_agent:slow_done" if slow else "agents.py_agent:done",
        "command": [sys.executable, "-S", "-c", code.replace("SLOW", str(slow))],
    })
    seen: list[int] = []
    doc = {"task_id": 1, "run_id": str(uuid.uuid4()), "model": "m", "provider": "p", "board": "b", "run_count": 1,
           "title": "t", "prompt": "", "attempt": 1, "context": []}
    result = run_agent(agent, RunContext(task=doc, timeout_s=30, on_start=lambda: seen.append(1)))
    assert isinstance(result, Done) and seen == calls


def test_start_run_beats_records_the_wait_and_returns_the_task_and_config(broker: Broker, r: redis.Redis,
                                                                  clock: Any) -> None:
    broker.load_config(config(timeout_minutes=7))
    tid, run_id = claimed(broker)
    clock.advance(300)
    r.script_flush()  # a restarted server: the heartbeat falls back to the wrapper, which loads the script
    task, cfg = broker.start_run(tid, run_id, 0.02)
    assert cfg.agent.timeout_minutes == 7
    assert (task.task_id, task.run_id, task.status) == (tid, run_id, TaskStatus.IN_PROGRESS)
    stats = {str(k, "utf-8"): str(v, "utf-8") for k, v in r.hgetall(broker.keys.stats_claim_to_start).items()}
    assert stats["count"] == "1" and stats[bucket_field(0.025)] == "1"
    lease_ms = (clock.t + broker.config().watchdog.stale_in_progress_minutes * 60) * 1000
    assert r.zscore(broker.keys.running, str(tid)) == lease_ms  # the beat extended the lease from now
    with pytest.raises(RunFenced):
        broker.start_run(tid, str(uuid.uuid4()))


def test_start_run_gives_the_agent_the_last_session_but_not_the_run_logs(broker: Broker) -> None:
    broker.load_config(config())
    tid, first = claimed(broker)
    broker.save_run_log(tid, first, ["x" * 1000], 4096)
    broker.record_usage(tid, first, "codex", "web", "sess-1", {"input_tokens": 3})
    broker.complete(tid, first, Outcome(needs_follow_up=True, next_prompt="go on", summary="half"))
    again = broker.claim()
    assert again.task_id == tid
    task, _ = broker.start_run(tid, again.run_id)
    assert task.runs[0]["session_id"] == "sess-1" and "log" not in task.runs[0]
    assert job_mod._last_session(task) == {"run_id": first, "model": task.runs[0]["model"], "session_id": "sess-1"}
    assert broker.get_task(tid).runs[0]["log"] == "x" * 1000  # `show` still reads them


def test_start_run_on_a_cluster_beats_on_its_own() -> None:
    import test_cluster  # its Cluster: three cluster-enabled servers (skipped without the system redis-cli)

    if test_cluster._CLI is None or not os.access(test_cluster._CLI, os.X_OK):
        pytest.skip("needs the system redis-server and redis-cli")
    cluster = test_cluster.Cluster().start()
    try:
        b = Broker.from_url(cluster.url, "jobs", lean=True)
        tid, run_id = claimed(b)
        for node in cluster.nodes:
            with node.client() as client:
                client.script_flush()
        task, cfg = b.start_run(tid, run_id, 0.2)
        assert (task.task_id, task.run_id, cfg) == (tid, run_id, b.config())
        assert b.client.hget(b.keys.stats_claim_to_start, "count") == "1"
        with pytest.raises(RunFenced):
            b.start_run(tid, str(uuid.uuid4()))
        b.close()
    finally:
        cluster.stop()


def test_a_job_through_sentinel_runs_on_a_lean_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    import test_sentinel  # its SentinelSetup: a primary, a replica and one Sentinel

    if test_sentinel._BINARY is None:
        pytest.skip("needs the system redis-server")
    setup = test_sentinel.SentinelSetup().start()
    monkeypatch.setenv("CLAWQ_REDIS_URL", setup.url)
    monkeypatch.setattr(job_mod, "_BROKERS", {})
    admin = Broker.from_url(setup.url, "jobs")
    try:
        admin.load_config(config())
        tid, run_id = claimed(admin)
        assert run_task("jobs", tid, run_id)["result"] == "completed"
        assert job_broker("jobs").client.connection_pool.connection_kwargs["protocol"] == 2
    finally:
        for b in (admin, *job_mod._BROKERS.values()):
            b.close()
        setup.stop()


def test_a_simple_worker_runs_every_job_on_one_broker(broker: Broker, redis_url: str, jobs: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    broker.load_config(config())
    made = counted(monkeypatch, Broker, "from_url")
    conn = rq_connection(redis_url, lean=True)
    try:
        enqueue = rq_enqueuer(broker, conn)
        ids = [broker.add(b, "t", chain="coding") for b in ("a", "b", "c")]
        for _ in ids:
            enqueue(broker.claim())
        queue = Queue(broker.config().agent.queue, connection=conn)
        ClawqSimpleWorker([queue], connection=conn).work(burst=True)
    finally:
        conn.close()
    assert [broker.get_task(t).status for t in ids] == [TaskStatus.IN_REVIEW] * 3
    assert len(made) == 1


@pytest.fixture
def fresh_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A python agent module that nothing has imported yet, whatever ran before: its name is unique. (Removing
    a shared module such as agents.py_agent from sys.modules instead made these tests depend on their order.)"""
    name = f"fresh_agent_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text("def done(task):\n    return {'summary': 'done'}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        yield name
    finally:
        sys.modules.pop(name, None)


def _enqueued(broker: Broker, conn: redis.Redis) -> tuple[int, str, Job]:
    """A task claimed and enqueued as the dispatcher does: its id, its run id and its RQ job."""
    claim = broker.claim() if broker.add("web", "t", chain="coding") else None
    assert claim is not None
    rq_enqueuer(broker, conn)(claim)
    return claim.task_id, claim.run_id, Job.fetch(claim.run_id, connection=conn)


def test_a_worker_prepares_a_job_before_running_it(broker: Broker, redis_url: str, jobs: Any, fresh_agent: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    broker.load_config(config(f"{fresh_agent}:done"))
    conn = rq_connection(redis_url, lean=True)
    try:
        job = _enqueued(broker, conn)[2]
        with caplog.at_level("DEBUG", logger="clawq.worker"):
            rq_glue._prepare(job)
    finally:
        conn.close()
    assert not [r.getMessage() for r in caplog.records if "cannot prepare" in r.getMessage()]
    prepared = job_broker(broker.namespace)
    assert prepared.config_version == broker.config_version
    assert fresh_agent in sys.modules


def test_a_worker_starts_the_run_before_its_job_which_does_not_start_it_again(
        broker: Broker, redis_url: str, r: redis.Redis, jobs: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker starts the run (heartbeat, task, claim-to-start) where it is cheap, before it forks; the
    job takes that start instead of sending its own."""
    broker.load_config(config())
    conn = rq_connection(redis_url, lean=True)
    try:
        tid, run_id, job = _enqueued(broker, conn)
        starts = counted(monkeypatch, Broker, "start_run")
        rq_glue._prepare(job)
        assert len(starts) == 1 and run_id in job_mod._STARTED
        assert r.hget(broker.keys.stats_claim_to_start, "count") == b"1"
        assert run_task(broker.namespace, tid, run_id)["reported"]
    finally:
        conn.close()
    assert len(starts) == 1, "the job started its run a second time"
    assert run_id not in job_mod._STARTED
    assert r.hget(broker.keys.stats_claim_to_start, "count") == b"1"
    assert broker.get_task(tid).status is TaskStatus.IN_REVIEW


def test_a_run_fenced_at_its_early_start_never_runs(broker: Broker, redis_url: str, clock: Any, jobs: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    broker.load_config(config())
    conn = rq_connection(redis_url, lean=True)
    try:
        tid, run_id, job = _enqueued(broker, conn)
        new = _steal(broker, clock, tid)
        rq_glue._prepare(job)
    finally:
        conn.close()
    assert isinstance(job_mod._STARTED[run_id], RunFenced)
    ran, starts = counted(monkeypatch, job_mod, "run_model"), counted(monkeypatch, Broker, "start_run")
    assert run_task(broker.namespace, tid, run_id)["why"] == "not the active run"
    assert ran == [] and starts == [] and run_id not in job_mod._STARTED
    assert broker.get_task(tid).run_id == new


def test_an_early_start_that_redis_refused_is_made_by_the_job(broker: Broker, redis_url: str, jobs: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    broker.load_config(config())
    conn = rq_connection(redis_url, lean=True)
    try:
        tid, run_id, job = _enqueued(broker, conn)
        def down(*args: Any, **kwargs: Any) -> Any:
            raise RedisUnavailable("Redis is down")

        with monkeypatch.context() as m:
            m.setattr(Broker, "start_run", down)
            rq_glue._prepare(job)
        assert run_id not in job_mod._STARTED
        starts = counted(monkeypatch, Broker, "start_run")
        assert run_task(broker.namespace, tid, run_id)["reported"]
    finally:
        conn.close()
    assert len(starts) == 1
    assert broker.get_task(tid).status is TaskStatus.IN_REVIEW


def test_the_worker_forgets_an_early_start_once_its_job_ran(broker: Broker, redis_url: str, jobs: Any) -> None:
    """In a forking worker the work-horse takes its own copy of the start: the worker drops its copy after."""
    class Horse:
        def execute_job(self, job: Job, queue: Queue) -> None:
            ran.append(job.id)  # the work-horse, elsewhere: this process's entry stays

    class Worker(rq_glue._Reporting, Horse):
        pass

    ran: list[str] = []
    broker.load_config(config())
    conn = rq_connection(redis_url, lean=True)
    try:
        _, run_id, job = _enqueued(broker, conn)
        Worker().execute_job(job, Queue("agents", connection=conn))
    finally:
        conn.close()
    assert ran == [run_id]
    assert run_id not in job_mod._STARTED


def test_prepare_reads_the_config_again_for_a_newer_claim(broker: Broker, jobs: Any) -> None:
    broker.load_config(config(timeout_minutes=5))
    prepare(broker.namespace)
    broker.load_config(config(timeout_minutes=9))
    broker.config()
    prepare(broker.namespace, config_version=broker.config_version)
    assert job_broker(broker.namespace).config().agent.timeout_minutes == 9


def test_without_a_url_a_job_broker_per_rq_connection(broker: Broker, redis_url: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLAWQ_REDIS_URL", raising=False)
    monkeypatch.setattr(job_mod, "_BROKERS", {})
    one, two = redis.Redis.from_url(redis_url), redis.Redis.from_url(redis_url)
    try:
        a = job_broker(broker.namespace, one)
        assert job_broker(broker.namespace, one) is a
        assert job_broker(broker.namespace, two) is not a
        assert a.client.ping()
    finally:
        for b in job_mod._BROKERS.values():
            b.close()
        one.close()
        two.close()


def test_preload_imports_a_python_agent_and_ignores_a_bad_one(fresh_agent: str) -> None:
    preload_agent(config(f"{fresh_agent}:done").agent)
    assert fresh_agent in sys.modules
    preload_agent(config("agents.no_such_module:run").agent)  # the run reports it, not the worker


def sent_on_connect(client: Any) -> list[bytes]:
    """The commands a client's first PING sends: its handshake, then PING."""
    sent: list[bytes] = []
    real = AbstractConnection.send_command

    def spy(conn: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(b" ".join(a if isinstance(a, bytes) else str(a).encode() for a in args[:2]).upper())
        return real(conn, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(AbstractConnection, "send_command", spy)
        assert client.ping()
    return sent


def test_a_lean_client_connects_without_a_handshake(redis_url: str) -> None:
    lean, full = client_from_url(redis_url, lean=True), client_from_url(redis_url)
    try:
        assert sent_on_connect(lean) == [b"PING"]
        handshake = sent_on_connect(full)
        assert b"HELLO 3" in handshake and b"CLIENT SETINFO" in handshake and b"CLIENT MAINT_NOTIFICATIONS" in handshake
    finally:
        lean.close()
        full.close()


@pytest.mark.slow
def test_a_forking_clawq_worker_runs_jobs_with_its_prepared_broker(broker: Broker, redis_url: str) -> None:
    broker.load_config(config())
    conn = rq_connection(redis_url)
    try:
        enqueue = rq_enqueuer(broker, conn)
        ids = [broker.add(b, "t", chain="coding") for b in ("a", "b")]
        claims = [broker.claim() for _ in ids]
        for c in claims:
            enqueue(c)
        subprocess.run([sys.executable, "-m", "clawq.cli", "worker", "--burst", "--redis-url", redis_url, "--namespace",
                        broker.namespace, "--log-level", "WARNING"], cwd=ROOT, check=True, timeout=60,
                       env={"PYTHONPATH": str(ROOT / "tests"), "PATH": "/usr/bin:/bin"})
        results = [Job.fetch(c.run_id, connection=conn).return_value() for c in claims]
    finally:
        conn.close()
    assert [res["reported"] for res in results] == [True, True]
    assert [broker.get_task(t).status for t in ids] == [TaskStatus.IN_REVIEW] * 2


@pytest.mark.slow
def test_a_python_agent_in_a_forked_work_horse_is_interrupted_at_its_timeout(broker: Broker, redis_url: str) -> None:
    # the horse runs the agent on its main thread, under RQ's SIGALRM job timeout: clawq's tick takes the signal
    # for the run, interrupts the agent at agent.timeout_minutes (0.6 s) and gives RQ its timer back
    broker.load_config(config("agents.py_agent:blocks", timeout_minutes=0.01))
    conn = rq_connection(redis_url)
    try:
        tid = broker.add("a", "t", chain="coding")
        claim = broker.claim()
        rq_enqueuer(broker, conn)(claim)
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "clawq.cli", "worker", "--burst", "--redis-url", redis_url, "--namespace",
                        broker.namespace, "--log-level", "WARNING"], cwd=ROOT, check=True, timeout=60,
                       env={"PYTHONPATH": str(ROOT / "tests"), "PATH": "/usr/bin:/bin"})
        took = time.monotonic() - t0
        job = Job.fetch(claim.run_id, connection=conn)
        assert job.get_status() == "failed" and "timeout" in (job.latest_result().exc_string or "")
    finally:
        conn.close()
    assert took < 20  # the agent would block for 30 s
    run = broker.get_task(tid).runs[-1]
    assert run["run_id"] == claim.run_id and run["outcome"] == "timeout"


# -- a worker's exit ---------------------------------------------------------------------------------
#: RQ's unsubscribe sends UNSUBSCRIBE, then stops its pubsub thread. On a busy machine the thread reads the
#: reply first; this delay makes that ordering certain, so the tests below cannot pass by luck.
_SLOW_STOP = '''
import time
from redis.client import PubSubWorkerThread

_real_stop = PubSubWorkerThread.stop


def _late_stop(self, *args, **kwargs):
    time.sleep(0.5)
    return _real_stop(self, *args, **kwargs)


PubSubWorkerThread.stop = _late_stop
'''
EXIT_BOUND_S = 10.0  # generous: a correct exit takes well under a second, the bug took RQ's sleep_time (60 s)


def test_a_simple_worker_exits_soon_even_when_its_pubsub_thread_is_slow_to_stop(
        broker: Broker, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real_stop = PubSubWorkerThread.stop

    def late_stop(self: PubSubWorkerThread, *args: Any, **kwargs: Any) -> None:
        time.sleep(0.5)
        real_stop(self, *args, **kwargs)

    monkeypatch.setattr(PubSubWorkerThread, "stop", late_stop)
    conn = rq_connection(redis_url, lean=True)
    try:
        worker = ClawqSimpleWorker([Queue(f"q-{broker.namespace}", connection=conn)], connection=conn)
        started = time.monotonic()
        worker.work(burst=True)
        took = time.monotonic() - started
    finally:
        conn.close()
    assert took < EXIT_BOUND_S, f"the burst worker took {took:.1f}s to exit an empty queue"


@pytest.mark.slow
@pytest.mark.parametrize("simple", [False, True], ids=["fork", "simple"])
def test_clawq_worker_burst_exits_soon(broker: Broker, redis_url: str, tmp_path: Path, simple: bool) -> None:
    (tmp_path / "sitecustomize.py").write_text(_SLOW_STOP)  # the same slow stop in the worker process
    argv = [sys.executable, "-m", "clawq.cli", "worker", "--burst", "--queue", f"q-{broker.namespace}",
            "--log-level", "WARNING", *(["--simple"] if simple else [])]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(tmp_path),
           "CLAWQ_REDIS_URL": redis_url, "CLAWQ_NAMESPACE": broker.namespace}
    started = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=90, check=False)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert took < EXIT_BOUND_S, f"`clawq worker --burst` took {took:.1f}s to exit an empty queue"
