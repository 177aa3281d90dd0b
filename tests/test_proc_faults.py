"""Field faults on the worker's side of a run, each with real processes on a private Redis: an agent's child that
escapes its session and holds its pipes, control bytes in what an agent prints, a Redis pause while a run
reports (issue 13, items 3, 4 and 5)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from test_job import claimed, counted, jobs  # noqa: F401  (jobs is a fixture)

from clawq.broker import Broker, RedisUnavailable, RunFenced, TaskStatus
from clawq.broker.config import Config
from clawq.workers.job import AgentRunFailed
from clawq.workers.job import run_task as rq_job
from clawq.workers.procs import alive

ROOT = Path(__file__).resolve().parent.parent
PROBE = str(ROOT / "tests" / "agents" / "probe_agent.py")


def run_task(namespace: str, task_id: int, run_id: str) -> dict[str, Any]:
    """The RQ job, called in-process; a failed run's result rides on the AgentRunFailed that files it as a failed
    RQ job."""
    try:
        return rq_job(namespace, task_id, run_id)
    except AgentRunFailed as err:
        assert err.result["task_id"] == task_id and str(err)
        return err.result


def command_config(*argv: str, timeout_minutes: float = 1.0) -> Config:
    return Config.model_validate({
        "night_mode": None, "notify": {"log": False},
        "agent": {"runner": "command", "command": [sys.executable, PROBE, *argv], "timeout_minutes": timeout_minutes}})


# -- item 3: no process survives its run ----------------------------------------------------------------------
def test_an_agent_whose_setsid_child_holds_its_pipes_is_reported_as_a_timeout_in_time(
        broker: Broker, jobs: Any, tmp_path: Path) -> None:  # noqa: F811
    """The child leaves the agent's session and keeps stdout/stderr open: the job neither hangs nor heartbeats
    on; it reports ``timeout`` within the timeout plus a few seconds, and the child is gone."""
    record = tmp_path / "record.json"
    broker.load_config(command_config(str(record), "escape", timeout_minutes=0.025))  # 1.5 s
    tid, run_id = claimed(broker)
    t0 = time.monotonic()
    try:
        out = run_task(broker.namespace, tid, run_id)
    finally:
        child = int(json.loads(Path(f"{record}.child").read_text())["pid"])
        escaped = alive(child)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, 9)
    assert out["reported"] and out["result"] == "timeout", out
    assert time.monotonic() - t0 < 1.5 + 3
    assert not escaped, "the agent's setsid child survived the run"
    task = broker.get_task(tid)
    assert task.last_error_reason == "timeout" and task.status is TaskStatus.UP_NEXT


# -- item 4: whatever an agent prints is sanitised before it reaches the broker -------------------------------
def run_bytes(broker: Broker, tmp_path: Path, stdout: bytes, stderr: bytes, code: int) -> dict[str, Any]:
    (tmp_path / "out").write_bytes(stdout)
    (tmp_path / "err").write_bytes(stderr)
    broker.load_config(command_config(str(tmp_path / "record.json"), "bytes", str(tmp_path / "out"),
                                      str(tmp_path / "err"), str(code)))
    tid, run_id = claimed(broker)
    out = run_task(broker.namespace, tid, run_id)
    assert out["reported"], out
    return out


def test_a_nul_byte_on_stderr_is_reported_at_once_as_the_failure_it_is(broker: Broker, jobs: Any,  # noqa: F811
                                                                       tmp_path: Path) -> None:
    out = run_bytes(broker, tmp_path, b"", b"fatal: cannot lock ref\x00 'HEAD'\x1b[31m red\x1b[0m\x07\n", 1)
    assert out["result"] == "failed"
    task = broker.get_task(out["task_id"])
    assert task.status is TaskStatus.UP_NEXT and task.last_error_reason == "failed"
    assert task.last_error is not None and "cannot lock ref 'HEAD' red" in task.last_error
    assert not [c for c in task.last_error if ord(c) < 32 and c not in "\t\n"], repr(task.last_error)


def test_a_rate_limit_message_with_a_nul_is_still_a_rate_limit(broker: Broker, jobs: Any,  # noqa: F811
                                                               tmp_path: Path) -> None:
    before = time.time()
    out = run_bytes(broker, tmp_path, b"", b"Error: 429\x00 Too Many Requests. Please try again in 5 minutes.\n", 1)
    assert out["result"] == "rate_limit"
    cooldowns = broker.cooldowns()
    assert before + 280 < cooldowns["codex"]["until"] < time.time() + 320, cooldowns
    task = broker.get_task(out["task_id"])
    assert task.status is TaskStatus.UP_NEXT and task.attempts == 0


def test_control_bytes_and_bad_utf8_in_an_outcome_are_cleaned_not_fatal(broker: Broker, jobs: Any,  # noqa: F811
                                                                        tmp_path: Path) -> None:
    line = json.dumps({"status": "done", "needs_follow_up": False, "summary": "fixed\u0000 the\u001b[1m form\u0007"})
    out = run_bytes(broker, tmp_path, b"log \xff\xfe line\x00\n" + line.encode() + b"\n", b"", 0)
    assert out["result"] == "completed"
    task = broker.get_task(out["task_id"])
    assert task.status is TaskStatus.IN_REVIEW
    assert task.context[-1]["summary"] == "fixed the form"


def test_a_huge_stderr_is_cut_to_the_broker_limit_and_reported(broker: Broker, jobs: Any,  # noqa: F811
                                                               tmp_path: Path) -> None:
    out = run_bytes(broker, tmp_path, b"", b"x" * 200_000 + b"\x00 the end\n", 2)
    assert out["result"] == "failed"
    task = broker.get_task(out["task_id"])
    assert task.last_error is not None and task.last_error.endswith("the end")


@pytest.mark.parametrize("field", ["summary", "error", "message"])
def test_a_python_agent_returning_nul_or_lone_surrogates_is_reported(
        broker: Broker, jobs: Any, field: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from agents import py_agent

    doc = {"summary": {"status": "done", "needs_follow_up": False, "summary": "ok\x00\ud800"},
           "error": {"status": "failed", "error": "bad\x00\udcff news"},
           "message": {"status": "rate_limited", "message": "429\x00 Too Many Requests, retry in 30s"}}[field]
    monkeypatch.setattr(py_agent, "RETURNS", doc)
    broker.load_config(Config.model_validate({"night_mode": None, "notify": {"log": False},
                                              "agent": {"runner": "python", "callable": "agents.py_agent:returns"}}))
    tid, run_id = claimed(broker)
    out = run_task(broker.namespace, tid, run_id)
    assert out["reported"], out
    assert out["result"] == {"summary": "completed", "error": "failed", "message": "rate_limit"}[field]


# -- item 5: reports survive a blip ---------------------------------------------------------------------------
def events_of(broker: Broker, task_id: int) -> list[str]:
    return [e["type"] for e in broker.events(count=1000) if str(e.get("task_id")) == str(task_id)]


def test_a_repeated_failure_report_is_recognised_not_applied_twice(broker: Broker) -> None:
    tid, run_id = claimed(broker)
    first = broker.fail(tid, run_id, "tests do not pass", cause="failed")
    assert broker.fail(tid, run_id, "tests do not pass", cause="failed") == first  # a repeat, not fenced
    assert events_of(broker, tid).count("failed") == 1
    assert broker.get_task(tid).attempts == 1
    with pytest.raises(RunFenced):  # another report of the ended run is refused
        broker.rate_limited(tid, run_id, retry_after=30)


def test_a_repeated_rate_limit_report_is_recognised_not_applied_twice(broker: Broker) -> None:
    tid, run_id = claimed(broker)
    first = broker.rate_limited(tid, run_id, retry_after=30, message="429")
    assert broker.rate_limited(tid, run_id, retry_after=30, message="429") == first
    assert events_of(broker, tid).count("rate_limit") == 1
    with pytest.raises(RunFenced):
        broker.fail(tid, run_id, "late", cause="failed")


def test_a_repeated_release_is_recognised_not_applied_twice(broker: Broker) -> None:
    tid, run_id = claimed(broker)
    broker.release(tid, run_id, "agent_unreachable", "no such binary")
    broker.release(tid, run_id, "agent_unreachable", "no such binary")
    assert events_of(broker, tid).count("released") == 1
    with pytest.raises(RunFenced):
        broker.release(tid, run_id, "pairing", "pairing required")


def test_a_repeat_of_an_old_run_after_a_new_claim_is_fenced(broker: Broker) -> None:
    tid, run_id = claimed(broker)
    broker.rate_limited(tid, run_id, retry_after=1, message="429")
    broker.load_config(Config.model_validate({"night_mode": None, "notify": {"log": False}}))
    new = broker.claim()
    assert new.task_id == tid and new.run_id != run_id
    with pytest.raises(RunFenced):  # the task moved on: the old run's repeat must not touch the new run
        broker.fail(tid, run_id, "late", cause="failed")
    assert broker.get_task(tid).run_id == new.run_id


@pytest.mark.parametrize("agent", ["then_done", "returns"])
def test_a_report_whose_reply_was_lost_is_tried_again_and_counted_once(
        broker: Broker, jobs: Any, agent: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The first report is applied but its reply never arrives (the connection drops): the worker tries again,
    the script recognises the repeat, and the outcome is recorded once."""
    from agents import py_agent

    monkeypatch.setattr(py_agent, "RETURNS", {"status": "failed", "error": "tests do not pass"})
    broker.load_config(Config.model_validate({"night_mode": None, "notify": {"log": False},
                                              "agent": {"runner": "python", "callable": f"agents.py_agent:{agent}"}}))
    tid, run_id = claimed(broker)
    real = Broker._run_call
    lost: list[str] = []

    def reply_lost(self: Broker, name: str, *args: Any, **kw: Any) -> Any:
        reply = real(self, name, *args, **kw)
        if self is not broker and not lost:
            lost.append(name)
            raise RedisUnavailable("cannot reach Redis: Connection reset by peer (after the script ran)")
        return reply

    monkeypatch.setattr(Broker, "_run_call", reply_lost)
    out = run_task(broker.namespace, tid, run_id)
    assert lost == ["complete_run" if agent == "then_done" else "fail_run"]
    assert out["reported"] and out["result"] == ("completed" if agent == "then_done" else "failed"), out
    task = broker.get_task(tid)
    kinds = events_of(broker, tid)
    if agent == "then_done":
        assert task.status is TaskStatus.IN_REVIEW and task.run_count == 1 and kinds.count("completed") == 1
    else:
        assert task.attempts == 1 and kinds.count("failed") == 1, kinds


def run_paused(broker: Broker, redis_url: str, monkeypatch: pytest.MonkeyPatch, lease_minutes: float,
               pause_ms: int) -> tuple[dict[str, Any], float, list[Any]]:
    """Run a job whose agent pauses the private server (CLIENT PAUSE WRITE: scripts wait) just before it answers
    done, with a worker whose Redis calls time out after 0.3 s; returns the job's result, its duration and the
    heartbeats sent."""
    from agents import py_agent

    admin = redis.Redis.from_url(redis_url)
    monkeypatch.setenv("CLAWQ_REDIS_URL", f"{redis_url}?socket_timeout=0.3")
    monkeypatch.setattr(py_agent, "BEFORE", lambda: admin.client_pause(pause_ms, all=False))
    broker.load_config(Config.model_validate({
        "night_mode": None, "notify": {"log": False},
        "watchdog": {"stale_in_progress_minutes": lease_minutes, "heartbeat_grace_minutes": 0},
        "agent": {"runner": "python", "callable": "agents.py_agent:then_done"}}))
    tid, run_id = claimed(broker)
    beats = counted(monkeypatch, Broker, "heartbeat")
    t0 = time.monotonic()
    try:
        out = run_task(broker.namespace, tid, run_id)
    finally:
        admin.client_unpause()
        admin.close()
    return out, time.monotonic() - t0, beats


@pytest.mark.timeout(60)
def test_reports_ride_out_a_client_pause_and_heartbeats_go_on(
        broker: Broker, jobs: Any, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The report is tried again until Redis answers, heartbeats go on meanwhile, the outcome is recorded once."""
    out, took, beats = run_paused(broker, redis_url, monkeypatch, lease_minutes=0.05, pause_ms=2500)  # 3 s lease
    assert out["reported"] and out["result"] == "completed", out
    assert 2.4 < took < 10, took
    assert beats, "no heartbeat while the report waited for Redis"
    task = broker.get_task(out["task_id"])
    assert task.status is TaskStatus.IN_REVIEW and task.run_count == 1
    assert events_of(broker, out["task_id"]).count("completed") == 1


@pytest.mark.timeout(60)
def test_a_report_is_given_up_once_the_lease_has_expired(
        broker: Broker, jobs: Any, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Past the lease the run may be running again elsewhere: the worker stops trying and says so. A try that
    timed out may still be applied when the pause ends (Redis runs what it had read): once at most."""
    out, took, _ = run_paused(broker, redis_url, monkeypatch, lease_minutes=0.02, pause_ms=4000)  # 1.2 s lease
    assert not out["reported"] and out["why"] == "redis_unavailable" and out["outcome"] == "done", out
    assert 1.0 < took < 4.5, took
    time.sleep(3.2)  # the pause is over
    task = broker.get_task(out["task_id"])
    completed = events_of(broker, out["task_id"]).count("completed")
    assert (task.status, task.run_count, completed) in ((TaskStatus.IN_PROGRESS, 0, 0),  # the reaper's to requeue
                                                        (TaskStatus.IN_REVIEW, 1, 1)), (task, completed)


# -- item 8: honest answers in rq-dashboard -------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_a_failed_agent_run_is_a_failed_rq_job_with_its_root_cause(broker: Broker, redis_url: str,
                                                                   tmp_path: Path) -> None:
    """A real ``clawq worker``: the failed run lands in RQ's failed registry with the root cause as its text, is
    not retried by RQ (clawq retries the task), and the worker logs one line, not a traceback; a done run is a
    finished job."""
    from rq import Queue
    from rq.job import Job
    from rq.registry import FailedJobRegistry, FinishedJobRegistry

    from clawq.broker.connection import rq_connection
    from clawq.workers.rq_glue import rq_enqueuer

    fail = tmp_path / "fail.sh"
    fail.write_text('#!/bin/sh\nif [ "$CLAWQ_BOARD" = ok ]; then echo \'{"status": "done", "summary": "ok"}\'; '
                    'exit 0; fi\necho "fatal: not a git repository" >&2\nexit 128\n')
    fail.chmod(0o755)
    broker.load_config(Config.model_validate({"night_mode": None, "notify": {"log": False},
                                              "agent": {"runner": "command", "command": [str(fail)]}}))
    conn = rq_connection(redis_url)
    log = tmp_path / "worker.log"
    try:
        enqueue = rq_enqueuer(broker, conn)
        bad, good = broker.add("bad", "t", chain="coding"), broker.add("ok", "t", chain="coding")
        claims = {c.task_id: c for c in (broker.claim(), broker.claim())}
        for c in claims.values():
            enqueue(c)
        with log.open("wb") as out:
            subprocess.run([sys.executable, "-m", "clawq.cli", "worker", "--burst", "--redis-url", redis_url,
                            "--namespace", broker.namespace, "--log-level", "INFO"], cwd=ROOT, check=True,
                           timeout=60, stdout=out, stderr=subprocess.STDOUT,
                           env={**os.environ, "PYTHONPATH": str(ROOT / "tests")})
        queue = Queue(broker.config().agent.queue, connection=conn)
        failed_job = Job.fetch(claims[bad].run_id, connection=conn)
        assert claims[bad].run_id in FailedJobRegistry(queue=queue).get_job_ids()
        assert claims[good].run_id in FinishedJobRegistry(queue=queue).get_job_ids()
        text = failed_job.latest_result().exc_string if failed_job.latest_result() else failed_job.exc_info
        assert "AgentRunFailed: failed: exit code 128: fatal: not a git repository" in str(text), text
        assert not failed_job.retries_left
    finally:
        conn.close()
    task = broker.get_task(bad)
    assert task.attempts == 1 and task.status is TaskStatus.UP_NEXT and task.run_count == 0
    assert events_of(broker, bad).count("failed") == 1
    assert broker.get_task(good).status is TaskStatus.IN_REVIEW
    output = log.read_text(errors="replace")
    assert "Traceback" not in output and "agent run failed: failed: exit code 128" in output, output[-3000:]


@pytest.mark.parametrize("how", ["delete", "cancel"])
def test_a_run_whose_rq_job_was_deleted_before_it_ran_is_given_back(
        broker: Broker, jobs: Any, redis_url: str, how: str, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    """Deleting (or cancelling) a queued agent job in rq-dashboard: the dispatcher notices at its next look and
    gives the run back without using an attempt, instead of leaving the task in progress until its lease ends.
    A job that ran is forgotten, never released."""
    import logging

    from rq.job import Job

    from clawq.broker.connection import rq_connection
    from clawq.workers import dispatcher as dispatcher_mod
    from clawq.workers.dispatcher import Dispatcher
    from clawq.workers.notify import Notifiers
    from clawq.workers.rq_glue import ClawqSimpleWorker, rq_enqueuer

    monkeypatch.setattr(dispatcher_mod, "_JOB_CHECK_S", 0.0)
    broker.load_config(Config.model_validate({"night_mode": None, "notify": {"log": False},
                                              "agent": {"runner": "python", "callable": "agents.py_agent:done"}}))
    conn = rq_connection(redis_url)
    try:
        sent = rq_enqueuer(broker, conn)
        d = Dispatcher(broker, sent, notifiers=Notifiers([]), jobs=sent)
        tid = broker.add("web", "t", chain="coding")
        assert d.step() == 1 and sent.watching == 1
        first = broker.get_task(tid).run_id
        assert first is not None
        job = Job.fetch(first, connection=conn)
        job.delete() if how == "delete" else job.cancel()  # what rq-dashboard's buttons do
        with caplog.at_level(logging.WARNING, logger="clawq.dispatch"):
            assert d.step() == 1  # gives the run back, then claims the task again: it is its board's head
        task = broker.get_task(tid)
        assert task.status is TaskStatus.IN_PROGRESS and task.run_id != first and task.attempts == 0
        assert [r["outcome"] for r in task.runs[:1]] == ["released"], task.runs
        assert f"its RQ job {first} was deleted before it ran" in caplog.text
        assert Job.fetch(task.run_id, connection=conn).get_status() == "queued"
        # the new job runs: it is forgotten, not released
        queue_name = broker.config().agent.queue
        from rq import Queue
        ClawqSimpleWorker([Queue(queue_name, connection=conn)], connection=conn).work(burst=True)
        assert broker.get_task(tid).status is TaskStatus.IN_REVIEW
        d.step()
        assert sent.watching == 0
        assert [r["outcome"] for r in broker.get_task(tid).runs] == ["released", "done"]
    finally:
        conn.close()
