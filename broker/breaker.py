"""The provider circuit breaker as operators, health and metrics see it.

The rules (what opens it, the half-open probe, doubling) live in ``lua/lib/core.lua``; this module only reads
``breaker:<provider>`` hashes into typed states and checks an operator's arguments.
"""

from __future__ import annotations

import enum
import math
from typing import Any

from pydantic import BaseModel, ConfigDict

from .config import MAX_MINUTES
from .errors import InputError

__all__ = ["BreakerState", "BreakerStatus", "check_open_minutes", "state_from"]


class BreakerStatus(enum.StrEnum):
    """Where a provider's breaker is."""

    CLOSED = "closed"  #: claims may pick the provider's models
    OPEN = "open"  #: no claim may pick them until ``until``
    HALF_OPEN = "half_open"  #: the opening ended: one probe run may go (or is running)

    @property
    def gauge(self) -> int:
        """The value of ``clawq_provider_breaker_state``: 0 closed, 1 open, 2 half-open."""
        return {BreakerStatus.CLOSED: 0, BreakerStatus.OPEN: 1, BreakerStatus.HALF_OPEN: 2}[self]


class BreakerState(BaseModel):
    """One provider's breaker (times in epoch seconds)."""

    model_config = ConfigDict(frozen=True)

    provider: str
    state: BreakerStatus
    remaining_s: float = 0.0  #: until the opening ends (0 unless open)
    until: float | None = None  #: when the opening ends / ended
    cause: str | None = None  #: what opened it: overloaded, timeout, unreachable, rate_limit, operator
    cooldown_s: float | None = None  #: this opening's length (a failed probe doubles it)
    probe_task: int | None = None  #: the task whose run is the half-open probe, while it runs
    recent_failures: int = 0  #: qualifying failures in the window, while closed


def state_from(provider: str, fields: dict[str, str], failures: int, now: float) -> BreakerState:
    """The state of ``provider``'s breaker from its hash (empty: closed) and its failures in the window."""
    if "until" not in fields:
        return BreakerState(provider=provider, state=BreakerStatus.CLOSED, recent_failures=failures)
    until = int(fields["until"]) / 1000
    probe = fields.get("probe_task")
    return BreakerState(
        provider=provider,
        state=BreakerStatus.OPEN if until > now else BreakerStatus.HALF_OPEN,
        remaining_s=round(max(0.0, until - now), 3),
        until=until,
        cause=fields.get("cause") or None,
        cooldown_s=int(fields.get("cooldown_ms", "0")) / 1000,
        probe_task=int(probe) if probe else None,
    )


def check_open_minutes(minutes: Any) -> float:
    """An operator's opening length in minutes: a number in (0, MAX_MINUTES]."""
    if isinstance(minutes, bool) or not isinstance(minutes, int | float) or not math.isfinite(minutes) \
            or not 0 < minutes <= MAX_MINUTES:
        raise InputError(f"bad breaker minutes {minutes!r}: a number of minutes in (0, {MAX_MINUTES}]")
    return float(minutes)
