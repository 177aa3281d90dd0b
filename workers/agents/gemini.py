"""Google Gemini CLI: ``gemini -o stream-json -p <prompt>``.

Output: JSONL (packages/cli nonInteractiveCli): ``init{session_id,model}``, assistant ``message`` deltas (the
final text is their concatenation), ``error{severity,message}`` and ``result{status, error?, stats}``.
Failures also go to stderr as text (``TerminalQuotaError``, ``Please retry in 44.09s``). Exit codes
(packages/core/src/utils/exitCodes.ts): 41 auth, 42 input, 44 sandbox, 52 config, 53 turn limit, 54 tool, 55
untrusted folder (``--skip-trust`` avoids it), 130 cancelled. SIGTERM exits 0, so a kill is ours to see.

Unverified: whether ``-p ""`` with the prompt on stdin works. The prompt goes as the ``-p`` argument; one too
long for a single argument (128 KiB on Linux) goes on stdin, which Gemini puts before the ``-p`` text.
"""

from __future__ import annotations

import signal
from typing import Any

from .base import Invocation, Launch, Native, Usage, count, json_lines, obj, text_of

__all__ = ["GeminiCli"]

EXIT_AUTH = 41
#: Linux refuses a single argument longer than 128 KiB (MAX_ARG_STRLEN); keep a margin.
MAX_ARG_BYTES = 100 * 1024
_EXIT_MEANING = {41: "authentication failed", 42: "bad input", 44: "sandbox error", 52: "config error",
                 53: "Maximum session turns exceeded", 54: "fatal tool error", 55: "untrusted folder",
                 130: "cancelled"}


class GeminiCli:
    preset = "gemini-cli"
    default_bin = "gemini"
    resumes = True
    stop_signals = (signal.SIGTERM,)

    def launch(self, inv: Invocation) -> Launch:
        argv = [inv.bin, "--output-format", "stream-json", "--model", inv.model, "--approval-mode", "yolo",
                "--skip-trust"]
        if inv.session_id:
            argv += ["--resume", inv.session_id]
        argv += list(inv.args)
        if len(inv.prompt.encode("utf-8")) <= MAX_ARG_BYTES:
            return Launch(argv=[*argv, "--prompt", inv.prompt], stdin=None)
        return Launch(argv=[*argv, "--prompt", "Follow the instructions above."], stdin=inv.prompt.encode("utf-8"))

    def parse(self, stdout: str, stderr: str, exit_code: int) -> Native:
        native = Native()
        deltas: list[str] = []
        for doc in json_lines(stdout):
            _read(native, doc, deltas)
        native.text = "".join(deltas)
        if exit_code == EXIT_AUTH:
            native.auth = True
        if exit_code in _EXIT_MEANING and native.error is None:
            native.error = f"gemini: {_EXIT_MEANING[exit_code]}"
        return native


def _read(native: Native, doc: dict[str, Any], deltas: list[str]) -> None:
    kind = doc.get("type")
    if kind == "init" and text_of(doc.get("session_id")):
        native.session_id = doc["session_id"]
    elif kind == "message" and doc.get("role") == "assistant":
        content = text_of(doc.get("content"))
        if doc.get("delta") is True:
            deltas.append(content)
        else:
            deltas[:] = [content]
    elif kind == "error" and text_of(doc.get("message")) and doc.get("severity") != "warning":
        native.error = doc["message"]
    elif kind == "result":
        stats = obj(doc.get("stats"))
        native.usage = Usage(count(stats.get("input_tokens")), count(stats.get("output_tokens")))
        if doc.get("status") == "error":
            error = doc.get("error")
            message = text_of(error.get("message")) if isinstance(error, dict) else text_of(error)
            native.error = message or native.error or "result status error"
