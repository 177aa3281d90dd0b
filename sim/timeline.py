"""The run timeline the checker reads, built from the tasks' histories after a run (simulation or chaos)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from clawq.broker import Broker, Task
from clawq.broker.config import Config

from .checker import BreakerRules, Run, TaskFinal, Timeline

__all__ = ["collect", "runs_of", "task_final"]

#: History outcome -> checker outcome, where the names differ.
_OUTCOME = {"rate_limit": "rate_limited"}


def runs_of(task: Task) -> list[Run]:
    """One record per claim of ``task``, from its history."""
    return [
        Run(task_id=task.task_id, board=task.board, model=r["model"], provider=r["provider"], run_id=r["run_id"],
            run_count=int(r["run_count"]), start=float(r["claimed_at"]),
            end=float(r["ended_at"]) if "ended_at" in r else None,
            outcome=_OUTCOME.get(r.get("outcome", ""), r.get("outcome")), detail=str(r.get("error", "")))
        for r in task.runs
    ]


def task_final(task: Task, cfg: Config) -> TaskFinal:
    """The task's final state, the models it was allowed, and the runs that asked for a follow-up."""
    allowed = tuple(cfg.chains[task.chain]) if task.chain else (task.model or "",)
    follow = tuple(str(c["run_id"]) for c in task.context if c.get("next_prompt"))
    return TaskFinal(task.task_id, task.board, task.status.value, task.run_count, allowed, follow)


def collect(broker: Broker, tasks: list[Task], started: float, finished: float, *,
            notifications: Iterable[dict[str, Any]] = (), idle_limit_s: float | None = None) -> Timeline:
    """The timeline of ``tasks`` under the broker's config; ``idle_limit_s`` defaults to three leases."""
    cfg = broker.config()
    return Timeline(
        tasks=[task_final(t, cfg) for t in tasks],
        runs=[r for t in tasks for r in runs_of(t)],
        model_caps=dict(cfg.limits.model_max_inflight),
        provider_caps=dict(cfg.limits.provider_max_inflight),
        global_cap_at=lambda ts: cfg.global_cap_at(ts)[0],
        notifications=list(notifications),
        started=started, finished=finished,
        summary_interval_s=cfg.notify.summary_interval_minutes * 60,
        idle_limit_s=idle_limit_s if idle_limit_s is not None
        else max(10.0, cfg.watchdog.stale_in_progress_minutes * 60 * 3),
        max_runs=cfg.followup.max_runs,
        breaker=_breaker_rules(cfg),
    )


def _breaker_rules(cfg: Config) -> BreakerRules | None:
    s = cfg.script_settings()
    if not s["breaker_failures"]:
        return None
    return BreakerRules(s["breaker_failures"], s["breaker_window_ms"], s["breaker_cooldown_ms"],
                        s["breaker_max_cooldown_ms"])
