"""What the fake agent CLIs share: the record of each call, the scenario, sessions, and the hang.

Each fake (``fake_claude.py``, ``fake_codex.py``, …) parses its real CLI's flags (an unknown flag is a usage
error, exit 2, as the real parsers do) and prints that CLI's real output format, taken from
/work/shared/agents/REAL_AGENTS.md. Tests put them on PATH under the real names (see ``install_fakes``).

- The scenario is the last ``fake:<name>`` token of the prompt, or ``fake:<name>@<preset>`` to apply to one
  preset only (the others then do ``done``): ``done``, ``follow`` (an outcome block asking for a follow-up whose
  next prompt is ``fake:done``), ``noblock``, ``usage`` (a usage limit with a reset), ``ratelimit`` (a rate
  limit with a reset), ``auth``, ``error0`` (exit 0, but the output says the run failed) and ``hang`` (a child
  process, then sleep until killed).
- Every call appends one JSON line to ``$FAKE_AGENT_DIR/calls.jsonl``: cli, argv, cwd, env, stdin, prompt,
  pid, pgid, scenario, session.
- Sessions live in ``$FAKE_AGENT_DIR/sessions/<cli>/<id>`` (holding the cwd): resuming an unknown id, or from
  another cwd (Claude keys sessions by cwd), fails as the real CLI does.
- ``$FAKE_RESET_S`` (default 3600): how far ahead the limit scenarios put their reset.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, NoReturn

_TOKEN = re.compile(r"fake:([a-z0-9]+)(?:@([a-z-]+))?")
SUMMARY = "fake work done"


def home() -> Path:
    path = Path(os.environ.get("FAKE_AGENT_DIR", "/tmp/fake-agents"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def scenario(prompt: str, preset: str) -> str:
    """The last ``fake:`` token of the prompt that applies to ``preset`` (``done`` when none)."""
    found = "done"
    for m in _TOKEN.finditer(prompt):
        if m.group(2) in (None, preset):
            found = m.group(1)
    return found


def reset_in() -> float:
    return float(os.environ.get("FAKE_RESET_S", "3600"))


def record(cli: str, argv: list[str], stdin: str, prompt: str, scene: str, session: str | None) -> None:
    doc = {"cli": cli, "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "stdin": stdin, "prompt": prompt,
           "pid": os.getpid(), "pgid": os.getpgid(0), "scenario": scene, "session": session, "t": time.time()}
    line = (json.dumps(doc) + "\n").encode("utf-8")
    fd = os.open(home() / "calls.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def new_session(cli: str) -> str:
    sid = str(uuid.uuid4())
    folder = home() / "sessions" / cli
    folder.mkdir(parents=True, exist_ok=True)
    (folder / sid).write_text(os.getcwd())
    return sid


def known_session(cli: str, sid: str, same_cwd: bool = True) -> bool:
    path = home() / "sessions" / cli / sid
    if not path.exists():
        return False
    return not same_cwd or path.read_text() == os.getcwd()


def answer(scene: str, cli: str) -> str:
    """The final text of a successful turn in ``scene`` (done / follow / noblock)."""
    if scene == "noblock":
        return f"I changed the files as asked ({cli}). Nothing else to report."
    follow = scene == "follow"
    block = {"needs_follow_up": follow, "next_prompt": "fake:done now add the tests" if follow else "",
             "summary": f"{SUMMARY} by {cli}"}
    return f"Done with this step.\n\n```clawq-outcome\n{json.dumps(block)}\n```\n"


def hang() -> NoReturn:
    """A child in our process group (as a shell tool would be), then sleep until a signal ends us; the signals
    received are appended to ``hang.<pid>.signals`` (SIGINT and SIGTERM end the fake, as they end the CLIs)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    (home() / f"hang.{os.getpid()}").write_text(json.dumps({"pid": os.getpid(), "child": child.pid}))

    def on_signal(signum: int, _frame: object) -> None:
        with open(home() / f"hang.{os.getpid()}.signals", "a", encoding="utf-8") as fh:
            fh.write(signal.Signals(signum).name + "\n")
        sys.exit(128 + signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    time.sleep(3600)
    sys.exit(0)


def emit(*docs: dict[str, Any]) -> None:
    for doc in docs:
        print(json.dumps(doc), flush=True)


def usage_error(prog: str, message: str) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)
