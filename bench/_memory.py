"""What a queued task costs in Redis memory: MEMORY USAGE of its keys, its index entries, and each hash field."""

from __future__ import annotations

import statistics
from typing import Any

import redis

from broker import Broker

__all__ = ["dict_bucket_bytes", "field_savings", "lp_entry_bytes", "per_task_breakdown", "used_memory"]

_SAMPLE = 200


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def _usage(client: redis.Redis, key: str, samples: int | None = None) -> int:
    found = client.memory_usage(key, samples=samples) if samples is not None else client.memory_usage(key)
    return int(found or 0)


def _mean_usage(client: redis.Redis, keys: list[str]) -> float:
    return statistics.fmean(_usage(client, k) for k in keys) if keys else 0.0


def _pow2(n: int) -> int:
    return 1 << max(2, (n - 1).bit_length())


def dict_bucket_bytes(keys_before: int, keys_after: int) -> int:
    """Growth of the main dict's bucket array (8 bytes per bucket, a power of two >= keys)."""
    return 8 * (_pow2(keys_after) - _pow2(keys_before))


def per_task_breakdown(broker: Broker, boards: int, tasks: int, delta: int,
                       shared: dict[str, int]) -> list[dict[str, Any]]:
    """Bytes per queued task by structure (sampled means scaled to all boards/tasks); the rest is 'unaccounted'.

    ``shared`` holds measured bytes that are not per task (the capped events stream, the main dict's buckets).
    """
    c, k = broker.client, broker.keys
    tids = [str(x) for x in c.zrandmember(k.tasks, _SAMPLE) or []]
    bnames = [str(x) for x in c.srandmember(k.boards, _SAMPLE) or []]
    lines = [str(x) for x in c.smembers(k.ready_chains)]
    rows = [
        ("task hash (task:<id>, one per task)", _mean_usage(c, [k.task(int(t)) for t in tids])),
        ("tasks ZSET entry (every task id)", _usage(c, k.tasks, samples=0) / tasks),
        ("board queue ZSET entry (board:<b>:queue)", _mean_usage(c, [k.queue(b) for b in bnames]) * boards / tasks),
        ("board hash (board:<b>), shared by its tasks", _mean_usage(c, [k.board(b) for b in bnames]) * boards / tasks),
        ("boards SET entry, shared", _usage(c, k.boards, samples=0) / tasks),
        ("ready lines (ready:<ck>), shared", sum(_usage(c, k.ready(ck), samples=0) for ck in lines) / tasks),
        *((name, value / tasks) for name, value in shared.items()),
    ]
    out = [{"part": name, "bytes_per_task": round(v, 1)} for name, v in rows]
    accounted = sum(v for _, v in rows)
    out.append({"part": "unaccounted (allocator, client buffers)",
                "bytes_per_task": round(delta / tasks - accounted, 1)})
    out.append({"part": "TOTAL (used_memory delta / tasks)", "bytes_per_task": round(delta / tasks, 1)})
    return out


#: Fields whose value at add time is a default or is already in another field or in the key name.
REDUNDANT = ("id", "prompt", "chain", "model_pin", "run_count", "attempts", "backoff_until", "updated_at",
             "queued_at")


#: listpack integer encodings: (lowest, highest, bytes)
_LP_INTS = ((0, 127, 1), (-4096, 4095, 2), (-(1 << 15), (1 << 15) - 1, 3), (-(1 << 23), (1 << 23) - 1, 4),
            (-(1 << 31), (1 << 31) - 1, 5))


def _lp_int_bytes(value: int) -> int:
    for low, high, size in _LP_INTS:
        if low <= value <= high:
            return size
    return 9


def lp_entry_bytes(text: str) -> int:
    """Bytes of one listpack entry holding ``text`` (Redis 7 encoding: integer forms, string header, backlen)."""
    is_int = text.lstrip("-").isdigit() and str(int(text)) == text and -(1 << 63) <= int(text) < (1 << 63)
    if is_int:
        size = _lp_int_bytes(int(text))
    else:
        n = len(text.encode())
        size = (1 if n <= 63 else 2 if n <= 4095 else 5) + n
    return size + (1 if size <= 127 else 2)


def field_savings(broker: Broker) -> dict[str, Any]:
    """MEMORY USAGE of one queued task's hash; each field's listpack bytes; the hash as redundant fields go.

    jemalloc rounds the listpack up to a size class, so one field alone often saves nothing: the cumulative
    column is what leaving out the redundant fields one after another really saves.
    """
    c = broker.client
    tid = int(str(c.zrange(broker.keys.tasks, -1, -1)[0]))
    fields = {str(f): str(v) for f, v in c.hgetall(broker.keys.task(tid)).items()}
    # MEMORY USAGE counts the key name: copies go under a scratch name of the same length
    scratch = broker.keys.task(tid).replace(":task:", ":tasx:")
    base = _copy_usage(c, scratch, fields, set())
    encoding = str(c.object("encoding", scratch))
    rows = []
    for i, name in enumerate(REDUNDANT):
        if name in fields:
            left = _copy_usage(c, scratch, fields, set(REDUNDANT[: i + 1]))
            rows.append({"field": name, "dropped_so_far": i + 1, "hash_bytes": left, "saved_bytes": base - left})
    c.delete(scratch)
    raw: list[dict[str, Any]] = [
        {"field": f, "value": v[:24], "listpack_bytes": lp_entry_bytes(f) + lp_entry_bytes(v)}
        for f, v in fields.items()
    ]
    return {"task_id": tid, "hash_bytes": base, "original_hash_bytes": _usage(c, broker.keys.task(tid)),
            "encoding": encoding, "listpack_payload_bytes": sum(r["listpack_bytes"] for r in raw) + 7,
            "fields": raw, "cumulative_drop": rows}


def _copy_usage(c: redis.Redis, key: str, fields: dict[str, str], leave_out: set[str]) -> int:
    c.delete(key)
    c.hset(key, mapping={f: v for f, v in fields.items() if f not in leave_out})
    return _usage(c, key)
