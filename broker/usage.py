"""What agent runs cost: each run's session id and usage beside its history, and the counters behind
``clawq_agent_tokens_total``, ``clawq_agent_cost_usd_total``, ``clawq health``'s cost line and the night's
cost in the periodic summary. Written in one MULTI per run, whether or not the run may still report (a fenced
run was paid for too)."""

from __future__ import annotations

import json
import math
from typing import Any

from .keys import Keys

__all__ = ["HOUR_S", "Usage", "cost_since", "queue_usage", "read_usage_stats", "usage_doc"]

HOUR_S = 3600
_KEEP_HOURS = 48
Usage = dict[str, Any]  #: {"input_tokens": int | None, "output_tokens": int | None, "cost_usd": float | None}


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return None
    return int(value)


def _dollars(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return None
    return float(value)


def usage_doc(usage: Any) -> Usage:
    """``usage`` with exactly the three fields, each a non-negative number or None."""
    u = usage if isinstance(usage, dict) else {}
    return {"input_tokens": _count(u.get("input_tokens")), "output_tokens": _count(u.get("output_tokens")),
            "cost_usd": _dollars(u.get("cost_usd"))}


def queue_usage(pipe: Any, keys: Keys, task_id: int, run_id: str, where: tuple[str, str], session_id: str | None,
                usage: Usage, now: float) -> None:
    """Add the writes of one run's session and usage to ``pipe`` (``where`` = (model, board))."""
    model, board = where
    doc = {"session_id": session_id, "usage": usage}
    pipe.hset(keys.run_meta(task_id), run_id, json.dumps(doc))
    for kind in ("input", "output"):
        if usage[f"{kind}_tokens"]:
            pipe.hincrby(keys.stats_agent_tokens, f"{model}|{board}|{kind}", usage[f"{kind}_tokens"])
    cost = usage["cost_usd"]
    if cost:
        hour = int(now // HOUR_S * HOUR_S)
        pipe.hincrbyfloat(keys.stats_agent_cost, f"{model}|{board}", cost)
        pipe.hincrbyfloat(keys.stats_agent_cost_hourly, f"{hour}|{model}", cost)


def stale_hours(fields: list[str], now: float) -> list[str]:
    """The hourly fields older than two days (the writer drops them)."""
    floor = now - _KEEP_HOURS * HOUR_S
    return [f for f in fields if f.partition("|")[0].isdigit() and int(f.partition("|")[0]) < floor]


def cost_since(hourly: dict[str, str], since: float) -> dict[str, float]:
    """Dollars per model from the hours that started at or after ``since``'s hour."""
    start = since // HOUR_S * HOUR_S
    out: dict[str, float] = {}
    for field, value in hourly.items():
        hour, _, model = field.partition("|")
        if hour.isdigit() and int(hour) >= start:
            out[model] = out.get(model, 0.0) + float(value)
    return out


def read_usage_stats(client: Any, keys: Keys) -> tuple[dict[tuple[str, str, str], int], dict[tuple[str, str], float]]:
    """(tokens by (model, board, kind), dollars by (model, board))."""
    pipe = client.pipeline(transaction=True)
    pipe.hgetall(keys.stats_agent_tokens)
    pipe.hgetall(keys.stats_agent_cost)
    tokens_raw, cost_raw = pipe.execute()
    tokens: dict[tuple[str, str, str], int] = {}
    for field, value in tokens_raw.items():
        parts = _s(field).split("|")
        if len(parts) == 3:
            tokens[(parts[0], parts[1], parts[2])] = int(_s(value))
    cost: dict[tuple[str, str], float] = {}
    for field, value in cost_raw.items():
        model, _, board = _s(field).partition("|")
        cost[(model, board)] = float(_s(value))
    return tokens, cost


def _s(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
