"""The provider breaker as operators see it: ``clawq breaker``, health, ``/metrics``, the alert, bad config input."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from conftest import FakeClock
from helpers import run_cli

from clawq.broker import Broker, Config, Outcome
from clawq.workers.dispatcher import Dispatcher
from clawq.workers.notify import Notifiers

OVERLOADED = "HTTP 529 overloaded_error: Overloaded"


def config(**breaker: Any) -> Config:
    return Config.model_validate({"night_mode": None, "notify": {"log": False},
                                  "limits": {"model_max_inflight": {}, "provider_max_inflight": {}},
                                  "breaker": breaker})


def snapshot(r: redis.Redis) -> dict[Any, Any]:
    return {k: (r.type(k), r.dump(k)) for k in r.scan_iter(count=1000)}


@pytest.fixture
def b(broker: Broker) -> Broker:
    broker.load_config(config())
    return broker


def cli(b: Broker, redis_url: str, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    return run_cli(["--redis-url", redis_url, "--namespace", b.namespace, *args], capsys)


def overload(b: Broker, n: int = 3) -> None:
    for i in range(n):
        b.add(f"o{i}", "t", model="opus")
        claim = b.claim()
        b.fail(claim.task_id, claim.run_id, OVERLOADED, retry=False)


# -- the CLI -------------------------------------------------------------------------------------------


def test_breaker_ls_open_close(b: Broker, redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(b, redis_url, capsys, "breaker", "ls", "--json")
    doc = json.loads(out)
    assert code == 0 and {p: d["state"] for p, d in doc.items()} == {
        "anthropic": "closed", "google": "closed", "openai": "closed", "zai": "closed"}
    code, out, _ = cli(b, redis_url, capsys, "breaker", "open", "openai", "30", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["state"] == "open" and doc["cause"] == "operator"
    assert 30 * 60 - 5 <= doc["remaining_s"] <= 30 * 60
    code, out, _ = cli(b, redis_url, capsys, "breaker", "ls")
    assert code == 0 and any(line.startswith("openai") and "open" in line and "left" in line
                             for line in out.splitlines())
    code, out, _ = cli(b, redis_url, capsys, "breaker", "close", "openai", "--json")
    assert code == 0 and json.loads(out)["state"] == "closed"
    assert [e["type"] for e in b.events(100) if e["type"].startswith("provider_")] == [
        "provider_open", "provider_closed"]


@pytest.mark.parametrize("args", [
    ("open", "openai", "0"), ("open", "openai", "-3"), ("open", "openai", "nan"), ("open", "openai", "1e9"),
    ("open", "openai", "soon"), ("open", "nobody", "5"), ("close", "nobody"),
])
def test_breaker_bad_input_is_one_line_exit_2_and_writes_nothing(
    b: Broker, redis_url: str, r: redis.Redis, capsys: pytest.CaptureFixture[str], args: tuple[str, ...]
) -> None:
    before = snapshot(r)
    code, _, err = cli(b, redis_url, capsys, "breaker", *args)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert snapshot(r) == before


@pytest.mark.parametrize("section", [
    {"failures": 0}, {"window_minutes": -1}, {"cooldown_minutes": 0}, {"max_cooldown_minutes": 10**7},
    {"cooldown_minutes": 20, "max_cooldown_minutes": 10},
])
def test_config_load_with_breaker_numbers_out_of_range(
    b: Broker, redis_url: str, r: redis.Redis, capsys: pytest.CaptureFixture[str], tmp_path: Path,
    section: dict[str, Any],
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"breaker": section}))
    before = snapshot(r)
    code, _, err = cli(b, redis_url, capsys, "config", "load", str(path))
    assert code == 2 and err.count("\n") == 1 and "breaker" in err, err
    assert snapshot(r) == before


# -- health ----------------------------------------------------------------------------------------------


def test_health_shows_each_providers_state_and_time_left(
    b: Broker, clock: FakeClock, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    overload(b)
    clock.advance(60)
    b.open_breaker("google", 1)
    clock.advance(61)
    providers = b.health()["providers"]
    assert providers["anthropic"]["breaker"] == {"state": "open", "remaining_s": 479.0, "until": clock() + 479,
                                                 "cause": "overloaded", "probe_task": None}
    assert providers["google"]["breaker"]["state"] == "half_open"
    assert providers["openai"]["breaker"]["state"] == "closed"
    code, out, _ = cli(b, redis_url, capsys, "health")  # the CLI's clock is the real one
    line = next(x for x in out.splitlines() if x.strip().startswith("provider anthropic"))
    assert code == 0 and "breaker open" in line and "s left" in line


# -- /metrics ------------------------------------------------------------------------------------------


@pytest.fixture
def http(b: Broker, tmp_path: Path) -> Iterator[Any]:
    pytest.importorskip("fastapi")
    pytest.importorskip("prometheus_client")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*httpx2.*")
        from fastapi.testclient import TestClient
    from clawq.server.app import create_app

    with TestClient(create_app(b, "tok", static_dir=tmp_path)) as c:
        yield c


def test_metrics_breaker_state_gauge(b: Broker, clock: FakeClock, http: Any) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    overload(b)
    b.open_breaker("google", 1)
    clock.advance(61)
    text = http.get("/metrics").text
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "clawq_provider_breaker_state"]
    assert family.type == "gauge"
    assert {s.labels["provider"]: s.value for s in family.samples} == {
        "anthropic": 1, "google": 2, "openai": 0, "zai": 0}


# -- the alert -----------------------------------------------------------------------------------------


def test_one_alert_per_opening_across_dispatchers(b: Broker, clock: FakeClock, redis_url: str) -> None:
    overload(b)
    other = Broker(redis.Redis.from_url(redis_url, decode_responses=True), b.namespace, clock=clock)
    s1, s2 = Notifiers(), Notifiers()
    d1, d2 = Dispatcher(b, lambda c: None, notifiers=s1), Dispatcher(other, lambda c: None, notifiers=s2)
    for d in (d1, d2, d1):
        d._on_events(b.events(1000))
    alerts = [n for n in s1.sent + s2.sent if n["kind"] == "provider_open"]
    assert len(alerts) == 1 and alerts[0]["provider"] == "anthropic"
    assert "anthropic" in alerts[0]["text"] and "overloaded" in alerts[0]["text"]
    clock.advance(600)
    b.add("probe", "t", model="opus")
    claim = b.claim()
    b.fail(claim.task_id, claim.run_id, OVERLOADED)  # the probe fails: a second opening, a second alert
    d2._on_events(b.events(1000))
    assert len([n for n in s1.sent + s2.sent if n["kind"] == "provider_open"]) == 2
    clock.advance(1200)
    claim = b.claim()
    b.complete(claim.task_id, claim.run_id, Outcome(summary="ok"))
    assert b.breakers()["anthropic"].state.value == "closed"
