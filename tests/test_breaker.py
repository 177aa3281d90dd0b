"""The provider circuit breaker (lua/lib/core.lua breaker_*, lua/set_breaker-5.lua), on real Redis 7 and 6.2.

One test per path: what opens it (and what does not), open, half-open with exactly one probe, the probe's
three endings, the operator's open and close, explain/doctor/config agreeing with the claim, and a race of
concurrent claimers for the probe.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
import redis
from conftest import FakeClock as Clock
from helpers import ms, rc

from clawq.broker import BreakerStatus, Broker, Claim, Config, ConfigError, NothingToClaim, Outcome, UnknownChain
from clawq.broker.config import DEFAULT_CONFIG, parse_config
from clawq.broker.errors import InputError, Status
from clawq.broker.signals import SignalClass, counts_for_breaker, parse_signal

OVERLOADED = '{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}'
DONE = Outcome(summary="done")


def config(**breaker: Any) -> Config:
    """No night mode, no caps (so caps never hide the breaker), the breaker section merged with ``breaker``."""
    data: dict[str, Any] = DEFAULT_CONFIG.model_dump(mode="json")
    data["night_mode"] = None
    data["limits"] = {"model_max_inflight": {}, "provider_max_inflight": {}}
    data["breaker"] = {**data["breaker"], **breaker}
    return Config.model_validate(data)


@pytest.fixture
def b(broker: Broker) -> Broker:
    broker.load_config(config())
    return broker


def raw(broker: Broker, name: str, *args: Any, **kw: Any) -> list[Any]:
    return broker._scripts.call(name, [broker.keys.prefix, *args], **kw)


def events(broker: Broker, *types: str) -> list[dict[str, Any]]:
    return [e for e in broker.events(10_000) if e["type"] in types]


def claim_pinned(broker: Broker, board: str, model: str) -> Claim:
    broker.add(board, "t", model=model)
    claim = broker.claim()
    assert (claim.board, claim.model) == (board, model)
    return claim


def overload(broker: Broker, n: int, model: str = "opus", prefix: str = "o") -> None:
    """``n`` runs of ``model`` fail as overloaded, one after another."""
    for i in range(n):
        claim = claim_pinned(broker, f"{prefix}{i}", model)
        broker.fail(claim.task_id, claim.run_id, OVERLOADED, retry=False)


def nothing(broker: Broker) -> dict[str, int]:
    with pytest.raises(NothingToClaim) as exc:
        broker.claim()
    return exc.value.skip_reasons


def state(broker: Broker, provider: str = "anthropic") -> BreakerStatus:
    return broker.breakers()[provider].state


# -- what opens it ---------------------------------------------------------------------------------


def test_failures_qualifying_failures_within_the_window_open_it(b: Broker, clock: Clock) -> None:
    overload(b, 2)
    assert state(b) is BreakerStatus.CLOSED and b.breakers()["anthropic"].recent_failures == 2
    overload(b, 1, model="sonnet", prefix="s")  # any model of the provider counts
    st = b.breakers()["anthropic"]
    assert st.state is BreakerStatus.OPEN and st.cause == "overloaded"
    assert st.until == clock() + 600 and st.remaining_s == 600
    opened = events(b, "provider_open")
    assert len(opened) == 1
    assert (opened[0]["provider"], opened[0]["cause"], opened[0]["until"]) == ("anthropic", "overloaded",
                                                                               str(ms(clock() + 600)))
    assert rc(b).hget(b.keys.blocked, "o:anthropic") == f"{ms(clock() + 600)}|"
    assert rc(b).exists(b.keys.breaker_failures("anthropic")) == 0
    assert b.breakers()["openai"].state is BreakerStatus.CLOSED


def test_failures_outside_the_sliding_window_do_not_count(b: Broker, clock: Clock) -> None:
    overload(b, 2)
    clock.advance(5 * 60 + 1)
    overload(b, 2, prefix="late")
    assert state(b) is BreakerStatus.CLOSED
    overload(b, 1, prefix="third")
    assert state(b) is BreakerStatus.OPEN


@pytest.mark.parametrize("message", [
    "FAILED tests/test_api.py::test_login - AssertionError",  # the task's fault
    "ruff: E501 line too long",
    "Your credit balance is too low to access the Anthropic API",  # billing: the provider answered
])
def test_a_task_failure_does_not_count(b: Broker, message: str) -> None:
    for i in range(4):
        claim = claim_pinned(b, f"f{i}", "opus")
        b.fail(claim.task_id, claim.run_id, message)
    assert state(b) is BreakerStatus.CLOSED
    assert b.breakers()["anthropic"].recent_failures == 0
    assert not events(b, "provider_open")


@pytest.mark.parametrize("message", [
    "Request timed out after 600s",
    "Error: connect ECONNREFUSED 104.18.1.1:443",
    "curl: (6) Could not resolve host: api.anthropic.com",
    "getaddrinfo ENOTFOUND api.anthropic.com",
])
def test_timeouts_and_an_unreachable_provider_count(b: Broker, message: str) -> None:
    for i in range(3):
        claim = claim_pinned(b, f"f{i}", "opus")
        b.fail(claim.task_id, claim.run_id, message)
    assert state(b) is BreakerStatus.OPEN


def test_a_rate_limit_without_a_reset_counts_one_with_a_reset_cools_only_its_model(b: Broker) -> None:
    b.add("r", "t", model="opus")  # a rate-limited task is its board's head again: the same task each time
    for _ in range(3):
        b.clear_cooldown("opus")
        claim = b.claim()
        b.rate_limited(claim.task_id, claim.run_id, message="Please try again in 5 minutes.")
    assert state(b) is BreakerStatus.CLOSED  # each reset cools its model only
    assert b.cooldowns()["opus"]["remaining_s"] == 300
    for _ in range(3):
        b.clear_cooldown("opus")
        claim = b.claim()
        b.rate_limited(claim.task_id, claim.run_id, message="429 Too Many Requests")
    st = b.breakers()["anthropic"]
    assert st.state is BreakerStatus.OPEN and st.cause == "rate_limit"


def test_disabled_it_never_opens_by_failures(broker: Broker) -> None:
    broker.load_config(config(enabled=False))
    overload(broker, 5)
    assert state(broker) is BreakerStatus.CLOSED


def test_signals_classify_what_counts() -> None:
    assert parse_signal("dial tcp: lookup api.openai.com: no such host", 0).klass is SignalClass.UNREACHABLE
    assert parse_signal('{"code": "ECONNREFUSED"}', 0).klass is SignalClass.UNREACHABLE
    assert counts_for_breaker("overloaded") and counts_for_breaker("timeout") and counts_for_breaker("unreachable")
    assert counts_for_breaker("rate_limit", reset_known=False)
    assert not counts_for_breaker("rate_limit") and not counts_for_breaker("quota_reached", reset_known=False)
    assert not counts_for_breaker("failed") and not counts_for_breaker("bad_output")


# -- open ------------------------------------------------------------------------------------------


def test_open_chains_fall_to_another_provider_at_once(b: Broker) -> None:
    overload(b, 3)
    b.add("plan", "p", chain="planning")  # opus, codex, gemini3
    claim = b.claim()
    assert (claim.board, claim.model) == ("plan", "codex")


def test_open_a_pinned_task_waits_with_skip_reason_provider_open(b: Broker) -> None:
    overload(b, 3)
    b.add("pin", "p", model="sonnet")
    assert nothing(b) == {"provider_open": 1}
    assert int(rc(b).hget(b.keys.stats_skips, "provider_open")) == 1
    assert b.explain_boards(["pin"], 6) == ["provider_open"]


def test_a_fault_of_a_run_claimed_before_the_opening_counts_nothing(b: Broker) -> None:
    late = claim_pinned(b, "late", "opus")
    overload(b, 3)
    b.fail(late.task_id, late.run_id, OVERLOADED)
    assert len(events(b, "provider_open")) == 1


# -- half-open and the probe -----------------------------------------------------------------------


def open_then_due(b: Broker, clock: Clock) -> None:
    overload(b, 3)
    clock.advance(600)
    assert state(b) is BreakerStatus.HALF_OPEN


def test_half_open_exactly_one_probe_is_claimed(b: Broker, clock: Clock) -> None:
    open_then_due(b, clock)
    for board in ("p1", "p2", "p3"):
        b.add(board, "t", model="opus")
    claims, skips = b.claim_many(3)
    assert [c.board for c in claims] == ["p1"]
    assert skips == {"provider_open": 2}
    probe = events(b, "provider_probe")
    assert [(e["provider"], e["task_id"], e["run_id"]) for e in probe] == [("anthropic", claims[0].task_id,
                                                                           claims[0].run_id)]
    assert b.breakers()["anthropic"].probe_task == claims[0].task_id
    assert b.explain_boards(["p2"], 6) == ["provider_open"]


def test_a_probe_that_succeeds_closes_it_and_resets_the_back_off(b: Broker, clock: Clock) -> None:
    open_then_due(b, clock)
    probe = claim_pinned(b, "p", "opus")
    b.complete(probe.task_id, probe.run_id, DONE)
    assert state(b) is BreakerStatus.CLOSED
    closed = events(b, "provider_closed")
    assert [e["provider"] for e in closed] == ["anthropic"]
    assert rc(b).hget(b.keys.blocked, "o:anthropic") is None
    overload(b, 3, prefix="again")
    assert b.breakers()["anthropic"].cooldown_s == 600  # the base again, not doubled


def test_a_probe_that_fails_reopens_with_the_doubled_cooldown_up_to_the_max(b: Broker, clock: Clock) -> None:
    open_then_due(b, clock)
    lengths = []
    for i in range(4):
        probe = claim_pinned(b, f"p{i}", "opus")
        b.fail(probe.task_id, probe.run_id, OVERLOADED, retry=False)
        st = b.breakers()["anthropic"]
        assert st.state is BreakerStatus.OPEN
        lengths.append(st.cooldown_s)
        clock.advance(st.remaining_s)
    assert lengths == [1200, 2400, 3600, 3600]
    assert len(events(b, "provider_open")) == 5


def test_a_probe_whose_task_failed_on_its_own_closes_it(b: Broker, clock: Clock) -> None:
    open_then_due(b, clock)
    probe = claim_pinned(b, "p", "opus")
    b.fail(probe.task_id, probe.run_id, "FAILED tests/test_x.py - assert 1 == 2")  # the provider answered
    assert state(b) is BreakerStatus.CLOSED


@pytest.mark.parametrize("ending", ["release", "cancel", "reap"])
def test_a_probe_that_tells_nothing_frees_the_probe_slot(b: Broker, clock: Clock, ending: str) -> None:
    open_then_due(b, clock)
    probe = claim_pinned(b, "p", "opus")
    if ending == "release":
        b.release(probe.task_id, probe.run_id)
    elif ending == "cancel":
        b.cancel(probe.task_id)
    else:
        clock.advance(23 * 60 + 1)
        assert b.reap() == [probe.task_id]
    st = b.breakers()["anthropic"]
    assert st.state is BreakerStatus.HALF_OPEN and st.probe_task is None
    b.add("q", "t", model="opus")
    again = b.claim()
    assert again.model == "opus" and b.breakers()["anthropic"].probe_task == again.task_id


# -- operators: set_breaker ------------------------------------------------------------------------


def test_set_breaker_open(b: Broker, clock: Clock) -> None:
    reply = raw(b, "set_breaker", ms(clock()), "openai", ms(90), provider="openai")
    assert reply == [Status.OK, "open", ms(clock() + 90)]
    st = b.breakers()["openai"]
    assert (st.state, st.cause, st.remaining_s) == (BreakerStatus.OPEN, "operator", 90)
    assert [(e["provider"], e["cause"]) for e in events(b, "provider_open")] == [("openai", "operator")]
    b.add("c", "t", model="codex")
    assert nothing(b) == {"provider_open": 1}


def test_set_breaker_close(b: Broker, clock: Clock) -> None:
    overload(b, 3)
    assert raw(b, "set_breaker", ms(clock()), "anthropic", 0, provider="anthropic") == [Status.OK, "closed", 0]
    assert state(b) is BreakerStatus.CLOSED
    assert [e["provider"] for e in events(b, "provider_closed")] == ["anthropic"]
    overload(b, 2, prefix="n")
    assert state(b) is BreakerStatus.CLOSED  # the failure window was reset too


def test_set_breaker_unknown_provider(b: Broker, clock: Clock) -> None:
    assert raw(b, "set_breaker", ms(clock()), "nope", 1000, provider="nope") == [
        Status.UNKNOWN_CHAIN, "unknown provider 'nope'"]
    with pytest.raises(UnknownChain):
        b.open_breaker("nope", 5)


@pytest.mark.parametrize("minutes", [0, -1, float("nan"), float("inf"), 10**9, True])
def test_operator_open_with_bad_minutes_changes_nothing(b: Broker, minutes: Any) -> None:
    with pytest.raises(InputError):
        b.open_breaker("openai", minutes)
    assert state(b, "openai") is BreakerStatus.CLOSED and not events(b, "provider_open")


def test_operator_open_then_a_failed_probe_doubles_it(b: Broker, clock: Clock) -> None:
    b.open_breaker("anthropic", 2)
    clock.advance(120)
    probe = claim_pinned(b, "p", "opus")
    b.fail(probe.task_id, probe.run_id, OVERLOADED)
    assert b.breakers()["anthropic"].cooldown_s == 240


# -- config, doctor, wake-ups ----------------------------------------------------------------------


@pytest.mark.parametrize("section", [
    {"failures": 0}, {"window_minutes": 0}, {"cooldown_minutes": -1}, {"max_cooldown_minutes": 10**9},
    {"cooldown_minutes": 30, "max_cooldown_minutes": 20}, {"enabled": "yes"}, {"failures": 2.5},
])
def test_breaker_numbers_out_of_range_are_refused(section: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"breaker": section})
    assert "\n" not in str(exc.value) and "breaker" in str(exc.value)


def test_a_config_load_keeps_an_open_breaker_blocking(b: Broker) -> None:
    overload(b, 3)
    b.load_config(config(failures=5))
    assert rc(b).hget(b.keys.blocked, "o:anthropic") is not None
    b.add("pin", "t", model="opus")
    assert nothing(b)["provider_open"] == 1


def test_doctor_repairs_a_lost_breaker_block_and_a_dead_probe(b: Broker, clock: Clock, r: redis.Redis) -> None:
    open_then_due(b, clock)
    probe = claim_pinned(b, "p", "opus")
    assert b.doctor()["ok"]
    rc(b).hdel(b.keys.blocked, "o:anthropic")
    rc(b).hset(b.keys.breaker("anthropic"), "probe", str(uuid.uuid4()))  # a probe nobody runs
    report = b.doctor(repair=True)
    assert any("probe" in p for p in report["problems"]) and any("o:anthropic" in p for p in report["problems"])
    assert report["ok"]
    st = b.breakers()["anthropic"]
    assert st.state is BreakerStatus.HALF_OPEN and st.probe_task is None
    assert rc(b).hget(b.keys.blocked, "o:anthropic") == f"{ms(clock())}|"
    assert probe.task_id == 4


def test_the_dispatcher_wakes_when_an_opening_ends(b: Broker, clock: Clock) -> None:
    overload(b, 3)
    assert b.deadlines().cooldown == clock() + 600


# -- race: exactly one probe -----------------------------------------------------------------------


def test_concurrent_claimers_get_exactly_one_probe(b: Broker, clock: Clock, redis_url: str) -> None:
    open_then_due(b, clock)
    for i in range(12):
        b.add(f"race{i}", "t", model=("opus", "sonnet")[i % 2])
    start = threading.Barrier(6)
    got: list[Claim] = []
    lock = threading.Lock()

    def claimer() -> None:
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        mine = Broker(client, b.namespace, clock=clock)
        start.wait()
        for _ in range(5):
            try:
                claims, _ = mine.claim_many(2)
            except NothingToClaim:
                continue
            with lock:
                got.extend(claims)
        client.close()

    threads = [threading.Thread(target=claimer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 1 and got[0].provider == "anthropic"
    assert len(events(b, "provider_probe")) == 1
    assert b.breakers()["anthropic"].probe_task == got[0].task_id


def test_doctor_drops_a_breaker_block_whose_breaker_is_gone(b: Broker) -> None:
    overload(b, 3)
    rc(b).delete(b.keys.breaker("anthropic"))  # closed by hand, its block left behind
    report = b.doctor(repair=True)
    assert any("o:anthropic" in p for p in report["problems"]) and report["ok"]
    assert rc(b).hget(b.keys.blocked, "o:anthropic") is None
    b.add("pin", "t", model="opus")
    assert b.claim().model == "opus"
