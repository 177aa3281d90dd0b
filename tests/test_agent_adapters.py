"""Table tests of each CLI adapter: argv, prompt delivery, and the parser over the samples of REAL_AGENTS.md
(/work/shared/agents/REAL_AGENTS.md), down to the run result (done, rate limited with its reset, failed)."""

from __future__ import annotations

import json
import os
import signal
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from clawq.broker.signals import parse_signal
from clawq.workers.agent_output import Done, Failed, RateLimited
from clawq.workers.agents import PRESETS, Invocation, Native, interpret, outcome_from_text, render_prompt, render_resume
from clawq.workers.agents.aider import Aider
from clawq.workers.agents.claude import ClaudeCode
from clawq.workers.agents.codex import Codex
from clawq.workers.agents.gemini import MAX_ARG_BYTES, GeminiCli
from clawq.workers.agents.openclaw import OpenClaw
from clawq.workers.agents.opencode import OpenCode

NOW = datetime(2026, 12, 4, 22, 0, tzinfo=UTC).timestamp()
BA = timezone(timedelta(hours=-3))  # the worker's local zone in these tests (Buenos Aires, no DST)
BLOCK = '```clawq-outcome\n{"needs_follow_up": true, "next_prompt": "add tests", "summary": "form fixed"}\n```'


def result(adapter: Any, stdout: str, stderr: str = "", code: int = 0) -> Any:
    return interpret(adapter.parse(stdout, stderr, code), stderr, code, NOW, BA)


def inv(**kw: Any) -> Invocation:
    base: dict[str, Any] = {"bin": "x", "model": "m1", "prompt": "do it", "session_id": None, "cwd": "/w",
                            "timeout_s": 600.0}
    return Invocation(**{**base, **kw})


# -- argv and prompt ---------------------------------------------------------------------------------------
def test_every_preset_is_registered() -> None:
    assert set(PRESETS) == {"claude-code", "codex", "gemini-cli", "openclaw", "opencode", "aider"}
    assert PRESETS["codex"].stop_signals[0] is signal.SIGINT


def test_claude_argv_prompt_on_stdin_and_resume_by_id() -> None:
    launch = ClaudeCode().launch(inv(bin="claude", model="opus", session_id="s-1"))
    assert launch.argv[:6] == ["claude", "-p", "--output-format", "stream-json", "--verbose", "--model"]
    assert launch.argv[launch.argv.index("--resume") + 1] == "s-1" and "--continue" not in launch.argv
    assert launch.stdin == b"do it" and launch.env == {}
    assert ClaudeCode().launch(inv(root=True)).env == {"IS_SANDBOX": "1"}


def test_codex_argv_skips_git_check_and_resumes_by_id() -> None:
    fresh = Codex().launch(inv(bin="codex", model="gpt-5-codex"))
    assert fresh.argv == ["codex", "exec", "--json", "--model", "gpt-5-codex", "--sandbox", "workspace-write",
                          "--skip-git-repo-check", "-"]
    resumed = Codex().launch(inv(session_id="t-9", args=("-c", "x=1")))
    assert resumed.argv[-5:] == ["-c", "x=1", "resume", "t-9", "-"] and "--last" not in resumed.argv


def test_gemini_prompt_as_argument_or_stdin_when_too_long() -> None:
    short = GeminiCli().launch(inv(session_id="g-1"))
    assert short.argv[-2:] == ["--prompt", "do it"] and short.stdin is None
    assert short.argv[short.argv.index("--resume") + 1] == "g-1" and "--skip-trust" in short.argv
    long = GeminiCli().launch(inv(prompt="x" * (MAX_ARG_BYTES + 1)))
    assert long.stdin == b"x" * (MAX_ARG_BYTES + 1) and len(long.argv[-1]) < 100


def test_openclaw_opencode_aider_argv(tmp_path: Path) -> None:
    oc = OpenClaw().launch(inv(model="zai/glm-4.7", session_id="ignored"))
    assert oc.argv[:5] == ["x", "agent", "exec", "--message-file", "-"] and oc.stdin == b"do it"
    assert "ignored" not in oc.argv and oc.argv[oc.argv.index("--timeout") + 1] == "600"
    op = OpenCode().launch(inv(session_id="ses_1"))
    assert op.argv[op.argv.index("--session") + 1] == "ses_1" and "--auto" in op.argv and op.stdin == b"do it"
    ai = Aider().launch(inv(scratch=str(tmp_path)))
    path = ai.argv[ai.argv.index("--message-file") + 1]
    assert ai.stdin is None and Path(path).read_text() == "do it" and "--yes-always" in ai.argv


# -- the outcome block and the prompt ----------------------------------------------------------------------
@pytest.mark.parametrize(("text", "follow", "summary"), [
    (f"Done.\n\n{BLOCK}\n", True, "form fixed"),
    ('x ```clawq-outcome {"needs_follow_up": false, "next_prompt": "", "summary": "inline"} ``` y', False, "inline"),
    ("I did it all. " * 100, False, ("I did it all. " * 100)[:500].strip()),
    ('```clawq-outcome\n{"needs_follow_up": true}\n```', True, "(the agent gave no final text)"),
    ("Work.\n```clawq-outcome\nnot json\n```", False, "unreadable clawq-outcome block; Work."),
], ids=["follow-up", "inline-block", "no-block", "follow-up-without-prompt", "unreadable-block"])
def test_outcome_block(text: str, follow: bool, summary: str) -> None:
    done = outcome_from_text(text)
    assert done.outcome.needs_follow_up is follow and done.outcome.summary == summary
    if follow:
        assert done.outcome.next_prompt


def test_prompt_has_context_and_instructions_and_resume_only_next_prompt() -> None:
    task = {"task_id": 3, "board": "web", "title": "Fix login", "prompt": "The form 500s", "run_count": 2,
            "context": [{"run_count": 1, "model": "opus", "summary": "found the bug", "next_prompt": "fix it"}]}
    text = render_prompt(task)
    assert text.startswith("Fix login\n\nThe form 500s") and "found the bug" in text and "Now: fix it" in text
    assert "```clawq-outcome" in text and "{" not in json.dumps(task["task_id"])
    assert render_prompt(task, "T=$title N=$next_prompt $unknown") == "T=Fix login N=fix it $unknown\n"
    resumed = render_resume("fix it")
    assert resumed.startswith("fix it\n") and "Fix login" not in resumed and "clawq-outcome" in resumed


# -- Claude Code -------------------------------------------------------------------------------------------
CLAUDE_OK = ('{"type":"result","subtype":"success","is_error":false,"duration_ms":1998,"duration_api_ms":1976,'
             '"num_turns":1,"result":"Hello CLI Test","stop_reason":"end_turn","session_id":'
             '"0e639165-79b1-4bd4-bb0f-4cb4c15115d4","total_cost_usd":0.0079825,"usage":{"input_tokens":3,'
             '"cache_read_input_tokens":15635,"output_tokens":6}}')
CLAUDE_REJECTED = ('{"type":"rate_limit_event","rate_limit_info":{"status":"rejected","resetsAt":1796479200,'
                   '"rateLimitType":"five_hour","overageStatus":"rejected","overageDisabledReason":'
                   '"org_level_disabled_until","isUsingOverage":false}}')


def _claude_result(text: str, *, is_error: bool, **extra: Any) -> str:
    return json.dumps({"type": "result", "subtype": "success", "is_error": is_error, "result": text,
                       "session_id": "s", **extra})


def test_claude_success_sample() -> None:
    native = ClaudeCode().parse('{"type":"system","subtype":"init","session_id":"x"}\n' + CLAUDE_OK, "", 0)
    assert native.session_id == "0e639165-79b1-4bd4-bb0f-4cb4c15115d4" and native.text == "Hello CLI Test"
    assert native.usage.doc() == {"input_tokens": 15638, "output_tokens": 6, "cost_usd": 0.0079825}
    done = result(ClaudeCode(), CLAUDE_OK)
    assert isinstance(done, Done) and done.outcome.summary == "Hello CLI Test"


@pytest.mark.parametrize(("stdout", "code", "kind", "reset"), [
    (CLAUDE_REJECTED + "\n" + _claude_result("You've hit your limit · resets 1pm (Europe/Lisbon)", is_error=True),
     1, "quota", 1796479200),
    (_claude_result("You've hit your limit · resets 1pm (Europe/Lisbon)", is_error=True), 1, "quota",
     datetime(2026, 12, 5, 13, 0, tzinfo=UTC).timestamp()),
    (_claude_result("Claude AI usage limit reached|1796479200", is_error=False), 1, "quota", 1796479200),
    (_claude_result("Claude AI usage limit reached|1796479200", is_error=False), 0, "quota", 1796479200),
    (_claude_result("API Error: Rate limit reached", is_error=True, duration_api_ms=0), 0, "rate", None),
    (_claude_result("You have reached your specified API usage limits. You will regain access on 2026-12-07 at "
                    "00:00 UTC.", is_error=True), 1, "quota", datetime(2026, 12, 7, tzinfo=UTC).timestamp()),
], ids=["rate-limit-event", "hit-your-limit-lisbon", "legacy-pipe-epoch", "legacy-not-is-error-exit-0",
        "api-error-exit-0", "spend-cap"])
def test_claude_limits(stdout: str, code: int, kind: str, reset: float | None) -> None:
    got = result(ClaudeCode(), stdout, "", code)
    assert isinstance(got, RateLimited) and got.quota is (kind == "quota") and got.reset_at == reset


@pytest.mark.parametrize(("stdout", "code", "cause"), [
    ('{"type":"assistant","message":{},"error":"authentication_failed"}\n'
     + _claude_result("Invalid API key · Please run /login", is_error=True), 1, "auth"),
    (_claude_result("Not logged in · Please run /login", is_error=True), 1, "auth"),
    (_claude_result('API Error: 500 {"type":"error","error":{"type":"api_error"}}', is_error=True,
                    api_error_status=500), 0, "failed"),
    ('{"type":"result","subtype":"error_max_turns","is_error":true,"session_id":"s"}', 0, "failed"),
    ("", 1, "failed"),
], ids=["auth-assistant-error", "not-logged-in", "exit-0-is-error", "max-turns", "nothing"])
def test_claude_failures(stdout: str, code: int, cause: str) -> None:
    got = result(ClaudeCode(), stdout, "", code)
    assert isinstance(got, Failed) and got.cause == cause


def test_claude_allowed_warning_then_success_is_done() -> None:
    warn = CLAUDE_REJECTED.replace('"rejected","resetsAt"', '"allowed_warning","resetsAt"')
    assert isinstance(result(ClaudeCode(), warn + "\n" + CLAUDE_OK), Done)


# -- Codex -------------------------------------------------------------------------------------------------
CODEX_OK = """{"type":"thread.started","thread_id":"0199a213-81c0-7800-8aa1-bbab2a035a53"}
{"type":"turn.started"}
{"type":"item.completed","item":{"id":"item_3","type":"agent_message","text":"Yep — there’s a `README.md` in the repository root."}}
{"type":"turn.completed","usage":{"input_tokens":24763,"cached_input_tokens":24448,"output_tokens":122}}"""  # noqa: E501, RUF001
CODEX_USAGE = """{"type":"error","message":"You've hit your usage limit. To get more access now, send a request to your admin or try again at 12:16 PM."}
{"type":"turn.failed","error":{"message":"You've hit your usage limit. To get more access now, send a request to your admin or try again at 12:16 PM."}}"""  # noqa: E501


def test_codex_success_sample() -> None:
    native = Codex().parse(CODEX_OK, "", 0)
    assert native.session_id == "0199a213-81c0-7800-8aa1-bbab2a035a53"
    assert native.usage.doc() == {"input_tokens": 24763, "output_tokens": 122, "cost_usd": None}
    done = result(Codex(), CODEX_OK)
    assert isinstance(done, Done) and done.outcome.summary.startswith("Yep")


def _local(day: int, hour: int, minute: int) -> float:
    return datetime(2026, 12, day, hour, minute, tzinfo=BA).timestamp()


@pytest.mark.parametrize(("stdout", "reset"), [
    (CODEX_USAGE, _local(5, 12, 16)),  # 19:00 local now: 12:16 PM is tomorrow's
    (CODEX_USAGE.replace("12:16 PM", "9:30 PM"), _local(4, 21, 30)),
    ('{"type":"turn.failed","error":{"message":"You\'ve hit your usage limit. Try again at Dec 6th, 2026 9:05 AM."}}',
     _local(6, 9, 5)),
    ('{"type":"error","message":"You\'ve hit your usage limit. Try again later."}', None),
    ('{"type":"error","message":"You\'ve hit your usage limit… try again in 2 days 17 hours 14 minutes."}',
     NOW + 2 * 86400 + 17 * 3600 + 14 * 60),
], ids=["local-clock-tomorrow", "local-clock-today", "other-day", "later", "old-build-duration"])
def test_codex_usage_limits(stdout: str, reset: float | None) -> None:
    got = result(Codex(), stdout, "", 1)
    assert isinstance(got, RateLimited) and got.quota and got.reset_at == reset


def test_codex_without_local_zone_guesses_nothing() -> None:
    assert parse_signal("try again at 12:16 PM.", NOW).reset_at is None


@pytest.mark.parametrize(("stdout", "code", "cause"), [
    ('{"type":"error","message":"Quota exceeded. Check your plan and billing details."}', 1, "rate"),
    ('{"type":"error","message":"unexpected status 401 Unauthorized: Missing bearer or basic authentication"}', 1,
     "auth"),
    ('{"type":"turn.failed","error":{"message":"Codex ran out of room in the model\'s context window."}}', 0,
     "failed"),
    ('{"type":"error","message":"Reconnecting... 1/5"}\n' + CODEX_OK, 0, "done"),
], ids=["quota-exceeded", "auth-401", "turn-failed-exit-0", "retried-stream-error"])
def test_codex_failures(stdout: str, code: int, cause: str) -> None:
    got = result(Codex(), stdout, "Not inside a trusted directory" if code and cause == "x" else "", code)
    kinds = {"rate": RateLimited, "done": Done}
    assert isinstance(got, kinds.get(cause, Failed))
    if isinstance(got, Failed):
        assert got.cause == cause


# -- Gemini CLI ----------------------------------------------------------------------------------------------
GEMINI_OK = """{"type":"init","timestamp":"<TIMESTAMP>","session_id":"test-session-id","model":"test-model"}
{"type":"message","timestamp":"<TIMESTAMP>","role":"assistant","content":"Final ","delta":true}
{"type":"message","timestamp":"<TIMESTAMP>","role":"assistant","content":"answer","delta":true}
{"type":"result","timestamp":"<TIMESTAMP>","status":"success","stats":{"total_tokens":0,"input_tokens":7,"output_tokens":2,"cached":0,"input":0,"duration_ms":5,"tool_calls":0,"models":{}}}"""


def test_gemini_success_sample() -> None:
    native = GeminiCli().parse(GEMINI_OK, "", 0)
    assert (native.session_id, native.text) == ("test-session-id", "Final answer")
    assert native.usage.doc() == {"input_tokens": 7, "output_tokens": 2, "cost_usd": None}


@pytest.mark.parametrize(("stderr", "code", "kind", "reset"), [
    ("Quota exceeded for metric: generate_content_free_tier_requests, limit: 2\nPlease retry in 44.097740004s.", 1,
     "quota", NOW + 44.097740004),
    ("Please retry in 900.2ms.", 1, "rate", NOW + 0.9002),
    ('{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.'
     'RetryInfo","retryDelay":"45.837906927s"}]}}', 1, "rate", NOW + 45.837906927),
    ("TerminalQuotaError: You have exhausted your daily quota on this model.", 1, "quota", None),
    ("You have exhausted your capacity on this model.", 1, "quota", None),
], ids=["please-retry-in", "retry-in-ms", "retry-delay", "terminal-daily", "capacity"])
def test_gemini_limits(stderr: str, code: int, kind: str, reset: float | None) -> None:
    got = result(GeminiCli(), '{"type":"init","session_id":"g"}', stderr, code)
    assert isinstance(got, RateLimited) and got.quota is (kind == "quota")
    assert got.reset_at == pytest.approx(reset) if reset else got.reset_at is None


@pytest.mark.parametrize(("stdout", "stderr", "code", "cause"), [
    ("", "Please set an Auth method in your settings.json or specify one of the following environment variables "
     "before running: GEMINI_API_KEY, GOOGLE_GENAI_USE_VERTEXAI, GOOGLE_GENAI_USE_GCA", 41, "auth"),
    ("", "", 41, "auth"),
    ('{"session_id":"test-session-id","error":{"type":"FatalInputError","message":"Invalid command syntax provided",'
     '"code":42}}', "", 42, "failed"),
    ('{"type":"result","status":"error","error":{"type":"X","message":"Maximum session turns exceeded"}}', "", 0,
     "failed"),
    ("", "This folder is not trusted.", 55, "failed"),
], ids=["auth-text", "auth-exit-41", "input-42", "result-error-exit-0", "untrusted-55"])
def test_gemini_failures(stdout: str, stderr: str, code: int, cause: str) -> None:
    got = result(GeminiCli(), stdout, stderr, code)
    assert isinstance(got, Failed) and got.cause == cause


# -- OpenClaw ------------------------------------------------------------------------------------------------
def _pretty(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2)


def test_openclaw_exec_success_and_legacy_shapes() -> None:
    exec_doc = {"ok": True, "status": "ok", "final": "done it", "usage": {"input": 10, "output": 4}, "costUsd": 0.5,
                "sessionId": "oc-1"}
    native = OpenClaw().parse("[banner]\n" + _pretty(exec_doc), "", 0)
    assert (native.text, native.session_id) == ("done it", "oc-1")
    assert native.usage.doc() == {"input_tokens": 10, "output_tokens": 4, "cost_usd": 0.5}
    local = {"payloads": [{"text": "from local"}], "meta": {"agentMeta": {"sessionId": "l-1",
                                                                         "usage": {"input": 3, "output": 1}}}}
    native = OpenClaw().parse("", _pretty(local), 0)  # --local prints on stderr
    assert (native.text, native.session_id, native.usage.input_tokens) == ("from local", "l-1", 3)


@pytest.mark.parametrize(("doc", "code", "expect"), [
    ({"ok": True, "status": "ok", "final": "⚠️ API rate limit reached. Please try again later."}, 0, "rate"),
    ({"status": "ok", "final": "⚠️ All models are temporarily rate-limited. Please try again in a few minutes."}, 0,
     "rate"),
    ({"result": {"payloads": [{"text": "⚠️ Agent failed before reply: All models failed (2): anthropic/claude-opus-4-5"
                               ": Provider anthropic is in cooldown (all profiles unavailable) (rate_limit)"}]}}, 0,
     "rate"),
    ({"runId": "366c06b1", "status": "error", "summary": "failed", "result": {"payloads": [
        {"text": "Context overflow: prompt too large for the model. ..."}]}}, 0, "failed"),
    ({"ok": False, "status": "error",
      "error": {"kind": "agent_error", "message": 'No API key found for provider "zai".'}}, 1, "auth"),
    ({"ok": False, "status": "timeout"}, 2, "timeout"),
], ids=["rate-limit-reply", "all-models-rate-limited", "cooldown-rate-limit", "legacy-error-exit-0", "auth",
        "timeout-exit-2"])
def test_openclaw_limits_and_failures(doc: dict[str, Any], code: int, expect: str) -> None:
    got = result(OpenClaw(), _pretty(doc), "", code)
    if expect == "rate":
        assert isinstance(got, RateLimited) and got.reset_at is None
    else:
        assert isinstance(got, Failed) and got.cause == expect


# -- opencode ------------------------------------------------------------------------------------------------
OPENCODE_OK = """{"type":"step_start","timestamp":1,"sessionID":"ses_9","part":{"type":"step-start"}}
{"type":"text","timestamp":2,"sessionID":"ses_9","part":{"type":"text","text":"first step"}}
{"type":"step_finish","timestamp":3,"sessionID":"ses_9","part":{"type":"step-finish","reason":"tool-calls","cost":0.01,"tokens":{"input":100,"output":5}}}
{"type":"step_start","timestamp":4,"sessionID":"ses_9","part":{"type":"step-start"}}
{"type":"text","timestamp":5,"sessionID":"ses_9","part":{"type":"text","text":"final words"}}
{"type":"step_finish","timestamp":6,"sessionID":"ses_9","part":{"type":"step-finish","reason":"stop","cost":0,"tokens":{"total":17512,"input":17509,"output":3}}}
{"type":"done","timestamp":7,"sessionID":"ses_9","reason":"idle","rejected":[]}"""


def test_opencode_success_sums_steps() -> None:
    native = OpenCode().parse(OPENCODE_OK, "", 0)
    assert (native.session_id, native.text) == ("ses_9", "final words")
    assert native.usage.doc() == {"input_tokens": 17609, "output_tokens": 8, "cost_usd": 0.01}


@pytest.mark.parametrize(("error", "code", "expect"), [
    ({"name": "APIError", "data": {"message": "Rate limit reached. Please try again in 20s.", "statusCode": 429}}, 1,
     "rate"),
    ({"name": "APIError", "data": {"message": '{"code":"rate_limit_exceeded"}', "statusCode": 429}}, 1, "rate"),
    ({"name": "ProviderAuthError", "data": {"providerID": "anthropic", "message": "bad key"}}, 1, "auth"),
    ({"name": "ContextOverflowError", "data": {"message": "too long"}}, 0, "failed"),
], ids=["api-429-with-reset", "api-429", "provider-auth", "error-exit-0"])
def test_opencode_failures(error: dict[str, Any], code: int, expect: str) -> None:
    line = json.dumps({"type": "error", "sessionID": "ses_9", "error": error})
    got = result(OpenCode(), line, "", code)
    if expect == "rate":
        assert isinstance(got, RateLimited)
    else:
        assert isinstance(got, Failed) and got.cause == expect


# -- aider -----------------------------------------------------------------------------------------------------
def test_aider_usage_lines_are_summed() -> None:
    out = ("Working.\nTokens: 2.3k sent, 120 received. Cost: $0.01 message, $0.01 session.\n"
           f"More.\n{BLOCK}\nTokens: 1,000 sent, 1.5k cache write, 80 received. Cost: $0.02 message, $0.03 session.\n")
    native = Aider().parse(out, "", 0)
    assert native.usage.doc() == {"input_tokens": 3300, "output_tokens": 200, "cost_usd": 0.03}
    got = result(Aider(), out)
    assert isinstance(got, Done) and got.outcome.next_prompt == "add tests"


@pytest.mark.parametrize(("out", "expect"), [
    ("litellm.RateLimitError: AnthropicException - rate limited. Please try again in 20s.\nThe API provider has "
     "rate limited you. Try again later or check your quotas.\nRetrying in 0.2 seconds...", "rate"),
    ('litellm.AuthenticationError: {"type":"authentication_error"}\nThe API provider is not able to authenticate '
     "you. Check your API key.", "auth"),
    ("Model gpt-4o has hit a token limit!", "failed"),
    ("Retrying in 0.1 seconds...\nThe API provider has rate limited you.\nRetrying in 0.2 seconds...\n"
     "All good now.\nTokens: 10 sent, 2 received.", "done"),
], ids=["rate-limited-exit-0", "auth-exit-0", "token-limit", "recovered-after-retry"])
def test_aider_exit_0_failures(out: str, expect: str) -> None:
    got = result(Aider(), out, "", 0)
    kinds = {"rate": RateLimited, "done": Done}
    assert isinstance(got, kinds.get(expect, Failed))
    if isinstance(got, Failed):
        assert got.cause == expect


def test_interpret_looks_for_limits_before_trusting_exit_codes() -> None:
    limited = Native(error="429 Too Many Requests. Please try again in 10s")
    got = interpret(limited, "", 0, NOW, None)
    assert isinstance(got, RateLimited) and got.reset_at == NOW + 10
    assert isinstance(interpret(Native(text="fine"), "", 0, NOW, None), Done)
    failed = interpret(Native(text="fine"), "segfault", 139, NOW, None)
    assert isinstance(failed, Failed) and failed.error.startswith("exit code 139")


# -- the fake CLIs, through the adapters ------------------------------------------------------------------------
FAKES = Path(__file__).resolve().parent / "agents"
FAKE_FILES = {"claude-code": "fake_claude.py", "codex": "fake_codex.py", "gemini-cli": "fake_gemini.py",
              "openclaw": "fake_openclaw.py", "opencode": "fake_opencode.py", "aider": "fake_aider.py"}
EXPECT = {"done": Done, "follow": Done, "noblock": Done, "usage": RateLimited, "ratelimit": RateLimited,
          "auth": Failed, "error0": Failed}


def _run_fake(preset: str, scene: str, tmp: Path, session: str | None = None) -> tuple[Any, int, dict[str, Any]]:
    import subprocess
    import sys

    adapter = PRESETS[preset]
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    launch = adapter.launch(Invocation(bin="fake", model="m1", prompt=f"Title\n\nfake:{scene}\n", session_id=session,
                                       cwd=str(work), timeout_s=60, scratch=str(tmp),
                                       root=os.geteuid() == 0))
    argv = [sys.executable, str(FAKES / FAKE_FILES[preset]), *launch.argv[1:]]
    env = {"PATH": "/usr/bin:/bin", "FAKE_AGENT_DIR": str(tmp / "fake"), "FAKE_RESET_S": "3600", **launch.env}
    proc = subprocess.run(argv, input=launch.stdin, capture_output=True, cwd=work, env=env, timeout=30, check=False,
                          stdin=None if launch.stdin is not None else subprocess.DEVNULL)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    native = adapter.parse(out, err, proc.returncode)
    calls = [json.loads(ln) for ln in (tmp / "fake" / "calls.jsonl").read_text().splitlines()]
    now = datetime.now(UTC).timestamp()
    return interpret(native, err, proc.returncode, now, datetime.now().astimezone().tzinfo), proc.returncode, {
        "native": native, "call": calls[-1], "err": err}


@pytest.mark.parametrize("preset", sorted(FAKE_FILES))
@pytest.mark.parametrize("scene", sorted(EXPECT))
def test_fake_cli_through_its_adapter(preset: str, scene: str, tmp_path: Path) -> None:
    got, _, info = _run_fake(preset, scene, tmp_path)
    assert isinstance(got, EXPECT[scene]), (got, info["err"])
    assert info["call"]["scenario"] == scene and info["call"]["cwd"] == str(tmp_path / "work")
    if scene in ("done", "follow"):
        assert got.outcome.summary == f"fake work done by {FAKE_FILES[preset][5:-3]}"
        assert got.outcome.needs_follow_up is (scene == "follow")
    if scene == "auth":
        assert got.cause == "auth"
    if scene == "usage" and preset in ("claude-code", "codex"):  # both say when it resets
        assert abs(got.reset_at - (info["call"]["t"] + 3600)) < 61


@pytest.mark.parametrize("preset", ["claude-code", "codex", "gemini-cli", "opencode"])
def test_fake_cli_resumes_its_session(preset: str, tmp_path: Path) -> None:
    _, _, first = _run_fake(preset, "follow", tmp_path)
    sid = first["native"].session_id
    got, _, second = _run_fake(preset, "done", tmp_path, session=sid)
    assert isinstance(got, Done) and second["native"].session_id == sid and second["call"]["session"] == sid
    missing, code, _ = _run_fake(preset, "done", tmp_path, session="no-such-session")
    assert isinstance(missing, Failed) and code != 0


# -- the night's cost in the periodic summary --------------------------------------------------------------------
def test_summary_line_says_what_tonight_cost_since_the_window_opened() -> None:
    from clawq.broker.config import Config
    from clawq.broker.usage import cost_since
    from clawq.workers.dispatcher import night_start, summary_line

    health = {"global": {"max_concurrent": 8, "in_progress": 1, "night": True}, "boards": {}, "models": {}}
    line = summary_line(health, {}, {"opus": 1.5, "codex": 0.25})
    assert line.endswith("· cost tonight: $1.75 (opus $1.50, codex $0.25)")
    assert "cost tonight" not in summary_line(health, {}, {})
    cfg = Config.model_validate({"night_mode": {"timezone": "UTC", "start": "23:00", "end": "08:00"}})
    assert night_start(cfg, NOW) == NOW - 23 * 3600  # 22:00 UTC: the window opened yesterday at 23:00
    assert night_start(cfg, NOW + 2 * 3600) == NOW + 3600  # 00:00: tonight's window opened at 23:00
    hourly = {f"{int(NOW - 7200)}|opus": "1.0", f"{int(NOW)}|opus": "0.5", f"{int(NOW)}|codex": "0.25", "junk": "9"}
    assert cost_since(hourly, NOW - 60) == {"opus": 0.5, "codex": 0.25}
