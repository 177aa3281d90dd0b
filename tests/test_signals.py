"""broker.signals: classify what an agent or provider said on a rate limit or failure.

Every expectation is relative to NOW = 2026-11-26T00:00:00Z (a Thursday).
"""

from __future__ import annotations

import json
import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clawq.broker import signals
from clawq.broker.signals import MAX_RESET_SECONDS, Signal, SignalClass, parse_reset, parse_signal

NOW = 1795651200.0  # 2026-11-26T00:00:00Z
H = 3600.0
DAY = 86400.0

RL = SignalClass.RATE_LIMIT
QUOTA = SignalClass.QUOTA_REACHED
OVER = SignalClass.OVERLOADED
BILL = SignalClass.BILLING
TIMEOUT = SignalClass.TIMEOUT
PAIR = SignalClass.PAIRING
OTHER = SignalClass.OTHER

_NO_HYPOTHESIS_DB = settings(database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _gemini(quota_id: str, retry_delay: str, message: str = "You exceeded your current quota.") -> str:
    return json.dumps(
        {
            "error": {
                "code": 429,
                "message": message + " please check your plan and billing details.",
                "status": "RESOURCE_EXHAUSTED",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                        "violations": [
                            {
                                "quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
                                "quotaId": quota_id,
                                "quotaValue": "50",
                            }
                        ],
                    },
                    {
                        "@type": "type.googleapis.com/google.rpc.Help",
                        "links": [{"url": "https://ai.google.dev"}],
                    },
                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay},
                ],
            }
        },
        indent=2,
    )


ANTHROPIC_429 = """\
HTTP/1.1 429 Too Many Requests
retry-after: 45
anthropic-ratelimit-requests-reset: 2026-11-26T00:01:00Z
anthropic-ratelimit-tokens-reset: 2026-11-26T00:00:30Z
content-type: application/json

{"type":"error","error":{"type":"rate_limit_error","message":"This request would exceed the rate limit \
for your organization of 50,000 input tokens per minute."}}
"""

STDERR_TAIL = """\
2026-11-25T23:59:58Z INFO agent started {"task": "t-17", "model": "claude"}
2026-11-25T23:59:59Z WARN request failed, dumping response
< HTTP/1.1 429 Too Many Requests
< retry-after: 42
< keep-alive: timeout=5
{
  "type": "error",
  "error": {
    "type": "rate_limit_error",
    "message": "Number of request tokens has exceeded your per-minute rate limit"
  }
}
Traceback (most recent call last): {broken
exit status 1
"""

OPENROUTER_PER_DAY = json.dumps(
    {
        "error": {
            "message": "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock 1000 free model "
            "requests per day",
            "code": 429,
            "metadata": {
                "headers": {
                    "X-RateLimit-Limit": "50",
                    "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Reset": "1795737600000",
                },
                "provider_name": None,
            },
        },
        "user_id": "user_2x",
    }
)

OPENROUTER_RAW_GEMINI = json.dumps(
    {
        "error": {
            "message": "Provider returned error",
            "code": 429,
            "metadata": {
                "raw": json.dumps(
                    {
                        "error": {
                            "code": 429,
                            "status": "RESOURCE_EXHAUSTED",
                            "details": [
                                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "30s"}
                            ],
                        }
                    }
                ),
                "provider_name": "Google AI Studio",
            },
        }
    }
)

GEMINI_PROTO_TEXT = """\
google.api_core.exceptions.ResourceExhausted: 429 You exceeded your current quota. [violations {
  quota_metric: "generativelanguage.googleapis.com/generate_content_free_tier_requests"
  quota_id: "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
}
, links {
  description: "Learn more about Gemini API quotas"
}
, retry_delay {
  seconds: 36
}
]"""

OPENAI_INSUFFICIENT_QUOTA = json.dumps(
    {
        "error": {
            "message": "You exceeded your current quota, please check your plan and billing details.",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
    }
)

OPENAI_RATE_LIMIT = json.dumps(
    {
        "error": {
            "message": "Rate limit reached for gpt-4o in organization org-abc on tokens per min (TPM): "
            "Limit 30000, Used 29000, Requested 2000. Please try again in 2s. Visit "
            "https://platform.openai.com/account/rate-limits to learn more.",
            "type": "tokens",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
)

ROWS = [
    # --- Retry-After family
    pytest.param("Retry-After: 30", RL, NOW + 30, "retry-after", id="retry-after-int"),
    pytest.param("retry-after: 1.5", RL, NOW + 1.5, "retry-after", id="retry-after-fraction"),
    pytest.param("retry-after-ms: 1500", RL, NOW + 1.5, "retry-after-ms", id="retry-after-ms"),
    pytest.param(
        "Retry-After: Thu, 26 Nov 2026 03:00:00 GMT",
        RL,
        NOW + 3 * H,
        "retry-after",
        id="retry-after-http-date",
    ),
    pytest.param(
        "Retry-After: Wed, 26 Nov 2026 03:00:00 GMT",
        RL,
        NOW + 3 * H,
        "retry-after",
        id="retry-after-http-date-wrong-weekday",
    ),
    pytest.param(
        "< HTTP/1.1 429 Too Many Requests\n< retry-after: 20\n< content-type: application/json",
        RL,
        NOW + 20,
        "retry-after",
        id="curl-verbose-response",
    ),
    # --- Anthropic
    pytest.param(
        "anthropic-ratelimit-requests-reset: 2026-11-26T03:00:00Z",
        RL,
        NOW + 3 * H,
        "anthropic-ratelimit-requests-reset",
        id="anthropic-requests-reset-rfc3339",
    ),
    pytest.param(
        "anthropic-ratelimit-tokens-reset: 2026-11-26T04:00:00.5+01:00",
        RL,
        NOW + 3 * H + 0.5,
        "anthropic-ratelimit-tokens-reset",
        id="anthropic-tokens-reset-offset-fraction",
    ),
    pytest.param(
        ANTHROPIC_429, RL, NOW + 60, "anthropic-ratelimit-requests-reset", id="anthropic-429-latest-absolute"
    ),
    pytest.param(
        "anthropic-ratelimit-unified-status: rejected\n"
        "anthropic-ratelimit-unified-reset: 1795662000\n"
        "anthropic-ratelimit-unified-7d-reset: 1796256000",
        RL,
        NOW + 3 * H,
        "anthropic-ratelimit-unified-reset",
        id="anthropic-unified-reset-beats-7d-window",
    ),
    pytest.param(
        'API Error: 529 {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
        OVER,
        None,
        "",
        id="anthropic-overloaded-error",
    ),
    pytest.param(
        '{"type":"error","error":{"type":"timeout_error","message":"Request timed out"}}',
        TIMEOUT,
        None,
        "",
        id="anthropic-timeout-error",
    ),
    pytest.param(
        '{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low '
        'to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."}}',
        BILL,
        None,
        "",
        id="anthropic-credit-balance-too-low",
    ),
    pytest.param(
        "You have reached your specified API usage limits. "
        "You will regain access on 2026-12-01 at 00:00 UTC.",
        QUOTA,
        NOW + 5 * DAY,
        "text:regain access on",
        id="anthropic-spend-limit-text",
    ),
    pytest.param(STDERR_TAIL, RL, NOW + 42, "retry-after", id="stderr-tail-multiline-json"),
    # --- OpenAI
    pytest.param(
        "x-ratelimit-reset-requests: 6m0s",
        RL,
        NOW + 360,
        "x-ratelimit-reset-requests",
        id="openai-go-duration",
    ),
    pytest.param(
        "x-ratelimit-reset-requests: 1s\nx-ratelimit-reset-tokens: 1h2m3s",
        RL,
        NOW + 3723,
        "x-ratelimit-reset-tokens",
        id="openai-largest-dimension",
    ),
    pytest.param(
        "x-ratelimit-reset-tokens: 1.5s", RL, NOW + 1.5, "x-ratelimit-reset-tokens", id="go-fraction"
    ),
    pytest.param(
        "x-ratelimit-reset-tokens: 12ms", RL, NOW + 0.012, "x-ratelimit-reset-tokens", id="go-millis"
    ),
    pytest.param(OPENAI_RATE_LIMIT, RL, NOW + 2, "text:try again in", id="openai-rate-limit-exceeded"),
    pytest.param(OPENAI_INSUFFICIENT_QUOTA, BILL, None, "", id="openai-insufficient-quota-json"),
    pytest.param(
        "openai.RateLimitError: Error code: 429 - {'error': {'message': 'You exceeded your current quota, "
        "please check your plan and billing details.', 'type': 'insufficient_quota', 'param': None, "
        "'code': 'insufficient_quota'}}",
        BILL,
        None,
        "",
        id="openai-insufficient-quota-python-repr",
    ),
    # --- Gemini
    pytest.param(
        _gemini("GenerateRequestsPerDayPerProjectPerModel-FreeTier", "45.837906927s"),
        QUOTA,
        NOW + 45.837906927,
        "gemini.retryDelay",
        id="gemini-per-day-protobuf-duration",
    ),
    pytest.param(
        _gemini("GenerateRequestsPerMinutePerProjectPerModel-FreeTier", "17s", "Please retry in 17.3s."),
        RL,
        NOW + 17,
        "gemini.retryDelay",
        id="gemini-per-minute",
    ),
    pytest.param(GEMINI_PROTO_TEXT, RL, NOW + 36, "gemini.retry_delay", id="gemini-api-core-proto-text"),
    pytest.param(
        '{"error":{"code":503,"message":"The model is overloaded. Please try again later.",'
        '"status":"UNAVAILABLE"}}',
        OVER,
        None,
        "",
        id="gemini-503-unavailable",
    ),
    pytest.param(
        '{"error":{"code":429,"message":"Resource has been exhausted (e.g. check quota).",'
        '"status":"RESOURCE_EXHAUSTED"}}',
        RL,
        None,
        "",
        id="vertex-resource-exhausted-check-quota",
    ),
    pytest.param(
        '{"retryDelay": {"seconds": 45, "nanos": 500000000}}',
        RL,
        NOW + 45.5,
        "gemini.retryDelay",
        id="protobuf-duration-object",
    ),
    # --- OpenRouter and generic X-RateLimit-Reset
    pytest.param(OPENROUTER_PER_DAY, QUOTA, NOW + DAY, "x-ratelimit-reset", id="openrouter-per-day-epoch-ms"),
    pytest.param(
        '{"error":{"message":"Rate limit exceeded: free-models-per-min.","code":429,'
        '"metadata":{"headers":{"X-RateLimit-Reset":"1795651260000"}}}}',
        RL,
        NOW + 60,
        "x-ratelimit-reset",
        id="openrouter-per-minute",
    ),
    pytest.param(OPENROUTER_RAW_GEMINI, RL, NOW + 30, "gemini.retryDelay", id="openrouter-raw-provider-json"),
    pytest.param(
        "X-RateLimit-Reset: 1795651500", RL, NOW + 300, "x-ratelimit-reset", id="x-ratelimit-reset-epoch"
    ),
    pytest.param("RateLimit-Reset: 50", RL, NOW + 50, "ratelimit-reset", id="ietf-ratelimit-reset-delta"),
    # --- Codex
    pytest.param(
        '{"error": {"type": "usage_limit_reached", "message": "The usage limit has been reached", '
        '"plan_type": "plus", "resets_at": 1795662000, "resets_in_seconds": 10000}}',
        QUOTA,
        NOW + 3 * H,
        "codex.resets_at",
        id="codex-resets-at",
    ),
    pytest.param(
        '{"error": {"type": "usage_limit_reached", "resets_at": 1795662000000}}',
        QUOTA,
        NOW + 3 * H,
        "codex.resets_at",
        id="codex-resets-at-epoch-ms",
    ),
    pytest.param(
        '{"error": {"type": "usage_limit_reached", "resets_in_seconds": 10800}}',
        QUOTA,
        NOW + 3 * H,
        "codex.resets_in_seconds",
        id="codex-resets-in-seconds",
    ),
    pytest.param(
        "You've hit your usage limit. Upgrade to Pro (https://openai.com/chatgpt/pricing) or try again in "
        "5 days 22 hours 11 minutes.",
        QUOTA,
        NOW + 5 * DAY + 22 * H + 11 * 60,
        "text:try again in",
        id="codex-human-days-hours-minutes",
    ),
    # --- Claude Code and human text
    pytest.param(
        "Claude AI usage limit reached|1795662000",
        QUOTA,
        NOW + 3 * H,
        "text:|epoch",
        id="claude-code-pipe-epoch",
    ),
    pytest.param(
        "Claude usage limit reached. Your limit will reset at 3am (Europe/Paris).",
        QUOTA,
        NOW + 2 * H,  # 03:00 CET is 02:00 UTC: the zone is named, so nothing is guessed
        "text:reset at",
        id="claude-code-wall-clock-in-named-zone",
    ),
    pytest.param("Please retry in 47.4s.", RL, NOW + 47.4, "text:retry in", id="text-retry-in-fraction"),
    pytest.param("retry after 120 seconds", RL, NOW + 120, "text:retry after", id="text-retry-after-seconds"),
    pytest.param(
        "Rate limited, try again in 5 minutes", RL, NOW + 300, "text:try again in", id="text-minutes"
    ),
    pytest.param(
        "try again in 2 hours and 30 min", RL, NOW + 2.5 * H, "text:try again in", id="text-hours-and-minutes"
    ),
    pytest.param("Please try again in 6ms.", RL, NOW + 0.006, "text:try again in", id="text-go-millis"),
    pytest.param(
        "Rate limit hit; resets at 2026-11-26T03:00:00Z",
        RL,
        NOW + 3 * H,
        "text:resets at",
        id="text-resets-rfc3339",
    ),
    pytest.param("limit resets at 3:00 AM UTC", RL, NOW + 3 * H, "text:resets at", id="text-wall-clock-utc"),
    pytest.param("429 Too Many Requests", RL, None, "", id="text-429"),
    # --- the other classes
    pytest.param("Error: request timed out after 600000ms", TIMEOUT, None, "", id="text-timed-out"),
    pytest.param("connect ETIMEDOUT 104.18.0.1:443", TIMEOUT, None, "", id="text-etimedout"),
    pytest.param("gateway closed (1008): pairing required", PAIR, None, "", id="text-pairing-required"),
    pytest.param("agent error: device not paired", PAIR, None, "", id="text-not-paired"),
    pytest.param('{"error": "unauthorized_client"}', PAIR, None, "", id="json-unauthorized-client"),
    pytest.param("HTTP 503 Service Unavailable", OVER, None, "", id="text-503"),
    pytest.param(
        "the model is overloaded, retry after 10 seconds", OVER, NOW + 10, "text:retry after", id="over"
    ),
    pytest.param("402 Payment Required", BILL, None, "", id="text-payment-required"),
    pytest.param(
        "You exceeded your current quota, please check your plan and billing details.",
        QUOTA,
        None,
        "",
        id="text-quota-billing-boilerplate-is-not-billing",
    ),
    pytest.param("checking quota settings", OTHER, None, "", id="text-quota-word-alone"),
    pytest.param(
        "keep-alive: timeout=5\nx-ratelimit-remaining-requests: 0\nretry-after: 3",
        RL,
        NOW + 3,
        "retry-after",
        id="header-names-are-not-class-words",
    ),
    pytest.param("", OTHER, None, "", id="empty"),
    pytest.param("segmentation fault (core dumped)", OTHER, None, "", id="unrelated"),
]


@pytest.mark.parametrize(("text", "klass", "reset_at", "source"), ROWS)
def test_formats(text: str, klass: SignalClass, reset_at: float | None, source: str) -> None:
    got = parse_signal(text, NOW)
    assert got.klass is klass
    assert got.source == source
    if reset_at is None:
        assert got.reset_at is None
    else:
        assert got.reset_at == pytest.approx(reset_at, abs=1e-6)
    assert parse_reset(text, NOW) == (got.reset_at, got.source)


def test_row_count() -> None:
    assert len(ROWS) >= 35


def test_signal_is_frozen_and_class_is_its_wire_value() -> None:
    sig = parse_signal("Retry-After: 30", NOW)
    assert sig == Signal(SignalClass.RATE_LIMIT, NOW + 30, "retry-after")
    assert SignalClass.QUOTA_REACHED.value == "quota_reached"
    assert isinstance(SignalClass.QUOTA_REACHED, str)
    with pytest.raises(AttributeError):
        sig.reset_at = 0.0  # type: ignore[misc]


def test_wall_clock_in_the_past_today_means_tomorrow() -> None:
    now = NOW + 4 * H  # 04:00Z: 03:00Z has passed
    assert parse_reset("resets 3am (UTC)", now) == (NOW + DAY + 3 * H, "text:resets")


# --------------------------------------------------------------------------- rejection

REJECTED = [
    pytest.param("Retry-After: nan", id="nan-word"),
    pytest.param('{"resets_at": NaN}', id="json-nan"),
    pytest.param('{"resets_in_seconds": Infinity}', id="json-infinity"),
    pytest.param("X-RateLimit-Reset: 1e400", id="overflow-to-infinity"),
    pytest.param("Retry-After: -30", id="negative-seconds"),
    pytest.param("retry-after-ms: -1", id="negative-ms"),
    pytest.param('{"retryDelay": "-5s"}', id="negative-duration"),
    pytest.param(f"Retry-After: {MAX_RESET_SECONDS + 1}", id="more-than-30-days"),
    pytest.param("anthropic-ratelimit-requests-reset: 2027-01-01T00:00:00Z", id="absolute-more-than-30-days"),
    pytest.param('{"resets_at": 1795650000}', id="absolute-in-the-past"),
    pytest.param("try again in 31 days", id="text-more-than-30-days"),
    pytest.param("Retry-After: Thu, 26 Nov 2026 99:00:00 GMT", id="invalid-http-date"),
    pytest.param("anthropic-ratelimit-requests-reset: 2026-13-45T00:00:00Z", id="invalid-rfc3339"),
]


@pytest.mark.parametrize("text", REJECTED)
def test_unusable_values_are_ignored(text: str) -> None:
    assert parse_reset(text, NOW) == (None, "")
    assert parse_signal(text, NOW).reset_at is None


def test_thirty_days_exactly_is_accepted() -> None:
    assert parse_reset(f"Retry-After: {MAX_RESET_SECONDS}", NOW) == (NOW + MAX_RESET_SECONDS, "retry-after")


def test_rejected_value_falls_back_to_the_next_signal() -> None:
    assert parse_reset('{"resets_at": NaN}\nretry-after: 10', NOW) == (NOW + 10, "retry-after")
    assert parse_reset("Retry-After: -5\nPlease retry in 7s", NOW) == (NOW + 7, "text:retry in")


@pytest.mark.parametrize("now", [math.nan, math.inf, -math.inf])
def test_unusable_now_gives_no_reset(now: float) -> None:
    assert parse_signal("Retry-After: 30\nresets at 3:00 AM UTC", now) == Signal(OTHER, None, "")
    assert parse_signal("429 Too Many Requests\nRetry-After: 30", now) == Signal(RL, None, "")


@pytest.mark.parametrize("now", [0.0, -1e12, 1e300, 1e308])
def test_odd_now_never_raises(now: float) -> None:
    _check(parse_signal("Retry-After: 30\nresets at 3:00 AM UTC\nX-RateLimit-Reset: 1795651500", now), now)


# --------------------------------------------------------------------------- precedence

# In precedence order; each later signal gives a LATER time, so precedence (not "latest") decides.
PRECEDENCE = [
    ('{"error": {"resets_at": 1795651300}}', NOW + 100, "codex.resets_at"),
    ("anthropic-ratelimit-unified-reset: 1795651400", NOW + 200, "anthropic-ratelimit-unified-reset"),
    (
        "anthropic-ratelimit-requests-reset: 2026-11-26T00:05:00Z",
        NOW + 300,
        "anthropic-ratelimit-requests-reset",
    ),
    ("retry-after-ms: 400000", NOW + 400, "retry-after-ms"),
    ("retry-after: 500", NOW + 500, "retry-after"),
    (
        '{"details": [{"@type": "google.rpc.RetryInfo", "retryDelay": "600s"}]}',
        NOW + 600,
        "gemini.retryDelay",
    ),
    ("x-ratelimit-reset-requests: 11m40s", NOW + 700, "x-ratelimit-reset-requests"),
    ("limit resets at 2026-11-26T00:13:20Z", NOW + 800, "text:resets at"),
    ("try again in 15 minutes", NOW + 900, "text:try again in"),
]


@pytest.mark.parametrize("skip", range(len(PRECEDENCE)))
def test_precedence(skip: int) -> None:
    lines = [line for line, _, _ in PRECEDENCE[skip:]]
    _, reset_at, source = PRECEDENCE[skip]
    for text in ("\n".join(lines), "\n".join(reversed(lines))):
        got_reset, got_source = parse_reset(text, NOW)
        assert (got_reset, got_source) == (reset_at, source)


def test_precedence_beats_latest_even_when_higher_rank_is_sooner() -> None:
    text = "retry-after: 5\nx-ratelimit-reset-tokens: 20m\ntry again in 3 hours"
    assert parse_reset(text, NOW) == (NOW + 5, "retry-after")


def test_within_a_rank_the_latest_reset_wins() -> None:
    text = "try again in 5 minutes\n... later ...\ntry again in 2 minutes"
    assert parse_reset(text, NOW) == (NOW + 300, "text:try again in")


def test_structured_class_beats_text_words() -> None:
    # OpenAI's quota message says "quota" and "billing"; the code says billing.
    assert parse_signal(OPENAI_INSUFFICIENT_QUOTA, NOW).klass is BILL
    # Gemini says "billing details" too, but RESOURCE_EXHAUSTED on a per-minute quota is a rate limit.
    gemini = _gemini("GenerateContentInputTokensPerModelPerMinute-FreeTier", "9s")
    assert parse_signal(gemini, NOW) == Signal(RL, NOW + 9, "gemini.retryDelay")


# --------------------------------------------------------------------------- robustness


def test_only_the_tail_is_read_and_huge_input_is_fast() -> None:
    head = "Retry-After: 30\n"
    filler = ("x" * 99 + "\n") * 100_000  # 10 MB
    started = time.perf_counter()
    assert parse_signal(head + filler, NOW) == Signal(OTHER, None, "")
    assert parse_signal(filler + "Please retry in 4s", NOW) == Signal(RL, NOW + 4, "text:retry in")
    assert time.perf_counter() - started < 5.0


@pytest.mark.parametrize(
    "text",
    [
        "{" * 200_000,
        "[" * 100_000 + "]" * 100_000,
        '{"a":' * 50_000 + "1" + "}" * 50_000,
        "{'a': " * 30_000 + "1" + "}" * 30_000,
        "{'a': '\\d \\q'}",
        '{"retryDelay": ' + '{"seconds": ' * 500 + "1" + "}" * 501,
        "a: x" + " " * 200_000,
        "1" * 1_000_000,
        "try again in " + "1s " * 50_000,
        '{"x": "' + '{\\"x\\": \\"' * 2_000 + '"}',
        '{"resets_at": ' + "9" * 5_000 + "}",
    ],
    ids=lambda text: repr(text[:16]),
)
def test_pathological_inputs(text: str) -> None:
    started = time.perf_counter()
    sig = parse_signal(text, NOW)
    assert isinstance(sig.klass, SignalClass)
    assert time.perf_counter() - started < 5.0


def test_non_string_input_never_raises() -> None:
    assert parse_signal(None, NOW) == Signal(OTHER, None, "")  # type: ignore[arg-type]
    assert parse_signal(b"Retry-After: 30", NOW) == Signal(RL, NOW + 30, "retry-after")  # type: ignore[arg-type]
    assert parse_reset(12, NOW) == (None, "")  # type: ignore[arg-type]


def _check(sig: Signal, now: float) -> None:
    assert isinstance(sig.klass, SignalClass)
    assert isinstance(sig.source, str)
    if sig.reset_at is None:
        assert sig.source == ""
    else:
        assert sig.source
        assert now <= sig.reset_at <= now + MAX_RESET_SECONDS


@_NO_HYPOTHESIS_DB
@given(st.text(), st.floats(allow_nan=True, allow_infinity=True))
def test_never_raises_on_any_text(text: str, now: float) -> None:
    _check(parse_signal(text, now), now)
    reset_at, source = parse_reset(text, now)
    assert reset_at is None or math.isfinite(reset_at)
    assert isinstance(source, str)


_FRAGMENTS = st.sampled_from(
    [
        "{", "}", "[", "]", '"', "'", ":", ",", "\n", " ", "\\", "|", "-", ".", "e", "NaN", "Infinity",
        "null", "retry-after: ", "retry-after-ms: ", "x-ratelimit-reset: ", "x-ratelimit-reset-tokens: ",
        "anthropic-ratelimit-requests-reset: ", '"resets_at": ', '"resets_in_seconds": ', '"retryDelay": ',
        '"quotaId": "PerDay"', '"code": 429', '"type": "usage_limit_reached"', "try again in ",
        "retry after ", "resets at ", "limit reached|", "2026-11-26T03:00:00Z", "3:00 AM UTC",
        "Thu, 26 Nov 2026 03:00:00 GMT", "1795662000", "1795662000000", "-5", "6m0s", "1.5s", "12ms",
        "5 days ", "22 hours ", "0", "1e400", "99999999999999999999999", "timed out", "pairing required",
        "overloaded", "billing", "quota exceeded", "retry_delay { seconds: 36 }",
        '{"seconds": 4, "nanos": 5}',
    ]
)  # fmt: skip


@_NO_HYPOTHESIS_DB
@given(st.lists(_FRAGMENTS, max_size=40).map("".join))
def test_never_raises_on_signal_shaped_text(text: str) -> None:
    _check(parse_signal(text, NOW), NOW)


@_NO_HYPOTHESIS_DB
@given(st.lists(_FRAGMENTS, max_size=40).map("".join))
def test_internals_do_not_lean_on_the_safety_net(text: str) -> None:
    """The catch-all in parse_signal is a last resort: the parsers themselves must not raise."""
    doc = signals._document(signals._tail(text))
    found = signals._best(signals._reset_candidates(doc, NOW))
    signals._classify(doc, has_reset=found is not None)
