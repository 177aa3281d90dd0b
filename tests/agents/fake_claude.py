"""Fake ``claude`` (Claude Code print mode): see fakecli.py. Formats: REAL_AGENTS.md section 1."""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import fakecli

CLI = "claude"


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="claude", add_help=False)
    p.add_argument("-p", "--print", action="store_true")
    p.add_argument("--output-format", choices=["text", "json", "stream-json"], default="text")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--model")
    p.add_argument("-r", "--resume")
    p.add_argument("--session-id")
    p.add_argument("--dangerously-skip-permissions", action="store_true")
    p.add_argument("--permission-mode")
    p.add_argument("--max-turns", type=int)
    p.add_argument("--version", action="store_true")
    p.add_argument("prompt", nargs="?")
    ns, unknown = p.parse_known_args(argv)
    if unknown:
        fakecli.usage_error("claude", f"unknown option '{unknown[0]}'")
    return ns


def _result(text: str, sid: str, *, is_error: bool = False, subtype: str = "success", **extra: object) -> dict:
    return {"type": "result", "subtype": subtype, "is_error": is_error, "duration_ms": 1998, "duration_api_ms": 1976,
            "num_turns": 1, "result": text, "stop_reason": "end_turn", "session_id": sid, "total_cost_usd": 0.0079825,
            "usage": {"input_tokens": 3, "cache_read_input_tokens": 15635, "output_tokens": 6}, **extra}


def main() -> int:
    ns = _args(sys.argv[1:])
    if ns.version:
        print("2.1.240 (Claude Code)")
        return 0
    if ns.output_format == "stream-json" and not ns.verbose:
        print("Error: When using --print, --output-format=stream-json requires --verbose", file=sys.stderr)
        return 1
    if ns.dangerously_skip_permissions and os.geteuid() == 0 and os.environ.get("IS_SANDBOX") != "1":
        print("--dangerously-skip-permissions cannot be used with root/sudo privileges for security reasons",
              file=sys.stderr)
        return 1
    stdin = "" if sys.stdin.isatty() else sys.stdin.read()
    prompt = (ns.prompt or "") + stdin
    if not prompt.strip():
        print("Error: Input must be provided through stdin or --prompt when running with --print", file=sys.stderr)
        return 1
    scene = fakecli.scenario(prompt, "claude-code")
    fakecli.record(CLI, sys.argv[1:], stdin, prompt, scene, ns.resume)
    if ns.resume and not fakecli.known_session(CLI, ns.resume):
        print(f"No conversation found with session ID: {ns.resume}", file=sys.stderr)
        return 1
    sid = ns.resume or fakecli.new_session(CLI)
    fakecli.emit({"type": "system", "subtype": "init", "session_id": sid, "cwd": os.getcwd(), "model": ns.model})
    return _play(scene, sid)


def _play(scene: str, sid: str) -> int:
    reset = int(time.time() + fakecli.reset_in())
    if scene == "hang":
        fakecli.hang()
    if scene == "usage":
        lisbon = datetime.fromtimestamp(reset, UTC).astimezone(ZoneInfo("Europe/Lisbon"))
        clock = lisbon.strftime("%I%p").lstrip("0").lower()
        fakecli.emit({"type": "rate_limit_event", "rate_limit_info": {
            "status": "rejected", "resetsAt": reset, "rateLimitType": "five_hour", "overageStatus": "rejected",
            "overageDisabledReason": "org_level_disabled_until", "isUsingOverage": False}},
            _result(f"You've hit your limit · resets {clock} (Europe/Lisbon)", sid, is_error=True))
        return 1
    if scene == "ratelimit":
        fakecli.emit(_result(f"Claude AI usage limit reached|{reset}", sid, is_error=True))
        return 1
    if scene == "auth":
        fakecli.emit({"type": "assistant", "message": {"content": [{"type": "text", "text": "Invalid API key"}]},
                      "session_id": sid, "error": "authentication_failed"},
                     _result("Invalid API key · Please run /login", sid, is_error=True))
        return 1
    if scene == "error0":  # anthropics/claude-code#79500: an API error, exit 0
        fakecli.emit(_result('API Error: 500 {"type":"error","error":{"type":"api_error","message":"Internal server '
                             'error"}}', sid, is_error=True, api_error_status=500))
        return 0
    text = fakecli.answer(scene, CLI)
    fakecli.emit({"type": "assistant", "message": {"content": [{"type": "text", "text": text}]}, "session_id": sid},
                 _result(text, sid))
    return 0


if __name__ == "__main__":
    sys.exit(main())
