"""The RQ side: enqueue a claim as an agent job, and run a worker on the agents queue."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import redis
from rq import Queue, SimpleWorker, Worker
from rq.job import Job

from clawq.broker import Broker, Claim, ClawqError
from clawq.broker.connection import rq_connection

from .job import prepare, run_task

__all__ = ["ClawqSimpleWorker", "ClawqWorker", "job_meta", "rq_enqueuer", "run_worker"]

log = logging.getLogger("clawq.worker")

#: Extra time RQ gives a job beyond agent.timeout_minutes (our own timeout fires first).
_JOB_TIMEOUT_MARGIN_S = 300


def job_meta(namespace: str, claim: Claim, config_version: str = "") -> dict[str, Any]:
    """What rq-dashboard shows and a worker needs: who runs what, and the config version the claim checked."""
    return {
        "namespace": namespace, "task_id": claim.task_id, "board": claim.board, "model": claim.model,
        "provider": claim.provider, "run_count": claim.run_count, "attempt": claim.attempt,
        "config_version": config_version,
    }


def rq_enqueuer(broker: Broker, connection: redis.Redis) -> Any:
    """A function that enqueues a claim as an RQ job (job id = run id) on agent.queue, in one MULTI (RQ alone
    sends two round trips: the queue's registration, then the job and its push)."""

    def enqueue(claim: Claim) -> None:
        cfg = broker.config().agent
        queue = Queue(cfg.queue, connection=connection)
        with connection.pipeline() as pipe:
            queue.enqueue(
                run_task, broker.namespace, claim.task_id, claim.run_id,
                job_id=claim.run_id,
                description=(f"clawq {claim.board}#{claim.task_id} on {claim.model} ({claim.provider}) "
                             f"run {claim.run_count} attempt {claim.attempt}"),
                meta=job_meta(broker.namespace, claim, broker.config_version),
                job_timeout=int(cfg.timeout_minutes * 60) + _JOB_TIMEOUT_MARGIN_S,
                result_ttl=86400, failure_ttl=7 * 86400, pipeline=pipe,
            )
            pipe.execute()

    return enqueue


def _prepare(job: Job) -> None:
    """Ready this process for a clawq job (see :func:`workers.job.prepare`); any other job is left alone. A
    failure here (Redis down, a bad namespace) is the job's to report: it does the same again."""
    if job.func_name != f"{run_task.__module__}.{run_task.__name__}" or not job.args:
        return
    try:
        prepare(str(job.args[0]), job.connection, job.meta.get("config_version") or None)
    except ClawqError as err:  # e.g. Redis is down: the job fails on it and RQ says so
        log.debug("cannot prepare job %s: %s", job.id, err)
    except Exception:  # never the worker's death: the job meets the same error and reports it
        log.warning("cannot prepare job %s", job.id, exc_info=True)


class ClawqWorker(Worker):
    """RQ's forking worker that makes a job's broker, config and agent before forking, once per worker."""

    def execute_job(self, job: Job, queue: Queue) -> None:
        _prepare(job)
        super().execute_job(job, queue)


class ClawqSimpleWorker(SimpleWorker):
    """RQ's in-process worker, prepared the same way (so its jobs reuse one broker)."""

    def execute_job(self, job: Job, queue: Queue) -> None:
        _prepare(job)
        super().execute_job(job, queue)


class _OncePerOutage(logging.Filter):
    """RQ logs every reconnection attempt; let the first through and drop repeats until Redis is back."""

    _PREFIX = "could not connect to Redis"

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self._PREFIX not in message:
            if self.down:
                self.down = False
                log.warning("Redis is reachable again: the worker resumes")
            return True
        if self.down:
            return False
        self.down = True
        return True


def run_worker(redis_url: str, queue: str, *, rq_url: str | None = None, burst: bool = False,
               name: str | None = None, simple: bool = False) -> bool:
    """Run an RQ worker on ``queue``; its jobs find clawq's Redis through CLAWQ_REDIS_URL.

    RQ's worker dies when Redis goes away while it watches a job; this loop starts a new one, with
    backoff, saying so once, so a Redis restart never shrinks the fleet.
    """
    os.environ["CLAWQ_REDIS_URL"] = redis_url
    logging.getLogger("rq.worker").addFilter(_OncePerOutage())
    cls: Any = ClawqSimpleWorker if simple else ClawqWorker
    backoff, outage = 1.0, False
    worker: Any = None
    while True:
        connection = rq_connection(rq_url or redis_url, lean=True)
        try:
            if worker is not None:  # the dead worker's registration survives in Redis: clear it first
                worker.register_death()
            worker = cls([Queue(queue, connection=connection)], connection=connection, name=name)
            return bool(worker.work(burst=burst))
        except (redis.ConnectionError, redis.TimeoutError) as err:
            if not outage:
                log.error("Redis went away (%s): restarting the worker with backoff", err)
            outage = True
            time.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
        finally:
            connection.close()
