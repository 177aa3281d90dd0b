"""What every CLI adapter shares: the invocation, the launch, the parsed native output, and how that output
becomes a run result (done, rate limited, failed) with the ``clawq-outcome`` block read from the final text.

An adapter is a small object with four parts (see :class:`Adapter`): the argv it builds, how the prompt goes
in (stdin or an argument; never the task JSON), how it reads the CLI's own output, and the signals that stop
the CLI cleanly. Failure texts are classified by :mod:`broker.signals`; this module only decides which
text to classify and in what order (a limit is looked for before the exit code is trusted).
"""

from __future__ import annotations

import json
import math
import re
import signal
from dataclasses import dataclass, field
from datetime import tzinfo
from typing import Any, Protocol

from clawq.broker import Outcome
from clawq.broker.signals import SignalClass, parse_signal
from clawq.workers.agent_output import AgentResult, Done, Failed, RateLimited, tail

__all__ = [
    "Adapter",
    "Invocation",
    "Launch",
    "Native",
    "Usage",
    "interpret",
    "json_lines",
    "outcome_from_text",
]

#: The summary of a run whose final text has no outcome block: this many characters of it.
SUMMARY_CHARS = 500
_BLOCK_RE = re.compile(r"```[ \t]*clawq-outcome[ \t]*\r?\n?(.*?)```", re.S)
_ERROR_TAIL = 2000


@dataclass(frozen=True)
class Usage:
    """Tokens and cost of one run; None where the CLI does not say."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: float | None = None

    def doc(self) -> dict[str, Any]:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens, "cost_usd": self.cost_usd}

    def plus(self, other: Usage) -> Usage:
        return Usage(_add(self.input_tokens, other.input_tokens), _add(self.output_tokens, other.output_tokens),
                     _add(self.cost_usd, other.cost_usd))


def _add(a: Any, b: Any) -> Any:
    return b if a is None else a if b is None else a + b


def count(value: Any) -> int | None:
    """A token count from a JSON value (non-negative integer, or a float that is one), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return None
    return int(value)


def dollars(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return None
    return float(value)


@dataclass(frozen=True)
class Invocation:
    """One run of a CLI: what the adapter builds its argv and input from."""

    bin: str  #: the executable (a name on PATH or a path)
    model: str  #: the model name the CLI is given
    prompt: str  #: the rendered prompt (the next prompt only, when resuming)
    session_id: str | None  #: resume this session (the adapter resumes only when it can)
    cwd: str  #: the board's workdir, or the worker's cwd
    args: tuple[str, ...] = ()  #: extra argv from the config entry
    timeout_s: float = 3600.0
    scratch: str = "/tmp"  #: a private directory of this run, deleted afterwards (aider's message file)
    root: bool = False  #: the worker runs as root


@dataclass(frozen=True)
class Launch:
    """How to start the CLI: argv, what goes to its stdin (None: /dev/null), and env it needs on top."""

    argv: list[str]
    stdin: bytes | None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Native:
    """What the CLI's own output said."""

    text: str = ""  #: the final answer
    session_id: str | None = None
    usage: Usage = field(default_factory=Usage)
    error: str | None = None  #: the CLI says the run failed (is_error, turn.failed, status error…)
    limited: bool = False  #: a structured limit signal (Claude's rejected rate_limit_event)
    quota: bool = False  #: that limit is a usage limit, not a per-minute rate limit
    reset_at: float | None = None  #: a machine-readable reset (epoch s)
    auth: bool = False  #: a structured "not logged in / bad key" signal (Gemini exit 41…)


class Adapter(Protocol):
    """One CLI preset."""

    @property
    def preset(self) -> str:
        """The config name (claude-code, codex, …)."""

    @property
    def default_bin(self) -> str:
        """The executable's usual name."""

    @property
    def resumes(self) -> bool:
        """The CLI can resume a session by its explicit id."""

    @property
    def stop_signals(self) -> tuple[signal.Signals, ...]:
        """Sent in turn to stop the CLI cleanly, before SIGKILL."""

    def launch(self, inv: Invocation) -> Launch: ...

    def parse(self, stdout: str, stderr: str, exit_code: int) -> Native: ...


# -- native output helpers ---------------------------------------------------------------------------


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` that is a JSON object (JSONL output; other lines are skipped)."""
    out: list[dict[str, Any]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            doc = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


def first_object(*texts: str) -> dict[str, Any] | None:
    """The first complete top-level JSON object in any of ``texts`` (pretty-printed output, banners around)."""
    decoder = json.JSONDecoder()
    for text in texts:
        for m in re.finditer(r"(?m)^\{", text):
            try:
                doc, _ = decoder.raw_decode(text, m.start())
            except (ValueError, RecursionError):
                continue
            if isinstance(doc, dict):
                return doc
    return None


def text_of(value: Any) -> str:
    return value if isinstance(value, str) else ""


def obj(value: Any) -> dict[str, Any]:
    """``value`` when it is a JSON object, else an empty one (native output is never trusted to be well formed)."""
    return value if isinstance(value, dict) else {}


# -- the outcome block ---------------------------------------------------------------------------------


def outcome_from_text(text: str) -> Done:
    """The run's outcome from its final text: the last ``clawq-outcome`` block, or done with a summary made
    of the text's start when there is none (or it is unreadable: the work is kept, never failed)."""
    blocks = _BLOCK_RE.findall(text)
    before = _BLOCK_RE.sub("", text).strip()
    fallback = before[:SUMMARY_CHARS] or "(the agent gave no final text)"
    if not blocks:
        return Done(Outcome(summary=fallback))
    try:
        doc = json.loads(blocks[-1].strip())
    except (ValueError, RecursionError):
        doc = None
    if not isinstance(doc, dict):
        return Done(Outcome(summary=("unreadable clawq-outcome block; " + fallback)[:SUMMARY_CHARS]))
    follow = doc.get("needs_follow_up") is True
    summary = text_of(doc.get("summary")).strip() or fallback
    next_prompt = text_of(doc.get("next_prompt")).strip()
    if follow and not next_prompt:
        next_prompt = "Continue the task where you left off."
    try:
        return Done(Outcome(needs_follow_up=follow, next_prompt=next_prompt if follow else None, summary=summary))
    except ValueError:  # oversized or NUL: keep what can be kept
        return Done(Outcome(summary=summary[:SUMMARY_CHARS].replace("\x00", "")))


# -- native output -> run result -------------------------------------------------------------------------


def interpret(native: Native, stderr: str, exit_code: int, now: float, local_tz: tzinfo | None) -> AgentResult:
    """The run's result. A limit is looked for first (whatever the exit code), then a failure (an error the
    CLI reported, or a non-zero exit: exit 0 with an error is not done), then the outcome block."""
    failed = native.error is not None or exit_code != 0
    message = _message(native, stderr, exit_code)
    if native.limited:
        sig = parse_signal(message, now, local_tz)
        return RateLimited(message=message, reset_at=native.reset_at or sig.reset_at, quota=native.quota)
    if not failed:
        return outcome_from_text(native.text)
    sig = parse_signal(message, now, local_tz)
    if sig.klass in (SignalClass.RATE_LIMIT, SignalClass.QUOTA_REACHED):
        return RateLimited(message=message, reset_at=native.reset_at or sig.reset_at,
                           quota=sig.klass is SignalClass.QUOTA_REACHED)
    if native.auth or sig.klass is SignalClass.AUTH:
        return Failed(error=message, cause="auth")
    cause = "failed" if sig.klass is SignalClass.OTHER else str(sig.klass.value)
    return Failed(error=message if exit_code == 0 else f"exit code {exit_code}: {message}", cause=cause)


def _message(native: Native, stderr: str, exit_code: int) -> str:
    parts = [native.error or ""]
    if exit_code != 0 or native.error is not None or native.limited:
        parts.append(tail(stderr, _ERROR_TAIL))
    text = "\n".join(p for p in parts if p and p.strip()).strip()
    return tail(text, _ERROR_TAIL) or tail(native.text, _ERROR_TAIL) or "the agent failed without a message"
