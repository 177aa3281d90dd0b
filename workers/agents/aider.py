"""aider: ``aider --message-file <file> --yes-always --no-pretty --no-stream``, stdin /dev/null.

There is no JSON: the final text is stdout itself. Usage lines read ``Tokens: 2.3k sent, 120 received.
Cost: $0.01 message, $0.02 session.`` (aider/coders/base_coder.py): tokens are summed over the lines, the cost
is the last session figure. aider exits 0 even when it gave up (Aider-AI/aider#3918), so an error line
(``The API provider has rate limited you…``, ``…is not able to authenticate you…``, ``litellm.*Error``) with
no usage line after it is a failure. Resume: only ``--restore-chat-history`` (the history file in the cwd), not
by id, so every run starts fresh. Unverified: how it stops on SIGTERM.
"""

from __future__ import annotations

import os
import re
import signal

from .base import Invocation, Launch, Native, Usage

__all__ = ["Aider"]

_TOKENS_RE = re.compile(
    r"Tokens:\s*([\d.,]+)([kKmM]?)\s+sent(?:,\s*([\d.,]+)([kKmM]?)\s+cache[^,]*)?(?:,\s*[\d.,]+[kKmM]?\s+cache[^,]*)?"
    r",\s*([\d.,]+)([kKmM]?)\s+received\.(?:\s*Cost:\s*\$([\d.]+)\s+message,\s*\$([\d.]+)\s+session\.)?")
_ERROR_RE = re.compile(
    r"^.*(?:The API provider (?:has rate limited you|is not able to authenticate you)|litellm\.\w+Error|"
    r"\w+(?:RateLimit|Authentication)Error|has hit a token limit).*$", re.M)
_SCALE = {"": 1, "k": 1_000, "m": 1_000_000}


class Aider:
    preset = "aider"
    default_bin = "aider"
    resumes = False
    stop_signals = (signal.SIGINT, signal.SIGTERM)  #: SIGINT prints ``^C KeyboardInterrupt`` and stops

    def launch(self, inv: Invocation) -> Launch:
        path = os.path.join(inv.scratch, "message.md")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(inv.prompt)
        argv = [inv.bin, "--message-file", path, "--model", inv.model, "--yes-always", "--no-pretty", "--no-stream",
                "--no-check-update", *inv.args]
        return Launch(argv=argv, stdin=None)

    def parse(self, stdout: str, stderr: str, exit_code: int) -> Native:
        native = Native(text=stdout.strip())
        sent = received = 0
        cost: float | None = None
        last_usage = -1
        for m in _TOKENS_RE.finditer(stdout):
            sent += _tokens(m.group(1), m.group(2))
            received += _tokens(m.group(5), m.group(6))
            cost = float(m.group(8)) if m.group(8) else cost
            last_usage = m.end()
        if last_usage >= 0:
            native.usage = Usage(sent, received, cost)
        late = [m.group(0).strip() for m in _ERROR_RE.finditer(stdout) if m.start() > last_usage]
        if last_usage < 0:  # no answer at all: an error on stderr counts too
            late += [m.group(0).strip() for m in _ERROR_RE.finditer(stderr)]
        if late:
            native.error = "\n".join(late)[-2000:]
        return native


def _tokens(number: str, unit: str) -> int:
    try:
        return int(float(number.replace(",", "")) * _SCALE[unit.lower()])
    except ValueError:
        return 0
