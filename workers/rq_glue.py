"""The RQ side: enqueue a claim as an agent job, and run a worker on the agents queue."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import redis
from redis.client import PubSubWorkerThread
from rq import Queue, SimpleWorker, Worker
from rq.job import Job

from clawq.broker import Broker, Claim, ClawqError
from clawq.broker.connection import rq_connection
from clawq.broker.errors import NamespaceWiped

from .job import AgentRunFailed, forget_start, prepare, run_task, start_early, waited_s

__all__ = ["ClawqSimpleWorker", "ClawqWorker", "RqEnqueuer", "job_meta", "rq_enqueuer", "run_worker"]

log = logging.getLogger("clawq.worker")

#: Extra time RQ gives a job beyond agent.timeout_minutes (our own timeout fires first).
_JOB_TIMEOUT_MARGIN_S = 300
#: How often a worker tries a lost Redis again (so it resumes within a second or two of Redis coming back).
_RETRY_S = 1.0


def job_meta(namespace: str, claim: Claim, config_version: str = "", namespace_id: str = "") -> dict[str, Any]:
    """What rq-dashboard shows and a worker needs: who runs what, the config version the claim checked, and
    the identity of the namespace it was claimed in (a worker that knew another one learns of a wipe)."""
    return {
        "namespace": namespace, "task_id": claim.task_id, "board": claim.board, "model": claim.model,
        "provider": claim.provider, "run_count": claim.run_count, "attempt": claim.attempt,
        "config_version": config_version, "namespace_id": namespace_id,
    }


#: RQ job statuses after which the job will not run (again): its run has reported, or its lease will expire.
_RAN = frozenset({"finished", "failed", "stopped"})


class RqEnqueuer:
    """Enqueues claims as RQ jobs (job id = run id) on agent.queue: a dispatcher's batch of claims in one MULTI
    (:meth:`many`: one round trip for the batch, all of its jobs or none), and remembers them until they have
    run, so that :meth:`lost` can tell which runs lost their job before it ran (deleted or cancelled in
    rq-dashboard). Each job is an ordinary RQ job, with its own description and meta."""

    def __init__(self, broker: Broker, connection: redis.Redis):
        self.broker, self.connection = broker, connection
        self._sent: dict[str, int] = {}  #: run id -> task id, for the jobs this dispatcher enqueued

    def __call__(self, claim: Claim) -> None:
        self.many([claim])

    def many(self, claims: Sequence[Claim]) -> None:
        """Enqueue a job per claim, in one transaction: when this raises, none of them was enqueued (unless
        the reply alone was lost; a job whose run was given back is then fenced when it starts)."""
        if not claims:
            return
        broker = self.broker
        cfg = broker.config().agent
        queue = Queue(cfg.queue, connection=self.connection)
        meta = {"config_version": broker.config_version, "namespace_id": broker.identity or ""}
        timeout = int(cfg.timeout_minutes * 60) + _JOB_TIMEOUT_MARGIN_S
        with self.connection.pipeline() as pipe:
            queue.enqueue_many([
                Queue.prepare_data(
                    run_task, (broker.namespace, claim.task_id, claim.run_id),
                    job_id=claim.run_id,
                    description=(f"clawq {claim.board}#{claim.task_id} on {claim.model} ({claim.provider}) "
                                 f"run {claim.run_count} attempt {claim.attempt}"),
                    meta=job_meta(broker.namespace, claim, **meta),
                    timeout=timeout, result_ttl=86400, failure_ttl=7 * 86400,
                ) for claim in claims
            ], pipeline=pipe)
            pipe.execute()
        for claim in claims:
            self._sent[claim.run_id] = claim.task_id

    @property
    def watching(self) -> int:
        """How many enqueued jobs have not run yet."""
        return len(self._sent)

    def lost(self) -> list[tuple[int, str]]:
        """(task id, run id) of each remembered job that is gone or cancelled: it will never run. Jobs that ran
        are forgotten. One pipelined read of the jobs' status."""
        if not self._sent:
            return []
        runs = list(self._sent.items())
        with self.connection.pipeline(transaction=False) as pipe:
            for run_id, _ in runs:
                pipe.hget(Job.key_for(run_id), "status")
            statuses = pipe.execute()
        gone = []
        for (run_id, task_id), raw in zip(runs, statuses, strict=True):
            status = raw.decode() if isinstance(raw, bytes) else raw
            if status is None or status == "canceled":
                gone.append((task_id, run_id))
            if status is None or status == "canceled" or status in _RAN:
                del self._sent[run_id]
        return gone


def rq_enqueuer(broker: Broker, connection: redis.Redis) -> RqEnqueuer:
    """The dispatcher's enqueue function for RQ (see :class:`RqEnqueuer`)."""
    return RqEnqueuer(broker, connection)


def _prepare(job: Job) -> str | None:
    """Ready this process for a clawq job (see :func:`workers.job.prepare`) and start its run
    (:func:`workers.job.start_early`); returns the run id (None for any other job, which is left alone). A
    failure here (Redis down, a bad namespace) is the job's to report: it does the same again."""
    if job.func_name != f"{run_task.__module__}.{run_task.__name__}" or len(job.args) != 3:
        return None
    namespace, task_id, run_id = job.args
    try:
        prepare(str(namespace), job.connection, job.meta.get("config_version") or None,
                job.meta.get("namespace_id") or None)
        start_early(str(namespace), int(task_id), str(run_id), waited_s(job))
    except NamespaceWiped as err:  # said once per wipe: the broker now knows the new identity
        log.error("NAMESPACE WIPED: %s. Runs of vanished tasks stop at their next heartbeat.", err)
    except ClawqError as err:  # e.g. Redis is down: the job fails on it and RQ says so
        log.debug("cannot prepare job %s: %s", job.id, err)
    except Exception:  # never the worker's death: the job meets the same error and reports it
        log.warning("cannot prepare job %s", job.id, exc_info=True)
    return str(run_id)


class _Outage:
    """What the worker says about Redis: one line when it goes away, one when it answers again.

    RQ logs every reconnection attempt, and a worker that loses Redis while it watches a job quits with a long
    traceback; :class:`_OutageFilter` turns both into this state. "Reachable again" is said only after a write
    succeeded (the worker's own RQ heartbeat), never on a guess.
    """

    def __init__(self) -> None:
        self.down = False

    def lost(self, why: str) -> None:
        if not self.down:
            self.down = True
            log.error("Redis is unreachable (%s): the worker waits for it", _one_line(why))

    def back(self) -> None:
        if self.down:
            self.down = False
            log.warning("Redis is reachable again: the worker resumes")


_OUTAGE = _Outage()
_CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _connection_error(exc_info: Any) -> BaseException | None:
    """The connection error behind a log record's exception (or its cause), if that is what it is."""
    err = exc_info[1] if isinstance(exc_info, tuple) and len(exc_info) == 3 else None
    seen = 0
    while err is not None and seen < 5:
        if isinstance(err, _CONNECTION_ERRORS):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


class _OutageFilter(logging.Filter):
    """RQ's records about a lost Redis (retries, a traceback when it quits) become one :class:`_Outage` line."""

    _PREFIX = "could not connect to Redis"

    def __init__(self, outage: _Outage) -> None:
        super().__init__()
        self.outage = outage

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self._PREFIX in message:
            self.outage.lost(message.partition("Redis instance:")[2].partition(" retrying")[0] or message)
            return False
        err = _connection_error(record.exc_info)
        if err is not None:
            self.outage.lost(str(err))
            return False
        return True


def _ask_pubsub_thread_to_stop(thread: PubSubWorkerThread) -> None:
    """Before RQ unsubscribes: tell the worker's pubsub thread to stop, without waiting for it.

    RQ's ``unsubscribe`` sends UNSUBSCRIBE, then calls the thread's ``stop()``, which in redis-py 8 waits for the
    thread to end. If the thread reads the UNSUBSCRIBE reply before ``stop()`` clears its flag (a busy machine),
    it loops once more, finds no subscription, and waits for one for RQ's ``sleep_time`` (60 s): the worker
    then takes a minute to exit. With the flag cleared first, that reply ends the thread's loop at once.
    """
    try:
        thread.stop(timeout=0)  # redis-py 8: clear the flag, do not wait
    except TypeError:  # redis-py 7: stop() takes no timeout and never waits
        thread.stop()


class _Reporting:
    """Mixin: a successful RQ heartbeat (a write) ends an outage; a job is prepared (and its run started) before
    it runs; the pubsub
    thread is told to stop before RQ unsubscribes (so a worker exits at once)."""

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        super().heartbeat(timeout, pipeline)  # type: ignore[misc]
        if pipeline is None:
            _OUTAGE.back()

    def execute_job(self, job: Job, queue: Queue) -> None:
        run_id = _prepare(job)
        try:
            super().execute_job(job, queue)  # type: ignore[misc]
        finally:
            if run_id is not None:
                forget_start(run_id)

    def unsubscribe(self) -> None:
        """RQ's unsubscribe with every wait bounded. RQ's calls the thread's ``stop()``, which in redis-py 8 waits
        for the thread without a limit; a thread caught waiting for a subscription then holds the worker's exit
        for RQ's ``sleep_time`` (60 s), or longer on a loaded machine. The thread is a daemon: one that is still
        waiting after a second ends with the process."""
        thread: PubSubWorkerThread | None = getattr(self, "pubsub_thread", None)
        if thread is None:
            return
        self.pubsub_thread = None
        _ask_pubsub_thread_to_stop(thread)
        pubsub: Any = getattr(self, "pubsub", None)
        with contextlib.suppress(redis.RedisError, OSError):
            if pubsub is not None:
                pubsub.unsubscribe()
        thread.join(timeout=1)
        if not thread.is_alive() and pubsub is not None:
            pubsub.close()

    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        """A failed agent run is an event, not a bug: one log line instead of RQ's traceback (RQ still files
        the job as failed, with the text, and runs its exception handlers)."""
        if isinstance(exc_info[1], AgentRunFailed):
            log.info("job %s: agent run failed: %s", job.id, exc_info[1])
            for handler in self._exc_handlers:  # type: ignore[attr-defined]
                go_on = handler(job, *exc_info)
                if go_on is not None and not go_on:  # RQ's rule: an explicit falsy value ends the chain
                    break
            return
        super().handle_exception(job, *exc_info)  # type: ignore[misc]


class ClawqWorker(_Reporting, Worker):
    """RQ's forking worker that makes a job's broker, config and agent before forking, once per worker. It
    retries a lost Redis every second (RQ doubles its wait up to a minute, so it would resume late)."""

    max_connection_wait_time = _RETRY_S


class ClawqSimpleWorker(_Reporting, SimpleWorker):
    """RQ's in-process worker, prepared the same way (so its jobs reuse one broker)."""

    max_connection_wait_time = _RETRY_S


def run_worker(redis_url: str, queue: str, *, rq_url: str | None = None, burst: bool = False,
               name: str | None = None, simple: bool = False) -> bool:
    """Run an RQ worker on ``queue``; its jobs find clawq's Redis through CLAWQ_REDIS_URL.

    RQ's worker quits when Redis goes away while it watches a job; this loop starts a new one every second
    until Redis answers, saying so once, so a Redis restart never shrinks the fleet.
    """
    os.environ["CLAWQ_REDIS_URL"] = redis_url
    logging.getLogger("rq.worker").addFilter(_OutageFilter(_OUTAGE))
    cls: Any = ClawqSimpleWorker if simple else ClawqWorker
    worker: Any = None
    while True:
        connection = rq_connection(rq_url or redis_url, lean=True)
        try:
            if worker is not None:  # the dead worker's registration survives in Redis: clear it first
                worker.register_death()
            worker = cls([Queue(queue, connection=connection)], connection=connection, name=name)
            worked = bool(worker.work(burst=burst))
            if burst or worker._stop_requested or not _OUTAGE.down:
                return worked
            time.sleep(_RETRY_S)  # RQ quit on a lost Redis (logged once by the filter): start a new worker
        except _CONNECTION_ERRORS as err:
            _OUTAGE.lost(str(err))
            time.sleep(_RETRY_S)
        finally:
            connection.close()
