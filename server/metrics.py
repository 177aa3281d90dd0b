"""Prometheus metrics of one namespace, read from Redis at scrape time (``GET /metrics``).

:class:`ClawqCollector` reads :meth:`broker.Broker.health` (the document ``clawq health --json`` prints)
and the ``stats:*`` keys in one scrape, so the gauges always agree with ``clawq health``; it lives in its
own :class:`prometheus_client.CollectorRegistry` (:func:`make_registry`), never the global one.

:func:`observe_claim_to_start` records one claim-to-start observation the way the collector reads it: the
HASH ``stats:claim_to_start`` holds NON-cumulative counts per bucket upper bound (fields ``"0.005"`` …
``"60"``, ``"+Inf"``) plus ``sum`` and ``count``. It needs only redis, so the workers can call it without
the ``clawq[server]`` extra installed (prometheus-client is imported only when a registry is built).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from clawq.broker import BreakerStatus, Broker
from clawq.broker.stats import CLAIM_TO_START_BUCKETS, Counters, bucket_field, observe_claim_to_start

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

__all__ = [
    "CLAIM_TO_START_BUCKETS",
    "CONTENT_TYPE",
    "ClawqCollector",
    "Stats",
    "bucket_field",
    "make_registry",
    "observe_claim_to_start",
    "read_stats",
    "render",
]

#: The text exposition format ``generate_latest`` writes (0.0.4), whatever prometheus-client's default.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"



#: The counters of the ``stats:*`` keys (read by the broker in one transaction).
Stats = Counters


def read_stats(broker: Broker) -> Stats:
    """Every ``stats:*`` counter of the namespace, in one transaction."""
    return broker.counters()


def histogram_buckets(fields: Mapping[str, float]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative ``(le, count)`` pairs (Prometheus order, +Inf last) and the sum, from the stored HASH."""
    counts = [0.0] * len(CLAIM_TO_START_BUCKETS)
    for field, n in fields.items():
        if field in ("sum", "count"):
            continue
        try:
            bound = float(field)
        except ValueError:
            continue
        if math.isnan(bound):
            continue
        counts[next(i for i, b in enumerate(CLAIM_TO_START_BUCKETS) if bound <= b)] += n
    buckets: list[tuple[str, float]] = []
    total = 0.0
    for bound, n in zip(CLAIM_TO_START_BUCKETS, counts, strict=True):
        total += n
        buckets.append(("+Inf" if math.isinf(bound) else repr(bound), total))  # Prometheus' "le" spelling
    return buckets, fields.get("sum", 0.0)


class ClawqCollector:
    """A custom collector: every scrape reads the namespace's health document and stats keys."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def describe(self) -> list[Metric]:
        return []  # nothing is read from Redis when the collector is registered

    def collect(self) -> Iterator[Metric]:
        health = self.broker.health()
        stats = read_stats(self.broker)
        yield from _board_metrics(health["boards"], stats)
        yield from _model_metrics(health["models"], health["providers"], stats)
        yield from _claim_metrics(stats)
        tokens, cost = self.broker.usage_stats()
        yield from _agent_metrics(tokens, cost)


def _board_metrics(boards: dict[str, Any], stats: Stats) -> Iterator[Metric]:
    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

    depth = GaugeMetricFamily("clawq_board_queue_depth", "Tasks up next on the board.", labels=["board"])
    running = GaugeMetricFamily("clawq_board_in_progress", "Runs in progress on the board (0 or 1).",
                                labels=["board"])
    waiting = GaugeMetricFamily("clawq_board_oldest_waiting_seconds",
                                "How long the board's head task has been waiting.", labels=["board"])
    scheduled = GaugeMetricFamily("clawq_board_scheduled",
                                  "Tasks of the board waiting for their not-before time or the night window.",
                                  labels=["board"])
    for name, doc in boards.items():
        depth.add_metric([name], doc["queue_depth"])
        scheduled.add_metric([name], doc["scheduled"])
        running.add_metric([name], doc["in_progress"])
        waiting.add_metric([name], doc["oldest_waiting_s"])
    completed = CounterMetricFamily("clawq_board_completed", "Run outcomes recorded on the board.",
                                    labels=["board"])
    for name in sorted(set(boards) | set(stats.completed)):
        completed.add_metric([name], stats.completed.get(name, 0.0))
    yield from (depth, scheduled, running, completed, waiting)


def _model_metrics(models: dict[str, Any], providers: dict[str, Any], stats: Stats) -> Iterator[Metric]:
    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

    inflight = GaugeMetricFamily("clawq_model_inflight", "Runs in progress on the model.", labels=["model"])
    cap = GaugeMetricFamily("clawq_model_cap", "The model's max inflight runs (models without a cap omitted).",
                            labels=["model"])
    cooling = GaugeMetricFamily("clawq_model_cooldown_remaining_seconds",
                                "Seconds left in the model's rate-limit cooldown (0 when not cooling).",
                                labels=["model"])
    for name, doc in models.items():
        inflight.add_metric([name], doc["inflight"])
        if doc["cap"] is not None:
            cap.add_metric([name], doc["cap"])
        cooling.add_metric([name], doc["cooldown_remaining_s"])
    p_inflight = GaugeMetricFamily("clawq_provider_inflight", "Runs in progress on the provider.",
                                   labels=["provider"])
    p_cap = GaugeMetricFamily("clawq_provider_cap", "The provider's max inflight runs (uncapped omitted).",
                              labels=["provider"])
    p_breaker = GaugeMetricFamily("clawq_provider_breaker_state",
                                  "The provider's circuit breaker: 0 closed, 1 open, 2 half-open.",
                                  labels=["provider"])
    for name, doc in providers.items():
        p_inflight.add_metric([name], doc["inflight"])
        if doc["cap"] is not None:
            p_cap.add_metric([name], doc["cap"])
        p_breaker.add_metric([name], BreakerStatus(doc["breaker"]["state"]).gauge)
    failures = CounterMetricFamily("clawq_model_failures", "Failed runs by model and reason.",
                                   labels=["model", "reason"])
    for (model, reason), n in sorted(stats.failures.items()):
        failures.add_metric([model, reason], n)
    yield from (inflight, cap, p_inflight, p_cap, p_breaker, cooling, failures)


def _claim_metrics(stats: Stats) -> Iterator[Metric]:
    from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily

    skips = CounterMetricFamily("clawq_skips", "Boards a claim passed over, by reason.", labels=["reason"])
    for reason, n in sorted(stats.skips.items()):
        skips.add_metric([reason], n)
    yield skips
    yield CounterMetricFamily("clawq_claims", "Successful claims.", value=stats.claims)
    buckets, total = histogram_buckets(stats.claim_to_start)
    yield HistogramMetricFamily("clawq_claim_to_start_seconds", "Seconds from a claim to its run starting.",
                                buckets=buckets, sum_value=total)


def _agent_metrics(tokens: dict[tuple[str, str, str], int], cost: dict[tuple[str, str], float]) -> Iterator[Metric]:
    from prometheus_client.metrics_core import CounterMetricFamily

    tok = CounterMetricFamily("clawq_agent_tokens", "Tokens the agent CLIs reported, by model, board and kind "
                              "(input, output).", labels=["model", "board", "kind"])
    for (model, board, kind), n in sorted(tokens.items()):
        tok.add_metric([model, board, kind], n)
    usd = CounterMetricFamily("clawq_agent_cost_usd", "US dollars the agent CLIs reported, by model and board.",
                              labels=["model", "board"])
    for (model, board), dollars in sorted(cost.items()):
        usd.add_metric([model, board], dollars)
    yield from (tok, usd)


def make_registry(broker: Broker) -> CollectorRegistry:
    """A private registry holding only the clawq collector of ``broker``."""
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    collector: Any = ClawqCollector(broker)  # Collector is an ABC in older prometheus-client, a Protocol now
    registry.register(collector)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format (:data:`CONTENT_TYPE`)."""
    from prometheus_client.exposition import generate_latest

    return generate_latest(registry)
