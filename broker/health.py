"""The health document (``clawq health``): one pipelined read of a namespace's state."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from .breaker import BreakerState
from .config import Config
from .connection import Client
from .keys import Keys
from .usage import read_usage_stats

__all__ = [
    "BoardHealth", "BreakerHealth", "GlobalHealth", "Health", "HealthSource", "ModelHealth", "ProviderHealth",
    "RecentError", "collect_health",
]

_HOUR_MS = 3_600_000
_RECENT_ERRORS = 20
_HEAD = 3  #: queued tasks shown per board


class _Doc(BaseModel):
    model_config = ConfigDict(frozen=True)


class GlobalHealth(_Doc):
    max_concurrent: int  #: the global cap in force now (the night cap inside the night window)
    in_progress: int
    night: bool  #: the night window is on
    scheduled: int  #: tasks waiting in ``scheduled`` (not-before time, night-only)


class HeadTask(_Doc):
    task_id: int
    title: str


class RunningTask(_Doc):
    task_id: int
    title: str
    model: str | None
    provider: str | None
    elapsed_s: float | None  #: since the claim


class BoardHealth(_Doc):
    queue_depth: int  #: tasks up next
    scheduled: int  #: its tasks waiting in ``scheduled``
    in_progress: int  #: 0 or 1
    running_task: int | None
    completed_last_hour: int
    oldest_waiting_s: float  #: how long its head has waited
    paused: bool
    state: str  #: the index it sits in: ready, busy, paused, backoff, idle
    head: list[HeadTask]  #: the first queued tasks
    running: RunningTask | None
    why_waiting: str  #: why its head is not running now (the claim's own rules, under the current config)


class ModelHealth(_Doc):
    provider: str
    inflight: int
    cap: int | None
    cooldown_remaining_s: float
    failures: int


class Usage(_Doc):
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0


class BreakerHealth(_Doc):
    state: str  #: closed, open, half_open
    remaining_s: float
    until: float | None
    cause: str | None
    probe_task: int | None


class ProviderHealth(_Doc):
    inflight: int
    cap: int | None
    breaker: BreakerHealth


class RecentError(_Doc):
    """One of the latest actionable errors (``errors`` list, written by ``lib/core.lua`` ``record_error``)."""

    reason: str  #: the root cause (an event type of the failure or cooling families)
    task_id: int
    board: str
    model: str
    message: str
    at: float  #: epoch seconds


class Health(_Doc):
    """The health document (``clawq health``, ``GET /api/v1/health``): this model is its one statement; the JSON
    document is its dump (:meth:`Broker.health`)."""

    global_: GlobalHealth = Field(alias="global")
    boards: dict[str, BoardHealth]
    models: dict[str, ModelHealth]
    usage: dict[str, Usage]  #: what the agent CLIs reported, per model
    providers: dict[str, ProviderHealth]
    recent_errors: list[RecentError]  #: newest first
    namespace: dict[str, Any] | None = None  #: the namespace's name and identity (set by the broker)
    redis: dict[str, Any] | None = None  #: Redis's eviction policy and memory (set by the broker)

    def doc(self) -> dict[str, Any]:
        """The JSON document."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=False)


class HealthSource(Protocol):
    """What the health document is read from (a :class:`~clawq.broker.Broker`)."""

    @property
    def keys(self) -> Keys: ...

    @property
    def client(self) -> Client: ...

    def config(self) -> Config: ...

    def now(self) -> float: ...

    def explain_boards(self, boards: list[str], global_cap: int | None = None) -> list[str]: ...

    def read_with_config(self, queue: Callable[[Any, Config], None]) -> tuple[Config, list[Any]]: ...

    def cooldowns(self) -> dict[str, dict[str, Any]]: ...

    def breakers(self) -> dict[str, BreakerState]: ...


def _t(value: Any) -> Any:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _int(value: Any) -> int:
    return int(_t(value)) if value is not None else 0


def collect_health(broker: HealthSource) -> Health:
    """Queue depth, in-progress and throughput per board; inflight, cap, cooldown per model."""
    keys, client = broker.keys, broker.client
    now = broker.now()
    now_ms = int(now * 1000)
    boards = sorted(str(_t(b)) for b in client.smembers(keys.boards))

    def queue(pipe: Any, _cfg: Config) -> None:
        pipe.zcard(keys.running)
        pipe.hgetall(keys.inflight_model)
        pipe.hgetall(keys.inflight_provider)
        pipe.hgetall(keys.stats_failures)
        pipe.lrange(keys.errors, 0, _RECENT_ERRORS - 1)
        for b in boards:
            pipe.zcard(keys.queue(b))
            pipe.hmget(keys.board(b), "running", "paused", "state", "scheduled")
            pipe.zcount(keys.done(b), now_ms - _HOUR_MS, "+inf")
            pipe.zrange(keys.queue(b), 0, _HEAD - 1)

    cfg, replies = broker.read_with_config(queue)  # the caps shown are those of the config in Redis now
    in_progress, inflight_m, inflight_p, failures, errors = replies[:5]
    cap, night = cfg.global_cap_at(now)
    breakers = broker.breakers()
    board_docs = _boards(broker, boards, replies[5:], now)
    for name, why in zip(boards, broker.explain_boards(boards), strict=True):
        board_docs[name]["why_waiting"] = why
    return Health.model_validate({
        "global": {"max_concurrent": cap, "in_progress": int(in_progress), "night": night,
                   "scheduled": sum(b["scheduled"] for b in board_docs.values())},
        "boards": board_docs,
        "models": _models(broker, inflight_m, failures, now),
        "usage": _usage(broker),
        "providers": {
            p: {"inflight": _int(_t_map(inflight_p).get(p)), "cap": cfg.limits.provider_max_inflight.get(p),
                "breaker": _breaker(breakers.get(p))}
            for p in cfg.providers()
        },
        "recent_errors": [json.loads(_t(e)) for e in errors],
    })


def _breaker(st: BreakerState | None) -> dict[str, Any]:
    """A provider's breaker in the health document: state (closed, open, half_open) and the time left."""
    if st is None:  # a provider with a cap but no model: nothing can open it
        return {"state": "closed", "remaining_s": 0.0, "until": None, "cause": None, "probe_task": None}
    return {"state": st.state.value, "remaining_s": st.remaining_s, "until": st.until, "cause": st.cause,
            "probe_task": st.probe_task}


def _t_map(mapping: dict[Any, Any]) -> dict[str, Any]:
    return {str(_t(k)): _t(v) for k, v in mapping.items()}


def _boards(broker: HealthSource, boards: list[str], replies: list[Any], now: float) -> dict[str, Any]:
    queues = [[int(_t(x)) for x in r] for r in replies[3::4]]
    running = [_t(r[0]) for r in replies[1::4]]
    fields = _task_fields(broker, {tid for q in queues for tid in q} | {int(x) for x in running if x})
    out: dict[str, Any] = {}
    for i, b in enumerate(boards):
        depth, (run_id, paused, state, scheduled), done = replies[4 * i : 4 * i + 3]
        head = queues[i][0] if queues[i] else None
        waited = max(0.0, now - int(fields[head].get("queued_at", 0)) / 1000) if head is not None else 0.0
        out[b] = {
            "queue_depth": int(depth),
            "scheduled": _int(scheduled),
            "in_progress": 1 if run_id else 0,
            "running_task": int(_t(run_id)) if run_id else None,
            "completed_last_hour": int(done),
            "oldest_waiting_s": round(waited, 3),
            "paused": _t(paused) == "1",
            "state": _t(state) or "idle",
            "head": [{"task_id": tid, "title": fields[tid].get("title", "")} for tid in queues[i]],
            "running": _running(fields, int(_t(run_id)), now) if run_id else None,
        }
    return out


def _running(fields: dict[int, dict[str, str]], tid: int, now: float) -> dict[str, Any]:
    f = fields.get(tid, {})
    claimed = int(f.get("claimed_at", 0)) / 1000
    return {"task_id": tid, "title": f.get("title", ""), "model": f.get("model"), "provider": f.get("provider"),
            "elapsed_s": round(max(0.0, now - claimed), 3) if claimed else None}


_TASK_FIELDS = ("title", "queued_at", "at", "created_at", "claimed_at", "model", "provider")


def _task_fields(broker: HealthSource, ids: set[int]) -> dict[int, dict[str, str]]:
    order = sorted(ids)
    if not order:
        return {}
    pipe = broker.client.pipeline(transaction=False)
    for tid in order:
        pipe.hmget(broker.keys.task(tid), *_TASK_FIELDS)
    out: dict[int, dict[str, str]] = {}
    for tid, row in zip(order, pipe.execute(), strict=True):
        f = {n: _t(v) for n, v in zip(_TASK_FIELDS, row, strict=True) if v is not None}
        added = f.get("at") or f.get("created_at")  # created_at: a hash written before `at`
        if added:
            f.setdefault("queued_at", added)  # absent until the task is first requeued
        out[tid] = f
    return out


def _usage(broker: HealthSource) -> dict[str, dict[str, float]]:
    """Tokens and dollars the agent CLIs reported, per model (summed over boards; models with none left out)."""
    tokens, cost = read_usage_stats(broker.client, broker.keys)
    out: dict[str, dict[str, float]] = {}
    for (model, _board, kind), n in tokens.items():
        doc = out.setdefault(model, {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0})
        if kind in ("input", "output"):
            doc[f"{kind}_tokens"] += n
    for (model, _board), dollars in cost.items():
        doc = out.setdefault(model, {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0})
        doc["cost_usd"] = round(doc["cost_usd"] + dollars, 6)
    return dict(sorted(out.items()))


def _models(broker: HealthSource, inflight: dict[Any, Any], failures: dict[Any, Any], now: float) -> dict[str, Any]:
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
