"""Fake ``openclaw`` (``openclaw agent exec --json``): see fakecli.py. Formats: REAL_AGENTS.md section 4."""

from __future__ import annotations

import argparse
import json
import sys
import uuid

import fakecli

CLI = "openclaw"


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="openclaw", add_help=False)
    p.add_argument("--version", action="store_true")
    p.add_argument("words", nargs="*")
    ns, rest = p.parse_known_args(argv)
    if ns.version:
        return ns
    if ns.words[:2] != ["agent", "exec"]:
        fakecli.usage_error("openclaw", f"unknown command {' '.join(ns.words)!r}")
    ex = argparse.ArgumentParser(prog="openclaw agent exec", add_help=False)
    ex.add_argument("--message-file")
    ex.add_argument("--cwd")
    ex.add_argument("--model")
    ex.add_argument("--json", action="store_true")
    ex.add_argument("--timeout", type=int)
    ex.add_argument("--thinking")
    ex.add_argument("prompt", nargs="?")
    sub, unknown = ex.parse_known_args(ns.words[2:] + rest)
    if unknown:
        fakecli.usage_error("openclaw agent exec", f"unknown option '{unknown[0]}'")
    sub.version = False
    return sub


def _doc(text: str, *, ok: bool = True, status: str = "ok", **extra: object) -> dict:
    return {"ok": ok, "status": status, "final": text, "payloads": [{"text": text, "isError": not ok}],
            "usage": {"input": 1500, "output": 300, "cacheRead": 0, "cacheWrite": 0, "total": 1800},
            "costUsd": 0.0042, "assistantTurns": 1, "model": "glm-4.7", "provider": "zai",
            "sessionId": str(uuid.uuid4()), **extra}


def main() -> int:
    ns = _args(sys.argv[1:])
    if ns.version:
        print("2026.11.3")
        return 0
    stdin = sys.stdin.read() if ns.message_file == "-" else ""
    prompt = stdin if ns.message_file == "-" else (ns.prompt or "")
    scene = fakecli.scenario(prompt, "openclaw")
    fakecli.record(CLI, sys.argv[1:], stdin, prompt, scene, None)
    if scene == "hang":
        fakecli.hang()
    code, doc = _play(scene)
    print(json.dumps(doc, indent=2))  # pretty-printed, as JSON.stringify(x, null, 2)
    return code


def _play(scene: str) -> tuple[int, dict]:
    if scene == "usage":  # openclaw#150726: the limit arrives as a normal reply
        return 0, _doc("⚠️ API rate limit reached. Please try again later.")
    if scene == "ratelimit":
        return 0, _doc("⚠️ All models are temporarily rate-limited. Please try again in a few minutes.")
    if scene == "auth":
        return 1, _doc("", ok=False, status="error",
                       error={"kind": "agent_error", "message": 'No API key found for provider "zai".'})
    if scene == "error0":  # before openclaw#125557: a failed turn exited 0 (Gateway shape)
        return 0, {"runId": str(uuid.uuid4()), "status": "error", "summary": "failed",
                   "result": {"payloads": [{"text": "Context overflow: prompt too large for the model."}]}}
    return 0, _doc(fakecli.answer(scene, CLI))


if __name__ == "__main__":
    sys.exit(main())
