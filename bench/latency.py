"""latency: from a run's completion to the next task's agent start on the freed board / slot (p50, p99).

Two scenarios, each a fresh namespace with its own dispatcher and the same two warm workers (one runs the
task, the other waits: the figure is the hand-over, not a queue of jobs):

- ``board``: L tasks on one board: each completion frees the board, the next task is its new head;
- ``slot``: L tasks on L boards under a global cap of 1: each completion frees the only slot.

The agent (``bench.noop_agent:stamp``) appends its start time (time.time()) to a file; the completion time is
the ``at`` (ms) of the run's ``completed`` event. Runs are strictly one after another, so the latency of run i
is start(i) - completed(i - 1). Each hand-over is also split by the ``claimed`` event and RQ's job
``started_at``: completion -> claim (dispatcher wakes, reaps, claims), claim -> job start (enqueue, dequeue,
fork), job start -> agent start (the job's set-up); agent start -> completion is the run itself (the runner's
wait, the report). Goals: p50 ≤ 20 ms, p99 ≤ 100 ms (forking workers).

    python -m bench.latency [--quick] [--json FILE]
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from rq.job import Job

from clawq.broker import Broker

from ._clawq import BIG_CAP, bench_config, new_broker
from ._common import Goal, bench_args, median, percentile, print_table, write_report
from ._procs import Procs
from ._server import BenchServer, machine_info
from .noop_agent import STAMPS_ENV

QUEUE = "bench-latency"
GOAL_P50_MS = 20.0
GOAL_P99_MS = 100.0
_TIMEOUT_S = 600.0
SCENARIOS = {"board": 1, "slot": 0}  #: name -> boards (0: one board per task)


def _config(cap: int) -> Any:
    return bench_config(queue={"global_max_concurrent": cap},
                        agent={"runner": "python", "callable": "bench.noop_agent:stamp", "queue": QUEUE})


def _events(broker: Broker, kind: str) -> dict[int, float]:
    rows = broker.events(count=1_000_000)
    return {int(e["task_id"]): float(e["at"]) for e in rows if e.get("type") == kind}


def _job_starts(conn: redis.Redis, run_ids: dict[int, str]) -> dict[int, float]:
    out: dict[int, float] = {}
    for tid, rid in run_ids.items():
        job = Job.fetch(rid, connection=conn)
        if job.started_at is not None:
            out[tid] = job.started_at.timestamp()
    return out


def _run_ids(broker: Broker, ids: list[int]) -> dict[int, str]:
    return {tid: str(broker.get_task(tid).runs[-1]["run_id"]) for tid in ids}


def run_scenario(procs: Procs, srv: BenchServer, stamps: Path, name: str, runs: int) -> dict[str, Any]:
    client = srv.client(decode_responses=True)
    per_board = SCENARIOS[name]
    broker = new_broker(client, f"lat-{name}-{time.monotonic_ns()}", _config(1 if name == "slot" else BIG_CAP),
                        cool=False)
    stamps.write_text("")
    dispatcher = procs.dispatcher(broker.namespace)
    try:
        ids = [broker.add("b0" if per_board else f"b{i}", f"t{i}", chain="coding") for i in range(runs)]
        deadline = time.monotonic() + _TIMEOUT_S
        while int(client.zcard(broker.keys.in_review)) < runs:
            if time.monotonic() > deadline:
                raise RuntimeError(f"latency {name}: not all {runs} runs completed")
            time.sleep(0.01)
    finally:
        procs.stop([dispatcher])
    starts = {int(d["task_id"]): float(d["t"]) for d in map(json.loads, stamps.read_text().splitlines())}
    return _handovers(starts, _events(broker, "completed"), _events(broker, "claimed"),
                      _job_starts(srv.client(), _run_ids(broker, ids)))


def _handovers(starts: dict[int, float], completed: dict[int, float], claimed: dict[int, float],
               job_started: dict[int, float]) -> dict[str, Any]:
    order = sorted(starts, key=starts.__getitem__)
    lat, to_claim, to_job, to_agent = [], [], [], []
    run = [(completed[t] - starts[t]) * 1000 for t in order]
    for prev, cur in itertools.pairwise(order):
        done = completed[prev]
        lat.append((starts[cur] - done) * 1000)
        to_claim.append((claimed[cur] - done) * 1000)
        to_job.append((job_started.get(cur, float("nan")) - claimed[cur]) * 1000)
        to_agent.append((starts[cur] - job_started.get(cur, float("nan"))) * 1000)
    return {
        "runs": len(order), "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99), "max_ms": max(lat),
        "stages_p50_ms": {"completion_to_claim": median(to_claim), "claim_to_job_start": median(to_job),
                          "job_start_to_agent_start": median(to_agent), "agent_start_to_completion": median(run)},
        "latencies_ms": [round(x, 2) for x in lat],
    }


def run_variant(procs: Procs, srv: BenchServer, stamps: Path, simple: bool, runs: int) -> dict[str, Any]:
    workers = procs.clawq_workers("bench", 2, simple=simple, queue=QUEUE)
    try:
        out = {name: run_scenario(procs, srv, stamps, name, runs) for name in SCENARIOS}
    finally:
        procs.stop(workers)
    for name, doc in out.items():
        print(f"{'simple' if simple else 'fork'} {name}: p50 {doc['p50_ms']:.1f} ms, p99 {doc['p99_ms']:.1f} ms",
              flush=True)
    return out


def _rows(results: dict[str, dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for workers, scenarios in results.items():
        for name, d in scenarios.items():
            s = d["stages_p50_ms"]
            rows.append([workers, name, d["runs"], d["p50_ms"], d["p99_ms"], d["max_ms"], s["completion_to_claim"],
                         s["claim_to_job_start"], s["job_start_to_agent_start"], s["agent_start_to_completion"]])
    return rows


def main() -> None:
    args = bench_args("completion -> next agent start on the freed board / slot")
    runs = 40 if args.quick else 300
    with BenchServer() as srv, tempfile.TemporaryDirectory(prefix="clawq-latency-") as tmp:
        stamps = Path(tmp) / "stamps.jsonl"
        procs = Procs(srv.url, Path(tmp), env={STAMPS_ENV: str(stamps)})
        try:
            results = {("simple" if simple else "fork"): run_variant(procs, srv, stamps, simple, runs)
                       for simple in (False, True)}
        finally:
            procs.stop()
        machine = machine_info(srv.version)
    print_table("completion -> next agent start (ms); stage medians", [
        "workers", "scenario", "runs", "p50", "p99", "max", "done->claim", "claim->job", "job->agent",
        "agent->done"],
        _rows(results))
    fork = results["fork"]
    p50 = max(fork[n]["p50_ms"] for n in SCENARIOS)
    p99 = max(fork[n]["p99_ms"] for n in SCENARIOS)
    goals = [Goal("latency p50, forking workers (worse scenario)", p50, GOAL_P50_MS, "ms"),
             Goal("latency p99, forking workers (worse scenario)", p99, GOAL_P99_MS, "ms")]
    write_report("latency", args, machine, goals, {"runs_per_scenario": runs, "results": results})


if __name__ == "__main__":
    main()
