"""What an agent run produced, read from its output: done, rate limited, or failed.

The agent protocol: the **last non-empty stdout line** is the outcome JSON; the lines before it are the
agent's log. Accepted outcomes:

- ``{"status": "done", "needs_follow_up": false, "summary": "…"}`` (and ``true`` with ``next_prompt``);
- ``{"status": "rate_limited", "retry_after_seconds": 30, "message": "…"}`` (or only a message to parse);
- ``{"status": "failed", "error": "…"}``;
- ClawTrol's outcome payload v1: ``{"version": "1", "task_id", "run_id", "needs_follow_up",
  "recommended_action", "next_prompt", "summary", …}``, read by :class:`workers.clawtrol.OutcomeV1`, the
  model the HTTP hook uses too.

A non-zero exit, or no outcome line, is a failure whose error is the stderr tail, classified by
:mod:`clawq.broker.signals` (a usage-limit or 429 text becomes a rate limit with its parsed reset).

Whatever an agent printed or returned is cleaned first (:func:`clean_text`, :func:`clean_result`): terminal
escape sequences and control characters (NUL included) are dropped, text that is not UTF-8 is replaced, and
texts are cut to what the broker takes. A stray byte never costs a run its outcome.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError

from clawq.broker import Outcome
from clawq.broker.checks import MAX_TEXT_BYTES
from clawq.broker.signals import MAX_RESET_SECONDS, SignalClass, parse_signal

from .clawtrol import OutcomeV1

__all__ = ["AgentResult", "Done", "Failed", "RateLimited", "clean_result", "clean_text", "outcome_meta",
           "parse_agent_output", "result_from_doc"]

#: The outcome line is looked for in the last this-many bytes of stdout.
MAX_OUTCOME_BYTES = 1024 * 1024
_TAIL = 2000


@dataclass(frozen=True)
class Done:
    """The run finished with an outcome (follow-up or not)."""

    outcome: Outcome


@dataclass(frozen=True)
class RateLimited:
    """The model answered with a rate or usage limit."""

    message: str
    retry_after: float | None = None  #: seconds, when the agent said so
    reset_at: float | None = None  #: epoch seconds, when parsed from the message
    quota: bool = False  #: a usage/quota limit rather than a rate limit


@dataclass(frozen=True)
class Failed:
    """The run failed; ``cause`` is its root cause (failed, timeout, pairing, overloaded, billing…)."""

    error: str
    cause: str = "failed"


AgentResult = Done | RateLimited | Failed

#: Terminal escape sequences: CSI (colours, cursor moves), OSC (titles, links), and two-character escapes.
_ESCAPES = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
#: Control characters other than tab and newline (NUL included), DEL, and the C1 controls.
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean_text(text: str) -> str:
    """Agent text fit for the broker and a terminal: escape sequences and control characters (NUL included)
    dropped, CR LF and lone CR made LF, lone surrogates (not UTF-8) replaced."""
    if text.isprintable():  # the common case: nothing to do
        return text
    text = text.encode("utf-8", "replace").decode("utf-8")
    text = _ESCAPES.sub("", text).replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROLS.sub("", text)


def _fit(text: str, limit: int = MAX_TEXT_BYTES) -> str:
    """``text`` cleaned and, when longer than ``limit`` bytes, cut to its end (the end says what went wrong)."""
    text = clean_text(text)
    if len(text.encode("utf-8")) <= limit:
        return text
    return "…" + text.encode("utf-8")[-(limit - 3):].decode("utf-8", "ignore")


def _clean_value(value: Any) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [_clean_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean_value(v) for k, v in value.items()}
    return value


def clean_result(result: AgentResult) -> AgentResult:
    """``result`` with every text cleaned and cut to what the broker takes (whatever runner produced it)."""
    if isinstance(result, Failed):
        return replace(result, error=_fit(result.error).strip() or "agent failed without a message")
    if isinstance(result, RateLimited):
        return replace(result, message=_fit(result.message))
    cleaned = _clean_value(result.outcome.model_dump())
    if cleaned == result.outcome.model_dump():
        return result
    return _outcome(cleaned)


def tail(text: str, limit: int = _TAIL) -> str:
    """The end of ``text``, at most ``limit`` characters, marked when cut."""
    text = text.strip()
    return text if len(text) <= limit else "…" + text[-limit:]


def _last_line(stdout: str) -> str:
    for line in reversed(stdout[-MAX_OUTCOME_BYTES:].splitlines()):
        if line.strip():
            return line.strip()
    return ""


def outcome_meta(stdout: str) -> dict[str, Any]:
    """What a command agent said about its run beside its outcome (optional fields of the outcome line):
    ``session_id`` (a string) and ``usage`` ``{input_tokens, output_tokens, cost_usd}``; {} when neither."""
    doc = _as_doc(_last_line(stdout)) or {}
    meta: dict[str, Any] = {}
    if isinstance(doc.get("session_id"), str) and doc["session_id"]:
        meta["session_id"] = doc["session_id"][:200]
    if isinstance(doc.get("usage"), dict):
        meta["usage"] = doc["usage"]
    return meta


def _as_doc(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
        return None
    return doc if isinstance(doc, dict) else None


def classify_text(text: str, now: float) -> AgentResult:
    """A failure text (stderr tail, error message): a rate limit, or a failure with its root cause."""
    text = clean_text(text)
    signal = parse_signal(text, now)
    if signal.klass in (SignalClass.RATE_LIMIT, SignalClass.QUOTA_REACHED):
        return RateLimited(message=tail(text), reset_at=signal.reset_at,
                           quota=signal.klass is SignalClass.QUOTA_REACHED)
    return Failed(error=tail(text) or "agent failed without a message", cause=signal.klass.root_cause)


def _bad(reason: str) -> Failed:
    return Failed(error=f"bad agent output: {reason}", cause="bad_output")


def _outcome(fields: dict[str, Any]) -> AgentResult:
    keep = ("needs_follow_up", "next_prompt", "summary", "achieved", "evidence", "remaining", "model_used")
    try:
        return Done(Outcome.model_validate({k: fields[k] for k in keep if k in fields and fields[k] is not None}))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "outcome"
        return _bad(f"{where}: {first['msg']}")


def _clawtrol(doc: dict[str, Any], expect: tuple[int, str] | None) -> AgentResult:
    """ClawTrol's payload v1, judged by the model the HTTP hook uses (:mod:`workers.clawtrol`)."""
    try:
        payload = OutcomeV1.model_validate(doc)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        problem = str(first["msg"]).removeprefix("Value error, ")
        return _bad(f"{where}: {problem}" if where else problem)
    if expect is not None and (payload.task_id, payload.run_id) != expect:
        return _bad(f"outcome is for task {payload.task_id} run {payload.run_id}, not task {expect[0]} run {expect[1]}")
    return Done(payload.outcome())


def _seconds(value: Any) -> float | None:
    """A number of seconds in (0, 30 days], or None (bools, text, NaN, huge integers refused)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) and 0 < seconds <= MAX_RESET_SECONDS else None


def _rate_limited(doc: dict[str, Any], now: float) -> AgentResult:
    message = doc.get("message", "")
    if not isinstance(message, str):
        return _bad("message must be a string")
    retry = doc.get("retry_after_seconds")
    if retry is not None:
        seconds = _seconds(retry)
        if seconds is None:
            return _bad(f"retry_after_seconds must be a number of seconds in (0, 30 days], got {str(retry)[:40]}")
        return RateLimited(message=tail(message), retry_after=seconds)
    signal = parse_signal(message, now)
    return RateLimited(message=tail(message), reset_at=signal.reset_at,
                       quota=signal.klass is SignalClass.QUOTA_REACHED)


def result_from_doc(doc: dict[str, Any], now: float, expect: tuple[int, str] | None = None) -> AgentResult:
    """An outcome document (stdout's last line, a python runner's return, an HTTP payload).

    ``expect`` = (task_id, run_id) of the run: a ClawTrol payload must name exactly that run.
    """
    doc = _clean_value(doc)
    if doc.get("version") is not None:
        return _clawtrol(doc, expect)
    status = doc.get("status")
    if status == "done":
        return _outcome(doc)
    if status == "rate_limited":
        return _rate_limited(doc, now)
    if status == "failed":
        error = doc.get("error", "")
        return classify_text(error if isinstance(error, str) and error else "agent reported failure", now)
    return _bad(f"status must be done, rate_limited or failed, got {status!r}")


def parse_agent_output(
    stdout: str, stderr: str, exit_code: int, now: float, expect: tuple[int, str] | None = None
) -> AgentResult:
    """Turn a finished command agent's output into its result (``expect``: see :func:`result_from_doc`)."""
    stdout, stderr = clean_text(stdout), clean_text(stderr)
    doc = _as_doc(_last_line(stdout))
    if exit_code != 0:
        if doc is not None and doc.get("status") in ("rate_limited", "failed"):
            return result_from_doc(doc, now, expect)
        result = classify_text(stderr or stdout, now)
        if isinstance(result, Failed) and result.cause == "failed":
            return Failed(error=f"exit code {exit_code}: {result.error}", cause="failed")
        return result
    if doc is None:
        text = stderr.strip() or "no outcome line on stdout"
        result = classify_text(text, now)
        return result if not isinstance(result, Failed) else Failed(
            error=f"no outcome line: {result.error}", cause=result.cause if result.cause != "failed" else "bad_output"
        )
    return result_from_doc(doc, now, expect)
