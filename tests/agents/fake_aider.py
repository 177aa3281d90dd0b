"""Fake ``aider`` (``aider --message-file``): see fakecli.py. Formats: REAL_AGENTS.md section 6."""

from __future__ import annotations

import argparse
import sys

import fakecli

CLI = "aider"


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="aider", add_help=False)
    p.add_argument("-m", "--message")
    p.add_argument("-f", "--message-file")
    p.add_argument("--model")
    for flag in ("--yes-always", "--no-pretty", "--no-stream", "--no-check-update", "--no-auto-commits",
                 "--restore-chat-history", "--version"):
        p.add_argument(flag, action="store_true")
    p.add_argument("files", nargs="*")
    ns, unknown = p.parse_known_args(argv)
    if unknown:
        fakecli.usage_error("aider", f"unrecognized arguments: {' '.join(unknown)}")
    return ns


def main() -> int:
    ns = _args(sys.argv[1:])
    if ns.version:
        print("aider 0.86.1")
        return 0
    prompt = ns.message or ""
    if ns.message_file:
        with open(ns.message_file, encoding="utf-8") as fh:
            prompt = fh.read()
    scene = fakecli.scenario(prompt, "aider")
    fakecli.record(CLI, sys.argv[1:], "", prompt, scene, None)
    print(f"Aider v0.86.1\nMain model: {ns.model} with diff edit format\nGit repo: none\n")
    if scene == "hang":
        fakecli.hang()
    print(_play(scene))
    return 0  # aider exits 0 even when it gave up (Aider-AI/aider#3918)


def _play(scene: str) -> str:
    if scene == "usage":
        return ("litellm.RateLimitError: RateLimitError: OpenAIException - You exceeded your current quota, please "
                "check your plan and billing details.\nThe API provider has rate limited you. Try again later or "
                "check your quotas.\nRetrying in 0.2 seconds...")
    if scene == "ratelimit":
        return ("litellm.RateLimitError: AnthropicException - Rate limit exceeded. Please try again in "
                f"{fakecli.reset_in():.0f}s.\nThe API provider has rate limited you. Try again later or check your "
                "quotas.\nRetrying in 0.2 seconds...")
    if scene == "auth":
        return ('litellm.AuthenticationError: AnthropicException - {"type":"error","error":{"type":'
                '"authentication_error","message":"invalid x-api-key"}}\nThe API provider is not able to '
                "authenticate you. Check your API key.")
    if scene == "error0":
        return "Model gpt-4o has hit a token limit!\nToken counts below are approximate."
    return (fakecli.answer(scene, CLI) +
            "\nTokens: 2.3k sent, 120 received. Cost: $0.01 message, $0.02 session.")


if __name__ == "__main__":
    sys.exit(main())
