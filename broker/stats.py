"""Counters kept beside the queue for metrics: the claim-to-start histogram."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import redis

from .errors import InputError
from .keys import Keys

__all__ = ["CLAIM_TO_START_BUCKETS", "Counters", "bucket_field", "counters_from", "observe_claim_to_start",
           "queue_claim_to_start"]

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


@dataclass(frozen=True)
class Counters:
    """The counters of the ``stats:*`` keys, read in one transaction (:meth:`Broker.counters`)."""

    completed: dict[str, float]  #: board -> outcomes recorded
    failures: dict[tuple[str, str], float]  #: (model, reason) -> failed runs
    skips: dict[str, float]  #: skip reason -> boards refused
    claims: float  #: successful claims
    claim_to_start: dict[str, float]  #: bucket field / "sum" / "count" -> value


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _number(value: Any) -> float:
    """A stored counter; a value that is not a finite number (hand-edited) counts as 0."""
    try:
        number = float(_text(value))
    except ValueError:
        return 0.0
    return number if math.isfinite(number) else 0.0


def _floats(mapping: Any) -> dict[str, float]:
    return {_text(k): _number(v) for k, v in (mapping or {}).items()}


def counters_from(completed: Any, failures: Any, skips: Any, claims: Any, histogram: Any,
                  per_board: Any = None) -> Counters:
    """The counters from the replies of HGETALL stats:completed, stats:failures, stats:skips, GET stats:claims and
    HGETALL stats:claim_to_start; per_board: board -> HGET board:<b> completed (added to stats:completed's)."""
    per_reason: dict[tuple[str, str], float] = {}
    for field, n in _floats(failures).items():
        model, _, reason = field.partition("|")
        per_reason[(model, reason)] = per_reason.get((model, reason), 0.0) + n
    done = _floats(completed)
    for board, n in (per_board or {}).items():
        if n is not None:
            done[_text(board)] = done.get(_text(board), 0.0) + _number(n)
    return Counters(completed=done, failures=per_reason, skips=_floats(skips),
                    claims=_number(claims) if claims is not None else 0.0, claim_to_start=_floats(histogram))
