"""Fake ``codex`` (``codex exec --json``): see fakecli.py. Formats: REAL_AGENTS.md section 2."""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime

import fakecli

CLI = "codex"


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="codex", add_help=False)
    p.add_argument("--version", action="store_true")
    sub = p.add_subparsers(dest="cmd")
    ex = sub.add_parser("exec", add_help=False)
    for flag in ("--json", "--skip-git-repo-check", "--ephemeral", "--dangerously-bypass-approvals-and-sandbox"):
        ex.add_argument(flag, action="store_true")
    ex.add_argument("-m", "--model")
    ex.add_argument("-s", "--sandbox", choices=["read-only", "workspace-write", "danger-full-access"])
    ex.add_argument("-C", "--cd")
    ex.add_argument("-c", "--config", action="append")
    ex.add_argument("rest", nargs=argparse.REMAINDER)
    ns = p.parse_args(argv)
    rest = list(ns.rest or []) if ns.cmd == "exec" else []
    ns.resume = None
    if rest[:1] == ["resume"]:
        if len(rest) < 2:
            fakecli.usage_error("codex exec resume", "a SESSION_ID or --last is required")
        ns.resume, rest = rest[1], rest[2:]
    if any(r.startswith("-") and r != "-" for r in rest) or len(rest) > 1:
        fakecli.usage_error("codex exec", f"unexpected argument '{rest[0]}'")
    ns.prompt = rest[0] if rest else "-"
    return ns


def main() -> int:
    ns = _args(sys.argv[1:])
    if ns.version or ns.cmd != "exec":
        print("codex-cli 0.101.0")
        return 0
    stdin = sys.stdin.read() if ns.prompt == "-" else ""
    prompt = stdin if ns.prompt == "-" else ns.prompt
    scene = fakecli.scenario(prompt, "codex")
    fakecli.record(CLI, sys.argv[1:], stdin, prompt, scene, ns.resume)
    if not ns.skip_git_repo_check and not os.path.isdir(".git"):
        print("Not inside a trusted directory and --skip-git-repo-check was not specified.", file=sys.stderr)
        return 1
    if ns.resume and not fakecli.known_session(CLI, ns.resume, same_cwd=False):
        print(f"Error: thread/resume failed: no rollout found for thread id {ns.resume}", file=sys.stderr)
        return 1
    sid = ns.resume or fakecli.new_session(CLI)
    fakecli.emit({"type": "thread.started", "thread_id": sid}, {"type": "turn.started"})
    return _play(scene)


def _fail(message: str) -> None:
    fakecli.emit({"type": "error", "message": message}, {"type": "turn.failed", "error": {"message": message}})


def _play(scene: str) -> int:
    if scene == "hang":
        fakecli.hang()
    if scene == "usage":  # the reset in the machine's local time, as codex-rs/core/src/error.rs formats it
        local = datetime.fromtimestamp(time.time() + fakecli.reset_in()).astimezone()
        clock = local.strftime("%I:%M %p").lstrip("0")
        _fail("You've hit your usage limit. To get more access now, send a request to your admin or try again at "
              f"{clock}.")
        return 1
    if scene == "ratelimit":
        _fail("exceeded retry limit, last status: 429 Too Many Requests. "
              f"Please try again in {fakecli.reset_in():.0f}s.")
        return 1
    if scene == "auth":
        _fail("unexpected status 401 Unauthorized: Missing bearer or basic authentication in header")
        return 1
    if scene == "error0":  # defensive: a failed turn whatever the exit code
        fakecli.emit({"type": "turn.failed", "error": {"message": "Codex ran out of room in the model's context "
                      "window. Start a new conversation or clear earlier history before retrying."}})
        return 0
    fakecli.emit({"type": "item.completed", "item": {"id": "item_0", "type": "reasoning", "text": "thinking"}},
                 {"type": "item.completed", "item": {"id": "item_3", "type": "agent_message",
                                                     "text": fakecli.answer(scene, CLI)}},
                 {"type": "turn.completed", "usage": {"input_tokens": 24763, "cached_input_tokens": 24448,
                                                      "output_tokens": 122}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
