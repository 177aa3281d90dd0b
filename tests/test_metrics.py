"""``GET /metrics`` (``server.metrics``): names, values agreeing with ``broker.health()``, the histogram."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import FakeClock

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

with warnings.catch_warnings():  # newer Starlette asks for httpx2 and warns when it only finds httpx
    warnings.filterwarnings("ignore", message=".*httpx2.*")
    from fastapi.testclient import TestClient

from clawq.broker import Broker, InputError, NothingToClaim, Outcome, parse_config
from clawq.server.app import create_app
from clawq.server.metrics import CLAIM_TO_START_BUCKETS, bucket_field, observe_claim_to_start

ROOT = Path(__file__).resolve().parent.parent
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

GAUGES = {
    "clawq_board_queue_depth", "clawq_board_in_progress", "clawq_board_oldest_waiting_seconds",
    "clawq_board_scheduled", "clawq_model_inflight", "clawq_model_cap", "clawq_provider_inflight", "clawq_provider_cap",
    "clawq_model_cooldown_remaining_seconds", "clawq_provider_breaker_state",
}
COUNTERS = {"clawq_board_completed", "clawq_model_failures", "clawq_skips", "clawq_claims", "clawq_agent_tokens",
            "clawq_agent_cost_usd"}


@pytest.fixture
def client(broker: Broker, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(broker, "tok", static_dir=tmp_path)) as c:
        yield c


def scrape(client: TestClient) -> tuple[dict[str, str], Samples]:
    """Family name -> type, and every sample by (name, labels)."""
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return types, samples


def labelled(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(labels)[label]: v for (n, labels), v in samples.items() if n == name}


def busy_namespace(broker: Broker, clock: FakeClock) -> None:
    """Boards queued, running, completed; a failure, a rate limit, skipped claims."""
    broker.load_config(parse_config({
        "night_mode": None,
        "limits": {"model_max_inflight": {"opus": 1, "codex": 2}, "provider_max_inflight": {"openai": 3}},
    }))
    for board, target in (("web", "coding"), ("web", "coding"), ("ops", None), ("docs", "bulk"), ("docs", "bulk")):
        broker.add(board, f"{board} task", chain=target, model=None if target else "opus")
    web, ops, docs = broker.claim(), broker.claim(), broker.claim()
    assert (web.board, ops.board, docs.board) == ("web", "ops", "docs")
    clock.advance(5)
    broker.complete(web.task_id, web.run_id, Outcome(summary="done"))
    broker.fail(docs.task_id, docs.run_id, "it broke")
    broker.rate_limited(ops.task_id, ops.run_id, retry_after=300)
    broker.add("ops", "second", model="opus")
    broker.add("ops", "tomorrow", model="opus", not_before=clock() + 86400)
    web2 = broker.claim()
    assert web2.board == "web"
    for _ in range(2):
        with pytest.raises(NothingToClaim):
            broker.claim()
    clock.advance(42)


def test_metrics_agree_with_health(client: TestClient, broker: Broker, clock: FakeClock) -> None:
    busy_namespace(broker, clock)
    types, samples = scrape(client)
    health = broker.health()
    keys, raw = broker.keys, broker.client

    assert {n for n, t in types.items() if t == "gauge"} == GAUGES
    assert {n for n, t in types.items() if t == "counter"} == COUNTERS
    assert {n for n, t in types.items() if t == "histogram"} == {"clawq_claim_to_start_seconds"}

    boards = health["boards"]
    assert set(boards) == {"web", "ops", "docs"}
    assert labelled(samples, "clawq_board_queue_depth", "board") == {b: d["queue_depth"] for b, d in boards.items()}
    assert labelled(samples, "clawq_board_in_progress", "board") == {b: d["in_progress"] for b, d in boards.items()}
    assert labelled(samples, "clawq_board_scheduled", "board") == {b: d["scheduled"] for b, d in boards.items()}
    assert labelled(samples, "clawq_board_oldest_waiting_seconds", "board") == pytest.approx(
        {b: d["oldest_waiting_s"] for b, d in boards.items()})
    assert labelled(samples, "clawq_board_oldest_waiting_seconds", "board")["ops"] == pytest.approx(42, abs=0.01)
    completed = {b: float(raw.hget(keys.board(b), "completed") or 0) for b in boards}
    assert completed["web"] == 1
    assert labelled(samples, "clawq_board_completed_total", "board") == completed

    models = health["models"]
    assert labelled(samples, "clawq_model_inflight", "model") == {m: d["inflight"] for m, d in models.items()}
    assert labelled(samples, "clawq_model_cap", "model") == {"opus": 1, "codex": 2}  # uncapped models omitted
    cooling = labelled(samples, "clawq_model_cooldown_remaining_seconds", "model")
    assert cooling == pytest.approx({m: d["cooldown_remaining_s"] for m, d in models.items()})
    assert cooling["opus"] == pytest.approx(300 - 42, abs=0.01)
    providers = health["providers"]
    assert labelled(samples, "clawq_provider_inflight", "provider") == {
        p: d["inflight"] for p, d in providers.items()}
    assert labelled(samples, "clawq_provider_cap", "provider") == {"openai": 3}

    failures = {
        (dict(labels)["model"], dict(labels)["reason"]): v
        for (n, labels), v in samples.items() if n == "clawq_model_failures_total"
    }
    stored = {tuple(str(k).split("|", 1)): float(v) for k, v in raw.hgetall(keys.stats_failures).items()}
    assert failures == stored
    assert ("opus", "rate_limit") in failures and len(failures) == 2
    for model, doc in models.items():  # health sums them per model
        assert doc["failures"] == sum(v for (m, _), v in failures.items() if m == model)

    skips = labelled(samples, "clawq_skips_total", "reason")
    assert skips == {k: float(v) for k, v in raw.hgetall(keys.stats_skips).items()}
    assert skips
    assert samples[("clawq_claims_total", frozenset())] == float(raw.get(keys.stats_claims) or 0) == 4


def test_metrics_of_an_empty_namespace(client: TestClient, broker: Broker, r: redis.Redis) -> None:
    types, samples = scrape(client)
    assert r.keys("*") == []  # a scrape writes nothing
    assert set(types) == GAUGES | COUNTERS | {"clawq_claim_to_start_seconds"}
    assert samples[("clawq_claims_total", frozenset())] == 0
    assert not labelled(samples, "clawq_board_queue_depth", "board")
    assert labelled(samples, "clawq_model_cap", "model") == broker.config().limits.model_max_inflight
    assert set(labelled(samples, "clawq_model_inflight", "model").values()) == {0}
    assert samples[("clawq_claim_to_start_seconds_count", frozenset())] == 0
    assert samples[("clawq_claim_to_start_seconds_bucket", frozenset({("le", "+Inf")}))] == 0


def test_claim_to_start_histogram(client: TestClient, broker: Broker) -> None:
    observed = [0.001, 0.005, 0.0051, 0.3, 2.0, 59.9, 60.0, 61.0, 1000.0, -3.0]
    for seconds in observed:
        observe_claim_to_start(broker.client, broker.keys, seconds)
    stored = broker.client.hgetall(broker.keys.prefix + "stats:claim_to_start")
    assert {k: v for k, v in stored.items() if k != "sum"} == {
        "0.005": "3", "0.01": "1", "0.5": "1", "2.5": "1", "60": "2", "+Inf": "2", "count": "10"}
    _, samples = scrape(client)
    buckets = labelled(samples, "clawq_claim_to_start_seconds_bucket", "le")
    assert list(buckets) == [("+Inf" if math.isinf(b) else repr(b)) for b in CLAIM_TO_START_BUCKETS]
    assert buckets == {
        "0.005": 3, "0.01": 4, "0.025": 4, "0.05": 4, "0.1": 4, "0.25": 4, "0.5": 5, "1.0": 5, "2.5": 6,
        "5.0": 6, "10.0": 6, "30.0": 6, "60.0": 8, "+Inf": 10,
    }
    total = sum(max(0.0, s) for s in observed)
    assert samples[("clawq_claim_to_start_seconds_sum", frozenset())] == pytest.approx(total)
    assert samples[("clawq_claim_to_start_seconds_count", frozenset())] == 10


def test_observe_writes_what_the_broker_writes(broker: Broker, redis_url: str, clock: FakeClock) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        other = Broker(client, broker.namespace + "b", clock=clock)
        for seconds in (0.0, 0.004, 0.02, 0.7, 3.0, 45.0, 75.0, -1.0):
            observe_claim_to_start(broker.client, broker.keys, seconds)
            other.observe_claim_to_start(seconds)
        mine = broker.client.hgetall(broker.keys.stats_claim_to_start)
        theirs = client.hgetall(other.keys.stats_claim_to_start)
        assert set(mine) == set(theirs)
        assert {k: float(v) for k, v in mine.items()} == pytest.approx({k: float(v) for k, v in theirs.items()})
    finally:
        client.close()


@pytest.mark.parametrize("seconds", [math.nan, math.inf, -math.inf])
def test_observe_refuses_non_finite(broker: Broker, r: redis.Redis, seconds: float) -> None:
    with pytest.raises(InputError, match="finite"):
        observe_claim_to_start(broker.client, broker.keys, seconds)
    assert r.keys("*") == []


def test_bucket_fields() -> None:
    assert [bucket_field(b) for b in CLAIM_TO_START_BUCKETS] == [
        "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "30", "60", "+Inf"]


def test_metrics_use_a_private_registry(client: TestClient, broker: Broker) -> None:
    broker.add("web", "t", chain="coding")
    scrape(client)
    assert b"clawq_" not in generate_latest(REGISTRY)


def test_metrics_need_no_token(client: TestClient) -> None:
    assert client.get("/api/v1/tasks/queue_health").status_code == 401
    assert client.get("/metrics").status_code == 200


def test_metrics_module_imports_without_the_extra() -> None:
    code = (
        "import sys\n"
        "for name in ('fastapi', 'starlette', 'uvicorn', 'prometheus_client'):\n"
        "    sys.modules[name] = None\n"
        "import server.metrics as m\n"
        "print(m.bucket_field(m.CLAIM_TO_START_BUCKETS[-1]), callable(m.observe_claim_to_start))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["+Inf", "True"]
