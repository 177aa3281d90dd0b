"""The benchmarks' quick modes run and write their JSON (no timing is asserted: machines are noisy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH_KEYS = {
    "claim_cost": {"usec_per_call", "claim_breakdown", "complete_breakdown"},
    "scaling": {"levels", "ratios", "memory_per_task", "task_hash_fields"},
    "e2e": {"variants", "job_profile"},
    "latency": {"results"},
    "bullmq": {"median", "rounds", "anchor"},
    "instructions": {"clawq_cycle", "clawq_throughput", "bullmq_cycle"},
}
GOAL_KEYS = {"name", "measured", "limit", "unit", "met"}


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)


def _strict(text: str) -> dict[str, object]:
    """Parse as strict JSON: NaN and Infinity are not JSON."""

    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    doc = json.loads(text, parse_constant=refuse)
    assert isinstance(doc, dict)
    return doc


def _check_doc(doc: dict[str, object], name: str) -> None:
    assert doc["bench"] == name
    assert doc["mode"] == "quick"
    machine = doc["machine"]
    assert isinstance(machine, dict)
    assert {"nproc", "cpu_model", "redis_server"} <= set(machine)
    goals = doc["goals"]
    assert isinstance(goals, list) and goals
    for goal in goals:
        assert set(goal) >= GOAL_KEYS
        assert isinstance(goal["met"], bool)
    details = doc["details"]
    assert isinstance(details, dict)
    assert BENCH_KEYS[name] <= set(details)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(BENCH_KEYS))
def test_quick_mode_runs_and_writes_json(name: str, tmp_path: Path) -> None:
    out = tmp_path / f"{name}.json"
    # The BullMQ anchor runs only where a previous full run cached it: a test never installs from npm.
    # instructions needs valgrind: without it (or without BullMQ) it says so and sets no goal.
    extra = ["--no-install"] if name in ("bullmq", "instructions") else []
    proc = _run(["-m", f"bench.{name}", "--quick", "--json", str(out), *extra])
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = _strict(out.read_text())
    if name in ("bullmq", "instructions") and doc["goals"] == []:
        assert "skipped" in doc["details"], doc  # type: ignore[operator]
        pytest.skip(str(doc["details"]["skipped"]))  # type: ignore[index]
    _check_doc(doc, name)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_all_only_one(tmp_path: Path) -> None:
    out = tmp_path / "all.json"
    proc = _run(["bench/run_all.py", "--quick", "--only", "claim_cost", "--json", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = _strict(out.read_text())
    assert doc["failed"] == []
    benches = doc["benches"]
    assert isinstance(benches, dict)
    _check_doc(benches["claim_cost"], "claim_cost")


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("threads", [1, 2])
def test_clawq_throughput_loop_ends_every_task_in_one_or_two_threads(threads: int) -> None:
    """bench.bullmq's clawq loop, as its goal runs it (2 threads, each its own Broker): every task claimed once and
    completed, none left running, whichever thread met an empty queue while the other held the ready boards."""
    from bench._server import BenchServer
    from bench.bullmq import clawq_throughput
    from clawq.broker import Broker

    with BenchServer() as srv:
        assert clawq_throughput(srv, 700, boards=64, threads=threads) > 0
        broker = Broker(srv.client(), "tput")
        client = srv.client()
        assert client.zcard(broker.keys.in_review) == 700
        assert client.zcard(broker.keys.running) == 0
        assert int(client.get(broker.keys.stats_claims) or 0) == 700
