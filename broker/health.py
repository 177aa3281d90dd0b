"""The health document (``clawq health``): one pipelined read of a namespace's state."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .broker import Broker

__all__ = ["collect_health"]

_HOUR_MS = 3_600_000
_RECENT_ERRORS = 20


def _t(value: Any) -> Any:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _int(value: Any) -> int:
    return int(_t(value)) if value is not None else 0


def collect_health(broker: Broker) -> dict[str, Any]:
    """Queue depth, in-progress and throughput per board; inflight, cap, cooldown per model."""
    keys, client = broker.keys, broker.client
    cfg = broker.config()
    now = broker.now()
    now_ms = int(now * 1000)
    boards = sorted(str(_t(b)) for b in client.smembers(keys.boards))
    pipe = client.pipeline(transaction=True)
    pipe.zcard(keys.running)
    pipe.hgetall(keys.inflight_model)
    pipe.hgetall(keys.inflight_provider)
    pipe.hgetall(keys.stats_failures)
    pipe.lrange(keys.errors, 0, _RECENT_ERRORS - 1)
    for b in boards:
        pipe.zcard(keys.queue(b))
        pipe.hmget(keys.board(b), "running", "paused", "state")
        pipe.zcount(keys.done(b), now_ms - _HOUR_MS, "+inf")
        pipe.zrange(keys.queue(b), 0, 0)
    replies = pipe.execute()
    in_progress, inflight_m, inflight_p, failures, errors = replies[:5]
    cap, night = cfg.global_cap_at(now)
    return {
        "global": {"max_concurrent": cap, "in_progress": int(in_progress), "night": night},
        "boards": _boards(broker, boards, replies[5:], now),
        "models": _models(broker, inflight_m, failures, now),
        "providers": {
            p: {"inflight": _int(_t_map(inflight_p).get(p)), "cap": cfg.limits.provider_max_inflight.get(p)}
            for p in cfg.providers()
        },
        "recent_errors": [json.loads(_t(e)) for e in errors],
    }


def _t_map(mapping: dict[Any, Any]) -> dict[str, Any]:
    return {str(_t(k)): _t(v) for k, v in mapping.items()}


def _boards(broker: Broker, boards: list[str], replies: list[Any], now: float) -> dict[str, Any]:
    heads = [r[0] if r else None for r in replies[3::4]]
    queued_at = _queued_at(broker, heads)
    out: dict[str, Any] = {}
    for i, b in enumerate(boards):
        depth, (running, paused, state), done = replies[4 * i : 4 * i + 3]
        head = heads[i]
        waited = max(0.0, now - queued_at[_t(head)]) if head is not None else 0.0
        out[b] = {
            "queue_depth": int(depth),
            "in_progress": 1 if running else 0,
            "running_task": int(_t(running)) if running else None,
            "completed_last_hour": int(done),
            "oldest_waiting_s": round(waited, 3),
            "paused": _t(paused) == "1",
            "state": _t(state) or "idle",
        }
    return out


def _queued_at(broker: Broker, heads: list[Any]) -> dict[Any, float]:
    ids = [_t(h) for h in heads if h is not None]
    if not ids:
        return {}
    pipe = broker.client.pipeline(transaction=False)
    for tid in ids:
        pipe.hget(broker.keys.task(int(tid)), "queued_at")
    return {tid: _int(v) / 1000 for tid, v in zip(ids, pipe.execute(), strict=True)}


def _models(broker: Broker, inflight: dict[Any, Any], failures: dict[Any, Any], now: float) -> dict[str, Any]:
    cfg = broker.config()
    cooling = broker.cooldowns()
    per_model: dict[str, int] = {}
    for key, n in _t_map(failures).items():
        model = key.split("|", 1)[0]
        per_model[model] = per_model.get(model, 0) + int(n)
    inflight_t = _t_map(inflight)
    return {
        m: {
            "provider": cfg.models[m],
            "inflight": _int(inflight_t.get(m)),
            "cap": cfg.limits.model_max_inflight.get(m),
            "cooldown_remaining_s": cooling[m]["remaining_s"] if m in cooling else 0.0,
            "failures": per_model.get(m, 0),
        }
        for m in sorted(cfg.models)
    }
