"""The RQ job that runs one claimed task: check the lease, heartbeat, run the agent, report.

``run_task(namespace, task_id, run_id)`` is what the dispatcher enqueues (RQ job id = run id). It finds
Redis through ``CLAWQ_REDIS_URL`` (``clawq worker --redis-url`` sets it) or, under a plain ``rq worker``,
through the worker's own connection.

A process keeps one :class:`Broker` per namespace (:func:`job_broker`): a ``SimpleWorker`` reuses it for every
job, and ``clawq worker`` makes it in the worker before forking (:func:`prepare`), so a work-horse inherits the
client, the registered scripts, the parsed config and the imported agent, and only opens a new connection
(a lean one: no handshake). The worker also starts the run there (:func:`start_early`: :meth:`Broker.start_run`,
its heartbeat, task, config version and claim-to-start in one round trip, on the worker's open connection),
where it costs less than in a fresh work-horse, whose first writes to memory copy its pages. A job then sends
one round trip of its own when the agent logs nothing: the outcome (two when nobody started it early).
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import threading
import time
from typing import Any

import redis

from clawq.broker import Broker, ClawqError, RedisUnavailable, RunFenced, ScriptError, Task, TaskNotFound, TaskStatus
from clawq.broker.config import Config

from .agent_output import AgentResult, Done, Failed, RateLimited, clean_result, clean_text
from .report import report
from .runners import RunContext, Stalled, preload_agent, run_model

__all__ = ["AgentRunFailed", "Heartbeat", "forget_start", "job_broker", "prepare", "run_task", "start_early",
           "waited_s"]

log = logging.getLogger("clawq.job")

#: This process's brokers by (namespace, where): the URL, or the RQ connection pool they copy (kept alive here).
_BROKERS: dict[tuple[str, object], Broker] = {}
#: Runs this process started for a job it is about to run (:func:`start_early`): run id -> the task and config
#: the start read, or the error that said the run is not the task's active one. The job takes its entry.
_STARTED: dict[str, tuple[Task, Config] | RunFenced | TaskNotFound] = {}
#: The first pause before a report that Redis refused is tried again; it doubles up to _REPORT_BACKOFF_MAX_S.
_REPORT_BACKOFF_S = 0.25
_REPORT_BACKOFF_MAX_S = 5.0
#: How long before the lease's end the last try of a report goes out.
_REPORT_LAST_TRY_S = 0.1


class Heartbeat(threading.Thread):
    """Beats every ``interval`` seconds; when fenced, sets ``stop`` (the agent is stopped). ``deadline`` is the
    lease's end as last extended (epoch seconds on the broker's clock)."""

    def __init__(self, broker: Broker, task_id: int, run_id: str, interval: float, stop: threading.Event,
                 deadline: float | None = None):
        super().__init__(daemon=True, name=f"clawq-heartbeat-{task_id}")
        self.broker, self.task_id, self.run_id = broker, task_id, run_id
        self.interval, self.stop = interval, stop
        self.deadline = deadline
        self.fenced = False
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                self.deadline = self.broker.heartbeat(self.task_id, self.run_id)
            except RunFenced:
                self.fenced = True
                self.stop.set()
                return
            except TaskNotFound:  # the task vanished (a wiped namespace): stop the agent, report nothing
                log.error("task %s vanished from Redis (the namespace was wiped?): its agent is stopped and "
                          "nothing is reported", self.task_id)
                self.fenced = True
                self.stop.set()
                return
            except ClawqError as err:  # Redis blip: try again at the next beat
                log.warning("heartbeat of task %s failed: %s", self.task_id, err)

    def ensure_started(self) -> None:
        """Start beating, unless it already did (or was halted)."""
        if self.ident is None and not self._halt.is_set():
            self.start()

    def halt(self) -> None:
        self._halt.set()


def job_broker(namespace: str, connection: redis.Redis | None = None) -> Broker:
    """This process's broker for ``namespace``: on CLAWQ_REDIS_URL, else on the server of the RQ connection
    (``connection``, by default the current job's). Made and schema-checked once; it never seeds the namespace
    (its runs were claimed, so the namespace is set up). A forked job's copy opens its own connection."""
    url = os.environ.get("CLAWQ_REDIS_URL")
    pool: redis.ConnectionPool | None = None
    if not url:
        pool = _rq_pool(connection)
    where: object = url or pool
    broker = _BROKERS.get((namespace, where))
    if broker is None:
        if url:
            broker = Broker.from_url(url, namespace, lean=True)
        else:
            assert pool is not None
            kwargs = {**pool.connection_kwargs, "decode_responses": True}
            client = redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))
            broker = Broker(client, namespace)
            broker.connect()
        broker.assume_ready()
        _BROKERS[(namespace, where)] = broker
    return broker


def _rq_pool(connection: redis.Redis | None) -> redis.ConnectionPool:
    if connection is None:
        from rq import get_current_job

        job = get_current_job()
        if job is None:
            raise ClawqError("no CLAWQ_REDIS_URL and not running inside an RQ job")
        connection = job.connection
    return connection.connection_pool


def prepare(namespace: str, connection: redis.Redis | None = None, config_version: str | None = None,
            namespace_id: str | None = None) -> None:
    """Before a job runs (in a forking worker: before the fork), make its broker, read the config (again when
    ``config_version``, the version its claim checked, is not the cached one, or when the claim was made in
    a namespace of another identity than the one known here: raises NamespaceWiped once then) and import its
    agent, so that the job, or every work-horse forked after this, finds them ready."""
    broker = job_broker(namespace, connection)
    if namespace_id is not None and broker.identity is not None and namespace_id != broker.identity:
        broker.forget_config()  # the reload reads the namespace id too, and says the namespace was wiped
    cfg = broker.config() if config_version is None else broker.config_of(config_version)
    preload_agent(cfg.agent)


def start_early(namespace: str, task_id: int, run_id: str, waited_s: float | None) -> None:
    """Start a run for the job that runs it next in this process (in a forking worker: before the fork). A
    start that Redis refused is left to the job, which tries again and meets the error itself."""
    try:
        _STARTED[run_id] = job_broker(namespace).start_run(task_id, run_id, waited_s)
    except (RunFenced, TaskNotFound) as err:
        _STARTED[run_id] = err
    except ClawqError as err:
        log.debug("run %s of task %s not started before its job: %s", run_id, task_id, err)


def forget_start(run_id: str) -> None:
    """Drop what :func:`start_early` kept for ``run_id`` (its job ran, or never will in this process)."""
    _STARTED.pop(run_id, None)


def _task_doc(broker: Broker, task_id: int, run_id: str) -> dict[str, Any] | None:
    return _doc_of(broker.get_task(task_id), run_id)


def _doc_of(task: Task, run_id: str) -> dict[str, Any] | None:
    """What the agent is given of ``task``, when ``run_id`` is its active run; else None."""
    if task.status is not TaskStatus.IN_PROGRESS or task.run_id != run_id:
        return None
    last = task.runs[-1] if task.runs else {}
    attempt = last.get("attempt", 1)
    return {
        "task_id": task.task_id, "board": task.board, "title": task.title, "prompt": task.prompt,
        "model": task.running_model, "provider": task.running_provider, "run_id": run_id,
        "run_count": task.run_count + 1, "attempt": attempt, "claim_index": len(task.runs),
        "claimed_at": last.get("claimed_at"), "context": task.context, "last_session": _last_session(task),
    }


def _last_session(task: Task) -> dict[str, Any] | None:
    """The session of the run that made the task's last outcome ({run_id, model, session_id}), if its agent
    CLI said one: a follow-up on the same model resumes it."""
    if not task.context:
        return None
    run_id = task.context[-1].get("run_id")
    for run in reversed(task.runs):
        if run.get("run_id") == run_id:
            sid = run.get("session_id")
            return {"run_id": run_id, "model": run.get("model"), "session_id": sid} if sid else None
    return None


def _queued_s() -> float | None:
    """How long the current RQ job waited since it was enqueued, right after its claim (None outside RQ)."""
    from rq import get_current_job

    return waited_s(get_current_job())


def waited_s(job: Any) -> float | None:
    """How long the RQ job ``job`` waited since it was enqueued (None without a job or its enqueue time)."""
    at: datetime.datetime | None = job.enqueued_at if job is not None else None
    if at is None:
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=datetime.UTC)
    return time.time() - at.timestamp()


def _wait_until_fenced(broker: Broker, task_id: int, run_id: str, limit_s: float) -> None:
    """A stalled agent: no heartbeats; hold the worker until the reaper takes the lease (or the limit)."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        try:
            if _task_doc(broker, task_id, run_id) is None:
                return
        except ClawqError:
            pass
        time.sleep(0.2)


class AgentRunFailed(Exception):
    """A run failed, and clawq recorded it (the task's retry is clawq's: the job has no RQ retries). Raised by
    the RQ job after the report, so RQ files the job in its failed registry with the root cause as the text;
    ``result`` is what the job would have returned."""

    def __init__(self, text: str, result: dict[str, Any]):
        super().__init__(text)
        self.result = result


def run_task(namespace: str, task_id: int, run_id: str) -> dict[str, Any]:
    """Run one claimed task; returns what happened (RQ keeps it as the job result). A run that failed, or whose
    outcome could not be reported, raises :class:`AgentRunFailed` once that is recorded."""
    out = _run(job_broker(namespace), task_id, run_id)
    if out.get("reported") and "error" in out:
        raise AgentRunFailed(f"{out['result']}: {out['error']}", out)
    if out.get("why") == "redis_unavailable":
        raise AgentRunFailed(f"outcome {out['outcome']} not reported: {out['error']}", out)
    return out


def _run(broker: Broker, task_id: int, run_id: str) -> dict[str, Any]:
    started = _STARTED.pop(run_id, None)
    try:  # beat at once (the job may have waited in the RQ queue), with the task, the config and the stat
        if isinstance(started, ClawqError):
            raise started
        task, cfg = started or broker.start_run(task_id, run_id, _queued_s())
    except (RunFenced, TaskNotFound):
        return {"task_id": task_id, "run_id": run_id, "reported": False, "why": "not the active run"}
    doc = _doc_of(task, run_id)
    if doc is None:  # the beat fences the run already: only a hand-edited task gets here
        return {"task_id": task_id, "run_id": run_id, "reported": False, "why": "not the active run"}
    stop = threading.Event()
    beat = Heartbeat(broker, task_id, run_id, cfg.watchdog.stale_in_progress_minutes * 60 / 3, stop,
                     task.lease_deadline)
    # the lease was just extended: heartbeats start once the agent outlives its first poll (RunContext.started)
    ctx = RunContext(task=doc, timeout_s=cfg.agent.timeout_minutes * 60, stop=stop, on_start=beat.start)
    missing = _missing_workdir(cfg, task.board)
    if missing is not None:  # not the task's fault: no attempt; the board pauses until someone fixes it
        log.error("board %s: workdir %s does not exist; board paused, task %s released", task.board, missing,
                  task_id)
        return _released_for_workdir(broker, task_id, run_id, task.board, missing)
    try:
        result = run_model(cfg, ctx)
        if result is None or beat.fenced:
            beat.halt()
            out: dict[str, Any] = {"task_id": task_id, "run_id": run_id, "reported": False, "why": "fenced"}
        else:  # heartbeats go on while the report waits for Redis
            out = _report(broker, task_id, run_id, clean_result(result), beat)
    except Stalled:
        beat.halt()
        _wait_until_fenced(broker, task_id, run_id, ctx.timeout_s)
        return {"task_id": task_id, "run_id": run_id, "reported": False, "why": "stalled"}
    finally:
        beat.halt()
    _keep_run_record(broker, task, ctx, doc, cfg)
    return out


def _keep_run_record(broker: Broker, task: Task, ctx: RunContext, doc: dict[str, Any], cfg: Config) -> None:
    """The run's log tail and what it cost, after its outcome (which matters more): a Redis error here is
    logged, never the outcome's loss."""
    try:
        broker.save_run_log(task.task_id, doc["run_id"], [clean_text(line) for line in ctx.log],
                            cfg.agent.log_tail_bytes)
        if ctx.meta:  # paid for whether or not the run could still report
            broker.record_usage(task.task_id, doc["run_id"], str(doc["model"]), task.board,
                                ctx.meta.get("session_id"), ctx.meta.get("usage") or {})
    except ClawqError as err:
        log.warning("task %s run %s: its log and usage were not kept: %s", task.task_id, doc["run_id"], err)


def _missing_workdir(cfg: Config, board: str) -> str | None:
    where = cfg.boards.get(board)
    if where is None or where.workdir is None or os.path.isdir(where.workdir):
        return None
    return where.workdir


def _released_for_workdir(broker: Broker, task_id: int, run_id: str, board: str, path: str) -> dict[str, Any]:
    try:
        broker.workdir_missing(task_id, run_id, board, path)
    except RunFenced:
        return {"task_id": task_id, "run_id": run_id, "reported": False, "why": "fenced"}
    return {"task_id": task_id, "run_id": run_id, "reported": True, "result": "workdir_missing"}


def _report(broker: Broker, task_id: int, run_id: str, result: AgentResult, beat: Heartbeat) -> dict[str, Any]:
    """Report ``result``. While Redis fails, try again with backoff until the lease would expire, heartbeating
    meanwhile. A first try that was applied although its reply was lost (a timeout during a pause) makes the
    next try a repeat, which its script recognises: the outcome is never recorded twice."""
    backoff, tries = _REPORT_BACKOFF_S, 0
    while True:
        tries += 1
        try:
            became = report(broker, task_id, run_id, result)
            break
        except (RunFenced, TaskNotFound):  # TaskNotFound: the task vanished with a wiped namespace
            return {"task_id": task_id, "run_id": run_id, "reported": False, "why": "fenced"}
        except (RedisUnavailable, ScriptError) as err:
            left = math.inf if beat.deadline is None else beat.deadline - broker.now()
            if left <= 0:
                log.error("task %s run %s: outcome %s not confirmed before the lease expired (%s); unless Redis "
                          "applied a try it had already read, the task will run again", task_id, run_id,
                          _what(result), err)
                return {"task_id": task_id, "run_id": run_id, "reported": False, "why": "redis_unavailable",
                        "error": str(err), "outcome": _what(result)}
            if tries == 1:
                log.warning("task %s run %s: cannot report %s yet (%s); trying again until the lease expires",
                            task_id, run_id, _what(result), err)
                beat.ensure_started()
        time.sleep(min(backoff, max(left - _REPORT_LAST_TRY_S, _REPORT_LAST_TRY_S)))  # one last try before it expires
        backoff = min(backoff * 2, _REPORT_BACKOFF_MAX_S)
    log.info("task %s run %s: %s%s", task_id, run_id, became, f" (after {tries} tries)" if tries > 1 else "")
    out = {"task_id": task_id, "run_id": run_id, "reported": True, "result": became}
    if isinstance(result, Failed):
        out["error"] = result.error
    return out


def _what(result: AgentResult) -> str:
    return "done" if isinstance(result, Done) else "rate limit" if isinstance(result, RateLimited) else result.cause
