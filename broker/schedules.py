"""Recurring tasks: a cron expression in a zone, fired exactly once per period by clawq's own atomic script.

Why not rq-scheduler or RQ's scheduler: they would enqueue RQ jobs, not clawq tasks; they poll (rq-scheduler
every 60 s) and need a process of their own; their keys carry no hash tag (no Redis Cluster); and they know
nothing of "skip while the previous task is unfinished". Here a cron parser (cronsim, pure Python, no
dependencies) computes the times, and ``lua/fire_schedule`` does the firing: it happens only while the
schedule's next-firing score is the time the caller read, and moves that score on in the same script, so the
firing is keyed by the schedule and its time. ``clawq dispatch`` fires due schedules on the wake it already has
(the earliest next firing is one of its deadlines): nothing polls, and no extra process needs starting.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from pydantic import BaseModel

from .errors import InputError, Status, error_for
from .keys import BOARD_RE
from .timing import start_of
from .translate import redis_errors

if TYPE_CHECKING:
    from .broker import Broker

__all__ = ["Firing", "Schedule", "Schedules", "check_cron", "check_zone", "next_fire"]

log = logging.getLogger("clawq.schedules")

#: Due schedules fired per call (the rest on the next call, at once: they stay due).
FIRE_BATCH = 100
_MAX_CRON = 200
_MAX_TITLE = 1024


def check_zone(zone: str) -> ZoneInfo:
    """The IANA zone ``zone``; raises InputError."""
    try:
        return ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise InputError(f"unknown time zone {zone[:80]!r}: give an IANA name such as Europe/Berlin or UTC") from None


def check_cron(expr: str, zone: str, now: float) -> float:
    """Check a five-field cron expression; returns its first firing after ``now``. Raises InputError."""
    tz = check_zone(zone)
    text = " ".join(expr.split())
    if len(text.split(" ")) != 5 or len(expr) > _MAX_CRON:
        raise InputError(f"bad cron expression {expr[:80]!r}: five fields (minute hour day month weekday)")
    try:
        return next_fire(text, tz, now)
    except (CronSimError, StopIteration) as err:
        raise InputError(f"bad cron expression {expr[:80]!r}: {err or 'it never fires'}") from None


def _dt(ts: float, tz: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC).astimezone(tz)


def next_fire(expr: str, tz: ZoneInfo, after: float) -> float:
    """The first firing strictly after epoch second ``after``."""
    return next(CronSim(expr, _dt(math.floor(after), tz))).timestamp()


class Schedule(BaseModel):
    """A recurring schedule as stored."""

    schedule_id: int
    cron: str
    tz: str
    board: str
    chain: str | None = None
    model: str | None = None
    title: str
    prompt: str = ""
    next_fire: float  #: epoch seconds
    created_at: float
    last_fire: float | None = None
    last_task: int | None = None
    fired: int = 0
    skipped: int = 0
    missed: int = 0


@dataclass(frozen=True)
class Firing:
    """What one due schedule did: fired (a task), skipped (the previous task is unfinished), missed (too late),
    repeated (another dispatcher fired it first), gone (removed meanwhile) or failed."""

    schedule_id: int
    outcome: str
    task_id: int | None = None
    fire: float | None = None


def _ms(ts: float) -> int:
    return round(ts * 1000)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class Schedules:
    """The recurring schedules of one broker's namespace."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def add(self, cron: str, board: str, title: str, *, tz: str = "UTC", chain: str | None = None,
            model: str | None = None, prompt: str = "") -> Schedule:
        """Store a schedule; raises InputError (bad cron, zone, board, title) or UnknownChain before writing."""
        b = self.broker
        if not isinstance(board, str) or not BOARD_RE.match(board):
            raise InputError(f"bad board name {board[:80]!r}: use 1-64 letters, digits, '.', '_' or '-'")
        if not title.strip() or len(title.encode()) > _MAX_TITLE or "\x00" in title + prompt:
            raise InputError("title must be 1-1024 bytes of text")
        if (chain is None) == (model is None):
            raise InputError("give exactly one of --chain or --model")
        b._check_known(chain=chain, model=model)
        first = check_cron(cron, tz, b.now())
        text = " ".join(cron.split())
        reply = b._call("add_schedule", [b._now_arg(), text, tz, board, chain or "", model or "", title, prompt,
                                         _ms(first)])
        if Status(reply[0]) is not Status.OK:
            raise error_for(Status(reply[0]), 0, "", str(reply[1]))
        return self.get(int(reply[1]))

    def remove(self, schedule_id: int) -> None:
        b = self.broker
        reply = b._call("remove_schedule", [b._now_arg(), schedule_id])
        if Status(reply[0]) is not Status.OK:
            raise InputError(str(reply[1]))

    def get(self, schedule_id: int) -> Schedule:
        found = self._read([schedule_id])
        if not found:
            raise InputError(f"no schedule {schedule_id}")
        return found[0]

    def ls(self) -> list[Schedule]:
        """Every schedule, by id."""
        with redis_errors(self.broker._where):
            ids = sorted(int(_text(x)) for x in self.broker.client.zrange(self.broker.keys.schedules, 0, -1))
        return self._read(ids)

    def _read(self, ids: list[int]) -> list[Schedule]:
        b = self.broker
        with redis_errors(b._where):
            pipe = b.client.pipeline(transaction=True)
            for sid in ids:
                pipe.hgetall(b.keys.schedule(sid))
                pipe.zscore(b.keys.schedules, sid)
            replies = pipe.execute()
        out = []
        for sid, fields, score in zip(ids, replies[::2], replies[1::2], strict=True):
            if fields and score is not None:
                out.append(_schedule(sid, {_text(k): _text(v) for k, v in fields.items()}, float(score)))
        return out

    def next_due(self) -> float | None:
        """When the earliest schedule fires next (epoch seconds), or None."""
        with redis_errors(self.broker._where):
            first = self.broker.client.zrange(self.broker.keys.schedules, 0, 0, withscores=True)
        return float(first[0][1]) / 1000 if first else None

    def fire_due(self) -> list[Firing]:
        """Fire every schedule whose time has come, each exactly once (several dispatchers may call this at
        once: one of them fires, the others see ``repeated``). A firing missed while nothing ran fires once
        if it is less than one period late, else it is recorded as missed; either way the schedule moves on
        to its first firing after now."""

        b = self.broker
        now = b.now()
        with redis_errors(b._where):
            due: list[tuple[Any, float]] = b.client.zrangebyscore(  # type: ignore[assignment]
                b.keys.schedules, "-inf", _ms(now), start=0, num=FIRE_BATCH, withscores=True)
        firings = []
        for member, score in due:
            sid = int(_text(member))
            try:
                firings.append(self._fire(sid, int(score), now))
            except InputError as err:
                log.error("schedule %s: %s", sid, err)
                firings.append(Firing(sid, "failed"))
        return firings

    def _fire(self, sid: int, score_ms: int, now: float) -> Firing:
        b = self.broker
        sched = self._read([sid])
        if not sched:  # listed without its hash (a hand edit): drop it, or it would stay due for ever
            b._call("remove_schedule", [b._now_arg(), sid])
            return Firing(sid, "gone")
        s = sched[0]
        tz = check_zone(s.tz)
        fire = score_ms / 1000
        # Late by less than one period (the time to the firing after it): it fires now, once. Later than that
        # (everything was down for longer): it is recorded as missed, and so is every firing in between.
        mode = "fire" if next_fire(s.cron, tz, fire) > now else "missed"
        following = next_fire(s.cron, tz, now)
        start = start_of(b.config(), s.board, now, not_before=None, night_only=False)
        reply = b._call("fire_schedule", [
            b._now_arg(), sid, score_ms, _ms(fire), _ms(following), mode,
            "" if start.due is None else _ms(start.due), "1" if start.night_only else "",
        ])
        status = Status(reply[0])
        if status is Status.REPEATED:
            return Firing(sid, "repeated", fire=fire)
        if status is Status.NOT_FOUND:
            return Firing(sid, "gone")
        if status is not Status.OK:
            log.error("schedule %s could not add its task: %s", sid, reply[1])
            return Firing(sid, "failed", fire=fire)
        outcome = str(reply[1])
        task_id = int(reply[2]) if len(reply) > 2 else None
        return Firing(sid, outcome, task_id=task_id, fire=fire)


def _schedule(sid: int, f: dict[str, str], score: float) -> Schedule:
    kind, _, name = f.get("ck", "").partition(":")

    def opt(name: str) -> int | None:
        return int(f[name]) if f.get(name) else None

    return Schedule(
        schedule_id=sid, cron=f.get("cron", ""), tz=f.get("tz", "UTC"), board=f.get("board", ""),
        chain=name if kind == "c" else None, model=name if kind == "m" else None, title=f.get("title", ""),
        prompt=f.get("prompt", ""), next_fire=score / 1000, created_at=int(f.get("created_at", 0)) / 1000,
        last_fire=int(f["last_fire"]) / 1000 if f.get("last_fire") else None, last_task=opt("last_task"),
        fired=int(f.get("fired", 0)), skipped=int(f.get("skipped", 0)), missed=int(f.get("missed", 0)),
    )
