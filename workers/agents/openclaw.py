"""OpenClaw: ``openclaw agent exec --message-file - --json``, the prompt on stdin (openclaw#113988).

Output: one pretty-printed JSON document (src/commands/agent-exec-result.ts): ``ok``, ``status``
(``ok|error|timeout``), ``final``, ``payloads``, ``usage``, ``costUsd``, ``sessionId``, ``error{message,kind}``;
exit 0 ok, 1 error, 2 timeout. Older ``openclaw agent --json`` prints ``{payloads, meta{agentMeta{sessionId,
usage}}}`` (on stderr with ``--local``) or the Gateway's ``{status, result{payloads, meta}}``: the parser takes
the first complete JSON object of stdout, then stderr, and reads all three shapes. A rate limit can come as a
*normal reply* (``⚠️ API rate limit reached…``, openclaw#150726): such a reply is a rate limit, not done. No
reset time is given (unverified), so the default cooldown applies. Each exec run is a fresh session: no resume.
"""

from __future__ import annotations

import re
import signal
from typing import Any

from .base import Invocation, Launch, Native, Usage, count, dollars, first_object, obj, text_of

__all__ = ["OpenClaw"]

_LIMIT_REPLY = re.compile(
    r"API rate limit reached|temporarily rate-limited|\(rate_limit\)|All models failed", re.I)
_EXIT_TIMEOUT = 2


class OpenClaw:
    preset = "openclaw"
    default_bin = "openclaw"
    resumes = False
    stop_signals = (signal.SIGTERM,)

    def launch(self, inv: Invocation) -> Launch:
        argv = [inv.bin, "agent", "exec", "--message-file", "-", "--cwd", inv.cwd, "--model", inv.model, "--json",
                "--timeout", str(max(1, int(inv.timeout_s))), *inv.args]
        return Launch(argv=argv, stdin=inv.prompt.encode("utf-8"))

    def parse(self, stdout: str, stderr: str, exit_code: int) -> Native:
        doc = first_object(stdout, stderr) or {}
        result = obj(doc.get("result")) or doc
        meta = obj(result.get("meta"))
        agent_meta = obj(meta.get("agentMeta"))
        native = Native(text=text_of(doc.get("final")) or _payload_text(result.get("payloads")))
        native.session_id = text_of(doc.get("sessionId")) or text_of(agent_meta.get("sessionId")) or None
        native.usage = _usage(doc.get("usage") or agent_meta.get("usage"), dollars(doc.get("costUsd")))
        native.error = _error(doc, meta, exit_code)
        if native.error is None and _LIMIT_REPLY.search(native.text):
            native.error = native.text  # a rate limit given as the reply
        return native


def _payload_text(payloads: Any) -> str:
    if not isinstance(payloads, list):
        return ""
    return "\n".join(text_of(p.get("text")) for p in payloads if isinstance(p, dict) and text_of(p.get("text")))


def _usage(usage: Any, cost: float | None) -> Usage:
    if not isinstance(usage, dict):
        return Usage(cost_usd=cost)
    return Usage(count(usage.get("input", usage.get("input_tokens"))),
                 count(usage.get("output", usage.get("output_tokens"))), cost)


def _error(doc: dict[str, Any], meta: dict[str, Any], exit_code: int) -> str | None:
    for where in (doc.get("error"), meta.get("error")):
        if isinstance(where, dict) and text_of(where.get("message")):
            return f"{text_of(where.get('kind')) or 'error'}: {where['message']}"
    status = text_of(doc.get("status"))
    if status in ("error", "timeout") or doc.get("ok") is False:
        return f"openclaw status {status or 'error'}: {_payload_text(_payloads(doc)) or text_of(doc.get('summary'))}"
    if exit_code == _EXIT_TIMEOUT:
        return "openclaw timed out"
    return None


def _payloads(doc: dict[str, Any]) -> Any:
    result = doc.get("result")
    return result.get("payloads") if isinstance(result, dict) else doc.get("payloads")
