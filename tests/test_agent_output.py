"""The agent protocol: what ``parse_agent_output`` / ``result_from_doc`` make of an agent's output.

Table-driven: each row is (stdout, stderr, exit code) and the expected result. Bad output of any kind must
become ``Failed(cause="bad_output")`` (or the failure/rate limit the text says), never an exception.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import pytest

from clawq.broker.models import MAX_TEXT_BYTES
from clawq.workers.agent_output import (
    Done,
    Failed,
    RateLimited,
    clean_result,
    clean_text,
    parse_agent_output,
    result_from_doc,
)

NOW = 1_800_000_000.0  # a fixed instant: resets parsed from text are NOW + their delay
MB = 1024 * 1024


@dataclass(frozen=True)
class Expect:
    """What the result must be: its type and the fields that matter for the row."""

    kind: type
    fields: dict[str, Any] = field(default_factory=dict)  #: exact attribute values (outcome.* for Done)
    error_has: tuple[str, ...] = ()  #: substrings of Failed.error / RateLimited.message
    reset_in: float | None = None  #: RateLimited.reset_at == NOW + this


def done(**fields: Any) -> Expect:
    return Expect(Done, fields)


def bad(*error_has: str) -> Expect:
    return Expect(Failed, {"cause": "bad_output"}, error_has)


def failed(cause: str, *error_has: str) -> Expect:
    return Expect(Failed, {"cause": cause}, error_has)


def limited(reset_in: float | None = None, *error_has: str, **fields: Any) -> Expect:
    return Expect(RateLimited, fields, error_has, reset_in)


def line(doc: dict[str, Any]) -> str:
    return json.dumps(doc)


def v1(**over: Any) -> str:
    """A ClawTrol outcome payload v1 line."""
    doc: dict[str, Any] = {
        "version": "1", "task_id": 7, "run_id": "0b6f4c9e-8e0e-4d5c-9a7e-3f0f6f1c2a11", "needs_follow_up": False,
        "recommended_action": "in_review", "summary": "did it", "achieved": ["a"], "evidence": ["pytest ok"],
        "remaining": [], "model_used": "codex",
    }
    doc.update(over)
    return json.dumps({k: v for k, v in doc.items() if v is not ...})


DONE = line({"status": "done", "needs_follow_up": False, "summary": "ok"})
RL_TEXT = "429 Too Many Requests. Please try again in 2s"
USAGE_TEXT = "You've hit your usage limit. Try again in 3 hours."

# (id, stdout, stderr, exit code, expected)
ROWS: list[tuple[str, str, str, int, Expect]] = [
    # -- done ------------------------------------------------------------------------------------
    ("done", DONE, "", 0, done(needs_follow_up=False, summary="ok", next_prompt=None)),
    ("done-follow-up", line({"status": "done", "needs_follow_up": True, "next_prompt": "add tests",
                             "summary": "half"}), "", 0,
     done(needs_follow_up=True, next_prompt="add tests", summary="half")),
    ("log-lines-before-and-blank-after", "step 1\nstep 2 {not json}\n" + DONE + "\n\n   \n", "warn", 0,
     done(summary="ok")),
    ("done-with-extras", line({"status": "done", "summary": "s", "achieved": ["x"], "evidence": "ci green",
                               "remaining": ["y"], "model_used": "sonnet"}), "", 0,
     done(achieved=["x"], evidence="ci green", remaining=["y"], model_used="sonnet")),
    ("done-unknown-keys-ignored", line({"status": "done", "summary": "s", "tokens": 12}), "", 0, done(summary="s")),
    ("megabytes-of-log-then-outcome", ("log line " * 20 + "\n") * 40_000 + DONE, "", 0, done(summary="ok")),
    # -- rate limited ----------------------------------------------------------------------------
    ("rl-retry-after", line({"status": "rate_limited", "retry_after_seconds": 30, "message": "slow down"}),
     "", 0, limited(None, "slow down", retry_after=30.0)),
    ("rl-float-retry-after", line({"status": "rate_limited", "retry_after_seconds": 0.5}), "", 0,
     limited(None, retry_after=0.5)),
    ("rl-message-parsed", line({"status": "rate_limited", "message": "Please try again in 20s"}), "", 0,
     limited(20.0, "try again in 20s", retry_after=None, quota=False)),
    ("rl-usage-limit-message", line({"status": "rate_limited", "message": USAGE_TEXT}), "", 0,
     limited(3 * 3600.0, quota=True)),
    ("rl-no-reset-known", line({"status": "rate_limited", "message": "busy"}), "", 0,
     limited(None, reset_at=None, retry_after=None)),
    ("rl-on-non-zero-exit", line({"status": "rate_limited", "retry_after_seconds": 5}), "", 2,
     limited(None, retry_after=5.0)),
    # -- failed ----------------------------------------------------------------------------------
    ("failed", line({"status": "failed", "error": "the tests did not pass"}), "", 0,
     failed("failed", "the tests did not pass")),
    ("failed-pairing", line({"status": "failed", "error": "pairing required for this device"}), "", 0,
     failed("pairing", "pairing required")),
    ("failed-with-429-text-is-rate-limit", line({"status": "failed", "error": RL_TEXT}), "", 0, limited(2.0)),
    ("failed-without-error", line({"status": "failed"}), "", 0, failed("failed", "agent reported failure")),
    ("failed-on-non-zero-exit", line({"status": "failed", "error": "compile error"}), "", 3,
     failed("failed", "compile error")),
    # -- non-zero exit / no outcome line: the stderr tail, classified ----------------------------
    ("exit-1-stderr", "", "Traceback...\nboom", 1, failed("failed", "exit code 1", "boom")),
    ("exit-1-429-stderr", "thinking\n", RL_TEXT, 1, limited(2.0, "429")),
    ("exit-2-usage-limit-stderr", "", USAGE_TEXT, 2, limited(3 * 3600.0, quota=True)),
    ("exit-1-overloaded", "", "HTTP 529 overloaded_error: Overloaded", 1, failed("overloaded", "Overloaded")),
    ("exit-1-done-line-still-fails", DONE, "", 1, failed("failed", "exit code 1")),
    ("exit-1-stderr-tail-kept", "", "x" * 50_000 + "\nTHE LAST WORDS", 1, failed("failed", "THE LAST WORDS")),
    ("exit-0-no-stdout", "", "", 0, bad("no outcome line")),
    ("exit-0-no-stdout-429-stderr", "", RL_TEXT, 0, limited(2.0)),
    ("exit-0-no-stdout-stderr-text", "", "could not open the repo", 0, bad("could not open the repo")),
    # -- bad output -> Failed(bad_output) --------------------------------------------------------
    ("not-json", "all good, done!", "", 0, bad("no outcome line")),
    ("truncated-json", '{"status": "done", "summary": "cut', "", 0, bad("no outcome line")),
    ("json-array", "[1, 2, 3]", "", 0, bad("no outcome line")),
    ("json-string", json.dumps(DONE), "", 0, bad("no outcome line")),
    ("outcome-not-last-line", DONE + "\nbye", "", 0, bad("no outcome line")),
    ("status-missing", line({"summary": "s"}), "", 0, bad("status")),
    ("status-unknown", line({"status": "ok"}), "", 0, bad("status", "'ok'")),
    ("status-not-a-string", line({"status": ["done"]}), "", 0, bad("status")),
    ("follow-up-without-prompt", line({"status": "done", "needs_follow_up": True}), "", 0, bad("next_prompt")),
    ("follow-up-blank-prompt", line({"status": "done", "needs_follow_up": True, "next_prompt": "  "}), "", 0,
     bad("next_prompt")),
    ("needs-follow-up-not-bool", line({"status": "done", "needs_follow_up": "maybe"}), "", 0,
     bad("needs_follow_up")),
    ("summary-wrong-type", line({"status": "done", "summary": 5}), "", 0, bad("summary")),
    ("next-prompt-wrong-type", line({"status": "done", "needs_follow_up": True, "next_prompt": {"a": 1}}), "", 0,
     bad("next_prompt")),
    ("achieved-wrong-type", line({"status": "done", "achieved": {"a": 1}}), "", 0, bad("achieved")),
    ("summary-too-large", line({"status": "done", "summary": "s" * (MAX_TEXT_BYTES + 1)}), "", 0, bad("summary")),
    ("megabytes-of-text", "x" * (5 * MB), "", 0, bad()),
    ("megabytes-in-one-json-line", line({"status": "done", "summary": "y" * (2 * MB)}), "", 0, bad()),
    ("retry-nan", '{"status": "rate_limited", "retry_after_seconds": NaN}', "", 0, bad("retry_after_seconds")),
    ("retry-infinity", '{"status": "rate_limited", "retry_after_seconds": Infinity}', "", 0,
     bad("retry_after_seconds")),
    ("retry-negative", line({"status": "rate_limited", "retry_after_seconds": -5}), "", 0,
     bad("retry_after_seconds")),
    ("retry-zero", line({"status": "rate_limited", "retry_after_seconds": 0}), "", 0, bad("retry_after_seconds")),
    ("retry-string", line({"status": "rate_limited", "retry_after_seconds": "30"}), "", 0,
     bad("retry_after_seconds")),
    ("retry-bool", line({"status": "rate_limited", "retry_after_seconds": True}), "", 0,
     bad("retry_after_seconds")),
    ("retry-over-30-days", line({"status": "rate_limited", "retry_after_seconds": 31 * 86400}), "", 0,
     bad("retry_after_seconds")),
    ("retry-1e308", line({"status": "rate_limited", "retry_after_seconds": 1e308}), "", 0,
     bad("retry_after_seconds")),
    ("rl-message-not-string", line({"status": "rate_limited", "message": 5}), "", 0, bad("message")),
    # -- ClawTrol outcome payload v1 -------------------------------------------------------------
    ("v1-in-review", v1(), "", 0,
     done(needs_follow_up=False, summary="did it", achieved=["a"], evidence=["pytest ok"], remaining=[],
          model_used="codex")),
    ("v1-requeue-same-task", v1(needs_follow_up=True, recommended_action="requeue_same_task",
                                next_prompt="now the docs"), "", 0,
     done(needs_follow_up=True, next_prompt="now the docs")),
    ("v1-requeue-implies-follow-up", v1(needs_follow_up=..., recommended_action="requeue_same_task",
                                        next_prompt="more"), "", 0, done(needs_follow_up=True)),
    ("v1-requeue-without-next-prompt", v1(needs_follow_up=True, recommended_action="requeue_same_task"), "", 0,
     bad("next_prompt")),
    # ClawTrol's semantics (one model with the HTTP hook): only requeue_same_task puts the task back, unless
    # needs_follow_up is false; every other action goes to review.
    ("v1-requeue-but-no-follow-up", v1(needs_follow_up=False, recommended_action="requeue_same_task",
                                       next_prompt="x"), "", 0, done(needs_follow_up=False)),
    ("v1-follow-up-but-in-review", v1(needs_follow_up=True, next_prompt="x"), "", 0, done(needs_follow_up=False)),
    ("v1-prompt-user", v1(needs_follow_up=True, recommended_action="prompt_user", next_prompt="ask"), "", 0,
     done(needs_follow_up=False, summary="did it")),
    ("v1-split-into-subtasks", v1(recommended_action="split_into_subtasks"), "", 0, done(needs_follow_up=False)),
    ("v1-upper-case-run-id", v1(run_id="0B6F4C9E-8E0E-4D5C-9A7E-3F0F6F1C2A11"), "", 0, done(summary="did it")),
    ("v1-task-id-as-text", v1(task_id="7"), "", 0, done(summary="did it")),
    ("v1-bad-run-id", v1(run_id="0" * 36), "", 0, bad("run_id")),
    ("v1-unknown-action", v1(recommended_action="merge"), "", 0, bad("recommended_action")),
    ("v1-needs-follow-up-as-text", v1(needs_follow_up="yes", recommended_action="requeue_same_task",
                                      next_prompt="go on"), "", 0, done(needs_follow_up=True, next_prompt="go on")),
    ("v1-needs-follow-up-odd-word", v1(needs_follow_up="maybe"), "", 0, bad("needs_follow_up")),
    ("v1-summary-wrong-type", v1(summary=["s"]), "", 0, bad("summary")),
    ("v1-unknown-version", v1(version="2"), "", 0, bad("version")),
    ("v1-numeric-version", v1(version=1), "", 0, done(summary="did it")),
    ("v1-float-version", v1(version=1.0), "", 0, bad("version")),
]


def check(result: Any, want: Expect) -> None:
    assert isinstance(result, want.kind), f"expected {want.kind.__name__}, got {result!r}"[:2000]
    source = result.outcome if isinstance(result, Done) else result
    for name, value in want.fields.items():
        assert getattr(source, name) == value, f"{name}: {getattr(source, name)!r} != {value!r}"
    text = result.error if isinstance(result, Failed) else getattr(result, "message", "")
    for part in want.error_has:
        assert part in text, f"{part!r} not in {text[:500]!r}"
    if isinstance(result, Failed):
        assert result.error.strip(), "a failure always says why"
        assert len(result.error) < 4000, "the error is a tail, not the whole output"
    if want.reset_in is not None:
        assert result.reset_at is not None and math.isclose(result.reset_at, NOW + want.reset_in, abs_tol=0.01)


def test_table_is_large_enough() -> None:
    assert len(ROWS) >= 25
    assert len({row[0] for row in ROWS}) == len(ROWS)


@pytest.mark.parametrize(("stdout", "stderr", "exit_code", "want"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_parse_agent_output(stdout: str, stderr: str, exit_code: int, want: Expect) -> None:
    check(parse_agent_output(stdout, stderr, exit_code, NOW), want)


# Rows whose stdout is one outcome line also hold for result_from_doc (python runner, HTTP payload).


def _is_doc(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


DOC_ROWS = [r for r in ROWS if r[3] == 0 and "\n" not in r[1] and len(r[1]) < MB and _is_doc(r[1])]


@pytest.mark.parametrize(("stdout", "want"), [(r[1], r[4]) for r in DOC_ROWS], ids=[r[0] for r in DOC_ROWS])
def test_result_from_doc(stdout: str, want: Expect) -> None:
    check(result_from_doc(json.loads(stdout), NOW), want)


def test_result_from_doc_odd_documents() -> None:
    for doc in ({}, {"status": None}, {"status": 1}, {"version": "1", "recommended_action": None},
                {"version": "1", "recommended_action": ["x"]}):
        result = result_from_doc(doc, NOW)
        assert isinstance(result, Failed) and result.cause == "bad_output", (doc, result)


def test_the_outcome_line_wins_over_earlier_json_lines() -> None:
    early = line({"status": "failed", "error": "an earlier attempt"})
    check(parse_agent_output(early + "\n" + DONE, "", 0, NOW), done(summary="ok"))


def test_stderr_noise_does_not_change_a_good_outcome() -> None:
    check(parse_agent_output(DONE, RL_TEXT + "\nretrying... ok", 0, NOW), done(summary="ok"))


def test_a_failure_error_is_the_tail_of_stderr() -> None:
    head, last = "HEAD-MARKER\n", "TAIL-MARKER"
    result = parse_agent_output("", head + "z" * 100_000 + last, 1, NOW)
    assert isinstance(result, Failed)
    assert last in result.error and "HEAD-MARKER" not in result.error


def test_deeply_nested_json_never_raises_small() -> None:
    nested = '{"status": "done", "x": ' + "[" * 200 + "]" * 200 + "}"
    check(parse_agent_output(nested, "", 0, NOW), done())


def test_deeply_nested_json_outcome_line_is_bad_output() -> None:
    nested = '{"status": "done", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    check(parse_agent_output(nested, "", 0, NOW), bad())


def test_huge_integer_retry_after_is_bad_output() -> None:
    huge = '{"status": "rate_limited", "retry_after_seconds": 1' + "0" * 400 + "}"
    check(parse_agent_output(huge, "", 0, NOW), bad("retry_after_seconds"))


@pytest.mark.parametrize("value", ["yes", 1, "true"])
def test_needs_follow_up_must_be_a_real_boolean(value: object) -> None:
    out = line({"status": "done", "needs_follow_up": value, "next_prompt": "p"})
    check(parse_agent_output(out, "", 0, NOW), bad("needs_follow_up"))


def test_v1_payload_missing_required_fields_is_bad_output() -> None:
    check(parse_agent_output(line({"version": "1"}), "", 0, NOW), bad())


@pytest.mark.parametrize(("raw", "clean"), [
    ("plain text", "plain text"),
    ("a\x00b", "ab"),
    ("\x1b[31mred\x1b[0m and \x1b[1;4mbold\x1b[m", "red and bold"),
    ("\x1b]0;title\x07after \x1b]8;;http://x\x1b\\link", "after link"),
    ("progress 10%\rprogress 100%\r\ndone\n", "progress 10%\nprogress 100%\ndone\n"),
    ("tab\tand\nnewline stay", "tab\tand\nnewline stay"),
    ("bell\x07 del\x7f c1\x85 form\x0c", "bell del c1 form"),
    ("lone \ud800 surrogate", "lone ? surrogate"),
    ("unicode ünïcödé → ok", "unicode ünïcödé → ok"),
])
def test_clean_text_drops_escapes_and_control_characters(raw: str, clean: str) -> None:
    assert clean_text(raw) == clean


def test_clean_result_cuts_texts_to_the_broker_limit_keeping_the_end() -> None:
    failed = clean_result(Failed(error="x" * (MAX_TEXT_BYTES * 2) + "\x00the cause", cause="failed"))
    assert isinstance(failed, Failed) and failed.cause == "failed"
    assert len(failed.error.encode()) <= MAX_TEXT_BYTES and failed.error.endswith("the cause")
    assert isinstance(empty := clean_result(Failed(error="\x00\x00")), Failed) and empty.error
    limited = clean_result(RateLimited(message="429\x00", retry_after=3.0))
    assert limited == RateLimited(message="429", retry_after=3.0)


def test_an_outcome_with_control_characters_is_kept_clean_not_refused() -> None:
    doc = {"status": "done", "needs_follow_up": True, "next_prompt": "add\x00 tests", "summary": "\x1b[32mok\x1b[0m",
           "achieved": ["a\x00", "b"]}
    result = result_from_doc(doc, 0.0)
    assert isinstance(result, Done)
    assert (result.outcome.next_prompt, result.outcome.summary, result.outcome.achieved) == ("add tests", "ok",
                                                                                             ["a", "b"])
    assert isinstance(bad := result_from_doc({**doc, "next_prompt": "\x00"}, 0.0), Failed) and bad.cause == "bad_output"


def test_a_v1_payload_must_name_the_run_it_reports() -> None:
    run = "0b6f4c9e-8e0e-4d5c-9a7e-3f0f6f1c2a11"
    check(parse_agent_output(v1(run_id=run.upper(), task_id="7"), "", 0, NOW, expect=(7, run)), done())
    check(parse_agent_output(v1(), "", 0, NOW, expect=(8, run)), bad("not task 8"))
    check(parse_agent_output(v1(), "", 0, NOW, expect=(7, "1" + run[1:])), bad("outcome is for task 7 run"))
