"""Fake ``opencode`` (``opencode run --format json``): see fakecli.py. Formats: REAL_AGENTS.md section 5."""

from __future__ import annotations

import argparse
import sys
import time

import fakecli

CLI = "opencode"


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="opencode", add_help=False)
    p.add_argument("--version", action="store_true")
    p.add_argument("words", nargs="*")
    p.add_argument("--format", choices=["default", "json"], default="default")
    p.add_argument("-m", "--model")
    p.add_argument("-s", "--session")
    p.add_argument("-c", "--continue", action="store_true")
    p.add_argument("--auto", "--yolo", "--dangerously-skip-permissions", action="store_true", dest="auto")
    p.add_argument("--dir")
    p.add_argument("--agent")
    ns, unknown = p.parse_known_args(argv)
    if unknown:
        fakecli.usage_error("opencode run", f"unknown option '{unknown[0]}'")
    if not ns.version and ns.words[:1] != ["run"]:
        fakecli.usage_error("opencode", "unknown command")
    return ns


def _ev(kind: str, sid: str, **fields: object) -> dict:
    return {"type": kind, "timestamp": int(time.time() * 1000), "sessionID": sid, **fields}


def main() -> int:
    ns = _args(sys.argv[1:])
    if ns.version:
        print("1.4.2")
        return 0
    stdin = "" if sys.stdin.isatty() else sys.stdin.read()
    prompt = "\n".join(p for p in (" ".join(ns.words[1:]), stdin) if p)
    if not prompt.strip():
        print("You must provide a message or a command", file=sys.stderr)
        return 1
    scene = fakecli.scenario(prompt, "opencode")
    fakecli.record(CLI, sys.argv[1:], stdin, prompt, scene, ns.session)
    if ns.session and not fakecli.known_session(CLI, ns.session, same_cwd=False):
        print(f"Error: Session not found: {ns.session}", file=sys.stderr)
        return 1
    sid = ns.session or fakecli.new_session(CLI)
    fakecli.emit(_ev("step_start", sid, part={"type": "step-start"}))
    return _play(scene, sid)


def _error(sid: str, name: str, **data: object) -> None:
    fakecli.emit(_ev("error", sid, error={"name": name, "data": data}))


def _play(scene: str, sid: str) -> int:
    if scene == "hang":
        fakecli.hang()
    if scene == "usage":
        _error(sid, "APIError", message="You exceeded your current quota, please check your plan and billing details.",
               statusCode=429, isRetryable=False)
        return 1
    if scene == "ratelimit":
        _error(sid, "APIError",
               message=f"Rate limit reached for requests. Please try again in {fakecli.reset_in():.0f}s.",
               statusCode=429, isRetryable=False)
        return 1
    if scene == "auth":
        _error(sid, "ProviderAuthError", providerID="anthropic", message="Invalid API key for provider anthropic")
        return 1
    if scene == "error0":
        _error(sid, "MessageOutputLengthError", message="output length exceeded")
        return 0
    fakecli.emit(_ev("text", sid, part={"type": "text", "text": fakecli.answer(scene, CLI)}),
                 _ev("step_finish", sid, part={"type": "step-finish", "reason": "stop", "cost": 0.0123,
                                               "tokens": {"total": 17512, "input": 17509, "output": 3,
                                                          "reasoning": 0, "cache": {"read": 0, "write": 0}}}),
                 _ev("done", sid, reason="idle", rejected=[]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
