"""End to end: a provider goes down for a while under a real ``clawq dispatch`` and ``clawq worker`` fleet.

Anthropic answers 529 ``overloaded_error`` to every run (tests/agents/e2e_agent.py reads ``<log>.down``) until
the test brings it back, right after its breaker opened. Checked from the event stream (in the order Redis
ran the scripts) and from the agent's own log: the breaker opens after ``failures`` failures, tasks run on the
other providers meanwhile, exactly one probe is sent when the opening ends, the breaker closes after it, and
no more runs were wasted on the dead provider than ``failures`` plus that probe.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_e2e import AGENT, E2EFleet, admin, check_boards, e2e_url, fleet, read_log, runs_of, wait_final

from clawq.broker import BreakerStatus, Broker, TaskStatus
from clawq.broker.config import Config

__all__ = ["admin", "e2e_url", "fleet"]  # the fixtures of test_e2e, used here

pytestmark = pytest.mark.slow

FAILURES = 3
COOLDOWN_S = 6.0


def outage_config(fleet: E2EFleet) -> Config:
    return Config.model_validate({
        "night_mode": None,
        "queue": {"global_max_concurrent": 4},
        "models": {"opus": "anthropic", "sonnet": "anthropic", "codex": "openai", "gemini3": "google"},
        # anthropic may run `failures` at once: a run in flight when the breaker opens is a run wasted too
        "limits": {"model_max_inflight": {"opus": 3, "sonnet": 1, "codex": 2, "gemini3": 2},
                   "provider_max_inflight": {"anthropic": FAILURES, "openai": 2, "google": 2}},
        "chains": {"planning": ["opus", "codex", "gemini3"]},
        "watchdog": {"stale_in_progress_minutes": 0.2, "heartbeat_grace_minutes": 0.05,
                     "failure_cooldown_minutes": 0.01, "max_attempts": 3},
        "breaker": {"failures": FAILURES, "window_minutes": 1, "cooldown_minutes": COOLDOWN_S / 60,
                    "max_cooldown_minutes": 1},
        "agent": {"runner": "command", "command": [sys.executable, AGENT, str(fleet.agent_log)],
                  "timeout_minutes": 1, "queue": f"q-{fleet.namespace}"},
        "notify": {"log": True, "summary_interval_minutes": 1},
    })


def wait_for(what: str, cond: Any, fleet: E2EFleet, timeout: float = 40.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if got := cond():
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}\n{fleet.log_tails()}")


def test_a_provider_outage_is_contained_by_its_breaker(fleet: E2EFleet, admin: Broker) -> None:
    admin.load_config(outage_config(fleet))
    down = Path(f"{fleet.agent_log}.down")
    down.write_text("anthropic")
    for i in range(16):  # opus first: every board tries the dead provider
        admin.add(f"p{i % 4}", f"plan {i + 1}", chain="planning", prompt=json.dumps({"dur": 0.6}), task_id=i + 1)
    fleet.dispatcher("dispatcher")
    for _ in range(4):
        fleet.worker(None, "--simple")

    wait_for("the breaker to open", lambda: admin.breakers()["anthropic"].state is BreakerStatus.OPEN, fleet)
    down.unlink()  # the provider is back; only a probe can tell
    for i in range(4):  # work only anthropic can do: it waits (provider_open) until the breaker closes
        admin.add(f"o{i}", f"opus {i + 1}", model="opus", prompt=json.dumps({"dur": 0.3}), task_id=101 + i)
    tasks = wait_final(admin, fleet, 20, timeout=90)
    assert all(t.status is TaskStatus.IN_REVIEW for t in tasks), [(t.task_id, t.status) for t in tasks]

    events = admin.events(100_000)
    kinds = [e["type"] for e in events]
    opened = [e for e in events if e["type"] == "provider_open"]
    probes = [e for e in events if e["type"] == "provider_probe"]
    closed = [e for e in events if e["type"] == "provider_closed"]
    assert [(e["provider"], e["cause"]) for e in opened] == [("anthropic", "overloaded")], opened
    assert len(probes) == 1 and len(closed) == 1, (probes, closed)
    i_open, i_probe, i_closed = (kinds.index(k) for k in ("provider_open", "provider_probe", "provider_closed"))
    assert i_open < i_probe < i_closed
    assert int(probes[0]["at"] * 1000) >= int(opened[0]["until"]), "the probe went before the cooldown ended"

    # the breaker opened at the `failures`-th qualifying failure
    failed_before = [e for e in events[:i_open] if e["type"] == "overloaded" and e.get("provider") == "anthropic"]
    assert len(failed_before) == FAILURES
    # while it was not closed, the only claim on anthropic was the probe
    claimed = [e for e in events[i_open:i_closed] if e["type"] == "claimed"]
    on_anthropic = [e for e in claimed if e["provider"] == "anthropic"]
    assert [e["run_id"] for e in on_anthropic] == [probes[0]["run_id"]]
    assert any(e["provider"] != "anthropic" for e in claimed), "nothing ran on the other providers meanwhile"

    runs = runs_of(read_log(fleet.agent_log))
    check_boards(runs)
    wasted = [r for r in runs if r["provider"] == "anthropic" and r["result"] == "overloaded"]
    assert len(wasted) <= FAILURES + len(probes), wasted
    probe_run = next(r for r in runs if r["run_id"] == probes[0]["run_id"])
    assert probe_run["result"] == "done"
    after = [r for r in runs if r["provider"] == "anthropic" and r["run_id"] != probe_run["run_id"]
             and r["start"] > probe_run["end"]]
    assert after, "anthropic got no work after its breaker closed"
    assert int(admin.client.hget(admin.keys.stats_skips, "provider_open") or 0) > 0
    assert admin.breakers()["anthropic"].state is BreakerStatus.CLOSED
    alerts = [ln for ln in fleet.log_tail("dispatcher", 1 << 20).splitlines() if "provider anthropic is down" in ln]
    assert len(alerts) == 1, alerts
