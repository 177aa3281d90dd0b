"""Agent jobs are ordinary RQ jobs that rq-dashboard shows with who runs what."""

from __future__ import annotations

from typing import Any

import pytest
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


def test_a_batch_of_claims_becomes_one_job_each_in_one_transaction(broker: Broker, redis_url: str) -> None:
    for board in ("web", "api", "docs"):
        broker.add(board, f"Fix {board}", chain="coding")
    claims, _ = broker.claim_many(3)
    conn = redis.Redis.from_url(redis_url)
    sent: list[bytes] = []
    real = conn.connection_pool.connection_class.send_packed_command

    def spy(self: Any, command: Any, check_health: bool = True) -> Any:
        sent.append(command if isinstance(command, bytes) else b"".join(bytes(c) for c in command))
        return real(self, command, check_health)

    try:
        enqueue = rq_enqueuer(broker, conn)
        Queue(broker.config().agent.queue, connection=conn).get_redis_server_version()  # connected, version known
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(conn.connection_pool.connection_class, "send_packed_command", spy)
            enqueue.many(claims)
        assert len(sent) == 1 and sent[0].startswith(b"*1\r\n$5\r\nMULTI") and sent[0].endswith(b"EXEC\r\n"), \
            "one round trip, one transaction"
        queue = Queue(broker.config().agent.queue, connection=conn)
        assert queue.job_ids == [c.run_id for c in claims]
        for claim in claims:
            job = queue.fetch_job(claim.run_id)
            assert job is not None and job.get_status() == "queued"
            assert job.description == (f"clawq {claim.board}#{claim.task_id} on {claim.model} ({claim.provider}) "
                                       "run 1 attempt 1")
            assert job.meta["task_id"] == claim.task_id and job.meta["board"] == claim.board
            assert job.meta["config_version"] == broker.config_version
            assert job.args == (broker.namespace, claim.task_id, claim.run_id)
            assert job.timeout == int(broker.config().agent.timeout_minutes * 60) + 300
        assert enqueue.watching == 3
    finally:
        conn.close()
