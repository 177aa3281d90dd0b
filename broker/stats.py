"""Counters kept beside the queue for metrics: the claim-to-start histogram."""

from __future__ import annotations

import math
from typing import Any

import redis

from .errors import InputError
from .keys import Keys

__all__ = ["CLAIM_TO_START_BUCKETS", "bucket_field", "observe_claim_to_start", "queue_claim_to_start"]

#: Upper bounds (s) of the claim-to-start histogram buckets, the last one +Inf. Counts are stored per
#: bucket (not cumulative) in the HASH ``stats:claim_to_start``, beside "sum" and "count".
CLAIM_TO_START_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, math.inf,
)


def bucket_field(bound: float) -> str:
    """The HASH field of a bucket bound: ``"0.005"``, ``"1"``, ``"2.5"``, ``"60"``, ``"+Inf"``."""
    return "+Inf" if math.isinf(bound) else f"{bound:g}"


def queue_claim_to_start(pipe: Any, keys: Keys, seconds: float) -> None:
    """Add to ``pipe`` the writes recording that a claimed run waited ``seconds`` for its worker (negative, from
    clock skew, counts as 0)."""
    if not math.isfinite(seconds):
        raise InputError(f"bad claim-to-start duration {seconds!r}: a finite number of seconds")
    seconds = max(0.0, float(seconds))
    bound = next(b for b in CLAIM_TO_START_BUCKETS if seconds <= b)
    pipe.hincrby(keys.stats_claim_to_start, bucket_field(bound), 1)
    pipe.hincrbyfloat(keys.stats_claim_to_start, "sum", seconds)
    pipe.hincrby(keys.stats_claim_to_start, "count", 1)


def observe_claim_to_start(client: redis.Redis, keys: Keys, seconds: float) -> None:
    """Record that a claimed run waited ``seconds`` for its worker, in one MULTI."""
    pipe = client.pipeline(transaction=True)
    queue_claim_to_start(pipe, keys, seconds)
    pipe.execute()
