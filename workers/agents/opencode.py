"""opencode: ``opencode run --format json``, the prompt on stdin (a non-TTY stdin is all appended).

Output: JSONL (packages/opencode/src/cli/cmd/run.ts): every event has ``sessionID``; ``text{part{text}}`` (the
final text is the text parts after the last ``step_start``), ``step_finish{part{cost, tokens{input, output,
…}}}`` (summed over steps), ``error{error{name, data{message, statusCode}}}``. Exit 1 if any session error.
``--auto`` approves permissions (else run mode auto-rejects them). Unverified: how it stops on SIGTERM, and
any reset time: a 429 ``APIError`` gets the default cooldown. Retryable 429s are retried silently, so a run
can hang until the timeout.
"""

from __future__ import annotations

import signal
from typing import Any

from .base import Invocation, Launch, Native, Usage, count, dollars, json_lines, obj, text_of

__all__ = ["OpenCode"]


class OpenCode:
    preset = "opencode"
    default_bin = "opencode"
    resumes = True
    stop_signals = (signal.SIGTERM,)

    def launch(self, inv: Invocation) -> Launch:
        argv = [inv.bin, "run", "--format", "json", "--model", inv.model, "--auto", "--dir", inv.cwd]
        if inv.session_id:
            argv += ["--session", inv.session_id]
        return Launch(argv=[*argv, *inv.args], stdin=inv.prompt.encode("utf-8"))

    def parse(self, stdout: str, stderr: str, exit_code: int) -> Native:
        native = Native()
        texts: list[str] = []
        for doc in json_lines(stdout):
            _read(native, doc, texts)
        native.text = "\n".join(t for t in texts if t)
        return native


def _read(native: Native, doc: dict[str, Any], texts: list[str]) -> None:
    kind = doc.get("type")
    if text_of(doc.get("sessionID")):
        native.session_id = doc["sessionID"]
    part = obj(doc.get("part"))
    if kind == "step_start":
        texts.clear()
    elif kind == "text":
        texts.append(text_of(part.get("text")))
    elif kind == "step_finish":
        tokens = obj(part.get("tokens"))
        native.usage = native.usage.plus(Usage(count(tokens.get("input")), count(tokens.get("output")),
                                               dollars(part.get("cost"))))
    elif kind == "error":
        native.error = _error_text(doc.get("error"))


def _error_text(error: Any) -> str:
    if not isinstance(error, dict):
        return text_of(error) or "session error"
    data = obj(error.get("data"))
    name, message, status = text_of(error.get("name")), text_of(data.get("message")), data.get("statusCode")
    status_text = f" (status {status})" if isinstance(status, int) else ""
    return f"{name or 'Error'}: {message}{status_text}".strip()
