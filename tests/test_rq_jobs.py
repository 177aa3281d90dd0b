"""Agent jobs are ordinary RQ jobs that rq-dashboard shows with who runs what."""

from __future__ import annotations

import redis
from rq import Queue

from clawq.broker import Broker
from clawq.workers.rq_glue import rq_enqueuer


def test_agent_job_carries_board_task_model(broker: Broker, redis_url: str) -> None:
    broker.add("web", "Fix the form", chain="coding")
    claim = broker.claim()
    conn = redis.Redis.from_url(redis_url)
    try:
        rq_enqueuer(broker, conn)(claim)
        queue = Queue(broker.config().agent.queue, connection=conn)
        assert queue.job_ids == [claim.run_id]  # RQ job id = run id
        job = queue.fetch_job(claim.run_id)
        assert job is not None
        assert job.description == f"clawq web#{claim.task_id} on codex (openai) run 1 attempt 1"
        assert job.meta == {"namespace": broker.namespace, "task_id": claim.task_id, "board": "web",
                            "model": "codex", "provider": "openai", "run_count": 1, "attempt": 1,
                            "config_version": broker.config_version, "namespace_id": broker.identity}
        assert broker.config_version  # the version the claim checked: a worker reads the config again only if newer
        assert job.func_name == "clawq.workers.job.run_task"
        assert job.args == (broker.namespace, claim.task_id, claim.run_id)
    finally:
        conn.close()
