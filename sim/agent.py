"""The simulated agent: deterministic from (seed, task, claim index), timed in simulated minutes.

Each run draws, from a generator seeded by those values, a duration and one fate: a rate-limit answer (in
one of several real providers' formats, with a reset the broker must parse), a failure, a stall (the agent
hangs and its heartbeats stop), or success; a first run asks for a follow-up at ``follow_up_rate``.

A production worker runs it when the config says ``agent.runner: simulated``: :mod:`workers.runners` looks
:func:`run_simulated` up by its import path, so nothing in ``workers/`` imports this package.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from clawq.broker import Outcome
from clawq.broker.config import AgentConfig, SimulatedAgentConfig
from clawq.broker.signals import parse_signal
from clawq.workers.agent_output import AgentResult, Done, Failed, RateLimited
from clawq.workers.runners import RunContext, Stalled

__all__ = ["rate_limit_message", "run_simulated", "simulated_result"]


def _rng(cfg: SimulatedAgentConfig, task: dict[str, Any]) -> random.Random:
    """Seeded by the task and how many times it was claimed: the same plan whatever the timing."""
    key = f"{cfg.seed}:{task['task_id']}:{task.get('claim_index', task['run_count'])}"
    return random.Random(key)


def _openai(s: float, now: float) -> str:
    return f"Error code: 429 - rate_limit_exceeded: Rate limit reached for requests. Please try again in {s:.3f}s."


def _gemini(s: float, now: float) -> str:
    return json.dumps({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "Quota exceeded", "details": [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{s:.3f}s"}]}})


def _anthropic(s: float, now: float) -> str:
    reset = datetime.fromtimestamp(now + s, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return f"HTTP 429 rate_limit_error\nretry-after: {max(1, round(s))}\nanthropic-ratelimit-requests-reset: {reset}"


def _codex(s: float, now: float) -> str:
    return json.dumps({"error": {"type": "usage_limit_reached", "message": "You've hit your usage limit.",
                                 "resets_in_seconds": round(s, 3)}})


_FORMATS: tuple[Callable[[float, float], str], ...] = (_openai, _gemini, _anthropic, _codex)


def rate_limit_message(rng: random.Random, seconds: float, now: float) -> str:
    """A rate-limit text in one of several providers' formats, resetting ``seconds`` from ``now``."""
    return rng.choice(_FORMATS)(seconds, now)


def _sleep(stop: threading.Event, seconds: float) -> bool:
    """Sleep, waking early when stopped; True when the sleep completed."""
    return not stop.wait(max(0.0, seconds))


def _rate_limited(cfg: SimulatedAgentConfig, rng: random.Random, now: float, quota: bool) -> AgentResult:
    cooldown = rng.uniform(5, 30) / cfg.speed  # 5-30 simulated minutes, in real seconds
    message = _codex(cooldown, now) if quota else rate_limit_message(rng, cooldown, now)
    signal = parse_signal(message, now)
    return RateLimited(message=message, reset_at=signal.reset_at, quota=quota)


def _drawn_fate(cfg: SimulatedAgentConfig, rng: random.Random, task: dict[str, Any]) -> str:
    draw = rng.random()
    for fate, rate in (("rate_limit", cfg.rate_limit_rate), ("fail", cfg.fail_rate), ("stall", cfg.stall_rate)):
        if draw < rate:
            return fate
        draw -= rate
    follow = task["run_count"] == 1 and rng.random() < cfg.follow_up_rate
    return "follow_up" if follow else "done"


#: What Anthropic's API answers while it is overloaded (HTTP 529).
OVERLOADED = '{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}'


def _fate(cfg: SimulatedAgentConfig, rng: random.Random, task: dict[str, Any], now: float) -> AgentResult:
    out = cfg.outage
    if out is not None and task.get("provider") == out.provider and out.start <= now < out.end:
        return Failed(error=OVERLOADED, cause=str(parse_signal(OVERLOADED, now).klass.value))
    planned = cfg.plan.get(f"{task['task_id']}:{task.get('claim_index', task['run_count'])}")
    fate = planned or _drawn_fate(cfg, rng, task)
    if fate in ("rate_limit", "quota"):
        return _rate_limited(cfg, rng, now, fate == "quota")
    if fate == "fail":
        return Failed(error="simulated failure: the test suite did not pass", cause="failed")
    if fate == "stall":
        raise Stalled(f"task {task['task_id']} stalls")
    summary = f"simulated run {task['run_count']} of task {task['task_id']} on {task['model']}"
    if fate == "follow_up":
        return Done(Outcome(needs_follow_up=True, next_prompt="Continue: add the missing tests.", summary=summary))
    return Done(Outcome(summary=summary))


def simulated_result(
    cfg: SimulatedAgentConfig, task: dict[str, Any], stop: threading.Event, timeout_s: float
) -> AgentResult | None:
    """Run the simulated agent; ``None`` when stopped (lease lost). Raises Stalled for a hung agent."""
    rng = _rng(cfg, task)
    minutes = rng.uniform(cfg.min_minutes, max(cfg.min_minutes, cfg.max_minutes))
    seconds = minutes / cfg.speed
    if seconds > timeout_s:
        return None if not _sleep(stop, timeout_s) else Failed(
            error=f"agent killed after {timeout_s:.0f}s", cause="timeout")
    if not _sleep(stop, seconds):
        return None
    return _fate(cfg, rng, task, time.time())


def run_simulated(agent: AgentConfig, ctx: RunContext) -> AgentResult | None:
    """The ``simulated`` runner: the fake agent of ``agent.simulated`` for ``ctx.task``."""
    ctx.started()
    return simulated_result(agent.simulated, ctx.task, ctx.stop, ctx.timeout_s)
