"""e2e: N no-op tasks through ``clawq dispatch`` + K ``clawq worker`` vs N no-op jobs through plain RQ + K workers.

Both sides run warm: the workers (and, for clawq, the dispatcher of the round's fresh namespace) are up before
the clock starts. The clock runs from the first task added (``Broker.add``; the dispatcher claims as the events
arrive) or the first job enqueued (``Queue.enqueue``) until all N are done (ZCARD of in_review = N, or RQ's
finished registry holds N). The clawq tasks sit 2 per board on N/2 boards, so half are claimed at once and the
rest as their board frees; the agent is ``agent.runner: python`` with ``bench.noop_agent:done``. Each round
runs both sides (alternating which goes first), once with RQ's forking Worker and once with SimpleWorker; the
ratio clawq / RQ is per round, the median is reported. Goal (forking workers): ≤ 1.15. Each side's CPU per task
is also split by process (from /proc: the workers, their work-horses, the Redis server, the dispatcher, this
process), which says where clawq's extra time goes.

    python -m bench.e2e [--quick] [--rounds N] [--json FILE]
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from rq import Queue
from rq.job import Job
from rq.registry import FinishedJobRegistry

from clawq.broker import Broker

from . import noop_agent
from ._clawq import bench_config, new_broker
from ._common import Goal, bench_args, median, print_table, write_report
from ._jobprofile import profile_job
from ._procs import Procs, cpu_s
from ._server import BenchServer, machine_info

GOAL_RATIO = 1.15
CLAWQ_QUEUE = "bench-clawq"
RQ_QUEUE = "bench-plain"
_POLL_S = 0.002
_TIMEOUT_S = 300.0


def e2e_config(callable_: str = "bench.noop_agent:done") -> Any:
    return bench_config(agent={"runner": "python", "callable": callable_, "queue": CLAWQ_QUEUE})


def _wait(done: Any, n: int, what: str) -> None:
    deadline = time.monotonic() + _TIMEOUT_S
    while done() < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: only {done()} of {n} done after {_TIMEOUT_S:.0f} s")
        time.sleep(_POLL_S)


def run_clawq(procs: Procs, client: redis.Redis, namespace: str, n: int,
              cpu: dict[str, float] | None = None) -> float:
    """Wall seconds for N tasks through a fresh namespace (its dispatcher started and idle before the clock);
    the dispatcher's CPU seconds meanwhile go to ``cpu["dispatcher"]``."""
    broker: Broker = new_broker(client, namespace, e2e_config(), cool=False)
    dispatcher = procs.dispatcher(namespace)
    boards = max(1, n // 2)
    try:
        before = cpu_s(dispatcher.pid)[0]
        t0 = time.perf_counter()
        for i in range(n):
            broker.add(f"b{i % boards}", f"task {i}", chain="coding")
        _wait(lambda: int(client.zcard(broker.keys.in_review)), n, f"clawq {namespace}")
        wall = time.perf_counter() - t0
        if cpu is not None:
            cpu["dispatcher"] = cpu_s(dispatcher.pid)[0] - before
        return wall
    finally:
        procs.stop([dispatcher])


def run_rq(conn: redis.Redis, n: int) -> float:
    """Wall seconds for N no-op jobs through plain RQ (its workers already waiting)."""
    queue = Queue(RQ_QUEUE, connection=conn)
    registry = FinishedJobRegistry(RQ_QUEUE, connection=conn)
    conn.delete(registry.key)
    t0 = time.perf_counter()
    for _ in range(n):
        queue.enqueue(noop_agent.noop, result_ttl=86400)
    _wait(lambda: registry.get_job_count(cleanup=False), n, "plain RQ")
    return time.perf_counter() - t0


def job_ms(conn: redis.Redis, queue: str) -> float:
    """Median RQ job duration (started_at -> ended_at, ms) of the jobs in ``queue``'s finished registry."""
    registry = FinishedJobRegistry(queue, connection=conn)
    jobs = Job.fetch_many(registry.get_job_ids(cleanup=False), connection=conn)
    spans = [(j.ended_at - j.started_at).total_seconds() * 1000 for j in jobs
             if j is not None and j.started_at and j.ended_at]
    return median(spans)


def dispatcher_rate(procs: Procs, client: redis.Redis, n: int) -> float:
    """Tasks per second one dispatcher claims and enqueues with no worker running (N boards: all claimable)."""
    broker: Broker = new_broker(client, "e2e-dispatch-only", e2e_config(), cool=False)
    dispatcher = procs.dispatcher(broker.namespace)
    try:
        t0 = time.perf_counter()
        for i in range(n):
            broker.add(f"b{i}", f"task {i}", chain="coding")
        _wait(lambda: int(client.zcard(broker.keys.running)), n, "dispatch only")
        return n / (time.perf_counter() - t0)
    finally:
        procs.stop([dispatcher])


#: Where a side's CPU goes, per task (ms): the workers themselves, their work-horses (forking workers), the
#: Redis server, clawq's dispatcher, and this process (the adds, or the enqueues).
CPU_PARTS = ("worker", "horse", "redis", "dispatcher", "bench")


def _side_cpu(pids: list[int], server_pid: int) -> dict[str, float]:
    own = [cpu_s(pid) for pid in pids]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"worker": sum(c[0] for c in own), "horse": sum(c[1] for c in own), "redis": cpu_s(server_pid)[0],
            "bench": usage.ru_utime + usage.ru_stime}


def run_variant(procs: Procs, srv: BenchServer, simple: bool, n: int, k: int, rounds: int) -> dict[str, Any]:
    """Both sides, ``rounds`` times, with forking workers or SimpleWorkers; each side's CPU per task by part."""
    client, conn = srv.client(decode_responses=True), srv.client()
    tag = "simple" if simple else "fork"
    sides = {"clawq": procs.clawq_workers("bench", k, simple=simple, queue=CLAWQ_QUEUE),
             "rq": procs.rq_workers(RQ_QUEUE, k, simple=simple)}
    rows = []
    try:
        for r in range(rounds):
            order = ("clawq", "rq") if r % 2 == 0 else ("rq", "clawq")
            t: dict[str, float] = {}
            row: dict[str, float] = {}
            conn.delete(FinishedJobRegistry(CLAWQ_QUEUE, connection=conn).key)
            for side in order:
                pids = [p.pid for p in sides[side]]
                cpu: dict[str, float] = {"dispatcher": 0.0}
                before = _side_cpu(pids, srv.pid)
                t[side] = run_clawq(procs, client, f"e2e-{tag}-{r}", n, cpu) if side == "clawq" else run_rq(conn, n)
                after = _side_cpu(pids, srv.pid)
                cpu.update({part: after[part] - before[part] for part in after})
                row.update({f"{side}_cpu_ms_{part}": cpu[part] * 1000 / n for part in CPU_PARTS})
                row[f"{side}_cpu_ms"] = sum(cpu.values()) * 1000 / n
            rows.append({"clawq_s": t["clawq"], "rq_s": t["rq"], "ratio": t["clawq"] / t["rq"],
                         "clawq_job_ms": job_ms(conn, CLAWQ_QUEUE), "rq_job_ms": job_ms(conn, RQ_QUEUE),
                         **row, "cpu_ratio": row["clawq_cpu_ms"] / row["rq_cpu_ms"]})
            print(f"{tag} round {r + 1}/{rounds}: clawq {t['clawq']:.2f} s, rq {t['rq']:.2f} s", flush=True)
    finally:
        procs.stop(sides["clawq"] + sides["rq"])
    return {"workers": tag, "rounds": rows, **{key: median([x[key] for x in rows]) for key in rows[0]}}


def _print_job(job: dict[str, Any]) -> None:
    print_table(f"one clawq job in-process (no RQ, no fork): {job['wall_ms_per_job']} ms wall, "
                f"{job['round_trips_per_job']} round trips", ["round trip", "per job"],
                [[k, v] for k, v in job["round_trips"].items()])
    print_table("its steps (cProfile cumulative, profiler overhead included)", ["step", "ms/job"],
                [[r["step"], r["ms_per_job"]] for r in job["steps"]])


def main() -> None:
    args = bench_args("N no-op tasks through clawq dispatch + K workers vs plain RQ with K workers")
    n, k, rounds = (60, 2, args.rounds or 2) if args.quick else (400, 4, args.rounds or 5)
    with BenchServer() as srv, tempfile.TemporaryDirectory(prefix="clawq-e2e-") as tmp:
        procs = Procs(srv.url, Path(tmp))
        try:
            variants = [run_variant(procs, srv, simple, n, k, rounds) for simple in (False, True)]
            rate = dispatcher_rate(procs, srv.client(decode_responses=True), n)
        finally:
            procs.stop()
        job = profile_job(srv.url, 50 if args.quick else 200)
        machine = machine_info(srv.version)
    _print_job(job)
    print_table(f"{n} no-op tasks, {k} workers (median of {rounds} rounds)",
                ["workers", "clawq s", "plain RQ s", "clawq ÷ RQ", "clawq tasks/s", "RQ jobs/s", "clawq job ms",
                 "RQ job ms"],
                [[v["workers"], v["clawq_s"], v["rq_s"], v["ratio"], n / v["clawq_s"], n / v["rq_s"],
                  v["clawq_job_ms"], v["rq_job_ms"]] for v in variants])
    print_table(f"CPU ms per task, by process (median of {rounds} rounds; the machine's 2 cores are shared by all)",
                ["workers", "side", *CPU_PARTS, "total"],
                [[v["workers"], side, *(v[f"{side}_cpu_ms_{part}"] for part in CPU_PARTS), v[f"{side}_cpu_ms"]]
                 for v in variants for side in ("clawq", "rq")])
    print(f"CPU per task clawq ÷ RQ: {variants[0]['cpu_ratio']:.2f} (forking), {variants[1]['cpu_ratio']:.2f} (simple)")
    print(f"one dispatcher alone (no workers) claims and enqueues {rate:.0f} tasks/s")
    goals = [Goal("e2e wall time clawq / plain RQ (forking workers)", variants[0]["ratio"], GOAL_RATIO, "x")]
    details = {"tasks": n, "workers": k, "rounds": rounds, "variants": variants,
               "simple_worker_ratio": variants[1]["ratio"], "job_profile": job, "dispatcher_tasks_per_s": rate}
    write_report("e2e", args, machine, goals, details)


if __name__ == "__main__":
    main()
