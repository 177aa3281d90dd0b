"""The RQ job that runs one claimed task: check the lease, heartbeat, run the agent, report.

``run_task(namespace, task_id, run_id)`` is what the dispatcher enqueues (RQ job id = run id). It finds
Redis through ``CLAWQ_REDIS_URL`` (``clawq worker --redis-url`` sets it) or, under a plain ``rq worker``,
through the worker's own connection.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import redis

from broker import Broker, ClawqError, RunFenced, TaskStatus
from broker.agent_output import Failed

from .runners import RunContext, Stalled, run_agent

__all__ = ["Heartbeat", "job_broker", "run_task"]

log = logging.getLogger("clawq.job")

#: Root causes that also hold claims for a while: the agent runtime is down, not the task.
_GATE_CAUSES = {"pairing": 30.0, "agent_unreachable": 30.0}


class Heartbeat(threading.Thread):
    """Beats every ``interval`` seconds; when fenced, sets ``stop`` (the agent is stopped)."""

    def __init__(self, broker: Broker, task_id: int, run_id: str, interval: float, stop: threading.Event):
        super().__init__(daemon=True, name=f"clawq-heartbeat-{task_id}")
        self.broker, self.task_id, self.run_id = broker, task_id, run_id
        self.interval, self.stop = interval, stop
        self.fenced = False
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                self.broker.heartbeat(self.task_id, self.run_id)
            except RunFenced:
                self.fenced = True
                self.stop.set()
                return
            except ClawqError as err:  # Redis blip: try again at the next beat
                log.warning("heartbeat of task %s failed: %s", self.task_id, err)

    def halt(self) -> None:
        self._halt.set()


def job_broker(namespace: str) -> Broker:
    """A broker for this job: CLAWQ_REDIS_URL, else the RQ worker's own connection."""
    url = os.environ.get("CLAWQ_REDIS_URL")
    if url:
        return Broker.from_url(url, namespace)
    from rq import get_current_job

    job = get_current_job()
    if job is None:
        raise ClawqError("no CLAWQ_REDIS_URL and not running inside an RQ job")
    pool = job.connection.connection_pool
    kwargs = {**pool.connection_kwargs, "decode_responses": True}
    client = redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))
    broker = Broker(client, namespace)
    broker.connect()
    return broker


def _task_doc(broker: Broker, task_id: int, run_id: str) -> dict[str, Any] | None:
    task = broker.get_task(task_id)
    if task.status is not TaskStatus.IN_PROGRESS or task.run_id != run_id:
        return None
    last = task.runs[-1] if task.runs else {}
    attempt = last.get("attempt", 1)
    return {
        "task_id": task.task_id, "board": task.board, "title": task.title, "prompt": task.prompt,
        "model": task.running_model, "provider": task.running_provider, "run_id": run_id,
        "run_count": task.run_count + 1, "attempt": attempt, "claim_index": len(task.runs),
        "claimed_at": last.get("claimed_at"), "context": task.context,
    }


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


def run_task(namespace: str, task_id: int, run_id: str) -> dict[str, Any]:
    """Run one claimed task; returns what happened (RQ keeps it as the job result)."""
    broker = job_broker(namespace)
    try:
        return _run(broker, task_id, run_id)
    finally:
        broker.close()


def _run(broker: Broker, task_id: int, run_id: str) -> dict[str, Any]:
    doc = _task_doc(broker, task_id, run_id)
    if doc is None:
        return {"task_id": task_id, "run_id": run_id, "reported": False, "why": "not the active run"}
    try:
        broker.heartbeat(task_id, run_id)  # at once: the job may have waited in the RQ queue
    except RunFenced:
        return {"task_id": task_id, "run_id": run_id, "reported": False, "why": "fenced"}
    if doc["claimed_at"]:
        broker.observe_claim_to_start(time.time() - float(doc["claimed_at"]))
    cfg = broker.config()
    ctx = RunContext(task=doc, timeout_s=cfg.agent.timeout_minutes * 60)
    beat = Heartbeat(broker, task_id, run_id, cfg.watchdog.stale_in_progress_minutes * 60 / 3, ctx.stop)
    beat.start()
    try:
        result = run_agent(cfg.agent, ctx)
    except Stalled:
        beat.halt()
        _wait_until_fenced(broker, task_id, run_id, ctx.timeout_s)
        return {"task_id": task_id, "run_id": run_id, "reported": False, "why": "stalled"}
    finally:
        beat.halt()
    broker.save_run_log(task_id, run_id, ctx.log, cfg.agent.log_tail_bytes)
    if result is None or beat.fenced:
        return {"task_id": task_id, "run_id": run_id, "reported": False, "why": "fenced"}
    return _report(broker, task_id, run_id, result)


def _report(broker: Broker, task_id: int, run_id: str, result: Any) -> dict[str, Any]:
    try:
        became = broker.report(task_id, run_id, result)
    except RunFenced:
        return {"task_id": task_id, "run_id": run_id, "reported": False, "why": "fenced"}
    if isinstance(result, Failed) and result.cause in _GATE_CAUSES:
        broker.trip_agent_gate(_GATE_CAUSES[result.cause], f"{result.cause}: {result.error}")
    log.info("task %s run %s: %s", task_id, run_id, became)
    return {"task_id": task_id, "run_id": run_id, "reported": True, "result": became}
