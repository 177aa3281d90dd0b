"""What a queued task costs in Redis memory: MEMORY USAGE of its keys, its index entries, and each hash field."""

from __future__ import annotations

import random
import statistics
from typing import Any

import redis

from clawq.broker import Broker

__all__ = ["LEFT_OUT", "dict_bucket_bytes", "field_savings", "lp_entry_bytes", "per_task_breakdown", "used_memory"]

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
    tids = _sample_ids(broker)
    bnames = [str(x) for x in c.srandmember(k.boards, _SAMPLE) or []]
    lines = [str(x) for x in c.zrange(k.ready_fronts, 0, -1)]
    rows = [
        ("task hash (task:<id>, one per task)", _mean_usage(c, [k.task(t) for t in tids])),
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


def _sample_ids(broker: Broker) -> list[int]:
    """Up to _SAMPLE task ids, at random from 1..seq:task (the benchmark's ids are the dense auto ids)."""
    seq = int(broker.client.get(broker.keys.task_seq) or 0)
    return sorted(random.Random(seq).sample(range(1, seq + 1), min(_SAMPLE, seq)))


#: The fields add_task leaves out (``Keys.task``): their value is a default, the key's id or another field.
LEFT_OUT = ("id", "prompt", "chain", "model_pin", "run_count", "attempts", "backoff_until", "updated_at",
            "queued_at")


def _layout_before(tid: int, fields: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    """The steps back to the hash add_task used to write: ``at`` named created_at again, then each LEFT_OUT
    field with the value a reader derives for it."""
    kind, _, name = fields.get("ck", "").partition(":")
    added = fields.get("at", "0")
    derived = {"id": str(tid), "prompt": "", "chain": name if kind == "c" else "",
               "model_pin": name if kind == "m" else "", "run_count": "0", "attempts": "0", "backoff_until": "0",
               "updated_at": added, "queued_at": added}
    current = {("created_at" if f == "at" else f): v for f, v in fields.items()}
    steps = [("created_at (for at)", dict(current))]
    for field in LEFT_OUT:
        if field not in current:
            current[field] = derived[field]
            steps.append((field, dict(current)))
    return steps


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
    """MEMORY USAGE of the last queued task's hash; each field's listpack bytes; the hash as the fields add_task
    leaves out are put back one after another (the layout before), to show what leaving them out saves.

    jemalloc rounds the listpack up to a size class, so one field alone often costs nothing: the cumulative
    column is what the fields cost together.
    """
    c = broker.client
    tid = int(c.get(broker.keys.task_seq) or 0)
    fields = {str(f): str(v) for f, v in c.hgetall(broker.keys.task(tid)).items()}
    # MEMORY USAGE counts the key name: copies go under a scratch name of the same length
    scratch = broker.keys.task(tid).replace(":task:", ":tasx:")
    base = _copy_usage(c, scratch, fields)
    encoding = str(c.object("encoding", scratch))
    rows = []
    for step, layout in _layout_before(tid, fields):
        size = _copy_usage(c, scratch, layout)
        rows.append({"field": step, "hash_bytes": size, "extra_bytes": size - base})
    c.delete(scratch)
    raw: list[dict[str, Any]] = [
        {"field": f, "value": v[:24], "listpack_bytes": lp_entry_bytes(f) + lp_entry_bytes(v)}
        for f, v in fields.items()
    ]
    return {"task_id": tid, "hash_bytes": base, "original_hash_bytes": _usage(c, broker.keys.task(tid)),
            "encoding": encoding, "listpack_payload_bytes": sum(r["listpack_bytes"] for r in raw) + 7,
            "fields": raw, "cumulative_add_back": rows}


def _copy_usage(c: redis.Redis, key: str, fields: dict[str, str]) -> int:
    c.delete(key)
    c.hset(key, mapping=fields)
    return _usage(c, key)
