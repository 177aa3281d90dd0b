"""Claude Code: ``claude -p --output-format stream-json --verbose``, the prompt on stdin.

Output: JSONL. The last ``type: result`` line holds the final text, ``session_id``, ``total_cost_usd``,
``usage`` and ``is_error`` (Claude can exit 0 with ``is_error: true``, anthropics/claude-code#79500). A
``rate_limit_event`` whose ``status`` is ``rejected`` carries the reset as ``resetsAt`` (epoch s). Assistant
messages may carry ``error: authentication_failed | rate_limit | billing_error | …``. Text forms of the usage
limit (``Claude AI usage limit reached|<epoch>``, ``You've hit your limit · resets 1pm (Europe/Lisbon)``) are
read by :mod:`broker.signals`. Root: ``--dangerously-skip-permissions`` is refused as root unless
``IS_SANDBOX=1`` (#3490), so the adapter sets it then.
"""

from __future__ import annotations

import re
import signal
from typing import Any

from .base import Invocation, Launch, Native, Usage, count, dollars, json_lines, obj, text_of

__all__ = ["ClaudeCode"]

#: A whole result that is a usage-limit notice (``Claude AI usage limit reached|<epoch>``, ``You've hit your
#: limit · resets 1pm (Europe/Lisbon)``, ``…session limit…``): a limit even when ``is_error`` is false.
_LIMIT_TEXT = re.compile(r"(?:Claude AI usage limit reached\s*\|\s*\d{9,}|You've hit your (?:\w+ )?limit\b)", re.I)
_ERROR_KINDS = {"authentication_failed", "billing_error", "rate_limit", "invalid_request", "server_error", "unknown"}


class ClaudeCode:
    preset = "claude-code"
    default_bin = "claude"
    resumes = True
    stop_signals = (signal.SIGTERM,)  #: print mode aborts the turn and kills its tool processes (exit 143)

    def launch(self, inv: Invocation) -> Launch:
        argv = [inv.bin, "-p", "--output-format", "stream-json", "--verbose", "--model", inv.model,
                "--dangerously-skip-permissions"]
        if inv.session_id:
            argv += ["--resume", inv.session_id]
        argv += list(inv.args)
        return Launch(argv=argv, stdin=inv.prompt.encode("utf-8"), env={"IS_SANDBOX": "1"} if inv.root else {})

    def parse(self, stdout: str, stderr: str, exit_code: int) -> Native:
        native = Native()
        for doc in json_lines(stdout):
            _read(native, doc)
        return native


def _read(native: Native, doc: dict[str, Any]) -> None:
    kind = doc.get("type")
    if isinstance(doc.get("session_id"), str) and doc["session_id"]:
        native.session_id = doc["session_id"]
    if kind == "result":
        _result(native, doc)
    elif kind == "rate_limit_event":
        _rate_limit(native, doc.get("rate_limit_info"))
    elif kind == "assistant":
        _assistant(native, doc)


def _result(native: Native, doc: dict[str, Any]) -> None:
    native.text = text_of(doc.get("result"))
    usage = obj(doc.get("usage"))
    parts = [count(usage.get(k)) for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")]
    known = [p for p in parts if p is not None]
    native.usage = Usage(sum(known) if known else None, count(usage.get("output_tokens")),
                         dollars(doc.get("total_cost_usd")))
    subtype = text_of(doc.get("subtype"))
    if _LIMIT_TEXT.match(native.text.strip()):  # fixtures disagree on is_error for these: the text decides
        native.error = native.text.strip()
        return
    if doc.get("is_error") is not True and subtype in ("", "success"):
        native.error, native.limited, native.auth = None, False, False  # the turn succeeded after all
    else:
        status = doc.get("api_error_status")
        listed = doc.get("errors")
        errors = [text_of(e) for e in listed if text_of(e)] if isinstance(listed, list) else []
        detail = native.text or "; ".join(errors) or subtype or "is_error"
        native.error = (f"{detail} (HTTP {status})" if isinstance(status, int) else detail).strip()


def _rate_limit(native: Native, info: Any) -> None:
    if not isinstance(info, dict) or info.get("status") != "rejected":
        return  # allowed / allowed_warning: the run goes on
    native.limited = True
    window = text_of(info.get("rateLimitType"))
    native.quota = True  #: five_hour, seven_day…: a plan's usage window, not a per-minute rate
    reset = info.get("resetsAt")
    if isinstance(reset, int | float) and not isinstance(reset, bool):
        native.reset_at = float(reset)
    native.error = native.error or f"Claude {window or 'usage'} limit reached (rate_limit_event rejected)"


def _assistant(native: Native, doc: dict[str, Any]) -> None:
    kind = text_of(doc.get("error"))
    if kind not in _ERROR_KINDS:
        return
    if kind == "authentication_failed":
        native.auth = True
    native.error = native.error or f"assistant error: {kind}"
