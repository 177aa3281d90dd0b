"""What one clawq agent job costs, in-process (no RQ, no fork): wall ms, its steps, its Redis commands.

``workers.job.run_task`` runs N times on claimed tasks of a fresh namespace with a no-op python agent; the
round trips it sends are counted on the client (one per packet: a pipeline is one), the time of its steps from
cProfile (cumulative, so profiler overhead included: compare the steps with each other, the wall figure is
unprofiled). As in a worker, the process keeps one broker per namespace: the first job of each namespace
connects (its HELLO and HGET schema show as fractions per job), the others reuse it.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import re
import time
from collections import Counter
from typing import Any

import redis
from redis.connection import AbstractConnection

from ._clawq import bench_config, new_broker

__all__ = ["profile_job"]

#: (label, file suffix, function name) of the steps reported
STEPS = (
    ("run_task (whole job)", "workers/job.py", "run_task"),
    ("job_broker (one per process and namespace)", "workers/job.py", "job_broker"),
    ("  Broker.from_url + connect (first job only)", "broker/broker.py", "from_url"),
    ("  redis-py driver info (per new client)", "redis/driver_info.py", "resolve_driver_info"),
    ("Broker.start_run (MULTI: heartbeat, task, config version, claim-to-start)", "broker/broker.py", "start_run"),
    ("  Broker._reload_config (only when the version changed)", "broker/broker.py", "_reload_config"),
    ("Broker._ensure_ready (never on the worker path)", "broker/broker.py", "_ensure_ready"),
    ("run_agent (python runner, no-op agent)", "workers/runners.py", "run_agent"),
    ("  Thread.start (a python agent runs on the job's thread: none unless it outlives a tick)", "threading.py",
     "start"),
    ("Broker.save_run_log (only when the agent logged)", "broker/broker.py", "save_run_log"),
    ("report -> Broker.complete", "workers/report.py", "report"),
)


def _config() -> Any:
    return bench_config(agent={"runner": "python", "callable": "bench.noop_agent:done"})


def _claims(client: redis.Redis, namespace: str, n: int) -> list[tuple[int, str]]:
    broker = new_broker(client, namespace, _config(), cool=False)
    for i in range(n):
        broker.add(f"b{i}", f"t{i}", chain="coding")
    return [(c.task_id, c.run_id) for c in (broker.claim() for _ in range(n))]


def _step_ms(stats: pstats.Stats, n: int) -> list[dict[str, Any]]:
    table: dict[tuple[str, int, str], Any] = stats.stats  # type: ignore[attr-defined]
    rows = []
    for label, path, func in STEPS:
        cum = sum(v[3] for (file, _, name), v in table.items() if file.endswith(path) and name == func)
        rows.append({"step": label, "ms_per_job": round(cum * 1000 / n, 3)})
    return rows


class _RoundTrips:
    """Counts what redis-py sends, one packet per round trip (a pipeline is one), by command names."""

    _NAME = re.compile(rb"\*\d+\r\n\$\d+\r\n([A-Za-z]+)\r\n(?:\$\d+\r\n([A-Za-z_]+)\r\n)?")

    def __init__(self) -> None:
        self.packets: Counter[str] = Counter()
        self._orig: Any = None

    def __enter__(self) -> _RoundTrips:
        cls: Any = AbstractConnection
        self._orig = orig = cls.send_packed_command
        packets = self.packets
        name_re = self._NAME

        def send(conn: Any, command: Any, check_health: bool = True) -> Any:
            data = command if isinstance(command, bytes | str) else b"".join(
                c if isinstance(c, bytes) else bytes(c) for c in command)
            raw = data.encode() if isinstance(data, str) else data
            names = [(a + (b" " + b if a.upper() == b"CLIENT" else b"")).decode().upper()
                     for a, b in name_re.findall(raw)]
            packets[" ".join(names) or "?"] += 1
            return orig(conn, command, check_health)

        cls.send_packed_command = send
        return self

    def __exit__(self, *exc: object) -> None:
        cls: Any = AbstractConnection
        cls.send_packed_command = self._orig


def profile_job(url: str, n: int) -> dict[str, Any]:
    """Per-job wall ms (unprofiled), round trips per job by what they send, and profiled ms per step."""
    from clawq.workers.job import run_task

    os.environ["CLAWQ_REDIS_URL"] = url
    client = redis.Redis.from_url(url, decode_responses=True)
    plain = _claims(client, "jobprof-a", n)
    t0 = time.perf_counter()
    for tid, rid in plain:
        run_task("jobprof-a", tid, rid)
    wall_ms = (time.perf_counter() - t0) * 1000 / n
    counted = _claims(client, "jobprof-b", n)
    with _RoundTrips() as trips:
        for tid, rid in counted:
            run_task("jobprof-b", tid, rid)
    profiled = _claims(client, "jobprof-c", n)
    prof = cProfile.Profile()
    prof.enable()
    for tid, rid in profiled:
        run_task("jobprof-c", tid, rid)
    prof.disable()
    client.close()
    return {"jobs": n, "wall_ms_per_job": round(wall_ms, 2),
            "round_trips_per_job": round(sum(trips.packets.values()) / n, 2),
            "round_trips": {k: v / n for k, v in trips.packets.most_common()},
            "steps": _step_ms(pstats.Stats(prof), n)}
