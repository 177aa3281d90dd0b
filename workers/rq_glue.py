"""The RQ side: enqueue a claim as an agent job, and run a worker on the agents queue."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import redis
from rq import Queue, Worker

from broker import Broker, Claim
from broker.connection import rq_connection

from .job import run_task

__all__ = ["job_meta", "rq_enqueuer", "run_worker"]

log = logging.getLogger("clawq.worker")

#: Extra time RQ gives a job beyond agent.timeout_minutes (our own timeout fires first).
_JOB_TIMEOUT_MARGIN_S = 300


def job_meta(namespace: str, claim: Claim) -> dict[str, Any]:
    """What rq-dashboard shows and a worker needs: who runs what."""
    return {
        "namespace": namespace, "task_id": claim.task_id, "board": claim.board, "model": claim.model,
        "provider": claim.provider, "run_count": claim.run_count, "attempt": claim.attempt,
    }


def rq_enqueuer(broker: Broker, connection: redis.Redis) -> Any:
    """A function that enqueues a claim as an RQ job (job id = run id) on agent.queue."""

    def enqueue(claim: Claim) -> None:
        cfg = broker.config().agent
        queue = Queue(cfg.queue, connection=connection)
        queue.enqueue(
            run_task, broker.namespace, claim.task_id, claim.run_id,
            job_id=claim.run_id,
            description=(f"clawq {claim.board}#{claim.task_id} on {claim.model} ({claim.provider}) "
                         f"run {claim.run_count} attempt {claim.attempt}"),
            meta=job_meta(broker.namespace, claim),
            job_timeout=int(cfg.timeout_minutes * 60) + _JOB_TIMEOUT_MARGIN_S,
            result_ttl=86400, failure_ttl=7 * 86400,
        )

    return enqueue


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
               name: str | None = None, with_scheduler: bool = False, simple: bool = False) -> bool:
    """Run an RQ worker on ``queue``; its jobs find clawq's Redis through CLAWQ_REDIS_URL.

    RQ's worker dies when Redis goes away while it watches a job; this loop starts a new one, with
    backoff, saying so once, so a Redis restart never shrinks the fleet.
    """
    os.environ["CLAWQ_REDIS_URL"] = redis_url
    logging.getLogger("rq.worker").addFilter(_OncePerOutage())
    cls: Any = Worker
    if simple:
        from rq import SimpleWorker

        cls = SimpleWorker
    backoff, outage = 1.0, False
    worker: Any = None
    while True:
        connection = rq_connection(rq_url or redis_url)
        try:
            if worker is not None:  # the dead worker's registration survives in Redis: clear it first
                worker.register_death()
            worker = cls([Queue(queue, connection=connection)], connection=connection, name=name)
            return bool(worker.work(burst=burst, with_scheduler=with_scheduler))
        except (redis.ConnectionError, redis.TimeoutError) as err:
            if not outage:
                log.error("Redis went away (%s): restarting the worker with backoff", err)
            outage = True
            time.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
        finally:
            connection.close()
