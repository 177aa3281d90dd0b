"""Fake ``gemini`` (headless, ``-o stream-json``): see fakecli.py. Formats: REAL_AGENTS.md section 3."""

from __future__ import annotations

import argparse
import os
import sys

import fakecli

CLI = "gemini"
TS = "2026-12-04T23:00:00.000Z"


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gemini", add_help=False)
    p.add_argument("-p", "--prompt")
    p.add_argument("-m", "--model")
    p.add_argument("-r", "--resume")
    p.add_argument("-o", "--output-format", choices=["text", "json", "stream-json"], default="text")
    p.add_argument("--approval-mode", choices=["default", "auto_edit", "yolo", "plan"])
    p.add_argument("--skip-trust", action="store_true")
    p.add_argument("--include-directories")
    p.add_argument("-v", "--version", action="store_true")
    ns, unknown = p.parse_known_args(argv)
    if unknown:
        print(f"Unknown argument: {unknown[0]}", file=sys.stderr)
        sys.exit(42)
    return ns


def main() -> int:
    ns = _args(sys.argv[1:])
    if ns.version:
        print("0.21.0")
        return 0
    stdin = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    prompt = (stdin + "\n\n" + (ns.prompt or "")).strip() if stdin else (ns.prompt or "")
    scene = fakecli.scenario(prompt, "gemini-cli")
    fakecli.record(CLI, sys.argv[1:], stdin, prompt, scene, ns.resume)
    if not ns.skip_trust and os.environ.get("GEMINI_CLI_TRUST_WORKSPACE") != "true":
        print("This folder is not trusted.", file=sys.stderr)
        return 55
    if scene == "auth":  # packages/cli/src/validateNonInterActiveAuth.ts, exit 41
        print("Please set an Auth method in your /root/.gemini/settings.json or specify one of the following "
              "environment variables before running: GEMINI_API_KEY, GOOGLE_GENAI_USE_VERTEXAI, GOOGLE_GENAI_USE_GCA",
              file=sys.stderr)
        return 41
    if ns.resume and not fakecli.known_session(CLI, ns.resume, same_cwd=False):
        print(f"Error resuming session: Invalid session identifier \"{ns.resume}\".", file=sys.stderr)
        return 42
    sid = ns.resume or fakecli.new_session(CLI)
    fakecli.emit({"type": "init", "timestamp": TS, "session_id": sid, "model": ns.model})
    return _play(scene)


def _play(scene: str) -> int:
    if scene == "hang":
        fakecli.hang()
    if scene == "usage":
        print("TerminalQuotaError: You have exhausted your daily quota on this model.", file=sys.stderr)
        return 1
    if scene == "ratelimit":
        print("[API Error: You exceeded your current quota, please check your plan and billing details. For more "
              "information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.\n"
              "* Quota exceeded for metric: generativelanguage.googleapis.com/generate_content_free_tier_requests, "
              f"limit: 2\nPlease retry in {fakecli.reset_in():.9f}s. (Status: RESOURCE_EXHAUSTED)]", file=sys.stderr)
        return 1
    if scene == "error0":
        fakecli.emit({"type": "error", "timestamp": TS, "severity": "error",
                      "message": "Maximum session turns exceeded"},
                     {"type": "result", "timestamp": TS, "status": "error",
                      "error": {"type": "FatalTurnLimitedError", "message": "Maximum session turns exceeded"},
                      "stats": {"total_tokens": 10, "input_tokens": 8, "output_tokens": 2}})
        return 0
    text = fakecli.answer(scene, CLI)
    half = len(text) // 2
    fakecli.emit({"type": "message", "timestamp": TS, "role": "user", "content": "(prompt)"},
                 {"type": "message", "timestamp": TS, "role": "assistant", "content": text[:half], "delta": True},
                 {"type": "message", "timestamp": TS, "role": "assistant", "content": text[half:], "delta": True},
                 {"type": "result", "timestamp": TS, "status": "success",
                  "stats": {"total_tokens": 1300, "input_tokens": 1200, "output_tokens": 100, "cached": 0,
                            "input": 1200, "duration_ms": 900, "tool_calls": 0, "models": {}}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
