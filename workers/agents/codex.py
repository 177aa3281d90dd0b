"""OpenAI Codex CLI: ``codex exec --json``, the prompt on stdin (``-``).

Output: JSONL (codex-rs/exec/src/exec_events.rs): ``thread.started{thread_id}`` (the session id),
``item.completed`` with an ``agent_message`` (the final text is the last one), ``turn.completed{usage}``
(no cost), ``turn.failed{error{message}}`` and ``error{message}``. A usage limit reads ``You've hit your usage
limit. … try again at 12:16 PM.`` in the machine's **local** time (or ``Sep 5th, 2026 12:16 PM`` on another
day): the caller passes the local zone to :mod:`broker.signals`. Codex refuses a directory that is not a git
repository without ``--skip-git-repo-check``. Resume: ``codex exec [flags] resume <id> -``. It stops cleanly
on SIGINT (it interrupts the turn), and has no SIGTERM handler.
"""

from __future__ import annotations

import signal
from typing import Any

from .base import Invocation, Launch, Native, Usage, count, json_lines, obj, text_of

__all__ = ["Codex"]


class Codex:
    preset = "codex"
    default_bin = "codex"
    resumes = True
    stop_signals = (signal.SIGINT, signal.SIGTERM)

    def launch(self, inv: Invocation) -> Launch:
        argv = [inv.bin, "exec", "--json", "--model", inv.model, "--sandbox", "workspace-write",
                "--skip-git-repo-check", *inv.args]
        if inv.session_id:
            argv += ["resume", inv.session_id]
        argv.append("-")
        return Launch(argv=argv, stdin=inv.prompt.encode("utf-8"))

    def parse(self, stdout: str, stderr: str, exit_code: int) -> Native:
        native = Native()
        for doc in json_lines(stdout):
            _read(native, doc)
        return native


def _read(native: Native, doc: dict[str, Any]) -> None:
    kind = doc.get("type")
    if kind == "thread.started" and text_of(doc.get("thread_id")):
        native.session_id = doc["thread_id"]
    elif kind == "item.completed":
        item = doc.get("item")
        if isinstance(item, dict) and item.get("type") == "agent_message":
            native.text = text_of(item.get("text"))
    elif kind == "turn.completed":
        usage = obj(doc.get("usage"))
        native.usage = native.usage.plus(Usage(count(usage.get("input_tokens")), count(usage.get("output_tokens"))))
    elif kind == "turn.failed":
        error = doc.get("error")
        native.error = text_of(error.get("message")) if isinstance(error, dict) else ""
        native.error = native.error or "turn failed"
    elif kind == "error":
        message = text_of(doc.get("message"))
        if message and not message.lower().startswith("reconnecting"):  # a retried stream error is not the end
            native.error = message
