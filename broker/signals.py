"""Classify what an AI agent or model provider said when it hit a limit or failed.

The input is whatever the worker captured: free text, raw HTTP header lines (``name: value``,
optionally prefixed by curl's ``<``), a JSON body (also Python ``repr`` of a dict, as the
OpenAI/Anthropic SDKs print it), or a mix such as the tail of an agent's stderr. The output is
a :class:`Signal`: a :class:`SignalClass`, the absolute epoch second at which the limit resets
(``None`` when no usable time was found) and the name of the signal that gave that time.

Pure: stdlib only, no I/O, no clock (the caller passes ``now``). Never raises, and only looks
at the last :data:`TAIL_CHARS` characters, so the time spent is bounded.

Reset precedence (lowest rank wins; within one rank the LATEST reset wins, since every
dimension that is exhausted has to reset):

0. JSON ``resets_at`` (Codex ``usage_limit_reached``)
1. ``anthropic-ratelimit-unified-reset`` (the binding window of a Claude subscription)
2. other absolute headers: ``anthropic-ratelimit-*-reset`` (RFC 3339), ``x-ratelimit-reset``
   (epoch s / epoch ms by magnitude, small numbers are seconds from now)
3. ``retry-after-ms``
4. ``retry-after`` (seconds or HTTP-date)
5. body delays: Gemini ``RetryInfo.retryDelay``, Codex ``resets_in_seconds``, ``retry_after``
6. per-dimension headers ``x-ratelimit-reset-requests`` / ``-tokens`` (Go durations)
7. absolute times in text: ``usage limit reached|<epoch>``, ``resets at <RFC 3339>``, ...
8. relative times in text: ``try again in 5 days 22 hours``, ``Please retry in 47.4s``, ...

A value that is NaN, infinite, in the past, or more than :data:`MAX_RESET_SECONDS` away is
ignored as if absent.

Class: structured codes in a JSON body (``rate_limit_error``, ``insufficient_quota``,
``RESOURCE_EXHAUSTED`` with Gemini ``quotaId`` ``...PerDay...``, HTTP status codes, ...) decide
when present; otherwise words in the text do. A reset with no class words is a rate limit;
nothing recognisable is :attr:`SignalClass.OTHER`.
"""

from __future__ import annotations

import ast
import enum
import json
import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "BREAKER_CAUSES", "MAX_RESET_SECONDS", "TAIL_CHARS", "Signal", "SignalClass", "counts_for_breaker", "parse_reset",
    "parse_signal", "root_cause",
]

MAX_RESET_SECONDS = 30 * 24 * 3600
TAIL_CHARS = 64 * 1024

_MAX_JSON_STARTS = 64  # lines holding a "{" that are tried as the start of a JSON object
_WALK_BUDGET = 20_000  # JSON nodes visited at most
_MAX_NESTED_TEXT = 16  # JSON documents embedded in JSON strings that are decoded at most


class SignalClass(str, enum.Enum):  # noqa: UP042 (str mixin: the wire values)
    RATE_LIMIT = "rate_limit"
    QUOTA_REACHED = "quota_reached"
    OVERLOADED = "overloaded"
    BILLING = "billing"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"  #: the provider could not be reached: connection refused, DNS
    PAIRING = "pairing"
    AUTH = "auth"  #: the agent is not logged in or its key is refused
    OTHER = "other"

    @property
    def root_cause(self) -> str:
        """The root cause a failure of this class records (the one mapping from signal class to root cause):
        its own name, but ``failed`` for other texts and for rate limits reported as failures."""
        if self in (SignalClass.OTHER, SignalClass.RATE_LIMIT, SignalClass.QUOTA_REACHED):
            return "failed"
        return str(self.value)


#: Root causes of a failed run that count toward its provider's circuit breaker: the provider, not the task,
#: failed. A failing test or a lint error (``failed``), bad output, billing or pairing do not count.
BREAKER_CAUSES = frozenset({SignalClass.OVERLOADED.value, SignalClass.TIMEOUT.value, SignalClass.UNREACHABLE.value})


def counts_for_breaker(cause: str, *, reset_known: bool = True) -> bool:
    """Whether a run that ended with root cause ``cause`` counts toward its provider's breaker: an overload, a
    timeout, an unreachable provider, or a rate limit whose reset nobody told (``reset_known`` False). A rate
    limit with a parsed reset cools only its model."""
    if cause == SignalClass.RATE_LIMIT.value:
        return not reset_known
    return cause in BREAKER_CAUSES


@dataclass(frozen=True)
class Signal:
    klass: SignalClass
    reset_at: float | None
    source: str


def parse_signal(text: str, now: float, local_tz: tzinfo | None = None) -> Signal:
    """Classify ``text`` and find when the limit it reports resets. Never raises.

    ``local_tz``: the zone of a wall-clock time that names none (Codex prints ``try again at 12:16 PM`` in
    the local time of the machine it runs on); without it such a time is not guessed."""
    try:
        doc = _document(_tail(text), local_tz)
        found = _best(_reset_candidates(doc, float(now)))
        klass = _classify(doc, has_reset=found is not None)
    except Exception:  # a parser must never take the worker down
        return Signal(SignalClass.OTHER, None, "")
    if found is None:
        return Signal(klass, None, "")
    return Signal(klass, found.reset_at, found.source)


def root_cause(message: str, now: float) -> str:
    """The root cause of a failure message: timeout, overloaded, unreachable, billing, pairing, auth, or failed."""
    return parse_signal(message, now).klass.root_cause


def parse_reset(text: str, now: float, local_tz: tzinfo | None = None) -> tuple[float | None, str]:
    """Only the reset part of :func:`parse_signal`: ``(reset_at, source)`` or ``(None, "")``."""
    try:
        found = _best(_reset_candidates(_document(_tail(text), local_tz), float(now)))
    except Exception:  # a parser must never take the worker down
        return None, ""
    return (None, "") if found is None else (found.reset_at, found.source)


def _tail(text: object) -> str:
    if isinstance(text, bytes):
        text = text[-4 * TAIL_CHARS :].decode("utf-8", "replace")
    return text[-TAIL_CHARS:] if isinstance(text, str) else ""


# --------------------------------------------------------------------------- the document


@dataclass(frozen=True)
class _Document:
    text: str
    low: str
    objects: tuple[dict[Any, Any], ...]  # every JSON object found, nested ones included
    headers: tuple[tuple[str, object], ...]  # (lower-case name, value)
    local_tz: tzinfo | None = None  # the zone of wall-clock times that name none (None: not guessed)


_HEADER_LINE_RE = re.compile(r"^[ \t<>*-]*([A-Za-z][A-Za-z0-9_-]{0,100})[ \t]*:[ \t]*([^\r\n]*)", re.M)


def _document(text: str, local_tz: tzinfo | None = None) -> _Document:
    objects = tuple(_walk(_extract_objects(text)))
    headers: list[tuple[str, object]] = [
        (m.group(1).lower(), m.group(2).strip()) for m in _HEADER_LINE_RE.finditer(text) if m.group(2).strip()
    ]
    headers.extend(_object_headers(objects))
    return _Document(text, text.lower(), objects, tuple(headers), local_tz)


def _object_headers(objects: Iterable[dict[Any, Any]]) -> Iterator[tuple[str, object]]:
    """Every scalar ``key: value`` of every object: header maps nest anywhere in bodies."""
    for obj in objects:
        for key, value in obj.items():
            if isinstance(key, str) and isinstance(value, str | int | float):
                yield key.strip().lower(), value


# --------------------------------------------------------------------------- JSON extraction


def _loads(text: str) -> object:
    """A JSON (or Python-literal) document, or None."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    if "'" not in text:
        return None
    try:
        with warnings.catch_warnings():  # invalid escapes in garbage warn while parsing
            warnings.simplefilter("ignore")
            return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _raw_decode(text: str, start: int) -> tuple[object, int]:
    """The JSON value starting at ``start`` and where it ends, or ``(None, start)``."""
    try:
        return json.JSONDecoder().raw_decode(text, start)
    except (ValueError, RecursionError):
        return None, start


def _json_starts(text: str) -> list[tuple[int, int]]:
    """(first ``{``, last ``}`` + 1) of the whole text, then of each line holding a ``{``."""
    spans = [(text.find("{"), text.rfind("}") + 1)]
    offset = 0
    for line in text.splitlines(keepends=True):
        brace = line.find("{")
        if brace >= 0:
            spans.append((offset + brace, offset + line.rfind("}") + 1))
        offset += len(line)
    return spans[:1] + spans[1:][-_MAX_JSON_STARTS:]


def _extract_objects(text: str) -> list[object]:
    """JSON objects embedded in ``text``: the largest ``{...}`` span, each line, multi-line objects."""
    found: list[object] = []
    covered: list[tuple[int, int]] = []
    for start, end in _json_starts(text):
        if start < 0 or any(lo <= start < hi for lo, hi in covered):
            continue
        value = _loads(text[start:end]) if end > start else None
        if value is None:
            value, end = _raw_decode(text, start)
        if isinstance(value, dict | list):
            found.append(value)
            covered.append((start, end))
    return found


def _walk(roots: list[object]) -> Iterator[dict[Any, Any]]:
    """Every dict under ``roots``, also inside JSON documents held in strings (OpenRouter ``raw``)."""
    stack = list(roots)
    budget, nested = _WALK_BUDGET, _MAX_NESTED_TEXT
    while stack and budget > 0:
        budget -= 1
        node = stack.pop()
        if isinstance(node, dict):
            yield node
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
        elif isinstance(node, str) and nested > 0 and node.lstrip()[:1] in ("{", "["):
            nested -= 1
            stack.append(_loads(node))


# --------------------------------------------------------------------------- values


_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_GO_DURATION_RE = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+")
_GO_PART_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS: dict[str, float] = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}  # fmt: skip


def _number(value: object) -> float | None:
    """A finite or infinite float from a JSON number or a plain decimal string; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            return None
    if isinstance(value, float):
        return value
    if isinstance(value, str) and _NUMBER_RE.fullmatch(value.strip()):
        return float(value.strip())
    return None


def _proto_duration(value: object) -> float | None:
    """Seconds in a protobuf ``Duration`` object ``{"seconds": 45, "nanos": 837906927}``."""
    if not isinstance(value, dict) or "seconds" not in value:
        return None
    seconds, nanos = _number(value.get("seconds")), _number(value.get("nanos", 0))
    return None if seconds is None or nanos is None else seconds + nanos / 1e9


def _go_duration(value: str) -> float | None:
    """Seconds in a Go / protobuf duration: ``6m0s``, ``1.5s``, ``12ms``, ``45.837906927s``."""
    text = value.strip().lower()
    if len(text) > 100 or not _GO_DURATION_RE.fullmatch(text):
        return None
    return sum(float(num) * _UNIT_SECONDS[unit] for num, unit in _GO_PART_RE.findall(text))


def _as_utc_timestamp(moment: datetime) -> float:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _iso_time(value: str) -> float | None:
    """An RFC 3339 / ISO 8601 timestamp; no offset means UTC."""
    text = re.sub(r"\s*(?:utc|gmt)$", "+00:00", value.strip(), flags=re.I)
    text = re.sub(r"\s+at\s+", "T", text, flags=re.I)
    try:
        return _as_utc_timestamp(datetime.fromisoformat(text.replace("z", "Z")))
    except (ValueError, OverflowError, OSError):
        return None


def _http_date(value: str) -> float | None:
    """An HTTP-date (RFC 9110): ``Thu, 26 Nov 2026 03:00:00 GMT``."""
    try:
        return _as_utc_timestamp(parsedate_to_datetime(value.strip()))
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None


def _date_time(value: str) -> float | None:
    if re.match(r"\s*\d{4}-\d{2}-\d{2}", value):
        return _iso_time(value)
    if re.search(r"[A-Za-z]{3}", value) and len(value) < 100:
        return _http_date(value)
    return None


def _epoch(number: float) -> float:
    """Epoch seconds from epoch s / ms / µs / ns, told apart by magnitude."""
    for threshold, scale in ((1e17, 1e-9), (1e14, 1e-6), (1e11, 1e-3)):
        if abs(number) >= threshold:
            return number * scale
    return number


NumberMode = Callable[[float, float], float]


def _delta_seconds(number: float, now: float) -> float:
    return now + number


def _delta_ms(number: float, now: float) -> float:
    return now + number / 1000.0


def _absolute(number: float, now: float) -> float:
    return _epoch(number)


def _absolute_or_delta(number: float, now: float) -> float:
    """Epoch s/ms by magnitude; a small number is seconds from now (``RateLimit-Reset: 30``)."""
    return now + number if abs(number) < 1e8 else _epoch(number)


def _time_value(value: object, now: float, mode: NumberMode) -> float | None:
    """An instant from a number (interpreted by ``mode``), a duration or a date-time."""
    number = _number(value) if not isinstance(value, dict) else _proto_duration(value)
    if number is not None:
        return mode(number, now)
    if not isinstance(value, str):
        return None
    duration = _go_duration(value)
    return now + duration if duration is not None else _date_time(value)


# --------------------------------------------------------------------------- reset candidates


class _Found(NamedTuple):
    rank: int
    reset_at: float
    source: str


_R_JSON_ABSOLUTE, _R_UNIFIED, _R_HEADER_ABSOLUTE, _R_RETRY_AFTER_MS, _R_RETRY_AFTER = 0, 1, 2, 3, 4
_R_BODY_DELAY, _R_DIMENSION, _R_TEXT_ABSOLUTE, _R_TEXT_RELATIVE = 5, 6, 7, 8


def _found(rank: int, reset_at: float | None, source: str, now: float) -> _Found | None:
    """The candidate, or None when the time is unusable (NaN, infinite, past, > 30 days away)."""
    if reset_at is None or not math.isfinite(reset_at) or not math.isfinite(now):
        return None
    if not now <= reset_at <= now + MAX_RESET_SECONDS:
        return None
    return _Found(rank, reset_at, source)


def _best(candidates: Iterable[_Found]) -> _Found | None:
    return min(candidates, key=lambda f: (f.rank, -f.reset_at), default=None)


def _reset_candidates(doc: _Document, now: float) -> Iterator[_Found]:
    for producer in (_header_candidates, _body_candidates, _text_candidates):
        for found in producer(doc, now):
            if found is not None:
                yield found


_HEADER_RULES: tuple[tuple[re.Pattern[str], int, NumberMode], ...] = (
    (re.compile(r"retry-after-ms"), _R_RETRY_AFTER_MS, _delta_ms),
    (re.compile(r"retry-after"), _R_RETRY_AFTER, _delta_seconds),
    (re.compile(r"anthropic-ratelimit-unified-reset"), _R_UNIFIED, _absolute_or_delta),
    (
        re.compile(r"anthropic-ratelimit-[a-z0-9-]*reset|x-rate-?limit-reset|ratelimit-reset"),
        _R_HEADER_ABSOLUTE,
        _absolute_or_delta,
    ),
    (re.compile(r"x-ratelimit-reset-(?:requests|tokens)[a-z0-9-]*"), _R_DIMENSION, _delta_seconds),
)


def _header_candidates(doc: _Document, now: float) -> Iterator[_Found | None]:
    for name, value in doc.headers:
        for pattern, rank, mode in _HEADER_RULES:
            if pattern.fullmatch(name):
                yield _found(rank, _time_value(value, now, mode), name, now)
                break


_BODY_RULES: tuple[tuple[str, int, NumberMode, str], ...] = (
    ("resets_at", _R_JSON_ABSOLUTE, _absolute, "codex.resets_at"),
    ("resets_in_seconds", _R_BODY_DELAY, _delta_seconds, "codex.resets_in_seconds"),
    ("retrydelay", _R_BODY_DELAY, _delta_seconds, "gemini.retryDelay"),
    ("retry_delay", _R_BODY_DELAY, _delta_seconds, "gemini.retryDelay"),
    ("retry_after", _R_BODY_DELAY, _delta_seconds, "json.retry_after"),
)


def _body_candidates(doc: _Document, now: float) -> Iterator[_Found | None]:
    for obj in doc.objects:
        for key, value in obj.items():
            for name, rank, mode, source in _BODY_RULES:
                if isinstance(key, str) and key.lower() == name:
                    yield _found(rank, _time_value(value, now, mode), source, now)


# Gemini through google-api-core prints protobuf text: ``retry_delay {\n  seconds: 36\n}``.
_PROTO_RETRY_DELAY_RE = re.compile(r"retry_delay\s*\{\s*seconds:\s*(\d{1,12})(?:\s*nanos:\s*(\d{1,9}))?")
_PIPE_EPOCH_RE = re.compile(r"limit\s+reached\s*\|\s*(\d{9,19}(?:\.\d+)?)", re.I)
_DATE_TIME = (
    r"\d{4}-\d{2}-\d{2}(?:(?:T|\s+at\s+|\s+)\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?"
    r"(?:\s*(?:Z|UTC|GMT|[+-]\d{2}:?\d{2})(?![A-Za-z0-9]))?"
    r"|(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun),\s+\d{1,2}\s+[A-Za-z]{3}\s+\d{4}\s+\d{2}:\d{2}(?::\d{2})?"
    r"\s+(?:GMT|UTC|[+-]\d{4})"
)
_TEXT_ABSOLUTE_RE = re.compile(
    r"\b(?P<trig>resets?(?:\s+(?:at|on))?|until|regain\s+access\s+on|(?:try\s+again|retry)\s+(?:at|after|on))"
    rf"\s+(?P<when>{_DATE_TIME})",
    re.I,
)
_WALL_CLOCK_RE = re.compile(
    r"\b(?P<trig>resets?(?:\s+at)?|try\s+again\s+at)\s+(?P<h>\d{1,2})(?::(?P<m>\d{2}))?\s*(?P<ampm>[ap]\.?m\.?)?"
    r"\s*\(?(?:UTC|GMT)\)?(?![A-Za-z])",
    re.I,
)
# Claude Code: "You've hit your limit · resets 1pm (Europe/Lisbon)": a wall clock in a named IANA zone.
_ZONED_CLOCK_RE = re.compile(
    r"\b(?P<trig>resets?(?:\s+at)?|try\s+again\s+at)\s+(?P<h>\d{1,2})(?::(?P<m>\d{2}))?\s*(?P<ampm>[ap]\.?m\.?)?"
    r"\s*\((?P<zone>[A-Za-z_]+(?:/[A-Za-z0-9_+-]+){1,2})\)",
    re.I,
)
# Codex: "try again at 12:16 PM." or "try again at Sep 5th, 2026 12:16 PM." in the machine's local time.
_LOCAL_CLOCK_RE = re.compile(
    r"\b(?P<trig>try\s+again\s+at|resets?\s+at)\s+"
    r"(?:(?P<mon>[A-Za-z]{3})[a-z]*\.?\s+(?P<day>\d{1,2})(?:st|nd|rd|th)?,?\s+(?P<year>\d{4}),?\s+)?"
    r"(?P<h>\d{1,2}):(?P<m>\d{2})\s*(?P<ampm>[ap]\.?m\.?)(?!\s*\(?(?:UTC|GMT|[A-Za-z_]+/))",
    re.I,
)
_MONTHS = {m: i for i, m in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov",
                                        "dec"), start=1)}
_TEXT_RELATIVE_RE = re.compile(
    r"\b(?P<trig>(?:try\s+again|retry|resets?|available(?:\s+again)?)\s+(?:in|after)|please\s+wait(?:\s+for)?)"
    r"\s+(?:about\s+|approximately\s+|roughly\s+|~\s*)?",
    re.I,
)
_TEXT_UNIT_RE = re.compile(
    r"(\d{1,12}(?:\.\d{1,12})?)\s*(weeks?|w|days?|d|hours?|hrs?|h|minutes?|mins?|milliseconds?|ms|m"
    r"|seconds?|secs?|s|us|µs|ns)(?![a-zµ])",
    re.I,
)
_TEXT_SEPARATOR_RE = re.compile(r"\s*,?\s*(?:and\s+)?")
_TEXT_UNIT_SECONDS: dict[str, float] = {
    "w": 604800.0, "d": 86400.0, "h": 3600.0, "hr": 3600.0, "mi": 60.0, "m": 60.0, "mil": 1e-3,
    "ms": 1e-3, "s": 1.0, "se": 1.0, "us": 1e-6, "µs": 1e-6, "ns": 1e-9,
}  # fmt: skip


def _text_candidates(doc: _Document, now: float) -> Iterator[_Found | None]:
    text = doc.text
    for m in _PROTO_RETRY_DELAY_RE.finditer(text):
        delay = int(m.group(1)) + int(m.group(2) or 0) / 1e9
        yield _found(_R_BODY_DELAY, now + delay, "gemini.retry_delay", now)
    for m in _PIPE_EPOCH_RE.finditer(text):
        yield _found(_R_TEXT_ABSOLUTE, _epoch(float(m.group(1))), "text:|epoch", now)
    for m in _TEXT_ABSOLUTE_RE.finditer(text):
        yield _found(_R_TEXT_ABSOLUTE, _date_time(m.group("when")), _text_source(m.group("trig")), now)
    for m in _WALL_CLOCK_RE.finditer(text):
        yield _found(_R_TEXT_ABSOLUTE, _next_wall_clock(m, now, UTC), _text_source(m.group("trig")), now)
    for m in _ZONED_CLOCK_RE.finditer(text):
        yield _found(_R_TEXT_ABSOLUTE, _next_wall_clock(m, now, _zone(m.group("zone"))), _text_source(m.group("trig")),
                     now)
    if doc.local_tz is not None:
        for m in _LOCAL_CLOCK_RE.finditer(text):
            yield _found(_R_TEXT_ABSOLUTE, _local_clock(m, now, doc.local_tz), _text_source(m.group("trig")), now)
    for m in _TEXT_RELATIVE_RE.finditer(text):
        duration = _text_duration(text, m.end())
        if duration is not None:
            yield _found(_R_TEXT_RELATIVE, now + duration, _text_source(m.group("trig")), now)


def _text_source(trigger: str) -> str:
    return "text:" + " ".join(trigger.lower().split())


def _unit_seconds(unit: str) -> float:
    """Seconds in a unit word: ``days``, ``hrs``, ``min``, ``ms``, ``milliseconds``, ``secs``..."""
    unit = unit.lower()
    if unit in _TEXT_UNIT_SECONDS:
        return _TEXT_UNIT_SECONDS[unit]
    for prefix in ("mil", "mi", "se", "hr"):
        if unit.startswith(prefix):
            return _TEXT_UNIT_SECONDS[prefix]
    return _TEXT_UNIT_SECONDS[unit[0]]


def _text_duration(text: str, pos: int) -> float | None:
    """Seconds in ``5 days 22 hours 11 minutes``, ``47.4s``, ``1h2m3s``, ``2 hours and 5 min``."""
    total, parts = 0.0, 0
    while parts < 8:
        m = _TEXT_UNIT_RE.match(text, pos)
        if m is None:
            break
        total += float(m.group(1)) * _unit_seconds(m.group(2))
        parts += 1
        separator = _TEXT_SEPARATOR_RE.match(text, m.end())
        pos = separator.end() if separator else m.end()
    return total if parts else None


def _zone(name: str) -> tzinfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def _hour24(m: re.Match[str]) -> tuple[int, int] | None:
    hour, minute, ampm = int(m.group("h")), int(m.group("m") or 0), (m.group("ampm") or "").lower()
    if ampm:
        if not 1 <= hour <= 12:
            return None
        hour = hour % 12 + (12 if ampm.startswith("p") else 0)
    return None if hour > 23 or minute > 59 else (hour, minute)


def _next_wall_clock(m: re.Match[str], now: float, zone: tzinfo | None) -> float | None:
    """The next ``3:00 AM`` after ``now`` in ``zone`` (None: an unknown zone, nothing is guessed)."""
    hm = _hour24(m)
    if hm is None or zone is None:
        return None
    try:
        today = datetime.fromtimestamp(now, zone).replace(hour=hm[0], minute=hm[1], second=0, microsecond=0)
    except (ValueError, OverflowError, OSError):
        return None
    moment = today.timestamp()
    return moment if moment >= now else (today + timedelta(days=1)).timestamp()


def _local_clock(m: re.Match[str], now: float, zone: tzinfo) -> float | None:
    """Codex's local reset time: today's (or tomorrow's) clock time, or the date it names."""
    if not m.group("mon"):
        return _next_wall_clock(m, now, zone)
    hm, month = _hour24(m), _MONTHS.get(m.group("mon").lower())
    if hm is None or month is None:
        return None
    try:
        return datetime(int(m.group("year")), month, int(m.group("day")), hm[0], hm[1], tzinfo=zone).timestamp()
    except (ValueError, OverflowError, OSError):
        return None


# --------------------------------------------------------------------------- classification

_PRIORITY = (
    SignalClass.PAIRING,
    SignalClass.AUTH,
    SignalClass.BILLING,
    SignalClass.QUOTA_REACHED,
    SignalClass.OVERLOADED,
    SignalClass.RATE_LIMIT,
    SignalClass.TIMEOUT,
    SignalClass.UNREACHABLE,
)

# error ``type`` / ``code`` / ``status`` / ``reason`` values of real providers, lower-cased
_CODE_CLASSES: dict[str, SignalClass] = {
    "unauthorized_client": SignalClass.PAIRING,
    "pairing_required": SignalClass.PAIRING,
    "not_paired": SignalClass.PAIRING,
    "authentication_error": SignalClass.AUTH,  # Anthropic 401
    "authentication_failed": SignalClass.AUTH,  # Claude Code's assistant message error
    "invalid_api_key": SignalClass.AUTH,  # OpenAI 401
    "unauthenticated": SignalClass.AUTH,  # google.rpc UNAUTHENTICATED
    "providerautherror": SignalClass.AUTH,  # opencode
    "fatalauthenticationerror": SignalClass.AUTH,  # Gemini CLI
    "401": SignalClass.AUTH,
    "insufficient_quota": SignalClass.BILLING,  # OpenAI: the account is out of credit
    "billing_error": SignalClass.BILLING,  # Anthropic 402
    "payment_required": SignalClass.BILLING,
    "insufficient_credits": SignalClass.BILLING,
    "402": SignalClass.BILLING,
    "usage_limit_reached": SignalClass.QUOTA_REACHED,  # Codex / ChatGPT plan
    "overloaded_error": SignalClass.OVERLOADED,  # Anthropic 529
    "overloaded": SignalClass.OVERLOADED,
    "unavailable": SignalClass.OVERLOADED,  # google.rpc UNAVAILABLE (503 "model is overloaded")
    "server_overloaded": SignalClass.OVERLOADED,
    "503": SignalClass.OVERLOADED,
    "529": SignalClass.OVERLOADED,
    "rate_limit_error": SignalClass.RATE_LIMIT,  # Anthropic 429
    "rate_limit_exceeded": SignalClass.RATE_LIMIT,  # OpenAI 429, google ErrorInfo reason
    "rate_limited": SignalClass.RATE_LIMIT,
    "resource_exhausted": SignalClass.RATE_LIMIT,  # Gemini 429, refined by quotaId
    "too_many_requests": SignalClass.RATE_LIMIT,
    "429": SignalClass.RATE_LIMIT,
    "timeout_error": SignalClass.TIMEOUT,  # Anthropic 504
    "deadline_exceeded": SignalClass.TIMEOUT,
    "request_timeout": SignalClass.TIMEOUT,
    "timeout": SignalClass.TIMEOUT,
    "408": SignalClass.TIMEOUT,
    "504": SignalClass.TIMEOUT,
    "econnrefused": SignalClass.UNREACHABLE,  # Node's error codes
    "enotfound": SignalClass.UNREACHABLE,
    "eai_again": SignalClass.UNREACHABLE,
    "enetunreach": SignalClass.UNREACHABLE,
    "ehostunreach": SignalClass.UNREACHABLE,
}
_CODE_KEYS = frozenset(
    {"type", "code", "status", "reason", "error", "error_code", "errorcode", "status_code", "statuscode"}
)

_TEXT_CLASS_RULES: tuple[tuple[SignalClass, re.Pattern[str]], ...] = (
    (
        SignalClass.PAIRING,
        re.compile(
            r"pairing[ _-](?:is[ _-])?required|requires?[ _-]pairing|not[ _-]paired"
            r"|unauthori[sz]ed[ _-]client"
        ),
    ),
    (
        SignalClass.AUTH,
        re.compile(
            r"not logged in|please run /login|invalid[ _-]api[ _-]?key|incorrect api key|api key not valid"
            r"|invalid x-api-key|authentication[ _-](?:failed|error|required)|not able to authenticate"
            r"|failed to authenticate|please set an auth method|oauth token (?:has )?expired"
            r"|\b401 unauthorized|missing bearer|providerautherror|no api key (?:found|provided|configured)"
            r"|missing api key|api key (?:is )?missing"
        ),
    ),
    (
        SignalClass.BILLING,
        # "please check your plan and billing details" is boilerplate in OpenAI and Gemini quota errors
        re.compile(
            r"payment[ _-]required|credit[ _-]balance(?: is)? too low"
            r"|insufficient[ _-](?:quota|credits?|funds|balance)|(?<!plan and )billing|out of credits?"
        ),
    ),
    (
        SignalClass.QUOTA_REACHED,
        # "quota" alone is not enough ("checking quota settings", Vertex's "(e.g. check quota)")
        re.compile(
            r"usage[ _-]limits?\b|quota[ _-](?:exceeded|reached|exhausted)"
            r"|exceeded (?:your |the )?(?:current )?quota|out of quota"
            r"|(?:hit|reached) your (?:usage |weekly |daily |monthly |session )?limit"
            r"|(?:weekly|daily|monthly|5-hour|session) limit reached"
            r"|exhausted your (?:daily |monthly )?(?:quota|capacity)|terminalquotaerror"
        ),
    ),
    (
        SignalClass.OVERLOADED,
        re.compile(r"overloaded|service[ _-]unavailable|over[ _-]capacity|server (?:is )?busy"),
    ),
    (
        SignalClass.RATE_LIMIT,
        # not "ratelimit-" of header names such as x-ratelimit-remaining-requests
        re.compile(
            r"rate[ _-]?limit(?!-)|too many requests|throttl"
            r"|resource[ _-]exhausted|resource has been exhausted"
        ),
    ),
    # not "keep-alive: timeout=5"
    (SignalClass.TIMEOUT, re.compile(r"timed?[ _-]?outs?(?![a-z=])|etimedout|deadline[ _-]exceeded")),
    (
        SignalClass.UNREACHABLE,
        # as agents print it: curl, Node (ECONNREFUSED, ENOTFOUND, EAI_AGAIN), Python (socket.gaierror), Go
        re.compile(
            r"connection refused|econnrefused|enotfound|eai_again|getaddrinfo|could not resolve host"
            r"|name or service not known|temporary failure in name resolution|no such host"
            r"|nodename nor servname|network is unreachable|enetunreach|no route to host|ehostunreach"
            r"|failed to resolve|dns (?:lookup|resolution) failed"
        ),
    ),
)
_STATUS_RE = re.compile(
    r"(?:\bhttp(?:/[\d.]+)?|\bstatus(?:[ _-]?code)?|\bcode|\berror)[\"']?\s*[:=]?\s*[\"'(]?(\d{3})\b"
)
_QUOTA_ID_RE = re.compile(r"quota_?id\\*[\"']?\s*[:=]\s*\\*[\"']([a-z0-9_./-]{1,200})")
_DAILY_RE = re.compile(r"per[ _-]?day|\(rpd\)|\bdaily (?:limit|quota|usage)")
_MINUTELY_RE = re.compile(r"per[ _-]?min(?:ute)?\b|\((?:rpm|tpm)\)")


def _pick(classes: Iterable[SignalClass | None]) -> SignalClass | None:
    present = set(classes)
    return next((klass for klass in _PRIORITY if klass in present), None)


def _classify(doc: _Document, has_reset: bool) -> SignalClass:
    quota_window = _quota_id_class(doc.low)
    klass = _pick([quota_window, *_structured_classes(doc.objects)]) or _text_class(doc.low)
    if klass is not None and quota_window is None:
        klass = _refine_by_window(klass, doc.low)
    if klass is None:
        return SignalClass.RATE_LIMIT if has_reset else SignalClass.OTHER
    return klass


def _code_class(value: object) -> SignalClass | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return _CODE_CLASSES.get(str(value)) if 100 <= value <= 999 else None
    return _CODE_CLASSES.get(value.strip().lower()) if isinstance(value, str) else None


def _structured_classes(objects: Iterable[dict[Any, Any]]) -> Iterator[SignalClass | None]:
    for obj in objects:
        for key, value in obj.items():
            if isinstance(key, str) and key.lower() in _CODE_KEYS:
                yield _code_class(value)


def _quota_id_class(low: str) -> SignalClass | None:
    """Gemini ``QuotaFailure`` violations: ``...PerDay...`` is a quota, ``...PerMinute...`` a rate limit."""
    ids = _QUOTA_ID_RE.findall(low)
    if any("perday" in quota_id for quota_id in ids):
        return SignalClass.QUOTA_REACHED
    if any(period in quota_id for quota_id in ids for period in ("perminute", "perhour", "persecond")):
        return SignalClass.RATE_LIMIT
    return None


def _text_class(low: str) -> SignalClass | None:
    words = (klass for klass, pattern in _TEXT_CLASS_RULES if pattern.search(low))
    statuses = (_CODE_CLASSES.get(code) for code in _STATUS_RE.findall(low))
    return _pick([*words, *statuses])


def _refine_by_window(klass: SignalClass, low: str) -> SignalClass:
    """A per-day limit is a quota (OpenRouter ``free-models-per-day``); a per-minute one a rate limit."""
    daily, minutely = bool(_DAILY_RE.search(low)), bool(_MINUTELY_RE.search(low))
    if klass is SignalClass.RATE_LIMIT and daily and not minutely:
        return SignalClass.QUOTA_REACHED
    if klass is SignalClass.QUOTA_REACHED and minutely and not daily:
        return SignalClass.RATE_LIMIT
    return klass
