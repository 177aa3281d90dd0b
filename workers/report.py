"""What an agent run's result does to its task: the agent-result policy above the broker.

A finished run is done (complete), rate limited (cool the model, requeue), or failed. A failure whose root
cause is the agent runtime rather than the task (:data:`RELEASE_CAUSES`) gives the run back without using an
attempt and holds every claim for a while; any other failure uses an attempt.
"""

from __future__ import annotations

from clawq.broker import Broker, TaskStatus

from .agent_output import AgentResult, Done, RateLimited

__all__ = ["MODEL_CAUSES", "RELEASE_CAUSES", "report"]

#: Root causes that give the run back without using an attempt (the agent runtime, not the task, failed),
#: with how long they hold claims (seconds): the runtime is down or refuses this client.
RELEASE_CAUSES: dict[str, float] = {"pairing": 30.0, "agent_unreachable": 30.0}
#: Root causes that cool the run's model for watchdog.auth_cooldown_minutes (no attempt used): its agent is
#: not logged in or its key is refused (auth), or its entry cannot run (agent_config: no such executable, an
#: env_from variable missing, an unreadable prompt template). The cooldown goes through rate_limited_run with
#: the cause as its class, so the claim skips the model and the task falls to the next model of its chain.
MODEL_CAUSES = frozenset({"auth", "agent_config"})


def report(broker: Broker, task_id: int, run_id: str, result: AgentResult) -> str:
    """Apply what an agent run produced; returns the event it became (completed, follow_up, …).

    Raises what the broker call raises (RunFenced when the run is no longer the task's active run).
    """
    if isinstance(result, Done):
        done = broker.complete(task_id, run_id, result.outcome)
        return "follow_up" if done.status is TaskStatus.UP_NEXT else "completed"
    if isinstance(result, RateLimited):
        broker.rate_limited(task_id, run_id, retry_after=result.retry_after, message=result.message,
                            reset_at=result.reset_at, quota=result.quota)
        return "quota_reached" if result.quota else "rate_limit"
    if result.cause in RELEASE_CAUSES:
        broker.release(task_id, run_id, result.cause, result.error, hold_s=RELEASE_CAUSES[result.cause])
        return "released"
    if result.cause in MODEL_CAUSES:
        minutes = broker.config().watchdog.auth_cooldown_minutes
        broker.rate_limited(task_id, run_id, retry_after=minutes * 60, message=result.error, quota=False,
                            cause=result.cause)
        return result.cause
    broker.fail(task_id, run_id, result.error, cause=result.cause)
    return result.cause
