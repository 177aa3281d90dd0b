"""When a task may start: not-before times (ISO 8601 or ``HH:MM``) and the night window.

The queue rule itself lives in Lua (``claim_task``: a scheduled task joins its board queue once due; no
night-only run starts outside the window). Time zones and DST are Python's part: the broker computes the due
time and the window's next opening from the config and hands them to the scripts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from .config import Config, next_local_time
from .errors import InputError

__all__ = ["MAX_AHEAD_S", "Start", "parse_not_before", "start_of"]

#: A not-before time at most this far ahead (a year): further is a typo, not a plan.
MAX_AHEAD_S = 366 * 86400
_HHMM = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)\Z")


def _zone(config: Config) -> str:
    """The zone of ``HH:MM`` and of ISO times without an offset: the night window's, else UTC."""
    return config.night_mode.timezone if config.night_mode is not None else "UTC"


def parse_not_before(text: str, config: Config, now: float) -> float:
    """``text`` as epoch seconds: ``HH:MM`` is the next such time in the night window's zone (UTC when night
    mode is off); an ISO 8601 time without an offset is read in that zone too. Raises InputError."""
    value = text.strip()
    match = _HHMM.match(value)
    if match:
        return next_local_time(f"{int(match[1]):02d}:{match[2]}", now, _zone(config))
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InputError(f"bad time {text[:80]!r}: give ISO 8601 (2026-12-05T23:00:00+01:00) or HH:MM") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=ZoneInfo(_zone(config)))
    return parsed.astimezone(UTC).timestamp()


@dataclass(frozen=True)
class Start:
    """When a new task may start: ``due`` (epoch s; None = now), and what was asked for."""

    due: float | None
    not_before: float | None
    night_only: bool


def start_of(config: Config, board: str, now: float, *, not_before: float | None, night_only: bool) -> Start:
    """The due time of a task added at ``now``: its not-before time, moved to the next opening of the night
    window when it is night-only. Raises InputError for a time more than a year ahead or not finite, and for a
    night-only task without a night window."""
    night = night_only or config.board_night_only(board)
    if not_before is not None and (not math.isfinite(not_before) or not_before - now > MAX_AHEAD_S):
        raise InputError("bad not-before time: at most a year ahead")
    if night_only and config.night_mode is None:
        raise InputError("night-only needs night_mode in the config: there is no night window")
    at = max(now, not_before) if not_before is not None else now
    if night:
        at = max(at, config.night_next(at) or at)
    return Start(due=at if at > now else None, not_before=not_before, night_only=night)
